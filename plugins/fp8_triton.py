"""FP8 activation quantization as DeepSeek-V3 specifies it, in Triton: per token, per 128 channels, dynamic.

`quantize_act_1x128(x)` returns (q float8_e4m3fn [T, C], scale float32 [T, cdiv(C, 128)]) with x ~= q * scale,
scale = amax / 448 of each 1x128 group (1 for an all-zero group), q = round-to-nearest-even(x / scale);
`quantize_act_1x128_reference` is its exact PyTorch model (bitwise equal, tested). The `@triton.jit` helper
`quantize_groups` is the same rounding on a [rows, 128] tile held in registers; the MoE and FP8 linear kernels
call it in their epilogues and prologues.

Rounding is done by hand in float32 (exact round-to-nearest-even onto the e4m3 grid) and only exact e4m3 values are
converted: Triton's interpreter's float32 -> fp8 conversion does not carry a rounding overflow into the exponent
(31.9 becomes 16), and `/` lowers to the approximate `div.full.f32` on sm_90, so the divisions use
`tl.math.div_rn`. 12582912.0 = 1.5 * 2**23: (x + M) - M rounds a float32 |x| < 2**22 to an integer, ties to even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1c.plugins.launch import Buf, Launch, TritonRunner, WorkspaceBuilder, launch, make_plan

QUANT_BLOCK = 128  # activations 1x128, weights 128x128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def quantize_groups(x):
    """Rows of a [R, G] float32 tile (one quantization group per row) -> (exact e4m3 values, scale [R])."""
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0.0, tl.math.div_rn(amax, 448.0), 1.0)
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    expo = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # e4m3: normal from 2**-6
    ulp = ((expo + 124) << 23).to(tl.float32, bitcast=True)  # 2**(expo - 3)
    inv_ulp = ((130 - expo) << 23).to(tl.float32, bitcast=True)  # 2**(3 - expo)
    y = ((y * inv_ulp + 12582912.0) - 12582912.0) * ulp
    return y, scale


@triton.jit
def _quant_act_1x128_kernel(
    x_ptr,  # [T, C]
    q_ptr,  # [T, C] float8_e4m3fn out
    s_ptr,  # [T, cdiv(C, 128)] float32 out
    C,
    stride_x,
    stride_q,
    stride_s,
    BLOCK_G: tl.constexpr,  # 128-wide groups per program
):
    t = tl.program_id(0).to(tl.int64)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = offs_g[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = cols < C
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y, scale = quantize_groups(x)
    tl.store(q_ptr + t * stride_q + cols, y.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + t * stride_s + offs_g, scale, mask=offs_g * 128 < C)


def quant_act_launch(x: Buf, q: Buf, s: Buf, tokens: int, channels: int) -> Launch:
    """The launch that quantizes x [tokens, channels] into q [tokens, channels] and s [tokens, cdiv(channels, 128)]
    (contiguous rows)."""
    groups = triton.cdiv(channels, QUANT_BLOCK)
    block_g = min(8, triton.next_power_of_2(groups))
    return launch(
        "quant_act_1x128", _quant_act_1x128_kernel, (tokens, triton.cdiv(groups, block_g)),
        {"x_ptr": x, "q_ptr": q, "s_ptr": s, "C": channels, "stride_x": channels, "stride_q": channels,
         "stride_s": groups},
        {"BLOCK_G": block_g}, num_warps=4,
    )


def quantize_act_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 1x128 dynamic FP8 quantization of x [T, C] (float32/bf16/fp16): (q float8_e4m3fn [T, C],
    scale float32 [T, cdiv(C, 128)]), x ~= q * scale; bitwise equal to `quantize_act_1x128_reference`."""
    x = x.contiguous()
    t, c = x.shape
    q = torch.empty(t, c, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(t, triton.cdiv(c, QUANT_BLOCK), dtype=torch.float32, device=x.device)
    la = quant_act_launch(Buf("in", 0, str(x.dtype).removeprefix("torch.")), Buf("out", 0, "float8_e4m3fn"),
                          Buf("out", 1, "float32"), t, c)
    TritonRunner().run(make_plan([la], WorkspaceBuilder()), [x], [q, s])
    return q, s


def quantize_act_1x128_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch model of the kernels' activation quantization: per row and 128 columns, scale = amax / 448 (1 if the
    group is all zero), q = round-to-nearest-even(x / scale) in e4m3fn; the last group of a row may be narrower."""
    x = x.to(torch.float32)
    t, c = x.shape
    groups = -(-c // QUANT_BLOCK)
    padded = torch.zeros(t, groups * QUANT_BLOCK, dtype=torch.float32, device=x.device)
    padded[:, :c] = x
    tiles = padded.view(t, groups, QUANT_BLOCK)
    amax = tiles.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(t, groups * QUANT_BLOCK)[:, :c].contiguous(), scale
