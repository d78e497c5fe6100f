"""`r1c::MoEExperts`: routed experts as grouped expert matmuls (see shared ARCHITECTURE.md)."""

from r1c.plugins.moe_experts.reference import SPEC, moe_experts_reference

__all__ = ["SPEC", "moe_experts_reference"]
