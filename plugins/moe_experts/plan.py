"""`r1c::MoEExperts` launch plans: which kernels run for a token count, with which tiles, and the workspace.

Shapes: T = tokens, K = top_k, E = experts, H = hidden, I = expert intermediate size. The op's buffers are
inputs 0 hidden [T, H], 1 topk_weights [T, K] float32, 2 topk_ids [T, K] int32, 3 w13 [E, 2I, H], 4 w2 [E, H, I],
5 w13_scale, 6 w2_scale (FP8 only), and output 0 [T, H] in hidden's dtype; every one contiguous.

Configs by token count (`select_config`), reasoned for Hopper (FP8 `wgmma` m64nNk32 per warpgroup, 228 KB of shared
memory and 64K registers per SM) and checked on the CPU with `ptxas -v` (no spills; `tests/test_kernels_triton.py`):
  * T*K <= 32 (decode): the GEMV path of `kernels_decode.py` (memory bound on the chosen experts' weights).
  * rows per expert T*K/E <= 16, <= 48: row blocks of 16 / 32 with the MMA transposed (SWAP_AB: 64 weight rows per
    warpgroup on the MMA's M side), 4 warps: at these sizes the GEMMs stream weights, and a 64-row block would be
    mostly padding.
  * more (prefill): 64-row blocks; GEMM1 on 8 warps (two warpgroups, each 64 x 64 of the tile: a 4-warp program
    would hold two 64x128 float32 accumulators plus the per-K-step products, 255 registers and spills), 3 pipeline
    stages (48 KB per stage: A, gate and up tiles); GEMM2 (one 64 x 128 accumulator) on 4 warps, 4 stages: two
    programs per SM hide each other's per-K-step promotion (the first H200 sweep: 7.32 ms against 7.60 ms with
    8 warps at 4096 tokens).
The experts' weights are read once per row block that uses them, and the blocks of one expert are adjacent in
launch order (rows fastest), so repeated reads of a weight tile hit L2.
"""

from __future__ import annotations

import dataclasses

import triton

from r1c.plugins.fp8_triton import QUANT_BLOCK, quant_act_launch
from r1c.plugins.launch import Buf, Launch, Plan, WorkspaceBuilder, launch, make_plan
from r1c.plugins.moe_experts.kernels import (
    _moe_combine_kernel,
    _moe_count_kernel,
    _moe_gemm1_swiglu_kernel,
    _moe_gemm2_kernel,
    _moe_offsets_kernel,
    _moe_scatter_kernel,
)
from r1c.plugins.moe_experts.kernels_decode import _moe_decode_gemm1_kernel, _moe_decode_gemm2_combine_kernel

DECODE_MAX_PAIRS = 32  # the decode path up to this many (token, slot) pairs
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
FP8 = "float8_e4m3fn"


@dataclasses.dataclass(frozen=True)
class ExpertsProblem:
    tokens: int
    top_k: int
    experts: int
    hidden: int
    inter: int
    hidden_dtype: str  # float32 | bfloat16 | float16
    weight_dtype: str  # float8_e4m3fn (quant fp8_block128) | float32 | bfloat16 | float16 (quant none)

    @property
    def quant(self) -> bool:
        return self.weight_dtype == FP8

    @property
    def pairs(self) -> int:
        return self.tokens * self.top_k

    @property
    def y_dtype(self) -> str:
        """Per-pair expert outputs before the combine: float32 for float32 hidden, else hidden's dtype."""
        return "float32" if self.hidden_dtype == "float32" else self.hidden_dtype


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    path: str  # "decode" | "sorted"
    block_m: int = 64
    gemm1_warps: int = 8
    gemm1_stages: int = 3
    gemm2_warps: int = 4
    gemm2_stages: int = 4
    gemm2_block_n: int = 128
    chunk: int = 256  # pairs per program of the count / scatter kernels
    sub: int = 32  # pairs ranked at a time in the scatter kernel
    decode_block_n1: int = 32
    decode_block_n2: int = 16


def sorted_config(block_m: int) -> ExpertsConfig:
    """The sorted path's tiles for row blocks of `block_m` (GEMM1 on 8 warps from 64 rows up, see the module
    docstring)."""
    return ExpertsConfig("sorted", block_m, 8 if block_m >= 64 else 4, 3, 4, 4)


