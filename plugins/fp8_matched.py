"""Float64 models of what r1c's FP8 kernels compute, with the elementwise error bounds they are held to.

The kernels quantize activations to e4m3 per token and 128 channels (`quantize_act_1x128_reference`, bitwise what
they do), multiply FP8 by FP8 with float32 accumulation and apply the block scales every 128 products. These
"matched" references apply the same quantization and do everything else in float64, so what remains between kernel
and reference is accumulation:
  * `noise`: the accumulation error per output, as a fraction of the sum of |products| feeding it. 1e-5 covers
    float32 (Triton's interpreter); 2e-3 is the native budget for Hopper's FP8 tensor cores, which keep about 14
    bits inside a 128-deep block (DeepSeek-V3 report, section 3.3.2): the native kernel tests pass within it on the
    H200. `hopper_fp8_dot` is an error model of that accumulation.
  * flips (experts' sorted path): a SwiGLU value that lies within that noise of an e4m3 rounding midpoint may round
    the other way in the kernel: one e4m3 step of that value, carried through GEMM2 at |weights|.
Used by the kernel tests (tests/test_kernels_*.py) and by the GPU check's per-op comparisons inside the tiny model
(scripts/gpu_check_layer.py). Shapes: T tokens, K top_k, E experts, H hidden, I expert intermediate size,
N out features; every result is float64 on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from r1c.plugins.fp8 import dequantize


def dequant_act(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 values of 1x128-quantized rows: q [R, C] float8_e4m3fn, scale [R, cdiv(C, 128)] float32."""
    return q.double() * scale.double().repeat_interleave(128, dim=1)[:, : q.shape[1]]


