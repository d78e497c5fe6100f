"""`r1c::MoEExperts`, sorted (prefill) path: the `@triton.jit` kernels. `plan.py` says when and how they launch.

  1. Alignment, three launches, nothing waits for the GPU (every buffer is sized for the worst case):
     `_moe_count_kernel` (one program per CHUNK of (token, slot) pairs: a histogram of expert ids per chunk),
     `_moe_offsets_kernel` (one program: each expert's row count padded up to BLOCK_M, the experts laid out one
     after the other; per chunk and expert the first row its pairs go to; `block_expert`, the expert of every
     BLOCK_M-row block or -1 past the end; every row preset to the padding sentinel NUMEL), and
     `_moe_scatter_kernel` (one program per chunk: `sorted_ids[row] = pair index t*K+j`, the pairs of one expert
     in ascending pair order, as the reference's stable argsort). Experts with no pair get no block.
  2. `r1c.plugins.fp8_triton._quant_act_1x128_kernel`: hidden to FP8, once per token (not per (token, slot)).
  3. `_moe_gemm1_swiglu_kernel`: per (128 columns of I, row block) — columns fastest in launch order, so a row
     block's gathered tokens are read from HBM once and its expert's weights once per block: gathers the tokens'
     FP8 rows, multiplies by the gate rows and the up rows of w13 (FP8 `tl.dot`, float32 accumulation, activation
     scale x weight block scale applied per 128-deep K step: the accumulator is promoted to float32 every 128
     products, as DeepSeek-V3 does), SwiGLU, then quantizes the 128 SwiGLU outputs of each row to FP8 with their
     own 1x128 scale: the input of GEMM2 never goes through memory in high precision. Rows stay in sorted order.
  4. `_moe_gemm2_kernel`: sorted rows x w2 (FP8, block scales as above), times the routing weight, stored to the
     pair's own row of a [T*K, H] buffer (the un-permute); columns fastest as in GEMM1 (with rows fastest, every
     column tile would re-read all sorted activations: 56 x 100 MB at R1's 4096-token prefill).
  5. `_moe_combine_kernel`: out[t] = sum over the K slots, in slot order (deterministic: no atomics).

With QUANT off (bf16/fp16/fp32 weights) the GEMMs multiply in the weights' dtype (hidden and the SwiGLU output
cast to it in the kernels), float32 accumulation; float32 dots use `input_precision="ieee"` (no TF32). SWAP_AB
computes the transposed tile (weight rows on the MMA's M side, 64 per warpgroup; tokens on its N side) for row
blocks < 64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from r1c.plugins.fp8_triton import quantize_groups


@triton.jit
def _moe_count_kernel(
    topk_ids_ptr,  # [NUMEL] int32
    counts_ptr,  # [cdiv(NUMEL, CHUNK), NUM_EXPERTS] int32 out
    NUMEL,
    NUM_EXPERTS,
    BLOCK_E: tl.constexpr,  # power of two >= NUM_EXPERTS
    CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < NUMEL, other=-1)
    ok = (offs < NUMEL) & (ids >= 0) & (ids < NUM_EXPERTS)
    counts = tl.histogram(ids, BLOCK_E, mask=ok)
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(counts_ptr + c.to(tl.int64) * NUM_EXPERTS + offs_e, counts, mask=offs_e < NUM_EXPERTS)


@triton.jit
def _moe_offsets_kernel(
    counts_ptr,  # [NUM_CHUNKS, NUM_EXPERTS] int32
    chunk_base_ptr,  # [NUM_CHUNKS, NUM_EXPERTS] int32 out: first sorted row of each chunk's pairs of each expert
    sorted_ids_ptr,  # [MAX_ROWS] int32 out: preset to NUMEL (padding)
    block_expert_ptr,  # [MAX_ROWS // BLOCK_M] int32 out
    NUM_CHUNKS,
    NUMEL,
    NUM_EXPERTS,
    MAX_ROWS,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,  # chunks per step
    BLOCK_R: tl.constexpr,  # rows (and blocks) per step
):
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < NUM_EXPERTS
    offs_c = tl.arange(0, BLOCK_C)
    totals = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, NUM_CHUNKS, BLOCK_C):
        cc = c0 + offs_c
        m = (cc < NUM_CHUNKS)[:, None] & e_ok[None, :]
        totals += tl.sum(tl.load(counts_ptr + cc[:, None] * NUM_EXPERTS + offs_e[None, :], mask=m, other=0), axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total_rows = tl.sum(padded, axis=0)

    running = starts  # first row of the next chunk's pairs, per expert
    for c0 in range(0, NUM_CHUNKS, BLOCK_C):
        cc = c0 + offs_c
        m = (cc < NUM_CHUNKS)[:, None] & e_ok[None, :]
        x = tl.load(counts_ptr + cc[:, None] * NUM_EXPERTS + offs_e[None, :], mask=m, other=0)
        base = running[None, :] + tl.cumsum(x, axis=0) - x
        tl.store(chunk_base_ptr + cc[:, None] * NUM_EXPERTS + offs_e[None, :], base, mask=m)
        running += tl.sum(x, axis=0)

    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, MAX_ROWS, BLOCK_R):
        r = r0 + offs_r
        tl.store(sorted_ids_ptr + r, tl.zeros_like(r) + NUMEL, mask=r < MAX_ROWS)
    for b0 in range(0, MAX_ROWS // BLOCK_M, BLOCK_R):
        b = b0 + offs_r
        first_row = b * BLOCK_M
        owner = tl.sum(((ends[None, :] <= first_row[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(first_row < total_rows, owner, -1), mask=b < MAX_ROWS // BLOCK_M)


@triton.jit
def _moe_scatter_kernel(
    topk_ids_ptr,  # [NUMEL] int32
    chunk_base_ptr,  # [NUM_CHUNKS, NUM_EXPERTS] int32
    sorted_ids_ptr,  # [MAX_ROWS] int32 out (data rows)
    NUMEL,
    NUM_EXPERTS,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,  # pairs ranked at a time (a SUB x SUB comparison)
):
    c = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    running = tl.load(chunk_base_ptr + c.to(tl.int64) * NUM_EXPERTS + offs_e, mask=offs_e < NUM_EXPERTS, other=0)
    offs_s = tl.arange(0, SUB)
    for s0 in range(0, CHUNK, SUB):
        offs = c * CHUNK + s0 + offs_s
        ids = tl.load(topk_ids_ptr + offs, mask=offs < NUMEL, other=-1)
        ok = (offs < NUMEL) & (ids >= 0) & (ids < NUM_EXPERTS)
        earlier = (ids[:, None] == ids[None, :]) & (offs_s[None, :] < offs_s[:, None]) & ok[None, :]
        rank = tl.sum(earlier.to(tl.int32), axis=1)
        base = tl.sum(tl.where(offs_e[None, :] == ids[:, None], running[None, :], 0), axis=1)
        tl.store(sorted_ids_ptr + base + rank, offs, mask=ok)
        running += tl.histogram(ids, BLOCK_E, mask=ok)


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
    SWAP_AB: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 dot operands through float32 (exact products)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # 128 when QUANT: one activation quantization group
    BLOCK_K: tl.constexpr,  # 128 when QUANT: one weight scale block
):
    pid_n = tl.program_id(0)  # columns fastest: a row block's tokens stay in L2 while its columns are computed
    pid_m = tl.program_id(1)
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
    if SWAP_AB:
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
        if not QUANT:
            a = a.to(wg.dtype)  # hidden in the weights' dtype
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
    if QUANT:  # this tile's 128 columns are one 1x128 group of each row: quantize in the epilogue
        y, scale = quantize_groups(act)
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
    pid_n = tl.program_id(0)  # columns fastest: a row block's tokens stay in L2 while its columns are computed
    pid_m = tl.program_id(1)
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

