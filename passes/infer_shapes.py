"""Shape and type inference (ONNX's) that fills gaps without erasing what is known.

ONNX's inference names the symbolic dims it cannot relate (`unk__3`); the exporter's own symbols
(`batch`, `seq*batch`) say more, so a shape that was already fully known is kept as it was. A value's
declared type is never replaced; a value without one takes the inferred type whole (a sequence or an
optional stays one: onnx_ir's own merge sets only the element dtype, which turns a sequence-valued `If`
inside a `Loop` body into a tensor that ONNX Runtime then rejects). Non-strict: ops ONNX does not know
(ONNX Runtime contrib ops) are skipped; when inference fails as a whole the model is left untouched.
"""

from __future__ import annotations

import functools
import logging

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

logger = logging.getLogger(__name__)


def _fully_known(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and all(isinstance(d, int) or (d.value is not None) for d in shape.dims)


def _merge(value: ir.Value, inferred: ir.Value) -> bool:
    """Fill `value`'s missing type and not fully known shape from `inferred`; True when something changed."""
    modified = False
    if value.type is None and inferred.type is not None:
        value.type = inferred.type
        modified = True
    same_kind = value.type is not None and inferred.type is not None and (
        type(value.type) is type(inferred.type))
    if same_kind and inferred.shape is not None and not _fully_known(value) and value.shape != inferred.shape:
        value.shape = inferred.shape
        modified = True
    return modified


class InferShapesPass(ir.passes.InPlacePass):
    """ONNX shape inference (non-strict, with data propagation), merged so that nothing known is erased."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        infer = functools.partial(onnx.shape_inference.infer_shapes, check_type=False, strict_mode=False,
                                  data_prop=True)
        try:
            inferred_proto = _c_api_utils.call_onnx_api(infer, model)
        except Exception as e:  # onnx raises its own error types; inference is an optimization, not a check
            logger.debug("shape inference failed, model left untouched: %s", e, extra={"untouched": True})
            return ir.passes.PassResult(model, False)
        inferred_model = ir.serde.deserialize_model(inferred_proto)
        modified = False
        for graph, inferred_graph in zip(model.graphs(), inferred_model.graphs()):
            inferred_values = ir.convenience.create_value_mapping(inferred_graph)
            for name, value in ir.convenience.create_value_mapping(graph).items():
                if name in inferred_values:
                    modified = _merge(value, inferred_values[name]) or modified
        return ir.passes.PassResult(model, modified)
