"""`r1c.cpu::MoE`: routed experts on the CPU as an ONNX Runtime custom op (spec.py; the kernel moe_cpu.cc; its
build library.py)."""

from r1c.plugins.cpu_moe.spec import CPU_DOMAIN, SPEC

__all__ = ["CPU_DOMAIN", "SPEC"]
