"""`r1c::MoERouter`: DeepSeek routing, one op for every mode (see shared ARCHITECTURE.md for the contract):
V3 noaux_tc and V2 greedy / group_limited_greedy (`topk_method`), sigmoid or softmax scores (`scoring`)."""

from r1c.plugins.moe_router.reference import SPEC, moe_router_reference

__all__ = ["SPEC", "moe_router_reference"]
