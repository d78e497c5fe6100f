"""The op's definition and its PyTorch reference (float32 throughout).

Shapes: T = tokens, H = hidden, E = routed experts, G = n_group, K = top_k.
"""

from __future__ import annotations

import torch

from r1c.plugins.moe_router.spec import SPEC  # noqa: F401 (the definition lives in spec.py)


def _topk_lower_index_first(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, descending; equal values keep ascending index order."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def moe_router_reference(
    hidden: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    correction_bias: torch.Tensor,  # [E]
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: int | bool,
    scoring: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [T, K] float32, topk_ids [T, K] int32)."""
    logits = hidden.to(torch.float32) @ gate_weight.to(torch.float32).t()  # [T, E]
    if scoring == "sigmoid":
        s = logits.sigmoid()
    elif scoring == "softmax":
        s = logits.softmax(dim=-1)
    else:
        raise ValueError(f"MoERouter: unknown scoring {scoring!r}")
    c = s + correction_bias.to(torch.float32)  # selection scores
    t, e = c.shape
    per_group = e // n_group
    if n_group > 1:
        grouped = c.view(t, n_group, per_group)
        group_score = _topk_lower_index_first(grouped, min(2, per_group))[0].sum(dim=-1)  # [T, G]
        _, keep = _topk_lower_index_first(group_score, topk_group)  # [T, topk_group]
        group_mask = torch.zeros(t, n_group, dtype=torch.bool, device=c.device).scatter_(1, keep, True)
        c = c.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), float("-inf"))
    _, ids = _topk_lower_index_first(c, top_k)  # [T, K]
    w = s.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * routed_scaling_factor
    return w, ids.to(torch.int32)
