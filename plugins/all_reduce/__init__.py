"""`r1c::AllReduce`: sum a tensor over the ranks of a process group (see shared ARCHITECTURE.md, Collectives)."""

from r1c.plugins.all_reduce.reference import SPEC, all_reduce_reference

__all__ = ["SPEC", "all_reduce_reference"]
