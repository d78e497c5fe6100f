"""`r1c::AllReduce`: sum a tensor over the ranks of a process group (see shared ARCHITECTURE.md, Collectives)."""

from typing import Any

from r1c.plugins.all_reduce.spec import SPEC

__all__ = ["SPEC", "all_reduce_reference"]


def __getattr__(name: str) -> Any:
    """The PyTorch reference loads torch: only when it is asked for."""
    if name == "all_reduce_reference":
        from r1c.plugins.all_reduce.reference import all_reduce_reference

        return all_reduce_reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
