"""The r1c plugin ops at DeepSeek-R1's shapes: the problems (and so the kernels) a bundle of the real model launches.

R1: hidden 7168, MoE intermediate 2048, 256 routed experts, top-8 in 4 of 8 groups; a dense FP8 projection of
7168 -> 2048 stands for the attention / shared-expert / dense-MLP linears (their kernels differ only in the N and K
arguments). `max_tokens` is the largest token count the kernels are planned for (prefill of 4096 tokens).
The AOT tests compile these; `scripts/gpu_check.py` compiles, loads and launches them on the GPU.
"""

from __future__ import annotations

from typing import Any

from r1c.plugins._triton import KernelSpec

HIDDEN, INTER, EXPERTS, TOP_K, N_GROUP, TOPK_GROUP = 7168, 2048, 256, 8, 8, 4


def r1_problems(max_tokens: int = 4096, hidden_dtype: str = "bfloat16") -> list[tuple[Any, dict[str, Any], Any]]:
    """(plugin op, attributes, problem at max_tokens) for the router, the FP8 experts and an FP8 linear."""
    from r1c.plugins.fp8_linear.plan import LinearProblem
    from r1c.plugins.fp8_linear.tensorrt import FP8LinearOp
    from r1c.plugins.moe_experts.plan import ExpertsProblem
    from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
    from r1c.plugins.moe_router.plan import RouterProblem
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    router, experts, linear = MoERouterOp(), MoEExpertsOp(), FP8LinearOp()
    r_attrs = router.spec.attrs(top_k=TOP_K, n_group=N_GROUP, topk_group=TOPK_GROUP, routed_scaling_factor=2.5,
                                norm_topk_prob=1)
    e_attrs = experts.spec.attrs(quant="fp8_block128")
    return [
        (router, r_attrs, RouterProblem(max_tokens, HIDDEN, EXPERTS, hidden_dtype, tuple(sorted(r_attrs.items())))),
        (experts, e_attrs, ExpertsProblem(max_tokens, TOP_K, EXPERTS, HIDDEN, INTER, hidden_dtype, "float8_e4m3fn")),
        (linear, linear.spec.attrs(), LinearProblem(max_tokens, HIDDEN, INTER, hidden_dtype)),
    ]


def r1_kernel_specs(max_tokens: int = 4096) -> list[KernelSpec]:
    """Every distinct kernel of `r1_problems` for token counts up to max_tokens."""
    specs: dict[str, KernelSpec] = {}
    for op, attrs, problem in r1_problems(max_tokens):
        for s in op.kernel_specs(attrs, problem):
            specs.setdefault(s.key, s)
    return list(specs.values())
