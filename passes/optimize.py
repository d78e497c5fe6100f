"""`r1c optimize`: a foreign ONNX model in, an r1c model directory out (whole or not at all).

The directory holds the optimized `model.onnx` (+ `.data`), `passes.json` (what each pass did) and, so that
`r1c build` and the runtime can serve it, `graph_io.json`: for an r1c export, the one beside the input (with
its `config.json`: passes do not change the graph's I/O); for a foreign model, a description made from the
graph itself (r1c/graph_io.py `describe_foreign`). A graph that is no causal language model (no input_ids,
no logits) is still optimized; it just gets no graph_io.json, and `passes.json` says why.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import onnx_ir as ir

from r1c import graph_io
from r1c.errors import PassError
from r1c.outdir import atomic_output_dir

logger = logging.getLogger(__name__)

REPORT_FILE = "passes.json"
R1C_EXPORT_FILES = (graph_io.FILE, "config.json")


def _describe(src: Path, model_path: Path, out: Path) -> dict[str, Any]:
    """Write out/graph_io.json (see the module docstring); returns what passes.json records about it."""
    if all((src.parent / name).is_file() for name in R1C_EXPORT_FILES):
        for name in R1C_EXPORT_FILES:
            shutil.copyfile(src.parent / name, out / name)
        return {"kind": "r1c", "from": f"{graph_io.FILE} beside the input"}
    try:
        description = graph_io.describe_foreign(ir.load(model_path), PassError)
    except PassError as e:
        logger.warning("no %s written (`r1c build` needs one): %s", graph_io.FILE, e)
        return {"kind": None, "reason": str(e)}
    (out / graph_io.FILE).write_text(json.dumps(description, indent=2) + "\n")
    cache = description["kv_cache"]
    return {"kind": graph_io.FOREIGN, "kv_cache": cache["kind"] if cache else None}


def optimize(foreign: str | Path, out_dir: str | Path, *, target: str = "r1c", dump_after: str | None = None,
             verbose: bool = False, progress: bool = False) -> Path:
    """Runs the `target` pipeline on `foreign` and writes `out_dir/model.onnx` (+ `.data`, `passes.json`,
    `graph_io.json`).

    target `r1c` (default) gives the r1c form (standard ONNX + r1c ops with their function bodies) that
    `r1c build` takes; `onnxruntime` / `tensorrt` give that target's lowered model. `out_dir` must not
    exist or be empty; everything is written in a sibling temp dir, then renamed. With `dump_after`, the
    model after that pass goes to `out_dir/dumps/`. Returns the path of the written model.
    Raises PassError (bad input, a pass that failed).
    """
    from r1c.passes.pipelines import MODEL_FILE, PassStats, lower_file

    src, out = Path(foreign), Path(out_dir)
    with atomic_output_dir(out, PassError, "optimize") as tmp:
        stats: list[PassStats] = []
        lower_file(src, tmp / MODEL_FILE, target=target, dump_after=dump_after,
                   dump_dir=tmp / "dumps" if dump_after else None, verbose=verbose, stats=stats, progress=progress)
        described = _describe(src, tmp / MODEL_FILE, tmp)
        passes = [{"name": s.name, "modified": s.modified, "nodes": s.nodes} for s in stats]  # no timings:
        report = {"source": src.name, "target": target, "passes": passes, "graph_io": described}  # same bytes
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("optimized %s -> %s (%s)", src, out, target)
    return out / MODEL_FILE
