"""The op's definition and its PyTorch reference.

Shapes: T = tokens, H = hidden, I = expert intermediate size, E = experts, K = top_k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r1c.plugins.fp8 import dequantize
from r1c.plugins.moe_experts.spec import QUANT_MODES, SPEC  # noqa: F401 (the definition lives in spec.py)


def moe_experts_reference(
    hidden: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int
    w13: torch.Tensor,  # [E, 2I, H]: gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    w13_scale: torch.Tensor | None = None,  # [E, ceil(2I/128), ceil(H/128)] for fp8
    w2_scale: torch.Tensor | None = None,  # [E, ceil(H/128), ceil(I/128)]
    *,
    quant: str = "none",
    activation: str = "swiglu",
) -> torch.Tensor:
    """Sum over the K chosen experts of weight * W2(silu(G h) * (U h)); returns [T, H] in hidden's dtype."""
    if activation != "swiglu":
        raise ValueError(f"MoEExperts: unknown activation {activation!r}")
    if quant == "fp8_block128":
        if w13_scale is None or w2_scale is None:
            raise ValueError("MoEExperts: fp8_block128 needs w13_scale and w2_scale")
        w13 = dequantize(w13, w13_scale)
        w2 = dequantize(w2, w2_scale)
    elif quant != "none":
        raise ValueError(f"MoEExperts: unknown quant {quant!r}")
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(compute)
    k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):  # a reference, not a kernel: clarity over speed
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        tok = pairs // k
        gu = x[tok] @ w13[e].to(compute).t()  # [n, 2I]
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = act @ w2[e].to(compute).t()  # [n, H]
        out.index_add_(0, tok, y * topk_weights.reshape(-1)[pairs].to(compute)[:, None])
    return out.to(hidden.dtype)
