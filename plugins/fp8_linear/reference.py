"""The op's definition and its PyTorch reference.

Shapes: M = tokens (every leading dim of x flattened), K = in features, N = out features.
`r1c::FP8Linear(x [..., K], weight [N, K] float8_e4m3fn, weight_scale [ceil(N/128), ceil(K/128)] float32)
-> y [..., N]` in x's dtype, y = x @ (weight * weight_scale[block])^T: a linear layer whose weight is FP8 with
DeepSeek-V3's `weight_scale_inv` (one float32 scale per 128x128 block; `r1c.plugins.fp8`). Attribute `block_size`
(128, the only value the kernels take). The exporter writes such layers as standard ONNX, a blocked
`DequantizeLinear` + `MatMul`; the `tensorrt` pipeline's `fuse_fp8_linear` pass turns them into this op, whose
ONNX function body is that same DequantizeLinear + MatMul. A kernel may quantize the activations to FP8 per token
and 128 channels (DeepSeek's 1x128 dynamic scales); that is its choice, not a change of the op's meaning, and its
error budget is stated with its tests.
"""

from __future__ import annotations

import torch

from r1c.plugins.fp8 import BLOCK, dequantize
from r1c.plugins.fp8_linear.spec import SPEC  # noqa: F401 (the definition lives in spec.py)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                         block_size: int = BLOCK) -> torch.Tensor:
    """x [..., K] (float32/bf16/fp16/float64) @ dequantized weight [N, K]^T -> [..., N] in x's dtype.

    Computed in float64 for float64 x, else float32. Raises ValueError on a block size other than 128 or shapes
    that do not match.
    """
    if block_size != BLOCK:
        raise ValueError(f"FP8Linear: block_size must be {BLOCK}, got {block_size}")
    n, k = weight.shape
    if x.shape[-1] != k or tuple(weight_scale.shape) != (-(-n // BLOCK), -(-k // BLOCK)):
        raise ValueError(f"FP8Linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, weight_scale "
                         f"{tuple(weight_scale.shape)} do not fit [..., K], [N, K], [ceil(N/128), ceil(K/128)]")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize(weight, weight_scale).to(compute)
    return (x.to(compute) @ w.t()).to(x.dtype)
