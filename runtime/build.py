"""`r1c build`: turn an exported model directory into an engine bundle for one target."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from r1c.config import ModelConfig
from r1c.errors import BuildError
from r1c.manifest import TARGETS, Manifest, file_records, host_device
from r1c.outdir import atomic_output_dir, check_output_dir

logger = logging.getLogger(__name__)

EXPORT_FILES = ("model.onnx", "graph_io.json", "config.json")


def _read_export(export_dir: Path) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    if not export_dir.is_dir():
        raise BuildError(f"build: {export_dir} is not a directory (expected the output of `r1c export`)")
    for name in EXPORT_FILES:
        if not (export_dir / name).is_file():
            raise BuildError(f"build: {export_dir} has no {name} (expected the output of `r1c export`)")
    config = ModelConfig.from_json(export_dir / "config.json")
    graph_io = json.loads((export_dir / "graph_io.json").read_text())
    source_path = export_dir / "source.json"
    source = json.loads(source_path.read_text()) if source_path.is_file() else {}
    return config, graph_io, source


def _lower(export_dir: Path, work: Path, target: str, dump_after: str | None, dump_dir: Path, verbose: bool) -> None:
    """Run the target's pass pipeline from export_dir/model.onnx into work/model.onnx (+ data)."""
    from r1c.passes.pipelines import lower_file

    lower_file(export_dir / "model.onnx", work / "model.onnx", target=target, dump_after=dump_after,
               dump_dir=dump_dir if dump_after else None, verbose=verbose)


def build_bundle(export_dir: str | Path, out_dir: str | Path, *, target: str = "onnxruntime",
                 session: dict[str, Any] | None = None, dump_after: str | None = None,
                 verbose: bool = False) -> Path:
    """Build `out_dir` (created whole or not at all) from the export at `export_dir`."""
    src, out = Path(export_dir), Path(out_dir)
    if target not in TARGETS:
        raise BuildError(f"build: unknown target {target!r} (choose from {', '.join(TARGETS)})")
    check_output_dir(out, BuildError, "build")
    config, graph_io, source = _read_export(src)
    dumps = out.with_name(out.name + ".dumps")  # --dump-after writes here, beside the bundle
    with atomic_output_dir(out, BuildError, "build") as tmp:
        libraries: dict[str, str] = {}
        target_options: dict[str, Any]
        if target == "onnxruntime":
            import onnxruntime as ort

            from r1c.runtime.ort_backend import DEFAULT_OPTIONS, OrtBackend

            _lower(src, tmp, target, dump_after, dumps, verbose)
            libraries["onnxruntime"] = ort.__version__
            target_options = {"model": "model.onnx", "session": {**DEFAULT_OPTIONS, **(session or {})}}
            # Load once now so a bundle that ONNX Runtime cannot run is never written.
            OrtBackend(tmp / "model.onnx", target_options["session"])
        else:
            from r1c.runtime.trt_build import build_tensorrt

            _lower(src, tmp, target, dump_after, dumps, verbose)
            target_options, libraries = build_tensorrt(tmp, config)
        import onnx

        from r1c.runtime.serving.text import copy_tokenizer_files

        copy_tokenizer_files(src, tmp)  # tokenizer.json & co. from the export, hashed in the manifest like the rest
        libraries["onnx"] = onnx.__version__
        files, sizes, fingerprints = file_records(tmp)  # hashed once, here; a load checks sizes + fingerprints
        manifest = Manifest(
            target=target,
            precision=graph_io.get("weights_quant", "none"),
            model_config=config.to_hf_dict(),
            config_hash=config.hash(),
            graph_io=graph_io,
            files=files,
            libraries=libraries,
            device=host_device(),
            target_options=target_options,
            source=source,
            file_sizes=sizes,
            file_fingerprints=fingerprints,
        )
        manifest.write(tmp)
    logger.info("built %s bundle at %s", target, out)
    return out
