"""r1c's CPU kernels as ONNX Runtime custom ops: `r1c.cpu::MoE` (routed experts) and `r1c.cpu::Linear` (a MatMul by
a constant), over one packed panel layout, and `r1c.cpu::MLAAttention` / `MLAAttentionInt8` (a layer's absorbed
latent attention, W_UK and W_UV float32 or int8), `r1c.cpu::MLABlock` (a layer's whole MLA attention block)
(spec.py the ops' definitions; moe_cpu.cc, linear_cpu.cc, attention_cpu.cc, mla_block_cpu.cc, panels.h, kernels.h,
register.cc the kernels; library.py their build)."""

from r1c.plugins.cpu_moe.spec import (
    ATTENTION_INT8_SPEC,
    ATTENTION_SPEC,
    CPU_DOMAIN,
    LINEAR_SPEC,
    MLA_BLOCK_SPEC,
    PANEL,
    SPEC,
    pack_experts,
    pack_fc1,
    pack_fc2,
    pack_linear,
    packed_shape,
)

__all__ = ["ATTENTION_INT8_SPEC", "ATTENTION_SPEC", "CPU_DOMAIN", "LINEAR_SPEC", "MLA_BLOCK_SPEC", "PANEL", "SPEC",
           "pack_experts", "pack_fc1", "pack_fc2", "pack_linear", "packed_shape"]
