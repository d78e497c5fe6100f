"""`r1c::FP8Linear`: y = x @ W^T with FP8 e4m3fn weights W [N, K] and DeepSeek's 128x128 block scales."""

from typing import Any

from r1c.plugins.fp8_linear.spec import SPEC

__all__ = ["SPEC", "fp8_linear_reference"]


def __getattr__(name: str) -> Any:
    """The PyTorch reference loads torch: only when it is asked for."""
    if name == "fp8_linear_reference":
        from r1c.plugins.fp8_linear.reference import fp8_linear_reference

        return fp8_linear_reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
