"""Prove on any machine (no GPU needed) that an r1c export parses and builds with TensorRT for RTX.

    python scripts/trt_rtx_check.py out/tiny [--compute-capability SM89] [--no-build] [--json]

Needs `pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`. Exits non-zero when the model does not
parse, an r1c node did not become a plugin layer, or the engine does not build.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from r1c.config import ModelConfig
from r1c.errors import R1CError
from r1c.runtime.trt_build import DEFAULT_RTX_COMPUTE_CAPABILITY, check_with_tensorrt_rtx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path, help="output of `r1c export` (model.onnx, config.json)")
    ap.add_argument("--compute-capability", default=DEFAULT_RTX_COMPUTE_CAPABILITY)
    ap.add_argument("--no-build", action="store_true", help="parse and check the plugin layers only")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seq", type=int, default=None)
    ap.add_argument("--max-capacity", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = ap.parse_args()
    try:
        config = ModelConfig.from_json(args.export_dir / "config.json")
        report = check_with_tensorrt_rtx(args.export_dir / "model.onnx", config,
                                         compute_capability=args.compute_capability, build=not args.no_build,
                                         max_batch=args.max_batch, max_seq=args.max_seq,
                                         max_capacity=args.max_capacity)
    except R1CError as e:
        print(f"trt_rtx_check: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(f"{report.tensorrt}, target {report.compute_capability}, fp8={report.fp8}")
        print(f"{report.onnx_nodes} ONNX nodes -> {report.layers} layers in {report.parse_seconds} s")
        for p in report.plugin_layers:
            print(f"  {p['name']:32} {p['plugin']:16} outputs {p['output_shapes']} {p['output_dtypes']}")
        if not args.no_build:
            print(f"engine: {report.engine_bytes} bytes in {report.build_seconds} s" if report.build_error is None
                  else f"build FAILED: {report.build_error}")
    return 0 if report.build_error is None else 2


if __name__ == "__main__":
    sys.exit(main())
