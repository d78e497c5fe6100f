"""`r1c::MoERouter`'s definition: name, inputs, outputs, attributes and which attribute combinations it defines
(no torch: the passes and `r1c passes` read it without loading a framework). See shared ARCHITECTURE.md for the
contract and reference.py for the modes."""

from __future__ import annotations

from r1c.plugins import OpSpec

SPEC = OpSpec(
    name="MoERouter",
    inputs=("hidden", "gate_weight", "correction_bias"),
    optional_inputs=(),
    outputs=("topk_weights", "topk_ids"),
    attributes={
        "top_k": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": 1,
        "scoring": "sigmoid",
        "topk_method": "noaux_tc",
    },
)

SCORINGS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


def check_attributes(*, top_k: int, n_group: int, topk_group: int, norm_topk_prob: int | bool, scoring: str,
                     topk_method: str, experts: int | None = None, **_: object) -> None:
    """ValueError naming the attribute for a combination the op does not define (every implementation calls this)."""
    if scoring not in SCORINGS:
        raise ValueError(f"MoERouter: unknown scoring {scoring!r} (expected one of {SCORINGS})")
    if topk_method not in TOPK_METHODS:
        raise ValueError(f"MoERouter: unknown topk_method {topk_method!r} (expected one of {TOPK_METHODS})")
    if topk_method != "noaux_tc" and norm_topk_prob:
        raise ValueError(f"MoERouter: norm_topk_prob=1 with topk_method {topk_method!r} is undefined (DeepSeek's V2 "
                         "code normalises instead of scaling, transformers ignores the flag)")
    groups, kept_groups = effective_groups(topk_method, n_group, topk_group)
    if groups < 1 or not 1 <= kept_groups <= groups:
        raise ValueError(f"MoERouter: need 1 <= topk_group <= n_group, got n_group={n_group}, topk_group={topk_group}")
    if experts is not None:
        if experts % groups:
            raise ValueError(f"MoERouter: {experts} experts do not split into n_group={groups} equal groups")
        kept = experts // groups * kept_groups
        if not 1 <= top_k <= kept:
            raise ValueError(f"MoERouter: top_k={top_k} must be in [1, {kept}] (experts left after the group mask)")


def effective_groups(topk_method: str, n_group: int, topk_group: int) -> tuple[int, int]:
    """(groups, kept groups) the method routes with: greedy is one group, kept."""
    return (1, 1) if topk_method == "greedy" else (n_group, topk_group)
