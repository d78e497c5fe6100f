"""Weight-only block quantization to 8 or 4 bits in ONNX Runtime's `MatMulNBits` / `QMoE` layout.

A weight W [..., N, K] (N output features, K input features) is cut into blocks of `block` consecutive
values along K; each block gets one float32 scale d and integers q with W ~ d * q:
    m = the block's value of largest magnitude (with its sign),  d = m / -2^(bits-1),
    q = clip(round(W / d), -2^(bits-1), 2^(bits-1) - 1)
(the value m lands exactly on -2^(bits-1), so all 2^bits levels are used: llama.cpp's Q4_0 / Q8_0 rule).
Stored as unsigned q + 2^(bits-1), which is ONNX Runtime's default zero point when none is given
(MatMulNBits / QMoE docs: "If not provided, a default zero point is used: 2^(bits-1)"); 4-bit values pack two
per byte, the first in the low nibble. Bytes per weight: bits/8 + 4/block (the scale).

Shapes (legend: N = output features, K = input features, B = block, ... = leading dims such as experts):
    pack(W [..., N, K] float32, bits, B) -> (q uint8 [..., N, K*bits/8], scales float32 [..., N, K/B])
    MatMulNBits wants q as [N, K/B, B*bits/8] (the same bytes, reshaped).

`quantize_columns` is the per-column int8 of batched weights W [..., K, N] (ONNX Runtime's
DynamicQuantizeMatMul): one scale per output column of each batch entry, d = max_k |W| / 127,
q = round(W / d) in [-127, 127] (signed int8, zero point 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BITS = (4, 8)


@dataclasses.dataclass(frozen=True)
class Packed:
    q: np.ndarray  # uint8 [..., N, K * bits / 8]
    scales: np.ndarray  # float32 [..., N, K / block]
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        return dequantize(self.q, self.scales, self.bits, self.block)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scales.nbytes)


def block_for(k: int, preferred: int, minimum: int = 16) -> int | None:
    """The largest power of two <= `preferred` and >= `minimum` that divides k (None if there is none)."""
    block = preferred
    while block >= minimum:
        if k % block == 0:
            return block
        block //= 2
    return None


def quantize(w: np.ndarray, bits: int, block: int) -> Packed:
    """Block quantization of float weights [..., N, K] along K (see the module docstring)."""
    if bits not in BITS:
        raise ValueError(f"int_block: {bits} bits is not supported (choose from {BITS})")
    k = w.shape[-1]
    if k % block:
        raise ValueError(f"int_block: K={k} is not a multiple of the block size {block}")
    half = 1 << (bits - 1)
    blocks = np.asarray(w, dtype=np.float32).reshape(*w.shape[:-1], k // block, block)
    idx = np.abs(blocks).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]  # signed value of largest magnitude
    d = extreme / -half
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    ints = np.clip(np.rint(blocks * inv[..., None]), -half, half - 1).astype(np.int16) + half
    q = ints.astype(np.uint8).reshape(w.shape)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return Packed(np.ascontiguousarray(q), np.ascontiguousarray(d.astype(np.float32)), bits, block)


def unpack(q: np.ndarray, bits: int) -> np.ndarray:
    """Stored unsigned integers [..., N, K] from the packed bytes."""
    if bits == 8:
        return q
    out = np.empty((*q.shape[:-1], q.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = q & 0x0F
    out[..., 1::2] = q >> 4
    return out


def dequantize(q: np.ndarray, scales: np.ndarray, bits: int, block: int) -> np.ndarray:
    """float32 [..., N, K] = scale * (q - 2^(bits-1)) per block."""
    ints = unpack(q, bits).astype(np.float32) - (1 << (bits - 1))
    k = ints.shape[-1]
    return (ints.reshape(*ints.shape[:-1], k // block, block) * scales[..., None]).reshape(ints.shape)


def squared_errors(w: np.ndarray, packed: Packed) -> tuple[float, float]:
    """(||dequantize(q) - w||_F^2, ||w||_F^2), to sum over pieces of one tensor."""
    w64 = np.asarray(w, dtype=np.float64)
    return float(np.sum(np.square(packed.dequantize() - w64))), float(np.sum(np.square(w64)))


def relative_error(w: np.ndarray, packed: Packed) -> float:
    """||dequantize(q) - w||_F / ||w||_F (the measure `r1c export --precision fp8` reports)."""
    err, norm = squared_errors(w, packed)
    return float(np.sqrt(err / norm)) if norm else 0.0


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of batched weights [..., K, N]: (q int8 [..., K, N], scales [..., 1, N])."""
    w = np.asarray(w, dtype=np.float32)
    d = np.abs(w).max(axis=-2, keepdims=True) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(w * inv), -127, 127).astype(np.int8)
    return q, d.astype(np.float32)
