"""Shape and type inference (ONNX's, through onnx_ir's pass) that fills gaps without erasing known shapes.

ONNX's inference names the symbolic dims it cannot relate (`unk__3`); the exporter's own symbols
(`batch`, `seq*batch`) say more, so a shape that was already fully known is kept as it was.
Non-strict: ops ONNX does not know (ONNX Runtime contrib ops) are skipped rather than failing the pass.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass


def _fully_known(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and all(isinstance(d, int) or (d.value is not None) for d in shape.dims)


class InferShapesPass(ShapeInferencePass):
    """ShapeInferencePass(strict_mode=False) that keeps every shape that was already fully known."""

    def __init__(self) -> None:
        super().__init__(check_type=False, strict_mode=False, data_prop=True)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        known = {v: v.shape for g in model.graphs() for v in _values(g) if _fully_known(v)}
        result = super().call(model)
        for value, shape in known.items():
            value.shape = shape
        return ir.passes.PassResult(model, result.modified)


def _values(graph: ir.Graph) -> list[ir.Value]:
    values = [*graph.inputs, *graph.initializers.values()]
    for node in graph:
        values.extend(v for v in node.outputs)
    return values
