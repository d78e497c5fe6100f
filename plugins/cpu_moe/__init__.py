"""`r1c.cpu::MoE`: routed experts on the CPU as an ONNX Runtime custom op (spec.py; the kernel moe_cpu.cc; its
build library.py)."""

from r1c.plugins.cpu_moe.spec import CPU_DOMAIN, PANEL, SPEC, pack_experts, pack_fc1, pack_fc2, packed_shape

__all__ = ["CPU_DOMAIN", "PANEL", "SPEC", "pack_experts", "pack_fc1", "pack_fc2", "packed_shape"]
