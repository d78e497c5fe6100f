"""Fold a constant scale of a routed MoE's output into its down projection: one node less per MoE layer.

    y = Mul(MoE(x, probs, fc1, -, fc2), c)        ->  MoE(x, probs, fc1, -, c * fc2)
    y = Mul(QMoE(..., q2, s2, ...), c)            ->  QMoE(..., q2, c * s2, ...)   (int blocks: scale the scales)

The lowering multiplies the routed experts' sum by DeepSeek's `routed_scaling_factor`; the output of an expert
is linear in its fc2 (and its block scales), and the routing weights do not depend on fc2, so the product is
the same up to float rounding (c * w rounded once instead of c * (w . a); relative 6e-8). Only a scalar
constant c whose Mul is the MoE output's sole reader, with fc2 (or fc2_scales) an initializer read by nothing
else, is folded.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx_ir as ir

from r1c.passes._util import ORT_DOMAIN, const_scalar

logger = logging.getLogger(__name__)

SCALED_INPUT = {"MoE": 4, "QMoE": 6}  # fc2_experts_weights (float MoE), fc2_scales (QMoE)


def _scaled(tensor: ir.TensorProtocol, factor: float) -> ir.TensorProtocol:
    array = tensor.numpy()
    return ir.tensor(np.ascontiguousarray(array * np.asarray(factor, dtype=array.dtype)))


class FoldMoEOutputScalePass(ir.passes.InPlacePass):
    """Mul(MoE/QMoE, scalar constant) -> the MoE with its fc2 (or fc2 scales) times the constant."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            index = SCALED_INPUT.get(node.op_type) if node.domain == ORT_DOMAIN else None
            if index is None or len(node.inputs) <= index:
                continue
            out = node.outputs[0]
            uses = list(out.uses())
            if len(uses) != 1 or out.is_graph_output():
                continue
            mul = uses[0].node
            if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx"):
                continue
            factor = const_scalar(mul.inputs[1 - uses[0].idx])
            target = node.inputs[index]
            if factor is None or target is None or target.const_value is None or len(target.uses()) != 1:
                continue
            source, name = target.const_value, target.name or f"{node.name}.fc2"
            lazy = ir.LazyTensor(functools.partial(_scaled, source, factor), dtype=source.dtype,
                                 shape=ir.Shape(source.shape.numpy()), name=name)
            graph.initializers.pop(name)  # the scaled tensor takes the name of the one it replaces
            value = ir.Value(name=name, shape=lazy.shape, type=ir.TensorType(lazy.dtype), const_value=lazy)
            graph.register_initializer(value)
            node.replace_input_with(index, value)
            result = mul.outputs[0]
            ir.convenience.replace_all_uses_with(result, out, replace_graph_outputs=True)
            result_name = result.name
            graph.remove(mul, safe=True)
            out.name = result_name
            count += 1
        logger.info("fold_moe_output_scale: %d MoE output scale(s) folded", count)
        return ir.passes.PassResult(model, count > 0)
