"""The op's definition and its PyTorch reference (float32 throughout).

Shapes: T = tokens, H = hidden, E = routed experts, G = n_group, K = top_k.

Modes (attribute `topk_method`; shared ARCHITECTURE.md, `r1c::MoERouter`):
* `noaux_tc` (DeepSeek-V3): select on c = s + correction_bias; group score = sum of the 2 largest c; masked
  experts' c = -inf; weights = s at the ids, optionally / (sum + 1e-20), times routed_scaling_factor.
* `group_limited_greedy` (DeepSeek-V2): select on s (no bias); group score = max of s; masked experts' s = 0;
  weights = s at the ids times routed_scaling_factor (no normalisation: `norm_topk_prob` must be 0).
* `greedy` (DeepSeek-V2-Lite): `group_limited_greedy` with one group (top_k over s).
`scoring` (sigmoid | softmax) computes s in every mode. Ties go to the lower expert index; a row's ids are in
descending selection score.
"""

from __future__ import annotations

import torch

from r1c.plugins.moe_router.spec import (  # noqa: F401 (the definition lives in spec.py)
    SCORINGS,
    SPEC,
    TOPK_METHODS,
    check_attributes,
    effective_groups,
)


def _topk_lower_index_first(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, descending; equal values keep ascending index order."""
    values, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def moe_router_reference(
    hidden: torch.Tensor,  # [T, H]
    gate_weight: torch.Tensor,  # [E, H]
    correction_bias: torch.Tensor,  # [E] (read by noaux_tc only)
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: int | bool,
    scoring: str = "sigmoid",
    topk_method: str = "noaux_tc",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [T, K] float32, topk_ids [T, K] int32); ValueError for an undefined mode."""
    e = gate_weight.shape[0]
    check_attributes(top_k=top_k, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                     scoring=scoring, topk_method=topk_method, experts=e)
    logits = hidden.to(torch.float32) @ gate_weight.to(torch.float32).t()  # [T, E]
    s = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    v3 = topk_method == "noaux_tc"
    c = s + correction_bias.to(torch.float32) if v3 else s  # selection scores
    t = c.shape[0]
    groups, kept_groups = effective_groups(topk_method, n_group, topk_group)
    if groups > 1:
        per_group = e // groups
        grouped = c.view(t, groups, per_group)
        if v3:
            group_score = _topk_lower_index_first(grouped, min(2, per_group))[0].sum(dim=-1)  # [T, G]
        else:
            group_score = grouped.amax(dim=-1)
        _, keep = _topk_lower_index_first(group_score, kept_groups)  # [T, topk_group]
        group_mask = torch.zeros(t, groups, dtype=torch.bool, device=c.device).scatter_(1, keep, True)
        c = c.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), float("-inf") if v3 else 0.0)
    _, ids = _topk_lower_index_first(c, top_k)  # [T, K]
    w = s.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * routed_scaling_factor
    return w, ids.to(torch.int32)
