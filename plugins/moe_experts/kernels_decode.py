"""`r1c::MoEExperts`, decode path (T*K <= DECODE_MAX_PAIRS): two launches, no sorting, no activation quantization.

  * `_moe_decode_gemm1_kernel`: one program per ((token, slot) pair, BLOCK_N columns of I): a GEMV over the pair's
    expert's gate and up rows, FP8 weights dequantized in registers (block scale per 128 columns), hidden in float32;
    SwiGLU; float32 result to a [T*K, I] buffer. Pairs are the fastest launch dimension.
  * `_moe_decode_gemm2_combine_kernel`: one program per (token, BLOCK_N columns of H): loops over the token's K
    slots, GEMV with the slot's expert's w2 rows, weighted sum in slot order, written once to the output. Tokens are
    the fastest launch dimension.
At T*K <= 32 the work is reading the weights of the chosen experts (memory bound: 44 MB per expert at R1 shapes);
tensor cores would need the M dimension padded to 16 or 64 rows and a sort to group the rows, so a CUDA-core GEMV
does the math. The programs of one weight tile for different pairs are adjacent in the launch order, so a tile
shared by two pairs is read from HBM once and then from L2. Activations stay unquantized, so this path matches the
exact reference to float32 rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
