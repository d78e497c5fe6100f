"""`r1c::MoEExperts` in Triton: grouped expert GEMMs with FP8 block-scaled weights (and a bf16/fp32 variant).

Two paths, chosen per call (`path="auto"`):

Sorted path (prefill, T*K > DECODE_MAX_PAIRS) — five launches:
  1. `_moe_align_kernel` (one program): counts the (token, slot) pairs per expert, pads every expert's count up to
     BLOCK_M, lays the experts out one after the other, and writes `sorted_ids` (the pair index t*K+j of every row
     of that layout, or the sentinel T*K on padding rows; pairs of one expert in ascending pair order, as the
     reference's stable argsort) and `block_expert` (the expert of every BLOCK_M-row block, -1 past the end).
     The buffers are sized for the worst case, T*K + min(E, T*K) * (BLOCK_M - 1) rows, so nothing waits for the
     GPU; blocks past the end exit at once. Experts with no pair get no block.
  2. `_quant_act_1x128_kernel`: per-token 1x128 dynamic quantization of `hidden` to FP8 e4m3fn (scale = amax/448,
     round to nearest even; `quantize_act_1x128_reference` is its exact PyTorch model), once per token, not once per
     (token, slot).
  3. `_moe_gemm1_swiglu_kernel`: for each (row block, 128 columns of I): gathers the tokens' FP8 rows, multiplies
     by the gate rows and the up rows of w13 (FP8 `tl.dot`, float32 accumulation, the activation scale x weight
     block scale applied per 128-deep K step: the accumulator is promoted to float32 every 128 products, as
     DeepSeek-V3 does), then SwiGLU, then quantizes the 128 SwiGLU outputs of each row to FP8 with their own
     1x128 scale — the input of GEMM2 never goes through memory in high precision. Rows stay in sorted order.
  4. `_moe_gemm2_kernel`: sorted rows x w2 (FP8, block scales as above), times the routing weight, stored to the
     pair's own row of a [T*K, H] buffer (the un-permute).
  5. `_moe_combine_kernel`: out[t] = sum over the K slots, in slot order (deterministic: no atomics).

Decode path (small batches, T*K <= DECODE_MAX_PAIRS) — two launches, no sorting, no activation quantization:
  * `_moe_decode_gemm1_kernel`: one program per ((token, slot) pair, BLOCK_N columns of I): a GEMV over the
    pair's expert's gate and up rows, FP8 weights dequantized in registers (block scale per 128 columns), hidden
    in float32; SwiGLU; float32 result to a [T*K, I] buffer. Pairs are the fastest launch dimension.
  * `_moe_decode_gemm2_combine_kernel`: one program per (token, BLOCK_N columns of H): loops over the token's K
    slots, GEMV with the slot's expert's w2 rows, weighted sum in slot order, written once to the output. Tokens are
    the fastest launch dimension.
  At T*K <= 32 the work is reading the weights of the chosen experts (memory bound: 44 MB per expert at R1
  shapes); tensor cores would need the M dimension padded to 16 or 64 rows, and a sort to group the rows, so a
  CUDA-core GEMV does the math. The programs of one weight tile for different pairs are adjacent in the launch
  order, so a tile shared by two pairs is read from HBM once and then from L2. Activations stay unquantized, so
  this path matches the exact reference to float32 rounding.

quant="none" (weights bf16/fp16/fp32) runs the same kernels with the FP8 steps off: the dot operands are in the
weights' dtype (hidden and the SwiGLU output are cast to it), float32 accumulation; float32 dots use
`input_precision="ieee"` (no TF32).

Interpreter or native: as any `@triton.jit` kernel, these are interpreter functions when `TRITON_INTERPRET=1` was set
before `triton` was first imported in the process (Triton 3.9 fixes the kind of its own `tl.max`/`tl.sum`/
`tl.sigmoid`, themselves `@triton.jit` functions, at that import), and compiled ones otherwise; the wrappers then run
on CPU tensors, respectively CUDA tensors. Rounding to FP8 is done by hand in float32 (exact round-to-nearest-even
onto the e4m3 grid) and only exact e4m3 values are converted: the interpreter's own float32 -> fp8 conversion does
not carry a rounding overflow into the exponent (31.9 becomes 16), and `/` lowers to the approximate `div.full.f32`
on sm_90, so the scale divisions use `tl.math.div_rn`. `compile_aot` compiles the kernels for sm_90 without a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from r1c.plugins._triton import AotSpec, compile_aot, is_interpreted

__all__ = [
    "DECODE_MAX_PAIRS",
    "FP8_MAX",
    "QUANT_BLOCK",
    "AotSpec",
    "MoeAlignment",
    "aot_specs",
    "compile_aot",
    "moe_align",
    "moe_combine",
    "moe_decode",
    "moe_experts_fp8_triton",
    "moe_experts_triton",
    "moe_gemm1_swiglu",
    "moe_gemm2",
    "quantize_act_1x128",
    "quantize_act_1x128_reference",
]

QUANT_BLOCK = 128  # FP8 block: weights 128x128, activations 1x128
FP8_MAX = 448.0
DECODE_MAX_PAIRS = 32  # path="auto" takes the decode path up to this many (token, slot) pairs
# In the kernels, 12582912.0 = 1.5 * 2**23: (x + M) - M rounds a float32 |x| < 2**22 to an integer, ties to even.


# --------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _moe_align_kernel(
    topk_ids_ptr,  # [NUMEL] int32
    sorted_ids_ptr,  # [MAX_ROWS] int32 out: pair index, or NUMEL on padding rows
    block_expert_ptr,  # [MAX_ROWS // BLOCK_M] int32 out: expert of the block, or -1 past the last block
    NUMEL,
    NUM_EXPERTS,
    MAX_ROWS,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,  # power of two >= NUM_EXPERTS
    CHUNK: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < NUM_EXPERTS
    offs_c = tl.arange(0, CHUNK)

    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, NUMEL, CHUNK):
        offs = start + offs_c
        ids = tl.load(topk_ids_ptr + offs, mask=offs < NUMEL, other=-1)
        ok = (offs < NUMEL) & (ids >= 0) & (ids < NUM_EXPERTS)
        counts += tl.histogram(ids, BLOCK_E, mask=ok)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    data_ends = starts + counts

    # every row of the layout: its owner expert; padding rows get the sentinel, first rows of blocks the block map
    for r0 in range(0, MAX_ROWS, CHUNK):
        r = r0 + offs_c
        r_ok = r < MAX_ROWS
        owner = tl.sum(((ends[None, :] <= r[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
        owner_data_end = tl.sum(tl.where(offs_e[None, :] == owner[:, None], data_ends[None, :], 0), axis=1)
        tl.store(sorted_ids_ptr + r, tl.zeros_like(r) + NUMEL, mask=r_ok & (r >= owner_data_end))
        block_owner = tl.where(r < total, owner, -1)
        tl.store(block_expert_ptr + r // BLOCK_M, block_owner, mask=r_ok & (r % BLOCK_M == 0))

    # data rows: pair i goes to starts[e] + (number of earlier pairs of expert e)
    running = starts
    for start in range(0, NUMEL, CHUNK):
        offs = start + offs_c
        ids = tl.load(topk_ids_ptr + offs, mask=offs < NUMEL, other=-1)
        ok = (offs < NUMEL) & (ids >= 0) & (ids < NUM_EXPERTS)
        earlier = (ids[:, None] == ids[None, :]) & (offs_c[None, :] < offs_c[:, None]) & ok[None, :]
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        base = tl.sum(tl.where(offs_e[None, :] == ids[:, None], running[None, :], 0), axis=1)
        tl.store(sorted_ids_ptr + base + rank, offs, mask=ok)
        running += tl.histogram(ids, BLOCK_E, mask=ok)


@triton.jit
def _quant_act_1x128_kernel(
    x_ptr,  # [T, H]
    q_ptr,  # [T, H] float8_e4m3fn out
    s_ptr,  # [T, cdiv(H, 128)] float32 out
    H,
    stride_x,
    stride_q,
    stride_s,
    BLOCK_G: tl.constexpr,  # 128-wide groups per program
):
    t = tl.program_id(0).to(tl.int64)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = offs_g[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = cols < H
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0.0, tl.math.div_rn(amax, 448.0), 1.0)
    # round x / scale to the nearest e4m3 value (ties to even), in float32
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    expo = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # e4m3: normal from 2**-6
    ulp = ((expo + 124) << 23).to(tl.float32, bitcast=True)  # 2**(expo - 3)
    inv_ulp = ((130 - expo) << 23).to(tl.float32, bitcast=True)  # 2**(3 - expo)
    y = ((y * inv_ulp + 12582912.0) - 12582912.0) * ulp
    tl.store(q_ptr + t * stride_q + cols, y.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + t * stride_s + offs_g, scale, mask=offs_g * 128 < H)


@triton.jit
def _moe_gemm1_swiglu_kernel(
    a_ptr,  # [T, H]: FP8 (QUANT) or the weights' dtype
    a_scale_ptr,  # [T, cdiv(H, 128)] float32 (QUANT)
    w_ptr,  # [E, 2I, H]: gate rows, then up rows
    w_scale_ptr,  # [E, cdiv(2I, 128), cdiv(H, 128)] float32 (QUANT)
    sorted_ids_ptr,
    block_expert_ptr,
    act_ptr,  # [MAX_ROWS, INTER] out: FP8 (QUANT) or the weights' dtype
    act_scale_ptr,  # [MAX_ROWS, cdiv(INTER, 128)] float32 out (QUANT)
    H,
    INTER,
    NUMEL,
    NUM_EXPERTS,
    stride_a,
    stride_as,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_act,
    stride_acts,
    TOP_K: tl.constexpr,
    QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 weights (no TF32); unused for fp8/bf16/fp16
    SWAP_AB: tl.constexpr,  # compute the transposed tile (for BLOCK_M < 64)
    UPCAST: tl.constexpr,  # interpreter only: bf16 dot operands through float32 (exact products)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # 128 when QUANT: one activation quantization group
    BLOCK_K: tl.constexpr,  # 128 when QUANT: one weight scale block
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if (expert < 0) | (expert >= NUM_EXPERTS):  # past the last block
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    valid = (pair >= 0) & (pair < NUMEL)  # padding rows hold NUMEL
    tok = tl.where(valid, pair // TOP_K, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    gate_rows = w_base + offs_n[:, None] * stride_wn
    up_rows = w_base + (offs_n + INTER)[:, None] * stride_wn
    a_rows = a_ptr + tok[:, None] * stride_a
    ws_base = w_scale_ptr + expert.to(tl.int64) * stride_wse
    if SWAP_AB:  # small row blocks: weight rows on the MMA's M side (64 per warpgroup), tokens on its N side
        acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(H, BLOCK_K)):
        kk = kb * BLOCK_K + offs_k
        k_ok = kk < H
        a = tl.load(a_rows + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(gate_rows + kk[None, :], mask=w_mask, other=0.0)
        wu = tl.load(up_rows + kk[None, :], mask=w_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        if QUANT:
            a_s = tl.load(a_scale_ptr + tok * stride_as + kb, mask=valid, other=0.0)
            s_g = tl.load(ws_base + (offs_n // 128) * stride_wsn + kb, mask=n_ok, other=0.0)
            s_u = tl.load(ws_base + ((offs_n + INTER) // 128) * stride_wsn + kb, mask=n_ok, other=0.0)
            if SWAP_AB:
                acc_g += tl.dot(wg, tl.trans(a)) * (s_g[:, None] * a_s[None, :])
                acc_u += tl.dot(wu, tl.trans(a)) * (s_u[:, None] * a_s[None, :])
            else:
                acc_g += tl.dot(a, tl.trans(wg)) * (a_s[:, None] * s_g[None, :])
                acc_u += tl.dot(a, tl.trans(wu)) * (a_s[:, None] * s_u[None, :])
        elif SWAP_AB:
            acc_g = tl.dot(wg, tl.trans(a), acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(wu, tl.trans(a), acc_u, input_precision=DOT_PRECISION)
        else:
            acc_g = tl.dot(a, tl.trans(wg), acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, tl.trans(wu), acc_u, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # SwiGLU: silu(gate) * up
    out_mask = valid[:, None] & n_ok[None, :]
    out_offs = rows[:, None].to(tl.int64) * stride_act + offs_n[None, :]
    if QUANT:
        # this tile's 128 columns are one 1x128 group of each row: quantize in the epilogue
        amax = tl.max(tl.abs(act), axis=1)
        scale = tl.where(amax > 0.0, tl.math.div_rn(amax, 448.0), 1.0)
        y = tl.math.div_rn(act, scale[:, None])
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        expo = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        ulp = ((expo + 124) << 23).to(tl.float32, bitcast=True)
        inv_ulp = ((130 - expo) << 23).to(tl.float32, bitcast=True)
        y = ((y * inv_ulp + 12582912.0) - 12582912.0) * ulp
        tl.store(act_ptr + out_offs, y.to(tl.float8e4nv), mask=out_mask)
        tl.store(act_scale_ptr + rows.to(tl.int64) * stride_acts + pid_n, scale, mask=valid)
    else:
        tl.store(act_ptr + out_offs, act.to(act_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _moe_gemm2_kernel(
    act_ptr,  # [MAX_ROWS, INTER] (sorted rows)
    act_scale_ptr,  # [MAX_ROWS, cdiv(INTER, 128)] float32 (QUANT)
    w_ptr,  # [E, H, INTER]
    w_scale_ptr,  # [E, cdiv(H, 128), cdiv(INTER, 128)] float32 (QUANT)
    sorted_ids_ptr,
    block_expert_ptr,
    topk_weights_ptr,  # [NUMEL] float32
    y_ptr,  # [NUMEL, H] out: routing weight * expert output, by pair
    H,
    INTER,
    NUMEL,
    NUM_EXPERTS,
    stride_act,
    stride_acts,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_y,
    QUANT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SWAP_AB: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128 when QUANT
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if (expert < 0) | (expert >= NUM_EXPERTS):  # past the last block
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    valid = (pair >= 0) & (pair < NUMEL)  # padding rows hold NUMEL
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + rows[:, None].to(tl.int64) * stride_act
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + offs_n[:, None] * stride_wn
    ws_base = w_scale_ptr + expert.to(tl.int64) * stride_wse + (offs_n // 128) * stride_wsn
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(INTER, BLOCK_K)):
        kk = kb * BLOCK_K + offs_k
        k_ok = kk < INTER
        a = tl.load(a_rows + kk[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if QUANT:
            a_s = tl.load(act_scale_ptr + rows.to(tl.int64) * stride_acts + kb, mask=valid, other=0.0)
            s_w = tl.load(ws_base + kb, mask=n_ok, other=0.0)
            if SWAP_AB:
                acc += tl.dot(w, tl.trans(a)) * (s_w[:, None] * a_s[None, :])
            else:
                acc += tl.dot(a, tl.trans(w)) * (a_s[:, None] * s_w[None, :])
        elif SWAP_AB:
            acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
    route_w = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0)
    acc = acc * route_w[:, None]
    y_offs = tl.where(valid, pair, 0).to(tl.int64)[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _moe_combine_kernel(
    y_ptr,  # [T * TOP_K, H]
    topk_ids_ptr,  # [T * TOP_K] int32
    out_ptr,  # [T, H]
    H,
    NUM_EXPERTS,
    stride_y,
    stride_out,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        expert = tl.load(topk_ids_ptr + pair + tl.zeros_like(offs))  # broadcast: masks stay vectors
        ok = mask & (expert >= 0) & (expert < NUM_EXPERTS)  # a pair with no valid expert has no row in y
        acc += tl.load(y_ptr + pair * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_decode_gemm1_kernel(
    x_ptr,  # [T, H]
    topk_ids_ptr,  # [T * TOP_K] int32
    w_ptr,  # [E, 2I, H]
    w_scale_ptr,  # [E, cdiv(2I, 128), cdiv(H, 128)] float32 (QUANT)
    act_ptr,  # [T * TOP_K, INTER] float32 out
    H,
    INTER,
    NUM_EXPERTS,
    stride_x,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_act,
    TOP_K: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128 when QUANT
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(topk_ids_ptr + pair)
    if (expert < 0) | (expert >= NUM_EXPERTS):
        return
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    gate_rows = w_base + offs_n[:, None] * stride_wn
    up_rows = w_base + (offs_n + INTER)[:, None] * stride_wn
    ws_base = w_scale_ptr + expert.to(tl.int64) * stride_wse
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(0, tl.cdiv(H, BLOCK_K)):
        kk = kb * BLOCK_K + offs_k
        k_ok = kk < H
        x = tl.load(x_ptr + tok * stride_x + kk, mask=k_ok, other=0.0).to(tl.float32)
        w_mask = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(gate_rows + kk[None, :], mask=w_mask, other=0.0).to(tl.float32)
        wu = tl.load(up_rows + kk[None, :], mask=w_mask, other=0.0).to(tl.float32)
        part_g = tl.sum(wg * x[None, :], axis=1)
        part_u = tl.sum(wu * x[None, :], axis=1)
        if QUANT:
            s_g = tl.load(ws_base + (offs_n // 128) * stride_wsn + kb, mask=n_ok, other=0.0)
            s_u = tl.load(ws_base + ((offs_n + INTER) // 128) * stride_wsn + kb, mask=n_ok, other=0.0)
            part_g = part_g * s_g
            part_u = part_u * s_u
        acc_g += part_g
        acc_u += part_u
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + pair.to(tl.int64) * stride_act + offs_n, act, mask=n_ok)


@triton.jit
def _moe_decode_gemm2_combine_kernel(
    act_ptr,  # [T * TOP_K, INTER] float32
    topk_ids_ptr,  # [T * TOP_K] int32
    topk_weights_ptr,  # [T * TOP_K] float32
    w_ptr,  # [E, H, INTER]
    w_scale_ptr,  # [E, cdiv(H, 128), cdiv(INTER, 128)] float32 (QUANT)
    out_ptr,  # [T, H]
    H,
    INTER,
    NUM_EXPERTS,
    stride_act,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_out,
    TOP_K: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128 when QUANT
):
    t = tl.program_id(0).to(tl.int64)  # tokens fastest: programs that may share a weight tile run together
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        expert = tl.load(topk_ids_ptr + pair)
        ok = (expert >= 0) & (expert < NUM_EXPERTS)
        expert = tl.where(ok, expert, 0).to(tl.int64)
        route_w = tl.where(ok, tl.load(topk_weights_ptr + pair), 0.0)
        w_rows = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn
        ws_base = w_scale_ptr + expert * stride_wse + (offs_n // 128) * stride_wsn
        part = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for kb in range(0, tl.cdiv(INTER, BLOCK_K)):
            kk = kb * BLOCK_K + offs_k
            k_ok = kk < INTER
            a = tl.where(ok, tl.load(act_ptr + pair * stride_act + kk, mask=k_ok, other=0.0), 0.0)
            w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            dots = tl.sum(w * a[None, :], axis=1)
            if QUANT:
                dots = dots * tl.load(ws_base + kb, mask=n_ok, other=0.0)
            part += dots
        acc += part * route_w
    tl.store(out_ptr + t * stride_out + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# --------------------------------------------------------------------------------------------------------------
# launch wrappers (one per kernel; `moe_experts_triton` composes them)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every scratch buffer comes from here (the tests replace it with a poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)



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


def max_sorted_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the padded layout in the worst case (every used expert wastes block_m - 1 rows), whole blocks."""
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, chunk: int = 64) -> MoeAlignment:
    """The sorted, block-padded layout of the (token, slot) pairs of `topk_ids` [T, K] (see `_moe_align_kernel`)."""
    _check_device(topk_ids.device)
    ids = topk_ids.to(torch.int32).contiguous().view(-1)
    numel = ids.numel()
    max_rows = max_sorted_rows(numel, num_experts, block_m)
    sorted_ids = _empty((max_rows,), torch.int32, ids.device)
    block_expert = _empty((max_rows // block_m,), torch.int32, ids.device)
    if max_rows:
        _moe_align_kernel[(1,)](
            ids,
            sorted_ids,
            block_expert,
            numel,
            num_experts,
            max_rows,
            BLOCK_M=block_m,
            BLOCK_E=max(triton.next_power_of_2(num_experts), 2),
            CHUNK=chunk,
            num_warps=8,
        )
    return MoeAlignment(sorted_ids, block_expert, block_m)


def quantize_act_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 1x128 dynamic FP8 quantization: (q float8_e4m3fn [T, H], scale float32 [T, cdiv(H, 128)]),
    x ~= q * scale; bitwise equal to `quantize_act_1x128_reference`."""
    _check_device(x.device)
    x = x.contiguous()
    t, h = x.shape
    groups = triton.cdiv(h, QUANT_BLOCK)
    q = _empty((t, h), torch.float8_e4m3fn, x.device)
    s = _empty((t, groups), torch.float32, x.device)
    block_g = min(8, triton.next_power_of_2(groups))
    if t:
        _quant_act_1x128_kernel[(t, triton.cdiv(groups, block_g))](
            x, q, s, h, x.stride(0), q.stride(0), s.stride(0), BLOCK_G=block_g, num_warps=4
        )
    return q, s


def quantize_act_1x128_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch model of the kernels' activation quantization: per row and 128 columns, scale = amax / 448 (1 if the
    group is all zero), q = round-to-nearest-even(x / scale) in e4m3fn; the last group of a row may be narrower."""
    x = x.to(torch.float32)
    t, h = x.shape
    groups = -(-h // QUANT_BLOCK)
    padded = torch.zeros(t, groups * QUANT_BLOCK, dtype=torch.float32, device=x.device)
    padded[:, :h] = x
    tiles = padded.view(t, groups, QUANT_BLOCK)
    amax = tiles.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(t, groups * QUANT_BLOCK)[:, :h].contiguous(), scale


def _upcast_dot(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter multiplies bf16 `tl.dot` operands as their raw 16-bit integers; there, the kernels
    convert them to float32 first (bf16 products are exact in float32, so the numerics are those of a bf16 MMA)."""
    return dtype == torch.bfloat16 and is_interpreted(_moe_gemm2_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or _upcast_dot(dtype) else "tf32"


def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float32, device=device)


def moe_gemm1_swiglu(
    a: torch.Tensor,  # [T, H] FP8 (quant) or the weights' dtype
    a_scale: torch.Tensor | None,  # [T, cdiv(H, 128)] (quant)
    w13: torch.Tensor,
    w13_scale: torch.Tensor | None,
    align: MoeAlignment,
    top_k: int,
    *,
    num_warps: int = 4,
    num_stages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SwiGLU(gate, up) of every sorted row: (act [max_rows, I], act_scale [max_rows, cdiv(I, 128)] or None).
    Only the rows of real pairs are written."""
    quant = w13.dtype == torch.float8_e4m3fn
    e, two_i, h = w13.shape
    inter = two_i // 2
    max_rows = align.sorted_ids.numel()
    act = _empty((max_rows, inter), torch.float8_e4m3fn if quant else w13.dtype, a.device)
    act_scale = _empty((max_rows, triton.cdiv(inter, QUANT_BLOCK)), torch.float32, a.device) if quant else None
    if quant:
        assert a_scale is not None and w13_scale is not None
    a_s = a_scale if a_scale is not None else _dummy(a.device)
    w_s = w13_scale if w13_scale is not None else _dummy(a.device)
    act_s = act_scale if act_scale is not None else _dummy(a.device)
    block_n = QUANT_BLOCK if quant else min(128, max(16, triton.next_power_of_2(inter)))
    grid = (align.block_expert.numel(), triton.cdiv(inter, block_n))
    if grid[0]:
        _moe_gemm1_swiglu_kernel[grid](
            a,
            a_s,
            w13,
            w_s,
            align.sorted_ids,
            align.block_expert,
            act,
            act_s,
            h,
            inter,
            a.shape[0] * top_k,
            e,
            a.stride(0),
            a_s.stride(0),
            w13.stride(0),
            w13.stride(1),
            w_s.stride(0) if quant else 0,
            w_s.stride(1) if quant else 0,
            act.stride(0),
            act_s.stride(0),
            TOP_K=top_k,
            QUANT=quant,
            DOT_PRECISION=_dot_precision(w13.dtype),
            SWAP_AB=align.block_m < 64,
            UPCAST=_upcast_dot(w13.dtype),
            BLOCK_M=align.block_m,
            BLOCK_N=block_n,
            BLOCK_K=QUANT_BLOCK if quant else 64,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return act, act_scale


def moe_gemm2(
    act: torch.Tensor,
    act_scale: torch.Tensor | None,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    align: MoeAlignment,
    topk_weights: torch.Tensor,  # [T, K]
    y_dtype: torch.dtype,
    *,
    block_n: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """routing weight * W2(act) for every pair, in pair order: y [T*K, H] (rows of pairs with no valid expert are
    not written)."""
    quant = w2.dtype == torch.float8_e4m3fn
    e, h, inter = w2.shape
    numel = topk_weights.numel()
    weights = topk_weights.to(torch.float32).contiguous().view(-1)
    y = _empty((numel, h), y_dtype, act.device)
    if quant:
        assert act_scale is not None and w2_scale is not None
    act_s = act_scale if act_scale is not None else _dummy(act.device)
    w_s = w2_scale if w2_scale is not None else _dummy(act.device)
    grid = (align.block_expert.numel(), triton.cdiv(h, block_n))
    if grid[0]:
        _moe_gemm2_kernel[grid](
            act,
            act_s,
            w2,
            w_s,
            align.sorted_ids,
            align.block_expert,
            weights,
            y,
            h,
            inter,
            numel,
            e,
            act.stride(0),
            act_s.stride(0),
            w2.stride(0),
            w2.stride(1),
            w_s.stride(0) if quant else 0,
            w_s.stride(1) if quant else 0,
            y.stride(0),
            QUANT=quant,
            DOT_PRECISION=_dot_precision(w2.dtype),
            SWAP_AB=align.block_m < 64,
            UPCAST=_upcast_dot(w2.dtype),
            BLOCK_M=align.block_m,
            BLOCK_N=block_n,
            BLOCK_K=QUANT_BLOCK if quant else 64,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return y


def moe_combine(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over slots j (in order) of y[t*K + j]; pairs whose expert id is out of range add nothing."""
    t, k = topk_ids.shape
    h = y.shape[1]
    ids = topk_ids.to(torch.int32).contiguous().view(-1)
    block_h = min(1024, triton.next_power_of_2(h))
    if t:
        _moe_combine_kernel[(t, triton.cdiv(h, block_h))](
            y, ids, out, h, num_experts, y.stride(0), out.stride(0), TOP_K=k, BLOCK_H=block_h, num_warps=4
        )
    return out


def moe_decode(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    out: torch.Tensor,
    *,
    block_n1: int = 32,
    block_n2: int = 16,
) -> torch.Tensor:
    """The decode path (see the module docstring) into `out` [T, H]."""
    quant = w13.dtype == torch.float8_e4m3fn
    t, k = topk_ids.shape
    e, two_i, h = w13.shape
    inter = two_i // 2
    ids = topk_ids.to(torch.int32).contiguous().view(-1)
    weights = topk_weights.to(torch.float32).contiguous().view(-1)
    x = hidden.contiguous()
    act = _empty((t * k, inter), torch.float32, hidden.device)
    w13_s = w13_scale if (quant and w13_scale is not None) else _dummy(hidden.device)
    w2_s = w2_scale if (quant and w2_scale is not None) else _dummy(hidden.device)
    if t == 0:
        return out
    _moe_decode_gemm1_kernel[(t * k, triton.cdiv(inter, block_n1))](
        x,
        ids,
        w13,
        w13_s,
        act,
        h,
        inter,
        e,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13_s.stride(0) if quant else 0,
        w13_s.stride(1) if quant else 0,
        act.stride(0),
        TOP_K=k,
        QUANT=quant,
        BLOCK_N=block_n1,
        BLOCK_K=QUANT_BLOCK,
        num_warps=4,
    )
    _moe_decode_gemm2_combine_kernel[(t, triton.cdiv(h, block_n2))](
        act,
        ids,
        weights,
        w2,
        w2_s,
        out,
        h,
        inter,
        e,
        act.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_s.stride(0) if quant else 0,
        w2_s.stride(1) if quant else 0,
        out.stride(0),
        TOP_K=k,
        QUANT=quant,
        BLOCK_N=block_n2,
        BLOCK_K=QUANT_BLOCK,
        num_warps=4,
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# the op


def pick_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block of the sorted path: small when experts get few rows each (less padding, less wasted MMA)."""
    per_expert = num_pairs / max(num_experts, 1)
    if per_expert <= 16:
        return 16
    if per_expert <= 48:
        return 32
    return 64


def _check_inputs(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2_scale: torch.Tensor | None,
    quant: str,
) -> None:
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
            want = (e, triton.cdiv(w.shape[1], QUANT_BLOCK), triton.cdiv(w.shape[2], QUANT_BLOCK))
            if s is None or tuple(s.shape) != want or s.dtype != torch.float32:
                found = None if s is None else (s.dtype, tuple(s.shape))
                raise ValueError(f"MoEExperts: {name} must be float32 {want}, got {found}")
    elif quant == "none":
        if w13.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w2.dtype != w13.dtype:
            raise ValueError("MoEExperts: quant='none' needs w13 and w2 of one dtype among float32/bf16/fp16")
    else:
        raise ValueError(f"MoEExperts: unknown quant {quant!r}")


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`r1c::MoEExperts` (activation "swiglu"); returns [T, H] in hidden's dtype (written into `out` if given)."""
    _check_inputs(hidden, topk_weights, topk_ids, w13, w2, w13_scale, w2_scale, quant)
    _check_device(hidden.device)
    t, h = hidden.shape
    k = topk_ids.shape[1]
    e = w13.shape[0]
    if out is None:
        out = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
    elif out.shape != (t, h) or out.dtype != hidden.dtype or out.stride(1) != 1:
        raise ValueError("MoEExperts: out must be [T, H] in hidden's dtype with unit column stride")
    if t == 0:
        return out
    fp8 = quant == "fp8_block128"
    # the kernels index weights and scales with a unit last stride (no copy when they already are contiguous)
    w13, w2 = w13.contiguous(), w2.contiguous()
    if fp8:
        assert w13_scale is not None and w2_scale is not None
        w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()
    if path == "auto":
        path = "decode" if t * k <= DECODE_MAX_PAIRS else "sorted"
    if path == "decode":
        return moe_decode(hidden, topk_weights, topk_ids, w13, w2, w13_scale, w2_scale, out)
    if path != "sorted":
        raise ValueError(f"MoEExperts: unknown path {path!r}")
    align = moe_align(topk_ids, e, block_m or pick_block_m(t * k, e))
    if fp8:
        a, a_scale = quantize_act_1x128(hidden)
    else:
        a, a_scale = hidden.to(w13.dtype).contiguous(), None
    act, act_scale = moe_gemm1_swiglu(a, a_scale, w13, w13_scale if fp8 else None, align, k)
    y_dtype = torch.float32 if hidden.dtype == torch.float32 else hidden.dtype
    y = moe_gemm2(act, act_scale, w2, w2_scale if fp8 else None, align, topk_weights, y_dtype)
    return moe_combine(y, topk_ids, e, out)


def moe_experts_fp8_triton(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_fp8: torch.Tensor,
    w2_fp8: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    *,
    path: str = "auto",
    block_m: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`r1c::MoEExperts` with quant="fp8_block128": FP8 e4m3fn weights, `weight_scale_inv` 128x128 block scales."""
    return moe_experts_triton(
        hidden,
        topk_weights,
        topk_ids,
        w13_fp8,
        w2_fp8,
        w13_scale,
        w2_scale,
        quant="fp8_block128",
        path=path,
        block_m=block_m,
        out=out,
    )


# --------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation


def _spec(
    name: str,
    kernel: Any,
    pointers: dict[str, str],
    ints: Mapping[str, int | None],  # example values at R1 shapes; None: varies with the batch
    constexprs: dict[str, Any],
    **options: int,
) -> AotSpec:
    divisible = tuple(n for n, v in ints.items() if v is not None and v % 16 == 0)
    signature = pointers | {n: "i32" for n in ints}
    return AotSpec(name, kernel, signature, constexprs, divisible_by_16=divisible, **options)


def aot_specs() -> list[AotSpec]:
    """The kernels at DeepSeek-R1 shapes (H 7168, I 2048, 256 experts, top-8), FP8 unless named otherwise."""
    h, inter, e = 7168, 2048, 256
    hb, ib, i2b = h // 128, inter // 128, 2 * inter // 128  # scale blocks
    w13_ints = {"stride_we": 2 * inter * h, "stride_wn": h, "stride_wse": i2b * hb, "stride_wsn": hb}
    w2_ints = {"stride_we": h * inter, "stride_wn": inter, "stride_wse": hb * ib, "stride_wsn": ib}
    sizes = {"H": h, "INTER": inter}
    gemm1_ints = sizes | {"NUMEL": None, "NUM_EXPERTS": e} | w13_ints
    gemm1_ints |= {"stride_a": h, "stride_as": hb, "stride_act": inter, "stride_acts": ib}
    gemm2_ints = sizes | {"NUMEL": None, "NUM_EXPERTS": e, "stride_act": inter, "stride_acts": ib} | w2_ints
    gemm2_ints |= {"stride_y": h}

    def gemm1_ptrs(dtype: str) -> dict[str, str]:
        return {
            "a_ptr": dtype,
            "a_scale_ptr": "*fp32",
            "w_ptr": dtype,
            "w_scale_ptr": "*fp32",
            "sorted_ids_ptr": "*i32",
            "block_expert_ptr": "*i32",
            "act_ptr": dtype,
            "act_scale_ptr": "*fp32",
        }

    gemm2_ptrs = {
        "act_ptr": "*fp8e4nv",
        "act_scale_ptr": "*fp32",
        "w_ptr": "*fp8e4nv",
        "w_scale_ptr": "*fp32",
        "sorted_ids_ptr": "*i32",
        "block_expert_ptr": "*i32",
        "topk_weights_ptr": "*fp32",
        "y_ptr": "*bf16",
    }
    specs = [
        _spec(
            "align",
            _moe_align_kernel,
            {"topk_ids_ptr": "*i32", "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32"},
            {"NUMEL": None, "NUM_EXPERTS": e, "MAX_ROWS": None},
            {"BLOCK_M": 64, "BLOCK_E": 256, "CHUNK": 64},
            num_warps=8,
        ),
        _spec(
            "quant_act_1x128",
            _quant_act_1x128_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32"},
            {"H": h, "stride_x": h, "stride_q": h, "stride_s": hb},
            {"BLOCK_G": 8},
        ),
        _spec(
            "combine",
            _moe_combine_kernel,
            {"y_ptr": "*bf16", "topk_ids_ptr": "*i32", "out_ptr": "*bf16"},
            {"H": h, "NUM_EXPERTS": e, "stride_y": h, "stride_out": h},
            {"TOP_K": 8, "BLOCK_H": 1024},
        ),
    ]
    for block_m in (64, 16):
        fp8_dot = {"DOT_PRECISION": "tf32", "SWAP_AB": block_m < 64, "UPCAST": False}
        tiles = {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": 128}
        specs.append(
            _spec(
                f"gemm1_swiglu_fp8_m{block_m}",
                _moe_gemm1_swiglu_kernel,
                gemm1_ptrs("*fp8e4nv"),
                gemm1_ints,
                {"TOP_K": 8, "QUANT": True} | fp8_dot | tiles,
            )
        )
        specs.append(
            _spec(
                f"gemm2_fp8_m{block_m}",
                _moe_gemm2_kernel,
                gemm2_ptrs,
                gemm2_ints,
                {"QUANT": True} | fp8_dot | tiles,
                num_stages=4,
            )
        )
    specs.append(
        _spec(
            "gemm1_swiglu_bf16_m64",
            _moe_gemm1_swiglu_kernel,
            gemm1_ptrs("*bf16"),
            gemm1_ints,
            {"TOP_K": 8, "QUANT": False, "DOT_PRECISION": "tf32", "SWAP_AB": False, "UPCAST": False}
            | {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64},
        )
    )
    specs.append(
        _spec(
            "decode_gemm1_fp8",
            _moe_decode_gemm1_kernel,
            {"x_ptr": "*bf16", "topk_ids_ptr": "*i32", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "act_ptr": "*fp32"},
            sizes | {"NUM_EXPERTS": e, "stride_x": h} | w13_ints | {"stride_act": inter},
            {"TOP_K": 8, "QUANT": True, "BLOCK_N": 32, "BLOCK_K": 128},
        )
    )
    specs.append(
        _spec(
            "decode_gemm2_combine_fp8",
            _moe_decode_gemm2_combine_kernel,
            {
                "act_ptr": "*fp32",
                "topk_ids_ptr": "*i32",
                "topk_weights_ptr": "*fp32",
                "w_ptr": "*fp8e4nv",
                "w_scale_ptr": "*fp32",
                "out_ptr": "*bf16",
            },
            sizes | {"NUM_EXPERTS": e, "stride_act": inter} | w2_ints | {"stride_out": h},
            {"TOP_K": 8, "QUANT": True, "BLOCK_N": 16, "BLOCK_K": 128},
        )
    )
    return specs
