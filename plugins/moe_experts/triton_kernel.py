"""`r1c::MoEExperts` in Triton: grouped expert GEMMs with FP8 block-scaled weights (and a bf16/fp32 variant).

The Python entry points over the launch plans of `plan.py` (kernels in `kernels.py` and `kernels_decode.py`), run
through Triton (`r1c.plugins.launch.TritonRunner`): `moe_experts_triton` is the whole op; `moe_align`,
`moe_gemm1_swiglu`, `moe_gemm2`, `moe_combine` run one stage each (the tests check the stages one by one). The
TensorRT plugin runs the same plans from ahead-of-time cubins.

Interpreter or native: as any `@triton.jit` kernel, these are interpreter functions when `TRITON_INTERPRET=1` was set
before `triton` was first imported in the process (Triton 3.9 fixes the kind of its own `tl.max`/`tl.sum`/
`tl.sigmoid`, themselves `@triton.jit` functions, at that import), and compiled ones otherwise; the wrappers then run
on CPU tensors, respectively CUDA tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from r1c.plugins._triton import is_interpreted
from r1c.plugins.fp8_triton import FP8_MAX, QUANT_BLOCK, quantize_act_1x128, quantize_act_1x128_reference
from r1c.plugins.launch import Buf, Plan, TritonRunner, WorkspaceBuilder, make_plan
from r1c.plugins.moe_experts.kernels import _moe_gemm2_kernel
from r1c.plugins.moe_experts.plan import (
    DECODE_MAX_PAIRS,
    ExpertsConfig,
    ExpertsProblem,
    align_launches,
    combine_launch,
    experts_plan,
    gemm1_launch,
    gemm2_launch,
    max_sorted_rows,
    pick_block_m,
    select_config,
    sorted_config,
)

__all__ = [
    "DECODE_MAX_PAIRS",
    "FP8_MAX",
    "QUANT_BLOCK",
    "MoeAlignment",
    "max_sorted_rows",
    "moe_align",
    "moe_combine",
    "moe_experts_fp8_triton",
    "moe_experts_triton",
    "moe_gemm1_swiglu",
    "moe_gemm2",
    "pick_block_m",
    "problem_of",
    "quantize_act_1x128",
    "quantize_act_1x128_reference",
]

# Called on every workspace region before the kernels run (the tests poison scratch memory with it).
scratch_init: Callable[[torch.Tensor], None] | None = None


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The stage wrappers' outputs come from here (the tests replace it with a poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _run(plan: Plan, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
    _check_device((inputs + outputs)[0].device)
    TritonRunner(init=scratch_init).run(plan, inputs, outputs)


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and not is_interpreted(_moe_gemm2_kernel):
        raise RuntimeError(
            "MoEExperts (triton): tensors are on the CPU but triton was imported without TRITON_INTERPRET=1; "
            "set it before the first `import triton` to run the kernels in Triton's interpreter"
        )


class MoeAlignment(NamedTuple):
    sorted_ids: torch.Tensor  # [max_rows] int32: pair index t*K+j, or T*K on padding rows
    block_expert: torch.Tensor  # [max_rows // block_m] int32: expert of each block, -1 past the last one
    block_m: int


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, chunk: int = 256,
              sub: int = 32) -> MoeAlignment:
    """The sorted, block-padded layout of the (token, slot) pairs of `topk_ids` [T, K] (see `kernels.py`)."""
    ids = topk_ids.to(torch.int32).contiguous()
    numel = ids.numel()
    max_rows = max_sorted_rows(numel, num_experts, block_m)
    sorted_ids = _empty((max_rows,), torch.int32, ids.device)
    block_expert = _empty((max_rows // block_m,), torch.int32, ids.device)
    ws = WorkspaceBuilder()
    launches = align_launches(Buf("in", 0, "int32"), Buf("out", 0, "int32"), Buf("out", 1, "int32"), ws, numel,
                              num_experts, block_m, chunk, sub) if numel else []
    _run(make_plan(launches, ws), [ids], [sorted_ids, block_expert])
    return MoeAlignment(sorted_ids, block_expert, block_m)


def _stage_problem(tokens: int, top_k: int, w13_or_w2: torch.Tensor, hidden_dtype: str, gemm: int) -> ExpertsProblem:
    e, rows, cols = w13_or_w2.shape
    hidden, inter = (cols, rows // 2) if gemm == 1 else (rows, cols)
    return ExpertsProblem(tokens, top_k, e, hidden, inter, hidden_dtype, _dtype(w13_or_w2))


def moe_gemm1_swiglu(a: torch.Tensor, a_scale: torch.Tensor | None, w13: torch.Tensor, w13_scale: torch.Tensor | None,
                     align: MoeAlignment, top_k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SwiGLU(gate, up) of every sorted row: (act [max_rows, I], act_scale [max_rows, cdiv(I, 128)] or None).
    `a` [T, H] is FP8 with its 1x128 scales when w13 is FP8. Only the rows of real pairs are written."""
    p = _stage_problem(a.shape[0], top_k, w13, _dtype(a), 1)
    c = sorted_config(align.block_m)
    max_rows = align.sorted_ids.numel()
    quant = p.quant
    act = _empty((max_rows, p.inter), w13.dtype, a.device)
    act_scale = _empty((max_rows, -(-p.inter // QUANT_BLOCK)), torch.float32, a.device) if quant else None
    ins = [a, w13, align.sorted_ids, align.block_expert] + ([a_scale, w13_scale] if quant else [])  # type: ignore[list-item]
    outs = [act] + ([act_scale] if quant else [])  # type: ignore[list-item]
    la = gemm1_launch(p, c, Buf("in", 0, p.weight_dtype), Buf("in", 4, "float32") if quant else None,
                      Buf("in", 1, p.weight_dtype), Buf("in", 5, "float32") if quant else None,
                      Buf("in", 2, "int32"), Buf("in", 3, "int32"), Buf("out", 0, p.weight_dtype),
                      Buf("out", 1, "float32") if quant else None)
    _run(make_plan([la], WorkspaceBuilder()), ins, outs)  # type: ignore[arg-type]
    return act, act_scale


def moe_gemm2(act: torch.Tensor, act_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
              align: MoeAlignment, topk_weights: torch.Tensor, y_dtype: torch.dtype) -> torch.Tensor:
    """routing weight * W2(act) for every pair, in pair order: y [T*K, H] (rows of pairs with no valid expert are
    not written)."""
    t, k = topk_weights.shape
    p = _stage_problem(t, k, w2, str(y_dtype).removeprefix("torch."), 2)
    c = sorted_config(align.block_m)
    quant = p.quant
    y = _empty((t * k, p.hidden), y_dtype, act.device)
    weights = topk_weights.to(torch.float32).contiguous()
    ins = [act, w2, align.sorted_ids, align.block_expert, weights] + ([act_scale, w2_scale] if quant else [])
    la = gemm2_launch(p, c, Buf("in", 0, p.weight_dtype), Buf("in", 5, "float32") if quant else None,
                      Buf("in", 1, p.weight_dtype), Buf("in", 6, "float32") if quant else None,
                      Buf("in", 2, "int32"), Buf("in", 3, "int32"), Buf("in", 4, "float32"),
                      Buf("out", 0, _dtype(y)))
    _run(make_plan([la], WorkspaceBuilder()), ins, [y])  # type: ignore[arg-type]
    return y


def moe_combine(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over slots j (in order) of y[t*K + j]; pairs whose expert id is out of range add nothing."""
    t, k = topk_ids.shape
    ids = topk_ids.to(torch.int32).contiguous()
    la = combine_launch(Buf("in", 0, _dtype(y)), Buf("in", 1, "int32"), Buf("out", 0, _dtype(out)), t, k,
                        num_experts, y.shape[1])
    _run(make_plan([la], WorkspaceBuilder()), [y, ids], [out])
    return out


def _check_inputs(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor, w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None, quant: str) -> None:
    if hidden.dim() != 2 or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        got = f"{hidden.dtype} {tuple(hidden.shape)}"
        raise ValueError(f"MoEExperts: hidden must be [T, H] float32/bf16/fp16, got {got}")
    t, h = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        raise ValueError("MoEExperts: topk_ids and topk_weights must both be [T, K]")
    if w13.dim() != 3 or w13.shape[2] != h or w13.shape[1] % 2:
        raise ValueError(f"MoEExperts: w13 must be [E, 2I, H={h}], got {tuple(w13.shape)}")
    e, two_i, _ = w13.shape
    if tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"MoEExperts: w2 must be [E, H, I] = {(e, h, two_i // 2)}, got {tuple(w2.shape)}")
    if quant == "fp8_block128":
        if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
            raise ValueError("MoEExperts: fp8_block128 needs float8_e4m3fn w13 and w2")
        for name, w, s in (("w13_scale", w13, w13_scale), ("w2_scale", w2, w2_scale)):
            want = (e, -(-w.shape[1] // QUANT_BLOCK), -(-w.shape[2] // QUANT_BLOCK))
            if s is None or tuple(s.shape) != want or s.dtype != torch.float32:
                found = None if s is None else (s.dtype, tuple(s.shape))
                raise ValueError(f"MoEExperts: {name} must be float32 {want}, got {found}")
    elif quant == "none":
        if w13.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w2.dtype != w13.dtype:
            raise ValueError("MoEExperts: quant='none' needs w13 and w2 of one dtype among float32/bf16/fp16")
    else:
        raise ValueError(f"MoEExperts: unknown quant {quant!r}")


def problem_of(hidden: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor) -> ExpertsProblem:
    t, h = hidden.shape
    e, two_i, _ = w13.shape
    return ExpertsProblem(t, topk_ids.shape[1], e, h, two_i // 2, _dtype(hidden), _dtype(w13))


def moe_experts_triton(
    hidden: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    *,
    quant: str = "none",
    path: str = "auto",  # "auto" | "sorted" | "decode"
    block_m: int | None = None,
    config: ExpertsConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`r1c::MoEExperts` (activation "swiglu"); returns [T, H] in hidden's dtype (written into `out` if given).

    `config` overrides the tiles `select_config` picks for the token count; `path`/`block_m` override just those.
    Raises ValueError for inputs that do not fit the op's contract.
    """
    _check_inputs(hidden, topk_weights, topk_ids, w13, w2, w13_scale, w2_scale, quant)
    if path not in ("auto", "sorted", "decode"):
        raise ValueError(f"MoEExperts: unknown path {path!r}")
    _check_device(hidden.device)
    t, h = hidden.shape
    if out is None:
        out = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
    elif out.shape != (t, h) or out.dtype != hidden.dtype or not out.is_contiguous():
        raise ValueError("MoEExperts: out must be a contiguous [T, H] tensor in hidden's dtype")
    p = problem_of(hidden, topk_ids, w13)
    c = config or select_config(p)
    if path == "decode" and c.path != "decode":
        c = ExpertsConfig("decode")
    elif (path == "sorted" and c.path != "sorted") or (block_m is not None and block_m != c.block_m):
        c = sorted_config(block_m or (c.block_m if c.path == "sorted" else 16))
    ins = [hidden.contiguous(), topk_weights.to(torch.float32).contiguous(), topk_ids.to(torch.int32).contiguous(),
           w13.contiguous(), w2.contiguous()]
    if quant == "fp8_block128":
        assert w13_scale is not None and w2_scale is not None
        ins += [w13_scale.contiguous(), w2_scale.contiguous()]
    _run(experts_plan(p, c), ins, [out])
    return out


def moe_experts_fp8_triton(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                           w13_fp8: torch.Tensor, w2_fp8: torch.Tensor, w13_scale: torch.Tensor,
                           w2_scale: torch.Tensor, **kw: Any) -> torch.Tensor:
    """`r1c::MoEExperts` with quant="fp8_block128": FP8 e4m3fn weights, `weight_scale_inv` 128x128 block scales."""
    return moe_experts_triton(hidden, topk_weights, topk_ids, w13_fp8, w2_fp8, w13_scale, w2_scale,
                              quant="fp8_block128", **kw)


__all__ += ["ExpertsConfig", "ExpertsProblem", "select_config"]
