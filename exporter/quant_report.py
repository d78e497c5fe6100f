"""The error FP8 block quantization adds, per tensor and in summary (written beside the export)."""

from __future__ import annotations

from typing import Any

import torch

from r1c.exporter.checkpoint import SCALE_SUFFIX
from r1c.plugins.fp8 import dequantize


def quantization_report(original: dict[str, torch.Tensor], quantized: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Relative Frobenius error ||dequant(q) - w|| / ||w|| of every tensor the quantization changed
    (tensors that were FP8 already are kept as they are, so they are not counted)."""
    per_tensor: dict[str, float] = {}
    for name, q in quantized.items():
        scale = quantized.get(name + SCALE_SUFFIX)
        before = original.get(name)
        if scale is None or q.dtype != torch.float8_e4m3fn or before is None or before.dtype == torch.float8_e4m3fn:
            continue
        w = before.to(torch.float32)
        err = (dequantize(q, scale) - w).norm() / w.norm().clamp_min(1e-30)
        per_tensor[name] = float(err)
    return summary(per_tensor)


def summary(per_tensor: dict[str, float]) -> dict[str, Any]:
    """quantization.json from the relative error of each quantized tensor (also what the streamed
    `precision_source.Fp8Quantizer` reports)."""
    errs = list(per_tensor.values())
    return {
        "format": "float8_e4m3fn, 128x128 block scales (weight_scale_inv)",
        "tensors": len(errs),
        "mean_relative_error": sum(errs) / len(errs) if errs else 0.0,
        "max_relative_error": max(errs) if errs else 0.0,
        "per_tensor": dict(sorted(per_tensor.items())),
    }
