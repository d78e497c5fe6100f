"""`r1c.cpu::MoE`'s definition: r1c's CPU kernel for routed experts, an ONNX Runtime custom op.

It takes the inputs and computes the function of ONNX Runtime's `com.microsoft.MoE` in the one form r1c's
lowering emits (passes/lower_moe_to_ort.py: interleaved SwiGLU, silu, no biases), so that a pass can swap one for
the other (passes/use_cpu_moe_kernel.py). The kernel is `moe_cpu.cc` beside this file (its header comment has the
formulas); `library.py` builds it.

Inputs (float32): input [.., H]; router_probs [T, E] (T = the product of input's leading dims); fc1_experts_weights
[E, 2I, H], rows gate 0, up 0, gate 1, up 1, ...; fc2_experts_weights [E, H, I]. Output: output, input's shape.
Attributes: k (experts per token: the k largest router_probs, ties to the higher expert index as in ORT's MoE),
normalize_routing_weights (1: softmax over the k chosen probs; 0: softmax over all E, taken at the k chosen).
Legend: T tokens, H hidden, E experts, I expert intermediate size.
"""

from __future__ import annotations

from r1c.plugins import OpSpec

CPU_DOMAIN = "r1c.cpu"

SPEC = OpSpec(
    name="MoE",
    inputs=("input", "router_probs", "fc1_experts_weights", "fc2_experts_weights"),
    optional_inputs=(),
    outputs=("output",),
    attributes={"k": 1, "normalize_routing_weights": 1},
    domain=CPU_DOMAIN,
)