def pick_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block of the sorted path: small when experts get few rows each (less padding, less wasted MMA)."""
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64


def select_config(p: ExpertsProblem) -> ExpertsConfig:
    """The kernels and tiles for this token count (see the module docstring)."""
    if p.pairs <= DECODE_MAX_PAIRS:
        return ExpertsConfig("decode")
    return sorted_config(pick_block_m(p.pairs, p.experts))


def quantizes_activations(p: ExpertsProblem, config: ExpertsConfig | None = None) -> bool:
    """Whether the kernels quantize hidden and the SwiGLU output to FP8 (1x128): FP8 weights on the sorted path;
    the decode path multiplies the unquantized activations by the dequantized weights."""
    return p.quant and (config or select_config(p)).path == "sorted"


def config_boundaries(top_k: int, experts: int) -> list[int]:
    """The largest token count of each config bucket (workspace sizes grow with T inside a bucket)."""
    return [DECODE_MAX_PAIRS // top_k, 16 * experts // top_k, 48 * experts // top_k]


def max_sorted_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the padded layout in the worst case (every used expert wastes block_m - 1 rows), whole blocks."""
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


def _interpreted() -> bool:
    from r1c.plugins._triton import is_interpreted

    return is_interpreted(_moe_gemm2_kernel)


def dot_options(weight_dtype: str) -> dict[str, object]:
    """Constexprs for the dot: float32 weights multiply in IEEE float32 (no TF32). Triton 3.9's interpreter
    multiplies bf16 dot operands as their raw 16-bit integers: there the kernels convert them to float32 first
    (bf16 products are exact in float32, so the numerics are those of a bf16 MMA)."""
    upcast = weight_dtype == "bfloat16" and _interpreted()
    return {"DOT_PRECISION": "ieee" if weight_dtype == "float32" or upcast else "tf32", "UPCAST": upcast}


# ---- the launches, one builder per kernel (the plan and the stage wrappers share them) ------------------------------
def align_launches(ids: Buf, sorted_ids: Buf, block_expert: Buf, ws: WorkspaceBuilder, numel: int, experts: int,
                   block_m: int, chunk: int = 256, sub: int = 32) -> list[Launch]:
    chunks = triton.cdiv(numel, chunk)
    max_rows = max_sorted_rows(numel, experts, block_m)
    counts = ws.add("align.counts", "int32", (chunks, experts))
    base = ws.add("align.chunk_base", "int32", (chunks, experts))
    block_e = max(triton.next_power_of_2(experts), 2)
    return [
        launch("moe_count", _moe_count_kernel, (chunks,),
               {"topk_ids_ptr": ids, "counts_ptr": counts, "NUMEL": numel, "NUM_EXPERTS": experts},
               {"BLOCK_E": block_e, "CHUNK": chunk}, dynamic=["NUMEL"]),
        launch("moe_offsets", _moe_offsets_kernel, (1,),
               {"counts_ptr": counts, "chunk_base_ptr": base, "sorted_ids_ptr": sorted_ids,
                "block_expert_ptr": block_expert, "NUM_CHUNKS": chunks, "NUMEL": numel, "NUM_EXPERTS": experts,
                "MAX_ROWS": max_rows},
               {"BLOCK_M": block_m, "BLOCK_E": block_e, "BLOCK_C": 16, "BLOCK_R": 32},
               dynamic=["NUM_CHUNKS", "NUMEL", "MAX_ROWS"], num_warps=8),
        launch("moe_scatter", _moe_scatter_kernel, (chunks,),
               {"topk_ids_ptr": ids, "chunk_base_ptr": base, "sorted_ids_ptr": sorted_ids, "NUMEL": numel,
                "NUM_EXPERTS": experts},
               {"BLOCK_E": block_e, "CHUNK": chunk, "SUB": min(sub, chunk)}, dynamic=["NUMEL"], num_warps=8),
    ]


