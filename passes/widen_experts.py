"""Routed experts in float32 for ONNX Runtime's CPU MoE kernels, whatever the export stored: FP8 (block scaled)
or bfloat16/float16 weights, and half-precision hidden states.

ORT's CPU lowering (`lower_moe_to_ort`) takes float32 blocks only: ORT 1.32 has no CPU kernel for FP8 MoE, and
a bfloat16 MoE neither. A block it refuses runs its `r1c::MoEExperts` function body, which computes *every*
expert densely (measured 3-6x slower decode for bf16/fp16 bundles in the issue-10 note). Widened here, the
block is lowered like any float32 one and runs only the chosen experts:
- FP8 weights (quant=fp8_block128) are dequantized by the op's own definition (`r1c.plugins.fp8.dequantize`:
  w_fp8 times its 128x128 block scale); their names carry FROM_FP8, which is how `quantize_weights` knows, under
  precision "auto", that the checkpoint stored them in 1 byte (they become int8 blocks: 1 byte a weight again);
- bfloat16/float16 weights are cast to float32 (exact);
- a bfloat16/float16 hidden state is cast to float32 once for the router and the experts (the router computes
  in float32 anyway: ARCHITECTURE), and the experts' float32 output cast back to the export's dtype, so the
  values around the block keep the export's dtype and rounding.
The float32 weights are made lazily, one tensor at a time, when a later pass or the writer reads them.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx_ir as ir

from r1c.passes._util import is_r1c
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC

logger = logging.getLogger(__name__)

FROM_FP8 = ".from_fp8"  # in the names of the float32 weights dequantized here (and of what later passes derive)
HALF = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)


def _dequantized(weight: ir.TensorProtocol, scale: ir.TensorProtocol) -> ir.TensorProtocol:
    import torch

    from r1c.plugins.fp8 import dequantize

    bits = np.array(weight.numpy()).view(np.uint8)  # a writable copy for torch
    w = torch.from_numpy(bits).view(torch.float8_e4m3fn)
    return ir.tensor(dequantize(w, torch.from_numpy(np.array(scale.numpy(), np.float32))).numpy())


def _widened(weight: ir.TensorProtocol) -> ir.TensorProtocol:
    return ir.tensor(np.asarray(weight.numpy(), dtype=np.float32))


def _float_initializer(graph: ir.Graph, name: str, make: functools.partial, shape: ir.Shape) -> ir.Value:
    lazy = ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=shape, name=name)
    value = ir.Value(name=name, shape=shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=lazy)
    graph.register_initializer(value)
    return value


class WidenExpertsPass(ir.passes.InPlacePass):
    """Every FP8 or half-precision `r1c::MoEExperts` (and its hidden state) becomes float32."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if not is_r1c(node, EXPERTS_SPEC):
                continue
            quant = node.attributes["quant"].as_string() if "quant" in node.attributes else "none"
            hidden, weights, ids, w13, w2, w13_scale, w2_scale = (list(node.inputs) + [None] * 7)[:7]
            if hidden is None or w13 is None or w2 is None or w13.const_value is None or w2.const_value is None:
                continue
            half_hidden = hidden.dtype in HALF
            if quant == "none" and w13.const_value.dtype not in HALF and not half_hidden:
                continue
            floats = []
            if quant == "fp8_block128":
                pairs = ((w13, w13_scale), (w2, w2_scale))
                if any(s is None or s.const_value is None for _, s in pairs):
                    logger.info("widen_experts: %s left as it is: its FP8 scales are not constants", node.name)
                    continue
                for w, s in pairs:
                    assert w.const_value is not None and s is not None and s.const_value is not None
                    floats.append(_float_initializer(
                        graph, f"{w.name}{FROM_FP8}", functools.partial(_dequantized, w.const_value, s.const_value),
                        ir.Shape(w.const_value.shape.numpy())))
            elif quant == "none":
                for w in (w13, w2):
                    assert w.const_value is not None
                    floats.append(w if w.const_value.dtype == ir.DataType.FLOAT else _float_initializer(
                        graph, f"{w.name}.float32", functools.partial(_widened, w.const_value),
                        ir.Shape(w.const_value.shape.numpy())))
            else:
                continue
            if half_hidden:
                hidden = self._widen_hidden(graph, node, hidden)
            attrs = {name: attr.value for name, attr in node.attributes.items()}
            attrs["quant"] = "none"
            new = ir.node(node.op_type, [hidden, weights, ids, *floats], attrs, domain=node.domain, name=node.name,
                          version=node.version)
            graph.insert_before(node, new)
            old, out = node.outputs[0], new.outputs[0]
            out.shape, out.dtype = old.shape, ir.DataType.FLOAT
            if half_hidden:  # back to the export's dtype for the readers of the block
                assert old.dtype is not None
                cast = ir.node("Cast", [out], {"to": int(old.dtype)}, name=f"{node.name}.narrow")
                graph.insert_after(new, cast)
                out.name = f"{node.name}.float32"
                out = cast.outputs[0]
                out.shape, out.dtype = old.shape, old.dtype
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            name = old.name
            graph.remove(node, safe=True)
            out.name = name
            count += 1
        for value in list(graph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)  # type: ignore[arg-type]
        if count:
            logger.info("widen_experts: %d expert block(s) now float32 (ORT's CPU MoE kernels are float32)", count)
        return ir.passes.PassResult(model, count > 0)

    @staticmethod
    def _widen_hidden(graph: ir.Graph, experts: ir.Node, hidden: ir.Value) -> ir.Value:
        """One float32 cast of the hidden state, read by the experts and the router that feeds them."""
        router = None if experts.inputs[1] is None else experts.inputs[1].producer()
        cast = ir.node("Cast", [hidden], {"to": int(ir.DataType.FLOAT)}, name=f"{experts.name}.widen")
        widened = cast.outputs[0]
        widened.name, widened.shape, widened.dtype = f"{experts.name}.hidden_float32", hidden.shape, ir.DataType.FLOAT
        graph.insert_before(router if router is not None and router.graph is graph else experts, cast)
        if router is not None and is_r1c(router, ROUTER_SPEC) and router.inputs[0] is hidden:
            router.replace_input_with(0, widened)
        return widened