def e4m3_grid(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For float64 rows act [R, C] quantized 1x128 (scale = group amax / 448): the scale of every element,
    |act| / scale, and the e4m3 step at that value (in scaled units; 2^-9 below the normal range)."""
    n, i = act.shape
    groups = -(-i // 128)
    pad = torch.zeros(n, groups * 128, dtype=torch.float64)
    pad[:, :i] = act
    amax = pad.view(n, groups, 128).abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax)).repeat_interleave(128, dim=1)[:, :i]
    v = (act / scale).abs()
    return scale, v, torch.exp2(torch.floor(torch.log2(v.clamp_min(2.0**-6))) - 3)


BlockDot = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def block_gemm(aq: torch.Tensor, a_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               block_dot: BlockDot | None = None) -> torch.Tensor:
    """sum over 128-deep K blocks of dot(a block, w block) * a_scale * w_scale, as the kernels promote: aq [M, K] and
    wq [N, K] e4m3, a_scale [M, cdiv(K, 128)], w_scale [cdiv(N, 128), cdiv(K, 128)] -> [M, N] float64.
    `block_dot(a [M, k], b [N, k]) -> [M, N]` on exact e4m3 values: float64 by default, or an accumulation
    model (`hopper_fp8_dot`)."""
    dot = block_dot or (lambda a, b: a @ b.t())
    a, w = aq.double(), wq.double()
    n, k = w.shape
    out = torch.zeros(a.shape[0], n, dtype=torch.float64)
    for kb in range(-(-k // 128)):
        blk = slice(kb * 128, min(k, kb * 128 + 128))
        w_s = w_scale[:, kb].double().repeat_interleave(128)[:n]
        out += dot(a[:, blk], w[:, blk]) * a_scale[:, kb, None].double() * w_s[None, :]
    return out


class LinearMatched(NamedTuple):
    out: torch.Tensor  # [M, N] float64
    mag: torch.Tensor  # [M, N] sum of |products|


def linear_matched(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   block_dot: BlockDot | None = None) -> LinearMatched:
    """`r1c::FP8Linear` as its kernels compute it: x [M, K] quantized 1x128, weight [N, K] e4m3 with its block
    scales [cdiv(N, 128), cdiv(K, 128)], the GEMM in float64 (or through `block_dot`, see `block_gemm`). A kernel
    output y is right when |y - out| <= noise * mag elementwise (plus the output dtype's rounding)."""
    from r1c.plugins.fp8_triton import quantize_act_1x128_reference

    xq, xs = quantize_act_1x128_reference(x.reshape(-1, x.shape[-1]).float())
    xd, w = dequant_act(xq, xs), dequantize(weight, weight_scale).double()
    return LinearMatched(block_gemm(xq, xs, weight, weight_scale, block_dot), xd.abs() @ w.abs().t())


def _per_expert(ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    flat = ids.reshape(-1).long()
    for ex in flat.unique().tolist():
        yield ex, (flat == ex).nonzero().flatten()


def swiglu64(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """float64 SwiGLU output of every (token, slot) pair [T*K, I], in pair order, from float64 x [T, H] and
    w13 [E, 2I, H] (gate rows, then up rows)."""
    k = ids.shape[1]
    inter = w13.shape[1] // 2
    act = torch.zeros(ids.numel(), inter, dtype=torch.float64)
    for ex, pairs in _per_expert(ids):
        gu = x[pairs // k] @ w13[ex].t()
        act[pairs] = F.silu(gu[:, :inter]) * gu[:, inter:]
    return act


def combine64(act: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From per-pair act [T*K, I] and w2 [E, H, I], float64: (out [T, H], sum over slots of |slot output|,
    sum of |products|)."""
    t, k = ids.shape
    out = torch.zeros(t, w2.shape[1], dtype=torch.float64)
    slots = torch.zeros_like(out)
    mag = torch.zeros_like(out)
    wflat = weights.reshape(-1).double()
    for ex, pairs in _per_expert(ids):
        y = (act[pairs] @ w2[ex].t()) * wflat[pairs, None]
        out.index_add_(0, pairs // k, y)
        slots.index_add_(0, pairs // k, y.abs())
        mag.index_add_(0, pairs // k, (act[pairs].abs() @ w2[ex].t().abs()) * wflat[pairs, None].abs())
    return out, slots, mag


class ExpertsMatched(NamedTuple):
    out: torch.Tensor  # [T, H] float64
    slot_abs: torch.Tensor  # [T, H] sum over slots of |slot output|
    mag: torch.Tensor  # [T, H] sum of |products| of GEMM2
    flips: torch.Tensor  # [T, H] what SwiGLU values near an e4m3 midpoint may move the output (0 unquantized)

    def bound(self, noise: float) -> torch.Tensor:
        """The elementwise tolerance of a kernel output at accumulation noise `noise` (the noise the flips were
        sized with; see the module docstring)."""
        return noise * self.mag + self.flips + 1e-30


def experts_matched(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor, *, quantize_act: bool,
                    noise: float = 0.0, block_dot: BlockDot | None = None) -> ExpertsMatched:
    """`r1c::MoEExperts` (quant fp8_block128) as its kernels compute it. hidden [T, H], weights [T, K] float32,
    ids [T, K], w13 [E, 2I, H] / w2 [E, H, I] e4m3 with their block scales.
    `quantize_act`: the sorted path, which quantizes hidden and the SwiGLU output 1x128 and multiplies FP8 by FP8
    (through `block_dot` when given, see `block_gemm`); the decode path does neither
    (`moe_experts.plan.quantizes_activations`). `noise`: the accumulation noise the SwiGLU values carry into their
    quantization, which sizes the flip term (0: no flip term)."""
    from r1c.plugins.fp8_triton import quantize_act_1x128_reference as quantize

    w13d = dequantize(w13, w13_scale).double()
    w2d = dequantize(w2, w2_scale).double()
    if not quantize_act:
        out, slots, mag = combine64(swiglu64(hidden.double(), ids, w13d), ids, weights, w2d)
        return ExpertsMatched(out, slots, mag, torch.zeros_like(out))
    k, inter = ids.shape[1], w13.shape[1] // 2
    xq, xs = quantize(hidden.float())
    act = torch.zeros(ids.numel(), inter, dtype=torch.float64)
    for ex, pairs in _per_expert(ids):
        tok = pairs // k
        gu = block_gemm(xq[tok], xs[tok], w13[ex], w13_scale[ex], block_dot)
        act[pairs] = F.silu(gu[:, :inter]) * gu[:, inter:]
    aq, as_ = quantize(act.float())
    if block_dot is None:
        out, slots, mag = combine64(dequant_act(aq, as_), ids, weights, w2d)
    else:
        y = torch.zeros(ids.numel(), w2.shape[1], dtype=torch.float64)
        for ex, pairs in _per_expert(ids):
            y[pairs] = block_gemm(aq[pairs], as_[pairs], w2[ex], w2_scale[ex], block_dot)
        out = (y * weights.reshape(-1, 1).double()).view(*ids.shape, -1).sum(1)
        _, slots, mag = combine64(dequant_act(aq, as_), ids, weights, w2d)
    if noise <= 0:
        return ExpertsMatched(out, slots, mag, torch.zeros_like(out))
    scale, v, step = e4m3_grid(act)
    to_midpoint = ((v / step) - torch.floor(v / step) - 0.5).abs() * step
    near = to_midpoint <= noise * 448  # the noise relative to the group's amax, in scaled units
    flips = combine64(torch.where(near, step * scale, 0.0), ids, weights.abs(), w2d.abs())[0]
    return ExpertsMatched(out, slots, mag, flips)


def hopper_fp8_dot(a: torch.Tensor, b: torch.Tensor, bits: int = 13) -> torch.Tensor:
    """An error model of one 128-deep FP8 `wgmma` chain (four k=32 instructions into a zeroed accumulator): each
    instruction adds its 32 exact products to the accumulator after aligning every addend to the largest one's
    exponent and truncating it to `bits` bits below that (the limited accumulation precision DeepSeek-V3's report
    measured on Hopper, ~14 bits). a [M, k], b [N, k] exact e4m3 values (k <= 128) -> [M, N] float64. A model,
    not NVIDIA's specification: used to size how far such rounding moves the tiny model (scripts/gpu_check_layer.py)."""
    prods = a.double()[:, None, :] * b.double()[None, :, :]  # exact: e4m3 products fit in float64
    acc = torch.zeros(prods.shape[:2], dtype=torch.float64)
    for j in range(0, prods.shape[-1], 32):
        addends = torch.cat([acc[..., None], prods[..., j:j + 32]], dim=-1)
        top = addends.abs().amax(-1, keepdim=True)
        ulp = torch.exp2(torch.floor(torch.log2(torch.where(top > 0, top, torch.ones_like(top)))) - bits)
        acc = (torch.trunc(addends / ulp) * ulp).sum(-1)
    return acc
