"""`--precision fp8 | fp32` as tensor sources: weights quantized or dequantized one tensor at a time, as the
exporter reads them (see exporter/tensor_source.py for the protocol), never the whole checkpoint in memory.

`Fp8Quantizer(source)`: the linear and expert weights that DeepSeek's release ships in FP8
(`checkpoint.is_quantizable`) become float8_e4m3fn with float32 128x128 block scales `<name>_scale_inv`
(`plugins/fp8.quantize`: scale = amax / 448 per block); tensors that are FP8 already pass through. It keeps the
relative error ||dequant(q) - w||_F / ||w||_F of every tensor it quantized, for quantization.json
(`quant_report.summary`).
`Fp8Dequantizer(source, dtype)`: FP8 weights dequantized with their block scales (`plugins/fp8.dequantize`)
straight into `dtype` (the export's), the scales dropped.

Both work in slabs of whole 128-row blocks (SLAB_ELEMENTS values at a time): block scaling never crosses a
block, so the result is bit-identical to the whole-tensor functions (`checkpoint.quantize_checkpoint_fp8`,
`checkpoint.dequantized`) while the float32 temporaries stay a few tens of MB whatever the tensor's size.
Fused expert tensors are handled one expert at a time (`expert_chunks`); a quantized expert tensor's scales
are kept from its chunks until `release()`. Shapes: weights [R, C] or experts [E, R, C]; scales
[ceil(R/128), ceil(C/128)] (per expert for [E, R, C]).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from r1c.config import ModelConfig
from r1c.errors import ExportError
from r1c.exporter.checkpoint import FP8_QUANTIZATION_CONFIG, SCALE_SUFFIX, is_quantizable
from r1c.exporter.quant_report import summary
from r1c.exporter.tensor_source import DictSource, MetaSource, TensorSource
from r1c.plugins import fp8

FP8 = torch.float8_e4m3fn
SLAB_ELEMENTS = 1 << 22  # 4 Mi values: 16 MiB of float32 per temporary


def _slabs(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """Row ranges [r0, r1) of whole 128-row blocks holding about SLAB_ELEMENTS values."""
    step = max(1, SLAB_ELEMENTS // max(cols, 1) // fp8.BLOCK) * fp8.BLOCK
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def quantize_slabs(w: torch.Tensor, err: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8.quantize of a 2-D `w` [R, C], slab by slab: (FP8 [R, C], float32 scales [ceil(R/128), ceil(C/128)]).

    `err`, if given, accumulates [sum (dequant(q) - w)^2, sum w^2] (float64) for the relative error.
    """
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=FP8)
    scale = torch.empty(fp8.block_shape(rows, cols), dtype=torch.float32)
    for r0, r1 in _slabs(rows, cols):
        part = w[r0:r1].to(torch.float32)
        q_part, s_part = fp8.quantize(part)
        q[r0:r1], scale[r0 // fp8.BLOCK: -(-r1 // fp8.BLOCK)] = q_part, s_part
        if err is not None:
            err[0] += float((fp8.dequantize(q_part, s_part) - part).double().square().sum())
            err[1] += float(part.double().square().sum())
    return q, scale


def dequantize_slabs(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8.dequantize of a 2-D FP8 `q` [R, C] with its block scales, slab by slab, into `dtype`."""
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=dtype)
    for r0, r1 in _slabs(rows, cols):
        out[r0:r1] = fp8.dequantize(q[r0:r1], scale[r0 // fp8.BLOCK: -(-r1 // fp8.BLOCK)]).to(dtype)
    return out


class Fp8Quantizer(MetaSource):
    """`source` with DeepSeek's FP8 weights quantized as they are read (see the module docstring)."""

    def __init__(self, source: TensorSource) -> None:
        self.src = source
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.quantized: set[str] = set()
        for name in source.names:
            shape, dtype = source.shape(name), source.dtype(name)
            if name.endswith(SCALE_SUFFIX) or dtype == FP8 or not is_quantizable(name, len(shape)):
                self.meta[name] = (shape, dtype)
                continue
            self.quantized.add(name)
            self.meta[name] = (shape, FP8)
            self.meta[name + SCALE_SUFFIX] = (fp8.scale_shape(shape), torch.float32)
        self._scales: dict[str, torch.Tensor] = {}
        self.per_tensor: dict[str, float] = {}  # relative Frobenius error of each quantized tensor

    def get(self, name: str) -> torch.Tensor:
        base = name.removesuffix(SCALE_SUFFIX)
        if name != base and base in self.quantized:
            if name not in self._scales:  # the scales asked for before their weight: quantize it (again)
                if len(self.shape(base)) == 3:
                    for _ in self.expert_chunks(base):
                        pass
                else:
                    self.get(base)
            return self._scales[name]
        if name not in self.quantized:
            return self.src.get(name)
        if len(self.shape(name)) == 3:
            return torch.stack(list(self.expert_chunks(name)))
        err = [0.0, 0.0]
        q, self._scales[name + SCALE_SUFFIX] = quantize_slabs(self.src.get(name), err)
        self._record(name, err)
        return q

    def expert_chunks(self, name: str) -> Iterator[torch.Tensor]:
        if name not in self.quantized:
            yield from self.src.expert_chunks(name)
            return
        err = [0.0, 0.0]
        scales = []
        for chunk in self.src.expert_chunks(name):
            q, s = quantize_slabs(chunk, err)
            scales.append(s)
            yield q
        self._scales[name + SCALE_SUFFIX] = torch.stack(scales)
        self._record(name, err)

    def _record(self, name: str, err: list[float]) -> None:
        self.per_tensor[name] = math.sqrt(err[0]) / max(math.sqrt(err[1]), 1e-30)

    def release(self) -> None:
        self._scales.clear()
        self.src.release()

    def report(self) -> dict[str, Any]:
        """quantization.json: the summary and per-tensor relative errors (`quant_report.summary`)."""
        missing = self.quantized - set(self.per_tensor)
        if missing:
            raise ValueError(f"Fp8Quantizer.report: {len(missing)} tensors were never read (first: {min(missing)})")
        return summary(self.per_tensor)


class Fp8Dequantizer:
    """`source` with its FP8 weights dequantized into `dtype` as they are read, the scales dropped."""

    def __init__(self, source: TensorSource, dtype: torch.dtype = torch.float32) -> None:
        self.src = source
        self.to = dtype
        self._names = [n for n in source.names
                       if not (n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) in source)]

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self.src and not (name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in self.src)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.src.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.to if self.src.dtype(name) == FP8 else self.src.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        if self.src.dtype(name) != FP8:
            return self.src.get(name)
        if len(self.shape(name)) == 3:
            return torch.stack(list(self.expert_chunks(name)))
        return dequantize_slabs(self.src.get(name), self.src.get(name + SCALE_SUFFIX), self.to)

    def expert_chunks(self, name: str) -> Iterator[torch.Tensor]:
        if self.src.dtype(name) != FP8:
            yield from self.src.expert_chunks(name)
            return
        scale = self.src.get(name + SCALE_SUFFIX)  # [E, ceil(R/128), ceil(C/128)]: 1/16384 of the weight
        for e, chunk in enumerate(self.src.expert_chunks(name)):
            yield dequantize_slabs(chunk, scale[e], self.to)

    def release(self) -> None:
        self.src.release()


def with_precision(config: ModelConfig, tensors: dict[str, torch.Tensor] | TensorSource, precision: str,
                   dtype: str) -> tuple[ModelConfig, TensorSource, Fp8Quantizer | None]:
    """`r1c export --precision`: (config, source, the quantizer whose `report()` is quantization.json or None).

    fp8: weights quantized as read, config gains DeepSeek's `quantization_config`; fp32: FP8 weights
    dequantized into `dtype` (float32 | bfloat16 | float16) as read, `quantization_config` dropped;
    auto: unchanged. Raises ExportError for another precision.
    """
    source: TensorSource = DictSource(tensors) if isinstance(tensors, dict) else tensors
    if precision == "auto":
        return config, source, None
    if precision == "fp8":
        quantizer = Fp8Quantizer(source)
        return config.replace(quantization_config=dict(FP8_QUANTIZATION_CONFIG)), quantizer, quantizer
    if precision == "fp32":
        to = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if to is None:
            raise ExportError(f"export: unknown dtype {dtype!r}")
        return config.replace(quantization_config=None), Fp8Dequantizer(source, to), None
    raise ExportError(f"export: unknown precision {precision!r} (choose from auto, fp8, fp32)")
