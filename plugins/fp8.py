"""FP8 e4m3fn block quantization as DeepSeek ships it: `weight_scale_inv` per 128x128 block.

The constants and `block_shape` need no torch (the passes read them); the tensor functions import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# `quantization_config` of a checkpoint or export holding such weights (DeepSeek-V3's config.json)
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}


def block_shape(rows: int, cols: int, block: int = BLOCK) -> tuple[int, int]:
    return (-(-rows // block), -(-cols // block))


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, ...]:
    """Shape of the block scales of a weight [..., R, C]: [..., ceil(R/b), ceil(C/b)] (leading dims kept)."""
    return (*shape[:-2], *block_shape(shape[-2], shape[-1], block))


def expand_scale(scale: torch.Tensor, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor:
    """[..., ceil(R/b), ceil(C/b)] block scales -> [..., R, C] elementwise scales."""
    return scale.repeat_interleave(block, dim=-2)[..., :rows, :].repeat_interleave(block, dim=-1)[..., :cols]


def dequantize(w: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 weights from FP8 `w` [..., R, C] and its `weight_scale_inv` [..., ceil(R/b), ceil(C/b)]."""
    import torch

    rows, cols = w.shape[-2], w.shape[-1]
    return w.to(torch.float32) * expand_scale(scale.to(torch.float32), rows, cols, block)


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest e4m3fn with one float32 scale per block (amax / 448); returns (w_fp8, scale_inv)."""
    import torch

    w = w.to(torch.float32)
    rows, cols = w.shape[-2], w.shape[-1]
    br, bc = block_shape(rows, cols, block)
    pad = torch.zeros(*w.shape[:-2], br * block, bc * block, dtype=torch.float32, device=w.device)
    pad[..., :rows, :cols] = w
    tiles = pad.reshape(*w.shape[:-2], br, block, bc, block)
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., br, bc]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / expand_scale(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale
