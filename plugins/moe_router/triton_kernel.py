"""`r1c::MoERouter` in Triton: DeepSeek-V3 noaux_tc and DeepSeek-V2 greedy / group_limited_greedy routing in one kernel.

Design
------
* The gate GEMM `hidden @ gate_weight^T` is a separate float32 kernel (`plan.py`; fusing it would make every
  program read the whole [E, H] gate weight, 7.3 MB at R1 shapes); the routing kernel only touches [T, E] logits.
* `_noaux_tc_router_kernel` does all the routing in one launch: one program per BLOCK_T rows, each row held whole
  (E padded to a power of two) in registers:
    1. s = sigmoid(logit) (or softmax over the row); c = s + correction_bias (noaux_tc) or c = s (V2 methods);
    2. group score = the two largest c of each group (noaux_tc) or the largest (group_limited_greedy), from a
       [rows, groups, experts] masked view, so the group size need not be a power of two; each group's rank =
       number of groups with a higher score, or an equal score and a lower index; groups of rank < topk_group are
       kept, the others' c set to -inf (noaux_tc) or 0 (group_limited_greedy); greedy is one group;
    3. top_k rounds of (row max, lowest expert index holding it, take it, set it to -inf): ties go to the lower
       expert index and the output order is descending c, as in the reference;
    4. weights: s (unbiased) at the ids, optionally / (sum + 1e-20) (noaux_tc only), times routed_scaling_factor.

Interpreter or native: as any `@triton.jit` kernel, this one is an interpreter function when `TRITON_INTERPRET=1`
was set before `triton` was first imported in the process (Triton 3.9 fixes the kind of its own `tl.max`/`tl.sum`/
`tl.sigmoid`, themselves `@triton.jit` functions, at that import), and a compiled one otherwise; the wrapper then
runs on CPU tensors, respectively CUDA tensors. `r1c.plugins._triton.compile_aot` compiles it without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from r1c.plugins._triton import is_interpreted
from r1c.plugins.launch import Buf, Launch, TritonRunner, launch
from r1c.plugins.moe_router.plan import RouterProblem, router_plan
from r1c.plugins.moe_router.reference import check_attributes, effective_groups

__all__ = ["moe_router_triton", "routing_launch"]


# --------------------------------------------------------------------------------------------------------------
# the kernel


@triton.jit
def _noaux_tc_router_kernel(
    logits_ptr,  # [T, E] float32
    bias_ptr,  # [E] float32
    weights_ptr,  # [T, TOP_K] float32 out
    ids_ptr,  # [T, TOP_K] int32 out
    T,
    stride_logits,
    stride_out,
    routed_scaling_factor,
    PER_GROUP: tl.constexpr,  # experts per group (E // n_group)
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    NORM: tl.constexpr,  # divide the weights by their sum
    SOFTMAX: tl.constexpr,  # scoring: softmax over the row instead of sigmoid
    V3: tl.constexpr,  # noaux_tc: biased selection, top-2-sum group score, dropped experts -inf (else V2 rules)
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,  # next power of two >= E
    BLOCK_G: tl.constexpr,  # next power of two >= N_GROUP
    BLOCK_K: tl.constexpr,  # next power of two >= TOP_K
):
    E: tl.constexpr = PER_GROUP * N_GROUP
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    neg_inf = float("-inf")

    logit = tl.load(
        logits_ptr + rows[:, None] * stride_logits + offs_e[None, :],
        mask=row_ok[:, None] & e_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    if SOFTMAX:
        shifted = tl.where(e_ok[None, :], logit, neg_inf)
        shifted = shifted - tl.max(shifted, axis=1)[:, None]
        num = tl.exp(shifted)
        s = num / tl.sum(num, axis=1)[:, None]
    else:
        s = tl.sigmoid(logit)
    if V3:
        bias = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
        c = tl.where(e_ok[None, :], s + bias[None, :], neg_inf)  # selection scores [BLOCK_T, BLOCK_E]
    else:
        c = tl.where(e_ok[None, :], s, neg_inf)

    if N_GROUP > 1:
        offs_g = tl.arange(0, BLOCK_G)
        in_group = ((offs_e[None, :] // PER_GROUP) == offs_g[:, None]) & e_ok[None, :]  # [BLOCK_G, BLOCK_E]
        c3 = tl.where(in_group[None, :, :], c[:, None, :], neg_inf)  # [BLOCK_T, BLOCK_G, BLOCK_E]
        top1 = tl.max(c3, axis=2)  # [BLOCK_T, BLOCK_G]
        if V3 and PER_GROUP > 1:
            first = tl.min(tl.where(c3 == top1[:, :, None], offs_e[None, None, :], BLOCK_E), axis=2)
            top2 = tl.max(tl.where(offs_e[None, None, :] == first[:, :, None], neg_inf, c3), axis=2)
            group_score = top1 + top2
        else:
            group_score = top1
        # rank of group g = #groups h with score[h] > score[g], or score[h] == score[g] and h < g
        gs_self = group_score[:, :, None]
        gs_other = group_score[:, None, :]
        better = (gs_other > gs_self) | ((gs_other == gs_self) & (offs_g[None, None, :] < offs_g[None, :, None]))
        better = better & (offs_g[None, None, :] < N_GROUP)
        rank = tl.sum(better.to(tl.int32), axis=2)  # [BLOCK_T, BLOCK_G]
        keep_group = (rank < TOPK_GROUP) & (offs_g[None, :] < N_GROUP)
        keep3 = in_group[None, :, :] & keep_group[:, :, None]
        keep = tl.max(keep3.to(tl.int32), axis=1) > 0  # [BLOCK_T, BLOCK_E]
        if V3:
            c = tl.where(keep, c, neg_inf)
        else:  # V2: dropped experts' s = 0 (padding lanes stay -inf)
            c = tl.where(keep | ~e_ok[None, :], c, 0.0)

    offs_k = tl.arange(0, BLOCK_K)
    out_ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    out_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(c, axis=1)  # [BLOCK_T]
        idx = tl.min(tl.where(c == best[:, None], offs_e[None, :], BLOCK_E), axis=1)  # lowest index among equals
        chosen = offs_e[None, :] == idx[:, None]
        w_j = tl.sum(tl.where(chosen, s, 0.0), axis=1)
        out_ids = tl.where(offs_k[None, :] == j, idx[:, None], out_ids)
        out_w = tl.where(offs_k[None, :] == j, w_j[:, None], out_w)
        c = tl.where(chosen, neg_inf, c)
    if NORM:
        out_w = tl.math.div_rn(out_w, tl.sum(out_w, axis=1)[:, None] + 1e-20)
    out_w = out_w * routed_scaling_factor

    out_mask = row_ok[:, None] & (offs_k[None, :] < TOP_K)
    out_offs = rows[:, None] * stride_out + offs_k[None, :]
    tl.store(weights_ptr + out_offs, out_w, mask=out_mask)
    tl.store(ids_ptr + out_offs, out_ids, mask=out_mask)


# --------------------------------------------------------------------------------------------------------------
# wrapper


def routing_launch(logits: Buf, bias: Buf, weights: Buf, ids: Buf, t: int, e: int, attrs: dict[str, Any], *,
                   block_t: int = 1, num_warps: int = 4) -> Launch:
    """The routing kernel's launch over logits [t, e] float32 (a plan's buffer) for the op's attributes.

    Every `topk_method` (noaux_tc | greedy | group_limited_greedy) and `scoring` (sigmoid | softmax) of the SPEC;
    ValueError naming the attribute for a combination the op does not define (`check_attributes`).
    """
    check_attributes(**attrs, experts=e)
    top_k, method = int(attrs["top_k"]), str(attrs["topk_method"])
    n_group, topk_group = effective_groups(method, int(attrs["n_group"]), int(attrs["topk_group"]))
    block_t = min(block_t, triton.next_power_of_2(t))
    return launch(
        "moe_router", _noaux_tc_router_kernel, (triton.cdiv(t, block_t),),
        {"logits_ptr": logits, "bias_ptr": bias, "weights_ptr": weights, "ids_ptr": ids, "T": t,
         "stride_logits": e, "stride_out": top_k, "routed_scaling_factor": float(attrs["routed_scaling_factor"])},
        {"PER_GROUP": e // n_group, "N_GROUP": n_group, "TOPK_GROUP": topk_group, "TOP_K": top_k,
         "NORM": bool(attrs["norm_topk_prob"]), "SOFTMAX": attrs["scoring"] == "softmax",
         "V3": method == "noaux_tc", "BLOCK_T": block_t, "BLOCK_E": triton.next_power_of_2(e),
         "BLOCK_G": triton.next_power_of_2(n_group), "BLOCK_K": triton.next_power_of_2(top_k)},
        dynamic=["T"], num_warps=num_warps,
    )


def moe_router_triton(
    hidden: torch.Tensor,  # [T, H] float/bf16
    gate_weight: torch.Tensor,  # [E, H] float32
    correction_bias: torch.Tensor,  # [E] float32 (read by noaux_tc only)
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: int | bool,
    scoring: str = "sigmoid",
    topk_method: str = "noaux_tc",
    block_t: int = 1,
    num_warps: int = 4,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (topk_weights [T, top_k] float32, topk_ids [T, top_k] int32), as `moe_router_reference`.

    Runs the op's launch plan (`plan.py`: the float32 gate GEMM kernel, then the routing kernel) in every mode of
    the op (`topk_method` noaux_tc | greedy | group_limited_greedy, `scoring` sigmoid | softmax); ValueError naming
    the attribute for a combination the op does not define.
    `out`: optional preallocated (weights, ids) to write into (contiguous, of those shapes and dtypes).
    """
    t = hidden.shape[0]
    e = gate_weight.shape[0]
    check_attributes(top_k=top_k, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                     scoring=scoring, topk_method=topk_method, experts=e)
    if correction_bias.shape != (e,):
        raise ValueError(f"MoERouter: correction_bias has shape {tuple(correction_bias.shape)}, expected ({e},)")
    device = hidden.device
    if out is None:
        weights = torch.empty(t, top_k, dtype=torch.float32, device=device)
        ids = torch.empty(t, top_k, dtype=torch.int32, device=device)
    else:
        weights, ids = out
        if weights.shape != (t, top_k) or weights.dtype != torch.float32 or not weights.is_contiguous():
            raise ValueError("MoERouter: out weights must be a contiguous float32 [T, top_k] tensor")
        if ids.shape != (t, top_k) or ids.dtype != torch.int32 or not ids.is_contiguous():
            raise ValueError("MoERouter: out ids must be a contiguous int32 [T, top_k] tensor")
    if t == 0:
        return weights, ids
    _check_device(_noaux_tc_router_kernel, device)
    attrs = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                 norm_topk_prob=int(norm_topk_prob), scoring=scoring, topk_method=topk_method)
    plan = router_plan(RouterProblem(t, hidden.shape[1], e, str(hidden.dtype).removeprefix("torch."),
                                     tuple(sorted(attrs.items()))), block_t=block_t, num_warps=num_warps)
    TritonRunner().run(plan, [hidden.contiguous(), gate_weight.to(torch.float32).contiguous(),
                              correction_bias.to(torch.float32).contiguous()], [weights, ids])
    return weights, ids


# --------------------------------------------------------------------------------------------------------------
# interpreter / native


def _check_device(kernel: Any, device: torch.device) -> None:
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            "MoERouter (triton): tensors are on the CPU but triton was imported without TRITON_INTERPRET=1; "
            "set it before the first `import triton` to run the kernels in Triton's interpreter"
        )
