"""Shared by the TensorRT tests: TensorRT's own tensor descriptors, built by hand (no GPU needed)."""

from __future__ import annotations

from typing import Any


def dyn_desc(trt: Any, dtype: Any, lo: list[int], hi: list[int]) -> Any:
    """A `DynamicPluginTensorDesc` from `lo` to `hi` (what the builder hands `get_workspace_size`)."""
    d = trt.DynamicPluginTensorDesc()
    d.min, d.max = trt.Dims(lo), trt.Dims(hi)
    pd = trt.PluginTensorDesc()
    pd.type = dtype
    pd.dims = trt.Dims([a if a == b else -1 for a, b in zip(lo, hi)])
    d.desc = pd
    return d
