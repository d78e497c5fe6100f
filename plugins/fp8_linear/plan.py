"""`r1c::FP8Linear` launch plans: activation quantization, the FP8 GEMM (split over K at small M), the split reduce.

Buffers: inputs 0 x [M, K] (float32/bf16/fp16), 1 weight [N, K] float8_e4m3fn, 2 weight_scale [cdiv(N, 128),
cdiv(K, 128)] float32; output 0 y [M, N] in x's dtype; all contiguous.

Tiles by token count (`select_config`), for Hopper's FP8 `wgmma` (m64 per warpgroup, K-major operands), checked
for register spills with `ptxas -v` on the CPU. Every config runs on one warpgroup (4 warps): the per-128-K
promotion (`acc += dot * scale`) waits for each K step's MMA, and what hides that wait is a second program on the
SM, which 4-warp tiles leave room for (64 x 128: ~2 programs per SM by registers and shared memory) and the
8-warp 128 x 128 tiles of the first H200 run did not (1 per SM: 482 TFLOP/s, 0.61x cuBLAS bf16 at 4096 tokens).
vLLM's Triton block-FP8 GEMM, tuned on the H200 for K = 7168, lands on the same shapes (4 warps, 64-128 rows,
64-128 columns, 3-5 stages). The GPU check's sweep times the alternatives (scripts/gpu_check_sweep.py):
  * M <= 16 (decode): SWAP_AB with 64 weight rows per program on the MMA's M side and 16 token columns, 4 stages;
    a quantization launch first, then the K loop split until the grid has >= TARGET_PROGRAMS programs: the GEMM
    streams the weight, so the point is many loads in flight. The activation quantization fused into the GEMM
    (QUANT_A, `fuse_quant`) saves a launch but re-quantizes x in every program: on the H200 (third GPU check, 7168
    -> 2048, 1 token) it took 44.3 us against 17.6 us for the quantization launch + GEMM, so it is not the default.
  * M <= 64: 64 x 128 tiles, 4 stages, quantization kernel first; split over K as above.
  * M > 64 (prefill): 64 x 128 tiles, 4 stages, programs grouped by 8 row blocks (L2 reuse of the weight
    columns), no split.
"""

from __future__ import annotations

import dataclasses

import triton

from r1c.plugins.fp8_linear.kernels import _fp8_linear_kernel, _splitk_reduce_kernel
from r1c.plugins.fp8_triton import QUANT_BLOCK, quant_act_launch
from r1c.plugins.launch import Buf, Plan, WorkspaceBuilder, launch, make_plan

FP8 = "float8_e4m3fn"
TARGET_PROGRAMS = 264  # 2 per SM of a 132-SM H100/H200: below this a decode GEMM leaves bandwidth unused
MAX_SPLITS = 32


@dataclasses.dataclass(frozen=True)
class LinearProblem:
    tokens: int  # M
    in_features: int  # K
    out_features: int  # N
    x_dtype: str  # float32 | bfloat16 | float16 (also y's)


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    block_m: int
    block_n: int
    swap_ab: bool
    num_warps: int
    num_stages: int
    group_m: int = 1
    split_to: int = 0  # split the K loop until the grid has this many programs (0: no split)
    fuse_quant: bool = False  # the GEMM quantizes x itself (QUANT_A) instead of a quantization launch


def select_config(p: LinearProblem) -> LinearConfig:
    """The tiles for this token count (see the module docstring)."""
    if p.tokens <= 16:
        return LinearConfig(16, 64, True, 4, 4, split_to=TARGET_PROGRAMS)
    if p.tokens <= 64:
        return LinearConfig(64, 128, False, 4, 4, split_to=TARGET_PROGRAMS)
    return LinearConfig(64, 128, False, 4, 4, group_m=8)


def config_boundaries() -> list[int]:
    """The largest token count of each config bucket."""
    return [16, 64]


def splits(p: LinearProblem, c: LinearConfig) -> int:
    """How many ways the K loop is split: enough programs for the GPU at small M (`c.split_to`), else 1."""
    k_blocks = triton.cdiv(p.in_features, QUANT_BLOCK)
    tiles = triton.cdiv(p.tokens, c.block_m) * triton.cdiv(p.out_features, c.block_n)
    if not c.split_to or tiles >= c.split_to:
        return 1
    want = min(MAX_SPLITS, k_blocks, triton.cdiv(c.split_to, tiles))
    per = triton.cdiv(k_blocks, want)
    return triton.cdiv(k_blocks, per)  # no empty split


def linear_plan(p: LinearProblem, config: LinearConfig | None = None) -> Plan:
    """The whole op for `p` (buffers as in the module docstring)."""
    c = config or select_config(p)
    ws = WorkspaceBuilder()
    m, k, n = p.tokens, p.in_features, p.out_features
    if m == 0:
        return make_plan([], ws)
    kb = triton.cdiv(k, QUANT_BLOCK)
    x, w, w_s, y = Buf("in", 0, p.x_dtype), Buf("in", 1, FP8), Buf("in", 2, "float32"), Buf("out", 0, p.x_dtype)
    launches = []
    if c.fuse_quant:
        a, a_s = x, w_s  # a_scale is not read with QUANT_A
    else:
        a = ws.add("x_fp8", FP8, (m, k))
        a_s = ws.add("x_scale", "float32", (m, kb))
        launches.append(quant_act_launch(x, a, a_s, m, k))
    s = splits(p, c)
    per = triton.cdiv(kb, s)
    target = ws.add("partials", "float32", (s, m, n)) if s > 1 else y
    launches.append(launch(
        "fp8_linear", _fp8_linear_kernel, (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n), s),
        {"a_ptr": a, "a_scale_ptr": a_s, "w_ptr": w, "w_scale_ptr": w_s, "out_ptr": target, "M": m, "N": n, "K": k,
         "K_PER_SPLIT": per, "stride_am": k, "stride_asm": kb, "stride_wn": k, "stride_wsn": kb, "stride_om": n,
         "stride_split": m * n if s > 1 else 0},
        {"SPLIT": s > 1, "QUANT_A": c.fuse_quant, "SWAP_AB": c.swap_ab, "GROUP_M": c.group_m, "BLOCK_M": c.block_m,
         "BLOCK_N": c.block_n, "BLOCK_K": QUANT_BLOCK},
        dynamic=["M", "K_PER_SPLIT", "stride_split"], num_warps=c.num_warps, num_stages=c.num_stages,
    ))
    if s > 1:
        block = 1024
        launches.append(launch("splitk_reduce", _splitk_reduce_kernel, (triton.cdiv(m * n, block),),
                               {"part_ptr": target, "out_ptr": y, "NUMEL": m * n, "SPLITS": s}, {"BLOCK": block},
                               dynamic=["NUMEL", "SPLITS"]))
    return make_plan(launches, ws)
