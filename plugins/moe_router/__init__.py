"""`r1c::MoERouter`: DeepSeek routing, one op for every mode (see shared ARCHITECTURE.md for the contract):
V3 noaux_tc and V2 greedy / group_limited_greedy (`topk_method`), sigmoid or softmax scores (`scoring`)."""

from typing import Any

from r1c.plugins.moe_router.spec import SPEC

__all__ = ["SPEC", "moe_router_reference"]


def __getattr__(name: str) -> Any:
    """The PyTorch reference loads torch: only when it is asked for."""
    if name == "moe_router_reference":
        from r1c.plugins.moe_router.reference import moe_router_reference

        return moe_router_reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
