"""r1c's CPU kernels as ONNX Runtime custom ops: `r1c.cpu::MoE` (routed experts) and `r1c.cpu::Linear` (a MatMul by
a constant), over one packed panel layout (spec.py the ops' definitions; moe_cpu.cc, linear_cpu.cc, panels.h,
register.cc the kernels; library.py their build)."""

from r1c.plugins.cpu_moe.spec import (
    CPU_DOMAIN,
    LINEAR_SPEC,
    PANEL,
    SPEC,
    pack_experts,
    pack_fc1,
    pack_fc2,
    pack_linear,
    packed_shape,
)

__all__ = ["CPU_DOMAIN", "LINEAR_SPEC", "PANEL", "SPEC", "pack_experts", "pack_fc1", "pack_fc2", "pack_linear",
           "packed_shape"]
