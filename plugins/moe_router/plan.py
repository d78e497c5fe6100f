"""`r1c::MoERouter` launch plan: the float32 gate GEMM, then the routing kernel of `triton_kernel.py`.

Buffers: inputs 0 hidden [T, H] (float32/bf16/fp16), 1 gate_weight [E, H] float32, 2 correction_bias [E] float32;
outputs 0 topk_weights [T, K] float32, 1 topk_ids [T, K] int32; workspace: the logits [S, T, E] float32, S partial
sums over disjoint ranges of H (S = 1 unless the GEMM is split), which the routing kernel adds in split order
(deterministic: no atomics).

The gate GEMM (`_router_logits_kernel`) is its own kernel, so that the plugin runs with no PyTorch call: fusing it
into the routing kernel would make every program read the whole [E, H] gate weight (7.3 MB at R1 shapes). It must
give float32 logits (the routing's top-k is decided on them, against a float32 reference), but IEEE float32 `tl.dot`
runs on the CUDA cores (the H200 measured 2.1 ms at 4096 tokens: 7 of 67 TFLOP/s). So it multiplies on the TF32
tensor cores with the operands split into TF32 pairs (`_tf32`): w = w_hi + w_lo exactly up to 2^-22 |w|, and
x * w = x * w_lo + x * w_hi, each product exact in float32. bf16/fp16 hidden is exact in TF32 (2 MMAs); float32
hidden is split too, x_lo * w_lo dropped (3 MMAs, "3xTF32"). Error: ~2^-21 of the sum of |products|, below
float32 accumulation over H = 7168 (tests/test_kernels_triton.py holds the logits to 1e-6 of it and the ids equal
on tie-robust inputs). The split is written out rather than `input_precision="tf32x3"` so that Triton's interpreter
computes exactly these products (it ignores input_precision) and the tests see the scheme's error.

Tiles by token count (`select_config`): decode and small batches are bandwidth-bound on the gate weight: 16 / 64
token rows x 32 experts per program, the H loop split over the grid's third dimension until there are
>= TARGET_PROGRAMS programs (2 per SM of an H200); prefill: 128 x 64 tiles on two warpgroups, no split.
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from r1c.plugins.launch import Buf, Plan, WorkspaceBuilder, launch, make_plan

TARGET_PROGRAMS = 264  # 2 per SM of a 132-SM H100/H200
MAX_SPLITS = 32


@triton.jit
def _tf32(x):
    """float32 x rounded to the nearest TF32 value (10 mantissa bits, ties away from zero): exact in TF32, so the
    tensor cores read it whole."""
    return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _router_logits_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, H] float32
    out_ptr,  # [S, T, E] float32 partial logits
    T,
    E,
    H,
    K_PER_SPLIT,  # H columns per split (a multiple of BLOCK_K)
    stride_x,
    stride_w,
    stride_o,
    stride_split,
    X_TF32: tl.constexpr,  # hidden is bf16/fp16: exact in TF32, not split
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    pid_k = tl.program_id(2)
    t_ok = offs_t < T
    e_ok = offs_e < E
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_x
    w_rows = w_ptr + offs_e.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, H), BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < H
        x = tl.load(x_rows + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + kk[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        w_hi = _tf32(w)
        w_lo = _tf32(w - w_hi)
        if X_TF32:
            acc = tl.dot(x, tl.trans(w_lo), acc, input_precision="tf32")
            acc = tl.dot(x, tl.trans(w_hi), acc, input_precision="tf32")
        else:
            x_hi = _tf32(x)
            x_lo = _tf32(x - x_hi)
            acc = tl.dot(x_lo, tl.trans(w_hi), acc, input_precision="tf32")
            acc = tl.dot(x_hi, tl.trans(w_lo), acc, input_precision="tf32")
            acc = tl.dot(x_hi, tl.trans(w_hi), acc, input_precision="tf32")
    tl.store(out_ptr + pid_k.to(tl.int64) * stride_split + offs_t.to(tl.int64)[:, None] * stride_o + offs_e[None, :],
             acc, mask=t_ok[:, None] & e_ok[None, :])


@dataclasses.dataclass(frozen=True)
class RouterProblem:
    tokens: int
    hidden: int
    experts: int
    hidden_dtype: str
    attrs: tuple[tuple[str, object], ...]  # the op's attributes (sorted items)


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The gate GEMM's tiles: BLOCK_T x BLOCK_E outputs per program, BLOCK_K deep steps; `split`: split H until
    the grid has TARGET_PROGRAMS programs."""

    block_t: int
    block_e: int
    block_k: int
    num_warps: int
    num_stages: int
    split: bool


def select_config(p: RouterProblem) -> GateConfig:
    """The gate GEMM's tiles for this token count (see the module docstring)."""
    if p.tokens <= 16:
        return GateConfig(16, 32, 64, 4, 4, True)
    if p.tokens <= 64:
        return GateConfig(64, 32, 64, 4, 4, True)
    # 128 x 64 tiles on 8 warps: 0.222 ms at 4096 tokens on the H200 (third GPU check's sweep) against 0.267 ms for
    # the 64 x 64 tiles on 4 warps that were the default then
    return GateConfig(128, 64, 32, 8, 3, False)


def splits(p: RouterProblem, c: GateConfig) -> tuple[int, int]:
    """(S, H columns per split): S > 1 only for configs that split, until TARGET_PROGRAMS programs."""
    k_blocks = triton.cdiv(p.hidden, c.block_k)
    tiles = triton.cdiv(p.tokens, c.block_t) * triton.cdiv(p.experts, c.block_e)
    want = min(MAX_SPLITS, k_blocks, triton.cdiv(TARGET_PROGRAMS, tiles)) if c.split else 1
    per = triton.cdiv(k_blocks, want)
    return triton.cdiv(k_blocks, per), per * c.block_k  # no empty split


def router_plan(p: RouterProblem, config: GateConfig | None = None, *, block_t: int = 1,
                num_warps: int = 4) -> Plan:
    """The whole op for `p` (buffers as in the module docstring); `block_t` / `num_warps`: the routing kernel's."""
    from r1c.plugins.moe_router.triton_kernel import routing_launch

    c = config or select_config(p)
    ws = WorkspaceBuilder()
    t, e, h = p.tokens, p.experts, p.hidden
    if t == 0:
        return make_plan([], ws)
    s, per = splits(p, c)
    logits = ws.add("logits", "float32", (s, t, e))
    gemm = launch("router_logits", _router_logits_kernel,
                  (triton.cdiv(t, c.block_t), triton.cdiv(e, c.block_e), s),
                  {"x_ptr": Buf("in", 0, p.hidden_dtype), "w_ptr": Buf("in", 1, "float32"), "out_ptr": logits,
                   "T": t, "E": e, "H": h, "K_PER_SPLIT": per, "stride_x": h, "stride_w": h, "stride_o": e,
                   "stride_split": t * e},
                  {"X_TF32": p.hidden_dtype != "float32", "BLOCK_T": c.block_t, "BLOCK_E": c.block_e,
                   "BLOCK_K": c.block_k},
                  dynamic=["T", "stride_split"], num_warps=c.num_warps, num_stages=c.num_stages)
    route = routing_launch(logits, Buf("in", 2, "float32"), Buf("out", 0, "float32"), Buf("out", 1, "int32"), t, e,
                           dict(p.attrs), splits=s, block_t=block_t, num_warps=num_warps)
    return make_plan([gemm, route], ws)


def config_boundaries() -> list[int]:
    """The largest token count of each config bucket."""
    return [16, 64]
