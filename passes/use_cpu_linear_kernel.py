"""Run float32 MatMuls by a constant weight on r1c's CPU kernel: each `MatMul(x, W)` whose W is a float32 [K, N]
initializer read by that node alone becomes `r1c.cpu::Linear(x, pack_linear(W))` (r1c/plugins/cpu_moe: the experts'
panel layout and register tiles; the weight repacked once here, computed when the model is saved).

Measured against ONNX Runtime's MatMul (MLAS) on this project's 2-core Zen 4 VM, four [1024, 8192] weights, the
same inputs, interleaved (`tests` hold the numerics; the measurement is in the closing note of issue 11): 1 token
1.21x with 1 thread, 1.01x with 2; 8 tokens 1.32x / 1.43x; 32 tokens 1.04x / 1.17x; 128 tokens 1.05x / 1.10x.

Only with `r1c build --cpu-moe r1c` (the build option that selects r1c's CPU kernels; `auto` resolves to it where
the library builds): the build's report counts the nodes swapped, and a bundle carries the library when this pass
or `use_cpu_moe_kernel` swapped one. Any other MatMul (a computed second input, another dtype, a batched or shared
weight) is left to ONNX Runtime.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from r1c.passes._util import CpuKernelPass, packed_initializer, take_over
from r1c.plugins.cpu_moe import LINEAR_SPEC, PANEL, pack_linear

logger = logging.getLogger(__name__)


def why_not(node: ir.Node) -> str | None:
    """None when `node` (an ONNX MatMul) is what `r1c.cpu::Linear` computes; else the reason it is not."""
    x, w = node.inputs
    if w is None or w.const_value is None or w.const_value.shape.rank() != 2:
        return "its second input is not a constant matrix"
    if len(w.uses()) != 1 or w.is_graph_input() or w.is_graph_output():
        return "its weight is read elsewhere too (it is repacked)"
    if x is None or x.dtype != ir.DataType.FLOAT or w.const_value.dtype != ir.DataType.FLOAT:
        return "not float32"
    return None


class UseCpuLinearKernelPass(CpuKernelPass):
    """MatMul(x, constant W) -> r1c.cpu::Linear where the build asked for r1c's CPU kernels."""

    spec = LINEAR_SPEC
    counted = "MatMul nodes"

    def swap(self, graph: ir.Graph) -> int:
        count = 0
        for node in list(graph):
            if node.domain not in ("", "ai.onnx") or node.op_type != "MatMul":
                continue
            reason = why_not(node)
            if reason:
                logger.debug("use_cpu_linear_kernel: %s left to ONNX Runtime: %s", node.name, reason)
                continue
            x, w = node.inputs
            assert x is not None and w is not None and w.const_value is not None  # why_not
            k, n = (int(d) for d in w.const_value.shape.numpy())
            packed = packed_initializer(graph, w, pack_linear, (-(-n // PANEL), k, PANEL))
            new = ir.node(LINEAR_SPEC.name, [x, packed], attributes=LINEAR_SPEC.attrs(n=n), domain=LINEAR_SPEC.domain,
                          version=LINEAR_SPEC.version, name=node.name)
            take_over(graph, new, node, node.outputs[0], ".mlas")
            graph.remove(node, safe=True)
            graph.initializers.pop(str(w.name))  # read by the removed node alone (why_not)
            count += 1
        return count
