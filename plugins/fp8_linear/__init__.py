"""`r1c::FP8Linear`: y = x @ W^T with FP8 e4m3fn weights W [N, K] and DeepSeek's 128x128 block scales."""

from r1c.plugins.fp8_linear.reference import SPEC, fp8_linear_reference

__all__ = ["SPEC", "fp8_linear_reference"]
