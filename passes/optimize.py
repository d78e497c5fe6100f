"""`r1c optimize`: a foreign ONNX model in, an r1c model directory out (whole or not at all)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from r1c.errors import PassError
from r1c.outdir import atomic_output_dir
from r1c.passes.pipelines import MODEL_FILE, PassStats, lower_file

logger = logging.getLogger(__name__)

REPORT_FILE = "passes.json"


def optimize(foreign: str | Path, out_dir: str | Path, *, target: str = "r1c", dump_after: str | None = None,
             verbose: bool = False) -> Path:
    """Runs the `target` pipeline on `foreign` and writes `out_dir/model.onnx` (+ `.data`, `passes.json`).

    target `r1c` (default) gives the r1c form (standard ONNX + r1c ops with their function bodies) that
    `r1c build` takes; `onnxruntime` / `tensorrt` give that target's lowered model. `out_dir` must not
    exist or be empty; everything is written in a sibling temp dir, then renamed. With `dump_after`, the
    model after that pass goes to `out_dir/dumps/`. Returns the path of the written model.
    """
    src, out = Path(foreign), Path(out_dir)
    with atomic_output_dir(out, PassError, "optimize") as tmp:
        stats: list[PassStats] = []
        lower_file(src, tmp / MODEL_FILE, target=target, dump_after=dump_after,
                   dump_dir=tmp / "dumps" if dump_after else None, verbose=verbose, stats=stats)
        passes = [{"name": s.name, "modified": s.modified, "nodes": s.nodes} for s in stats]  # no timings:
        report = {"source": src.name, "target": target, "passes": passes}  # same input -> same bytes
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("optimized %s -> %s (%s)", src, out, target)
    return out / MODEL_FILE
