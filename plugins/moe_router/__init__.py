"""`r1c::MoERouter`: DeepSeek-V3 noaux_tc routing (see shared ARCHITECTURE.md for the contract)."""

from r1c.plugins.moe_router.reference import SPEC, moe_router_reference

__all__ = ["SPEC", "moe_router_reference"]
