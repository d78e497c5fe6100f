"""FP8 routed experts become float32 `r1c::MoEExperts` for a target with no FP8 expert kernel (ONNX Runtime's CPU).

ONNX Runtime 1.32 has no CPU kernel for FP8 MoE, so an FP8 `r1c::MoEExperts` node would otherwise run its
function body, which computes *every* expert densely. Dequantized (w_fp8 * its 128x128 block scale, the op's
own definition: `r1c.plugins.fp8.dequantize`), the node is lowered to ORT's MoE like any float32 block, which
runs only the chosen experts; `quantize_weights` then stores those weights as int8 blocks (1 byte a weight,
the default for an FP8 export) unless the build asks for float32. The float32 weights are made lazily, one
tensor at a time, when a later pass or the writer reads them; their names carry FROM_FP8, which is how
`quantize_weights` knows, under precision "auto", that the checkpoint stored them in 1 byte.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx_ir as ir

from r1c.passes._util import is_r1c
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC

logger = logging.getLogger(__name__)

FROM_FP8 = ".from_fp8"  # in the names of the float32 weights made here (and of what later passes derive from them)


def _dequantized(weight: ir.TensorProtocol, scale: ir.TensorProtocol) -> ir.TensorProtocol:
    import torch

    from r1c.plugins.fp8 import dequantize

    bits = np.array(weight.numpy()).view(np.uint8)  # a writable copy for torch
    w = torch.from_numpy(bits).view(torch.float8_e4m3fn)
    return ir.tensor(dequantize(w, torch.from_numpy(np.array(scale.numpy(), np.float32))).numpy())


class DequantizeFP8ExpertsPass(ir.passes.InPlacePass):
    """Rewrites every FP8 `r1c::MoEExperts` (quant=fp8_block128) to quant=none with float32 weights."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if not is_r1c(node, EXPERTS_SPEC) or node.attributes.get("quant") is None:
                continue
            if node.attributes["quant"].as_string() != "fp8_block128":
                continue
            hidden, weights, ids, w13, w2, w13_scale, w2_scale = (list(node.inputs) + [None] * 7)[:7]
            pairs = ((w13, w13_scale), (w2, w2_scale))
            if any(w is None or s is None or w.const_value is None or s.const_value is None for w, s in pairs):
                logger.info("dequantize_fp8_experts: %s left as it is: its weights or scales are not constants",
                            node.name)
                continue
            floats = []
            for w, s in pairs:
                assert w is not None and s is not None and w.const_value is not None and s.const_value is not None
                lazy = ir.LazyTensor(functools.partial(_dequantized, w.const_value, s.const_value),
                                     dtype=ir.DataType.FLOAT, shape=ir.Shape(w.const_value.shape.numpy()),
                                     name=f"{w.name}{FROM_FP8}")
                value = ir.Value(name=lazy.name, shape=lazy.shape, type=ir.TensorType(ir.DataType.FLOAT),
                                 const_value=lazy)
                graph.register_initializer(value)
                floats.append(value)
            attrs = {name: attr.value for name, attr in node.attributes.items()}
            attrs["quant"] = "none"
            new = ir.node(node.op_type, [hidden, weights, ids, *floats], attrs, domain=node.domain, name=node.name,
                          version=node.version)
            graph.insert_before(node, new)
            old, out = node.outputs[0], new.outputs[0]
            out.shape = old.shape
            if old.dtype is not None:
                out.dtype = old.dtype
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            name = old.name
            graph.remove(node, safe=True)
            out.name = name
            count += 1
        for value in list(graph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)  # type: ignore[arg-type]
        if count:
            logger.info("dequantize_fp8_experts: %d FP8 expert block(s) now float32 (ORT has no CPU FP8 MoE)", count)
        return ir.passes.PassResult(model, count > 0)
