"""Residual add + RMSNorm as one ONNX Runtime kernel: `com.microsoft.SkipSimplifiedLayerNormalization`.

    s = Add(x, y)                       the residual stream (also read by the next residual add)
    n = SimplifiedLayerNormalization(s, gamma; epsilon)
->  n, _, _, s = SkipSimplifiedLayerNormalization(x, y, gamma; epsilon)

ORT's kernel returns the sum as its 4th output (`input_skip_bias_sum`), so the other readers of s read that.
One node per residual instead of two; the arithmetic is the same (the sum, then RMSNorm of it in float32).
Matched when both addends are float32 tensors of rank 2 or 3 with the same static last dimension as gamma
(the kernel's contract); run after `fuse_rmsnorm` in the `onnxruntime` pipeline.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from r1c.passes._util import ORT_DOMAIN

logger = logging.getLogger(__name__)


def _last_dim(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None or value.shape.rank() not in (2, 3):
        return None
    dim = value.shape[-1]
    return dim if isinstance(dim, int) else None


class FuseSkipRMSNormPass(ir.passes.InPlacePass):
    """Add + SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization (sum exposed for the residual)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for norm in list(graph):
            if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx"):
                continue
            total, gamma = norm.inputs[0], norm.inputs[1]
            add = None if total is None else total.producer()
            if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or gamma is None:
                continue
            x, y = add.inputs[0], add.inputs[1]
            dims = {_last_dim(x), _last_dim(y), None if gamma.shape is None else gamma.shape[-1]}
            if x is None or y is None or len(dims) != 1 or None in dims or x.shape.rank() != y.shape.rank():  # type: ignore[union-attr]
                logger.info("fuse_skip_rmsnorm: %s left as it is: addends and weight disagree in shape", norm.name)
                continue
            if x.dtype != ir.DataType.FLOAT or y.dtype != ir.DataType.FLOAT:
                continue
            eps = norm.attributes.get("epsilon")
            attrs = {"epsilon": eps.as_float()} if eps is not None else {}
            label = norm.name or norm.outputs[0].name or f"rmsnorm{count}"
            fused = ir.node("SkipSimplifiedLayerNormalization", [x, y, gamma], attrs, domain=ORT_DOMAIN,
                            num_outputs=4, name=f"{label}.skip", version=1)
            graph.insert_before(add, fused)
            out, _, _, sum_out = fused.outputs
            for new, old in ((out, norm.outputs[0]), (sum_out, add.outputs[0])):
                new.shape, new.dtype = old.shape, ir.DataType.FLOAT
            names = (norm.outputs[0].name, add.outputs[0].name)
            ir.convenience.replace_all_uses_with(norm.outputs[0], out, replace_graph_outputs=True)
            graph.remove(norm, safe=True)
            ir.convenience.replace_all_uses_with(add.outputs[0], sum_out, replace_graph_outputs=True)
            graph.remove(add, safe=True)
            out.name, sum_out.name = names
            fused.outputs[1].name, fused.outputs[2].name = f"{fused.name}.mean", f"{fused.name}.inv_std"
            count += 1
        logger.info("fuse_skip_rmsnorm: %d residual add(s) fused into their RMSNorm", count)
        return ir.passes.PassResult(model, count > 0)
