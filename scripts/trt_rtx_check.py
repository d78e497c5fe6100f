"""Prove on any machine (no GPU needed) that an r1c export parses and builds with TensorRT for RTX.

    python scripts/trt_rtx_check.py out/tiny [--arch sm89] [--lowered] [--no-build] [--json]

`--lowered` runs the `tensorrt` pass pipeline first (what `r1c build --target tensorrt-rtx` hands TensorRT: FP8
linear layers as r1c::FP8Linear plugin layers); without it the export is parsed as written (function bodies
dropped). Needs `pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`. Exits non-zero when the model does
not parse, an r1c node did not become a plugin layer, or the engine does not build.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import click

from r1c.config import ModelConfig
from r1c.errors import R1CError
from r1c.runtime.trt_rtx import check_with_tensorrt_rtx
from r1c.targets import DEFAULT_RTX_COMPUTE_CAPABILITY


@click.command(help=__doc__.splitlines()[0] if __doc__ else None)
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--arch", default=DEFAULT_RTX_COMPUTE_CAPABILITY, show_default=True)
@click.option("--lowered", is_flag=True, help="run the tensorrt pass pipeline first")
@click.option("--no-build", is_flag=True, help="parse and check the plugin layers only")
@click.option("--max-batch", type=int, default=8, show_default=True)
@click.option("--max-seq", type=int, default=None)
@click.option("--max-capacity", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="print the whole report as JSON")
def main(export_dir: Path, arch: str, lowered: bool, no_build: bool, max_batch: int, max_seq: int | None,
         max_capacity: int | None, as_json: bool) -> None:
    try:
        config = ModelConfig.from_json(export_dir / "config.json")
        with tempfile.TemporaryDirectory(prefix="r1c-rtx-check-") as tmp:
            model = export_dir / "model.onnx"
            if lowered:
                from r1c.passes.pipelines import lower_file

                model = lower_file(model, Path(tmp) / "model.onnx", target="tensorrt")
            report = check_with_tensorrt_rtx(model, config, compute_capability=arch, build=not no_build,
                                             max_batch=max_batch, max_seq=max_seq, max_capacity=max_capacity)
    except R1CError as e:
        click.echo(f"trt_rtx_check: error: {e}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        click.echo(f"{report.tensorrt} ({report.parser}), target {report.compute_capability}, fp8={report.fp8}")
        click.echo(f"{report.onnx_nodes} ONNX nodes -> {report.layers} layers in {report.parse_seconds} s")
        for p in report.plugin_layers:
            click.echo(f"  {p['name']:40} {p['plugin']:16} outputs {p['output_shapes']} {p['output_dtypes']}")
        if not no_build:
            click.echo(f"engine: {report.engine_bytes} bytes in {report.build_seconds} s" if report.build_error is None
                       else f"build FAILED: {report.build_error}")
    sys.exit(0 if report.build_error is None else 2)


if __name__ == "__main__":
    main()
