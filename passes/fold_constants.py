"""Constant folding that never unfolds the weights.

Wraps onnxscript's folder (with its partial evaluation of Shape/Reshape/Concat chains on static dims) and
adds r1c's guards: a node is never folded when one of its constant inputs is FP8 or another low-precision
type (an FP8 weight must not become float32 on disk), when it widens a large constant (Cast, CastLike,
DequantizeLinear), when it belongs to a custom domain, or when a large Transpose would be materialised
(onnxscript folds those regardless of size). Large results are never stored: see OUTPUT_SIZE_LIMIT.
A node that one of onnxscript's evaluators cannot handle (e.g. `SplitToSequence` with a computed `split`) is
left untouched instead of failing the pass.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir
from onnxscript.optimizer._constant_folding import FoldConstantsPass as _OnnxscriptFoldConstants

logger = logging.getLogger(__name__)

INPUT_SIZE_LIMIT = 8192  # elements: larger constant inputs are weights; their consumers are left alone
OUTPUT_SIZE_LIMIT = 65536  # elements: a folded result larger than this is not stored
LOW_PRECISION = frozenset({
    ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ,
    ir.DataType.FLOAT8E8M0, ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1, ir.DataType.INT2,
    ir.DataType.UINT2,
})
WIDENING_OPS = frozenset({"Cast", "CastLike", "DequantizeLinear"})


def _keep_weights_folded(node: ir.Node) -> bool | None:
    """False: never fold this node; None: let onnxscript's size rules decide."""
    if node.domain not in ("", "ai.onnx"):
        return False
    constants = [v.const_value for v in node.inputs if v is not None and v.const_value is not None]
    if any(t.dtype in LOW_PRECISION for t in constants):
        return False
    largest = max((t.size for t in constants), default=0)
    if node.op_type in WIDENING_OPS and largest > INPUT_SIZE_LIMIT:
        return False
    if node.op_type == "Transpose" and largest > INPUT_SIZE_LIMIT:
        return False
    return None


class FoldConstantsPass(_OnnxscriptFoldConstants):
    """onnxscript's constant folding with r1c's weight guards and size limits; nodes it fails on stay as they are."""

    def __init__(self) -> None:
        super().__init__(shape_inference=True, input_size_limit=INPUT_SIZE_LIMIT,
                         output_size_limit=OUTPUT_SIZE_LIMIT, should_fold=_keep_weights_folded)

    def process_node(self, node: ir.Node, is_function: bool) -> Any:
        try:
            return super().process_node(node, is_function)
        except RuntimeError as e:  # onnxscript wraps an evaluator's failure in a RuntimeError naming the node
            cause = e.__cause__ if e.__cause__ is not None else e
            logger.debug("fold_constants: left %s (%s) untouched: %s: %s", node.name, node.op_type,
                         type(cause).__name__, cause, extra={"untouched": True})
            return None
