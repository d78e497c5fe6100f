"""Where the exporter's tensors come from: one small protocol over a checkpoint on disk, a dict in memory,
or nothing at all (shapes only, for `--weights none`).

Every source answers `names`, `shape(name)`, `dtype(name)` and `name in source` without reading a weight;
`get(name)` reads one tensor, `expert_chunks(name)` a fused expert tensor one expert at a time, and
`release()` lets go of what was read for the layer just exported. `CheckpointReader`
(exporter/checkpoint_reader.py) is the on-disk source.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from r1c.config import ModelConfig
from r1c.errors import ExportError
from r1c.exporter.checkpoint_layouts import SCALE_SUFFIX
from r1c.plugins import fp8

ROUTER_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


class TensorSource(Protocol):
    @property
    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...
    def expert_chunks(self, name: str) -> Iterator[torch.Tensor]: ...
    def release(self) -> None: ...


class MetaSource:
    """The metadata half of the protocol, answered from `meta` (name -> (shape, dtype)) in its order.

    The base of the sources that know every shape and dtype before reading a weight (`ShapeSource`,
    `CheckpointReader`, `precision_source.Fp8Quantizer`); they fill `meta` and add `get`, `expert_chunks` and
    `release`.
    """

    meta: dict[str, tuple[tuple[int, ...], torch.dtype]]

    @property
    def names(self) -> list[str]:
        return list(self.meta)

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[name][1]


class DictSource:
    """Tensors already in memory (a preset's random weights, a quantized checkpoint)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ExportError(f"export: checkpoint has no tensor {name}") from None

    def expert_chunks(self, name: str) -> Iterator[torch.Tensor]:
        yield from self.get(name)

    def release(self) -> None:
        pass


class ShapeSource(MetaSource):
    """Shapes and dtypes of a config's tensors with no values: `get` is an error (weights are never read).

    FP8 configs (`quantization_config.quant_method == "fp8"`) get DeepSeek's release layout: linear and expert
    weights float8_e4m3fn with float32 128x128 block scales, the router float32, everything else `dtype`.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        from r1c.exporter.checkpoint import expected_shapes, is_quantizable

        quantized = (config.quantization_config or {}).get("quant_method") == "fp8"
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shape in expected_shapes(config).items():
            if quantized and is_quantizable(name, len(shape)):
                self.meta[name] = (shape, torch.float8_e4m3fn)
                self.meta[name + SCALE_SUFFIX] = (fp8.scale_shape(shape), torch.float32)
            else:
                self.meta[name] = (shape, torch.float32 if name.endswith(ROUTER_SUFFIXES) else dtype)

    def get(self, name: str) -> torch.Tensor:
        raise ExportError(f"export: internal: weights=none read {name}")

    def expert_chunks(self, name: str) -> Iterator[torch.Tensor]:
        raise ExportError(f"export: internal: weights=none read {name}")

    def release(self) -> None:
        pass
