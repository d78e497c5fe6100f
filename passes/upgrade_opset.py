"""Raise the ONNX opset a foreign model imports to the one an r1c op body is written at (21); never lower it.

The function bodies of `r1c::MoERouter` / `r1c::MoEExperts` import `ai.onnx` 21, and ONNX Runtime requires a
model-local function and its model to import the same version. So when a fusion puts an r1c op into a model
below 21 (a stock `torch.onnx` export is at 18, its native opset, or at what `opset_version` asked for),
`ensure_function` converts the model up first. Models no fusion touches keep their opset.

The conversion is ONNX's own version converter (`onnx.version_converter`: the reference adapters for every
op change since opset 1; it passes nodes of other domains through), run on the graph without its large
initializers (onnx_ir's helper for ONNX's C API). A model it cannot convert is refused with its reason.
"""

from __future__ import annotations

import functools
import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from r1c.errors import PassError

logger = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx")


def onnx_opset(model: ir.Model) -> int | None:
    """The `ai.onnx` version the model imports (None when it imports none)."""
    versions = {v for d, v in model.opset_imports.items() if d in ONNX_DOMAINS}
    if len(versions) > 1:
        raise PassError(f"the model imports two ONNX opsets ({sorted(versions)})")
    return versions.pop() if versions else None


def upgrade_opset(model: ir.Model, version: int, why: str) -> None:
    """Converts `model` (in place) from its lower ONNX opset to `version`; PassError when ONNX cannot."""
    have = onnx_opset(model)
    if have is None or have >= version:
        return
    if model.functions:
        raise PassError(f"{why} needs ONNX opset {version}; the model imports {have} and has model-local "
                        "functions, which ONNX's version converter does not convert (convert the model first)")
    try:
        converted = _c_api_utils.call_onnx_api(
            functools.partial(onnx.version_converter.convert_version, target_version=version), model)
    except Exception as e:  # the converter raises RuntimeError with its C++ assertion text
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise PassError(f"{why} needs ONNX opset {version}; converting the model from {have} failed: "
                        f"{reason}") from None
    _adopt(model, ir.serde.deserialize_model(converted))
    logger.info("converted the model from ONNX opset %d to %d (%s)", have, version, why)


def _adopt(model: ir.Model, converted: ir.Model) -> None:
    """Moves the converted graph into `model`, with the initializers (whose data stayed in `model`) back in it."""
    n_inputs = len(model.graph.inputs)
    for value in converted.graph.inputs:  # the C API call turned initializers into inputs, large ones without data
        original = model.graph.initializers.get(value.name or "")
        if original is not None and value.name not in converted.graph.initializers:
            value.const_value = original.const_value
            converted.graph.register_initializer(value)
    user_inputs = list(converted.graph.inputs[:n_inputs])
    converted.graph.inputs.clear()
    converted.graph.inputs.extend(user_inputs)
    for domain in ("ai.onnx",):
        converted.graph.opset_imports.pop(domain, None)
    model.graph = converted.graph
    model.ir_version = max(model.ir_version, converted.ir_version)
