"""`r1c::AllGather`: concatenate each rank's tensor along an axis (see shared ARCHITECTURE.md, Collectives)."""

from typing import Any

from r1c.plugins.all_gather.spec import SPEC

__all__ = ["SPEC", "all_gather_reference"]


def __getattr__(name: str) -> Any:
    """The PyTorch reference loads torch: only when it is asked for."""
    if name == "all_gather_reference":
        from r1c.plugins.all_gather.reference import all_gather_reference

        return all_gather_reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
