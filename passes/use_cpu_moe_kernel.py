"""Run routed experts on r1c's CPU kernel: each float32 `com.microsoft.MoE` in the form r1c lowers to becomes
`r1c.cpu::MoE` (r1c/plugins/cpu_moe: the same function, a kernel that shares every selected expert's weight
panels evenly among the threads and streams each once). The expert weights are repacked here, once, into the
kernel's panel layout (`pack_fc1` / `pack_fc2`: the same bytes give or take the padding of I to 16 and H to 32;
computed when the model is saved, one tensor at a time).

Only with `r1c build --cpu-moe r1c` (`auto` resolves to it where the library builds; `BuildOptions.cpu_moe`): a
bundle in which the pass swapped a node carries the library and its manifest names it (the count goes to the
build's report; an int8/int4 bundle, whose experts run on ORT's QMoE, has none). A node is swapped when it is
exactly what the kernel computes: five inputs with no fc1 bias (input, router_probs, fc1, -, fc2), float32,
SwiGLU with interleaved rows (swiglu_fusion=1) and alpha 1 / beta 0 (silu(g) * u), no other attribute, and
fc1 / fc2 initializers that only this node reads and that are not graph inputs or outputs (an overridable
initializer stays as it is); any other MoE is left to ORT and the pass says why. With `cpu_moe="r1c"`,
`split_moe_experts` leaves the experts whole (the kernel balances them).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from r1c.passes._util import (
    CpuKernelPass,
    attr_int,
    ort_moe_nodes,
    packed_initializer,
    swiglu_moe_problem,
    take_over,
)
from r1c.plugins.cpu_moe import SPEC, pack_fc1, pack_fc2, packed_shape

logger = logging.getLogger(__name__)

_KNOWN = {"k", "activation_type", "swiglu_fusion", "normalize_routing_weights", "activation_alpha",
          "activation_beta"}


def why_not(node: ir.Node) -> str | None:
    """None when `node` (a com.microsoft.MoE) is what `r1c.cpu::MoE` computes; else the reason it is not."""
    form = swiglu_moe_problem(node)
    if form:
        return form
    ins = list(node.inputs)
    fc1 = ins[2]
    if any(v is not None and v.dtype not in (None, ir.DataType.FLOAT) for v in ins) or fc1 is None or \
            fc1.dtype is None:
        return "not float32"  # MoE's type T binds input, router_probs and the weights: fc1's dtype is theirs
    extra = set(node.attributes) - _KNOWN
    if extra:
        return f"attributes the kernel does not implement: {sorted(extra)}"
    if any(w is None or w.const_value is None or len(w.uses()) != 1 or w.const_value.shape.rank() != 3
           or w.is_graph_input() or w.is_graph_output() for w in (ins[2], ins[4])):
        # a graph input with an initializer is only a default the caller may override: repacking it would leave
        # the input unread (and, with its initializer gone, required)
        return ("fc1 / fc2 are not [E, rows, cols] initializers read by this node alone, nor graph inputs or "
                "outputs (they are repacked)")
    alpha = node.attributes.get("activation_alpha")
    beta = node.attributes.get("activation_beta")
    if (alpha is None or alpha.as_float() != 1.0) or (beta is not None and beta.as_float() != 0.0):
        return "SwiGLU alpha/beta other than 1/0"
    return None


class UseCpuMoEKernelPass(CpuKernelPass):
    """com.microsoft.MoE -> r1c.cpu::MoE where the build asked for r1c's CPU kernel."""

    spec = SPEC
    counted = "MoE nodes"

    def swap(self, graph: ir.Graph) -> int:
        count = 0
        for node in ort_moe_nodes(graph, why_not, "use_cpu_moe_kernel", "left to ONNX Runtime"):
            x, probs, fc1, _, fc2 = node.inputs
            assert fc1 is not None and fc2 is not None  # why_not
            attrs = SPEC.attrs(k=attr_int(node, "k", 1),
                               normalize_routing_weights=attr_int(node, "normalize_routing_weights", 0))
            assert fc1.const_value is not None and fc2.const_value is not None  # why_not
            w1 = packed_initializer(graph, fc1, pack_fc1, packed_shape("fc1", fc1.const_value.shape.numpy()))
            w2 = packed_initializer(graph, fc2, pack_fc2, packed_shape("fc2", fc2.const_value.shape.numpy()))
            new = ir.node(SPEC.name, [x, probs, w1, w2], attributes=attrs, domain=SPEC.domain,
                          version=SPEC.version, name=node.name)
            take_over(graph, new, node, node.outputs[0], ".ort")
            graph.remove(node, safe=True)
            for old_w in (fc1, fc2):
                graph.initializers.pop(str(old_w.name))  # read by the removed node alone (why_not)
            count += 1
        return count
