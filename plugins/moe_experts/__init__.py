"""`r1c::MoEExperts`: routed experts as grouped expert matmuls (see shared ARCHITECTURE.md)."""

from typing import Any

from r1c.plugins.moe_experts.spec import SPEC

__all__ = ["SPEC", "moe_experts_reference"]


def __getattr__(name: str) -> Any:
    """The PyTorch reference loads torch: only when it is asked for."""
    if name == "moe_experts_reference":
        from r1c.plugins.moe_experts.reference import moe_experts_reference

        return moe_experts_reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
