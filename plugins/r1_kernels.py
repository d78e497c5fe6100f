"""The r1c plugin ops at DeepSeek-R1's shapes: the problems (and so the kernels) a bundle of the real model launches.

R1: hidden 7168, MoE intermediate 2048, 256 routed experts, top-8 in 4 of 8 groups; a dense FP8 projection of
7168 -> 2048 stands for the attention / shared-expert / dense-MLP linears (their kernels differ only in the N and K
arguments). `max_tokens` is the largest token count the kernels are planned for (prefill of 4096 tokens). `SMALL`
has the same structure at sizes the Triton interpreter runs in seconds (the GPU check's dry run).
The AOT tests compile these; `scripts/gpu_check.py` compiles, loads and launches them on the GPU, and also the
router's other modes (`ROUTER_MODES`: DeepSeek-V2 / V2-Lite routing) at those models' shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from r1c.plugins._triton import KernelSpec


@dataclasses.dataclass(frozen=True)
class MoEShapes:
    hidden: int
    inter: int
    experts: int
    top_k: int
    n_group: int
    topk_group: int
    linear: tuple[int, int]  # (K, N) of the FP8 linear


R1 = MoEShapes(hidden=7168, inter=2048, experts=256, top_k=8, n_group=8, topk_group=4, linear=(7168, 2048))
SMALL = MoEShapes(hidden=256, inter=128, experts=8, top_k=2, n_group=4, topk_group=2, linear=(384, 256))


def problems(shapes: MoEShapes = R1, max_tokens: int = 4096,
             hidden_dtype: str = "bfloat16") -> dict[str, tuple[Any, dict[str, Any], Any]]:
    """{"router" | "experts" | "linear": (plugin op, attributes, problem at max_tokens)}."""
    from r1c.plugins.fp8_linear.plan import LinearProblem
    from r1c.plugins.fp8_linear.tensorrt import FP8LinearOp
    from r1c.plugins.moe_experts.plan import ExpertsProblem
    from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
    from r1c.plugins.moe_router.plan import RouterProblem
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    s = shapes
    router, experts, linear = MoERouterOp(), MoEExpertsOp(), FP8LinearOp()
    r_attrs = router.spec.attrs(top_k=s.top_k, n_group=s.n_group, topk_group=s.topk_group, routed_scaling_factor=2.5,
                                norm_topk_prob=1)
    return {
        "router": (router, r_attrs,
                   RouterProblem(max_tokens, s.hidden, s.experts, hidden_dtype, tuple(sorted(r_attrs.items())))),
        "experts": (experts, experts.spec.attrs(quant="fp8_block128"),
                    ExpertsProblem(max_tokens, s.top_k, s.experts, s.hidden, s.inter, hidden_dtype, "float8_e4m3fn")),
        "linear": (linear, linear.spec.attrs(), LinearProblem(max_tokens, *s.linear, hidden_dtype)),
    }


def r1_problems(max_tokens: int = 4096, hidden_dtype: str = "bfloat16") -> list[tuple[Any, dict[str, Any], Any]]:
    """(plugin op, attributes, problem at max_tokens) for the router, the FP8 experts and an FP8 linear at R1."""
    return list(problems(R1, max_tokens, hidden_dtype).values())


def kernel_specs(shapes: MoEShapes = R1, max_tokens: int = 4096, hidden_dtype: str = "bfloat16") -> list[KernelSpec]:
    """Every distinct kernel of `problems` for token counts up to max_tokens."""
    specs: dict[str, KernelSpec] = {}
    for op, attrs, problem in problems(shapes, max_tokens, hidden_dtype).values():
        for s in op.kernel_specs(attrs, problem):
            specs.setdefault(s.key, s)
    return list(specs.values())


def r1_kernel_specs(max_tokens: int = 4096) -> list[KernelSpec]:
    return kernel_specs(R1, max_tokens)


# The router's other modes, at the shapes of the models that route that way (config.json of each release):
# label -> (experts, hidden, attributes). DeepSeek-V2 (and V2.5): 160 experts, top-6 in 3 of 8 groups by max softmax,
# scaled by 16; DeepSeek-V2-Lite: 64 experts, top-6 over the softmax, scale 1. The sigmoid / softmax swaps are the
# op's other combinations (no release uses them; the op defines them, so the kernels must compute them).
_V2 = dict(top_k=6, n_group=8, topk_group=3, routed_scaling_factor=16.0, norm_topk_prob=0)
_V2_LITE = dict(top_k=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=0)
ROUTER_MODES: dict[str, tuple[int, int, dict[str, Any]]] = {
    "V2 group_limited_greedy": (160, 5120, dict(_V2, scoring="softmax", topk_method="group_limited_greedy")),
    "V2-Lite greedy": (64, 2048, dict(_V2_LITE, scoring="softmax", topk_method="greedy")),
    "group_limited sigmoid": (160, 5120, dict(_V2, scoring="sigmoid", topk_method="group_limited_greedy")),
    "greedy sigmoid": (64, 2048, dict(_V2_LITE, scoring="sigmoid", topk_method="greedy")),
    "noaux_tc softmax": (256, 7168, dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                                         norm_topk_prob=1, scoring="softmax", topk_method="noaux_tc")),
}
# the same modes at interpreter sizes (16 experts: 4 groups of 4, 2 kept, top-4)
_SMALL_MODE_SHAPE = dict(top_k=4, n_group=4, topk_group=2)


def router_mode_problems(small: bool = False, max_tokens: int = 64,
                         hidden_dtype: str = "bfloat16") -> dict[str, tuple[Any, dict[str, Any], Any]]:
    """{label: (MoERouterOp, attributes, problem at max_tokens)} for every `ROUTER_MODES` entry (`small`: 16
    experts, hidden 256, for the interpreter)."""
    from r1c.plugins.moe_router.plan import RouterProblem
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    op = MoERouterOp()
    out = {}
    for label, (experts, hidden, given) in ROUTER_MODES.items():
        if small:
            experts, hidden = 16, 256
            given = given | _SMALL_MODE_SHAPE if given["topk_method"] != "greedy" else given | {"top_k": 4}
        attrs = op.spec.attrs(**given)
        op.validate(attrs)
        out[label] = (op, attrs, RouterProblem(max_tokens, hidden, experts, hidden_dtype, tuple(sorted(attrs.items()))))
    return out