def gemm1_launch(p: ExpertsProblem, c: ExpertsConfig, a: Buf, a_scale: Buf | None, w13: Buf, w13_scale: Buf | None,
                 sorted_ids: Buf, block_expert: Buf, act: Buf, act_scale: Buf | None) -> Launch:
    dummy = a  # an unused pointer argument (never dereferenced when QUANT is off)
    block_n = QUANT_BLOCK if p.quant else min(128, max(16, triton.next_power_of_2(p.inter)))
    max_rows = max_sorted_rows(p.pairs, p.experts, c.block_m)
    hb, ib = triton.cdiv(p.hidden, QUANT_BLOCK), triton.cdiv(p.inter, QUANT_BLOCK)
    return launch(
        "moe_gemm1_swiglu", _moe_gemm1_swiglu_kernel, (triton.cdiv(p.inter, block_n), max_rows // c.block_m),
        {"a_ptr": a, "a_scale_ptr": a_scale or dummy, "w_ptr": w13, "w_scale_ptr": w13_scale or dummy,
         "sorted_ids_ptr": sorted_ids, "block_expert_ptr": block_expert, "act_ptr": act,
         "act_scale_ptr": act_scale or dummy, "H": p.hidden, "INTER": p.inter, "NUMEL": p.pairs,
         "NUM_EXPERTS": p.experts, "stride_a": p.hidden, "stride_as": hb if p.quant else 0,
         "stride_we": 2 * p.inter * p.hidden, "stride_wn": p.hidden,
         "stride_wse": triton.cdiv(2 * p.inter, QUANT_BLOCK) * hb if p.quant else 0,
         "stride_wsn": hb if p.quant else 0, "stride_act": p.inter, "stride_acts": ib if p.quant else 0},
        {"TOP_K": p.top_k, "QUANT": p.quant, "UP_ALIGNED": p.inter % QUANT_BLOCK == 0, **dot_options(p.weight_dtype),
         "SWAP_AB": c.block_m < 64,
         "BLOCK_M": c.block_m, "BLOCK_N": block_n, "BLOCK_K": QUANT_BLOCK if p.quant else 64},
        dynamic=["NUMEL"], num_warps=c.gemm1_warps, num_stages=c.gemm1_stages,
    )


def gemm2_launch(p: ExpertsProblem, c: ExpertsConfig, act: Buf, act_scale: Buf | None, w2: Buf,
                 w2_scale: Buf | None, sorted_ids: Buf, block_expert: Buf, weights: Buf, y: Buf) -> Launch:
    dummy = act
    max_rows = max_sorted_rows(p.pairs, p.experts, c.block_m)
    hb, ib = triton.cdiv(p.hidden, QUANT_BLOCK), triton.cdiv(p.inter, QUANT_BLOCK)
    return launch(
        "moe_gemm2", _moe_gemm2_kernel, (triton.cdiv(p.hidden, c.gemm2_block_n), max_rows // c.block_m),
        {"act_ptr": act, "act_scale_ptr": act_scale or dummy, "w_ptr": w2, "w_scale_ptr": w2_scale or dummy,
         "sorted_ids_ptr": sorted_ids, "block_expert_ptr": block_expert, "topk_weights_ptr": weights, "y_ptr": y,
         "H": p.hidden, "INTER": p.inter, "NUMEL": p.pairs, "NUM_EXPERTS": p.experts, "stride_act": p.inter,
         "stride_acts": ib if p.quant else 0, "stride_we": p.hidden * p.inter, "stride_wn": p.inter,
         "stride_wse": hb * ib if p.quant else 0, "stride_wsn": ib if p.quant else 0, "stride_y": p.hidden},
        {"QUANT": p.quant, **dot_options(p.weight_dtype), "SWAP_AB": c.block_m < 64, "BLOCK_M": c.block_m,
         "BLOCK_N": c.gemm2_block_n, "BLOCK_K": QUANT_BLOCK if p.quant else 64},
        dynamic=["NUMEL"], num_warps=c.gemm2_warps, num_stages=c.gemm2_stages,
    )


def combine_launch(y: Buf, ids: Buf, out: Buf, tokens: int, top_k: int, experts: int, hidden: int) -> Launch:
    block_h = min(1024, triton.next_power_of_2(hidden))
    return launch("moe_combine", _moe_combine_kernel, (tokens, triton.cdiv(hidden, block_h)),
                  {"y_ptr": y, "topk_ids_ptr": ids, "out_ptr": out, "H": hidden, "NUM_EXPERTS": experts,
                   "stride_y": hidden, "stride_out": hidden},
                  {"TOP_K": top_k, "BLOCK_H": block_h})


def decode_launches(p: ExpertsProblem, c: ExpertsConfig, ws: WorkspaceBuilder) -> list[Launch]:
    hidden, weights, ids, w13, w2 = (Buf("in", i, d) for i, d in enumerate(
        (p.hidden_dtype, "float32", "int32", p.weight_dtype, p.weight_dtype)))
    w13_s = Buf("in", 5, "float32") if p.quant else hidden
    w2_s = Buf("in", 6, "float32") if p.quant else hidden
    act = ws.add("decode.act", "float32", (p.pairs, p.inter))
    hb, ib, i2b = (triton.cdiv(n, QUANT_BLOCK) for n in (p.hidden, p.inter, 2 * p.inter))
    return [
        launch("moe_decode_gemm1", _moe_decode_gemm1_kernel, (p.pairs, triton.cdiv(p.inter, c.decode_block_n1)),
               {"x_ptr": hidden, "topk_ids_ptr": ids, "w_ptr": w13, "w_scale_ptr": w13_s, "act_ptr": act,
                "H": p.hidden, "INTER": p.inter, "NUM_EXPERTS": p.experts, "stride_x": p.hidden,
                "stride_we": 2 * p.inter * p.hidden, "stride_wn": p.hidden,
                "stride_wse": i2b * hb if p.quant else 0, "stride_wsn": hb if p.quant else 0, "stride_act": p.inter},
               {"TOP_K": p.top_k, "QUANT": p.quant, "BLOCK_N": c.decode_block_n1, "BLOCK_K": QUANT_BLOCK}),
        launch("moe_decode_gemm2_combine", _moe_decode_gemm2_combine_kernel,
               (p.tokens, triton.cdiv(p.hidden, c.decode_block_n2)),
               {"act_ptr": act, "topk_ids_ptr": ids, "topk_weights_ptr": weights, "w_ptr": w2, "w_scale_ptr": w2_s,
                "out_ptr": Buf("out", 0, p.hidden_dtype), "H": p.hidden, "INTER": p.inter,
                "NUM_EXPERTS": p.experts, "stride_act": p.inter, "stride_we": p.hidden * p.inter,
                "stride_wn": p.inter, "stride_wse": hb * ib if p.quant else 0, "stride_wsn": ib if p.quant else 0,
                "stride_out": p.hidden},
               {"TOP_K": p.top_k, "QUANT": p.quant, "BLOCK_N": c.decode_block_n2, "BLOCK_K": QUANT_BLOCK}),
    ]


def experts_plan(p: ExpertsProblem, config: ExpertsConfig | None = None) -> Plan:
    """The whole op for `p` (inputs and output as in the module docstring)."""
    c = config or select_config(p)
    ws = WorkspaceBuilder()
    if p.tokens == 0:
        return make_plan([], ws)
    if c.path == "decode":
        return make_plan(decode_launches(p, c, ws), ws)
    if c.path != "sorted":
        raise ValueError(f"MoEExperts: unknown path {c.path!r}")
    hidden, weights, ids, w13, w2 = (Buf("in", i, d) for i, d in enumerate(
        (p.hidden_dtype, "float32", "int32", p.weight_dtype, p.weight_dtype)))
    max_rows = max_sorted_rows(p.pairs, p.experts, c.block_m)
    sorted_ids = ws.add("sorted_ids", "int32", (max_rows,))
    block_expert = ws.add("block_expert", "int32", (max_rows // c.block_m,))
    launches = align_launches(ids, sorted_ids, block_expert, ws, p.pairs, p.experts, c.block_m, c.chunk, c.sub)
    a_scale = act_scale = w13_s = w2_s = None
    if p.quant:
        a = ws.add("hidden_fp8", FP8, (p.tokens, p.hidden))
        a_scale = ws.add("hidden_scale", "float32", (p.tokens, triton.cdiv(p.hidden, QUANT_BLOCK)))
        launches.append(quant_act_launch(hidden, a, a_scale, p.tokens, p.hidden))
        act = ws.add("act_fp8", FP8, (max_rows, p.inter))
        act_scale = ws.add("act_scale", "float32", (max_rows, triton.cdiv(p.inter, QUANT_BLOCK)))
        w13_s, w2_s = Buf("in", 5, "float32"), Buf("in", 6, "float32")
    else:
        a = hidden  # cast to the weights' dtype in the kernel
        act = ws.add("act", p.weight_dtype, (max_rows, p.inter))
    y = ws.add("y", p.y_dtype, (p.pairs, p.hidden))
    launches.append(gemm1_launch(p, c, a, a_scale, w13, w13_s, sorted_ids, block_expert, act, act_scale))
    launches.append(gemm2_launch(p, c, act, act_scale, w2, w2_s, sorted_ids, block_expert, weights, y))
    launches.append(combine_launch(y, ids, Buf("out", 0, p.hidden_dtype), p.tokens, p.top_k, p.experts, p.hidden))
    return make_plan(launches, ws)
