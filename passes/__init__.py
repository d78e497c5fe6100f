"""r1c.passes: graph passes over ONNX, one pass per module, composed into one pipeline per target.

Public API:
    pipeline(target) -> list of onnx_ir passes          PIPELINES, TARGETS, pass_name(pass)
    run_pipeline(model, target, *, dump_after, dump_dir, verbose) -> onnx_ir.Model
    lower_file(src, dst, *, target, ...) -> Path         (used by `r1c build`)
    optimize(foreign, out_dir, *, target="r1c", ...) -> Path
    inspect_model(path) -> dict
CLI commands (registered by r1c.cli): r1c.cli_passes.inspect_cmd, passes_cmd, optimize_cmd.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from r1c.passes.inspect_model import inspect_model
from r1c.passes.optimize import optimize

if TYPE_CHECKING:
    from r1c.passes.pipelines import PIPELINES, TARGETS, lower_file, pass_name, pipeline, run_pipeline

__all__ = ["PIPELINES", "TARGETS", "inspect_model", "lower_file", "optimize", "pass_name", "pipeline", "run_pipeline"]


def __getattr__(name: str) -> Any:
    """The pipelines (and with them every pass, onnxscript's rewriter, the plugins) load on first use, so that
    `r1c inspect` starts without them."""
    if name in __all__:
        return getattr(importlib.import_module("r1c.passes.pipelines"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
