"""`r1c::AllGather`: concatenate each rank's tensor along an axis (see shared ARCHITECTURE.md, Collectives)."""

from r1c.plugins.all_gather.reference import SPEC, all_gather_reference

__all__ = ["SPEC", "all_gather_reference"]
