"""`r1c::FP8Linear` in Triton: FP8 x FP8 GEMM with 1x128 activation scales and 128x128 weight block scales.

`_fp8_linear_kernel` computes tiles of y = dequant(a) @ dequant(w)^T from a [M, K] FP8 (quantized per token and 128
channels by `r1c.plugins.fp8_triton`) and w [N, K] FP8 (K contiguous: the K-major operand FP8 `wgmma` needs): per
128-deep K step one FP8 `tl.dot` (float32 accumulation) scaled by a_scale[row, kb] * w_scale[col // 128, kb] and
added to a float32 accumulator: the promotion every 128 products that DeepSeek-V3 specifies. SWAP_AB computes the
transposed tile (weight rows on the MMA's M side) for small M; SPLIT splits the K loop over the grid's second
dimension (K_PER_SPLIT blocks each) into float32 partials [splits, M, N] that `_splitk_reduce_kernel` sums in split
order (deterministic: no atomics) when the M x N tiles alone would leave most SMs idle (decode). GROUP_M orders
the programs so that consecutive ones share weight columns (L2 reuse).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fp8_linear_kernel(
    a_ptr,  # [M, K] float8_e4m3fn
    a_scale_ptr,  # [M, cdiv(K, 128)] float32
    w_ptr,  # [N, K] float8_e4m3fn
    w_scale_ptr,  # [cdiv(N, 128), cdiv(K, 128)] float32
    out_ptr,  # [M, N] in the output dtype, or [splits, M, N] float32 partials (SPLIT)
    M,
    N,
    K,
    K_PER_SPLIT,  # 128-deep K blocks per split
    stride_am,
    stride_asm,
    stride_wn,
    stride_wsn,
    stride_om,
    stride_split,
    SPLIT: tl.constexpr,
    SWAP_AB: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128: one scale block
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows < M
    n_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    as_rows = a_scale_ptr + rows.to(tl.int64) * stride_asm
    ws_rows = w_scale_ptr + (cols // 128) * stride_wsn
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb_start = pid_k * K_PER_SPLIT
    kb_end = tl.minimum(kb_start + K_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    for kb in range(kb_start, kb_end):
        kk = kb * BLOCK_K + offs_k
        k_ok = kk < K
        a = tl.load(a_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        a_s = tl.load(as_rows + kb, mask=m_ok, other=0.0)
        w_s = tl.load(ws_rows + kb, mask=n_ok, other=0.0)
        if SWAP_AB:
            acc += tl.dot(w, tl.trans(a)) * (w_s[:, None] * a_s[None, :])
        else:
            acc += tl.dot(a, tl.trans(w)) * (a_s[:, None] * w_s[None, :])
    if SWAP_AB:
        acc = tl.trans(acc)
    offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(out_ptr + pid_k.to(tl.int64) * stride_split + offs, acc, mask=mask)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr,  # [SPLITS, NUMEL] float32
    out_ptr,  # [NUMEL]
    NUMEL,
    SPLITS,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
