"""A lazy view of an HF-layout checkpoint: canonical tensor names -> tensors read from the shards on use.

Opening reads only the safetensors headers (names, shapes, dtypes) and checks them against the model's
canonical layout (`checkpoint.expected_shapes`), so a missing or misshapen tensor fails before any weight is
read. `get(name)` reads one tensor through safetensors' own lazy API (`safe_open` + `get_tensor`, which maps
the shard's bytes rather than copying them); DeepSeek's per-expert tensors are fused only when their layer's
fused name is asked for, and `expert_chunks` hands them out one expert at a time so that a writer can lay the
fused tensor out on disk without ever holding it. `release()` drops the open shard handles (and with them the
mapped pages), which the exporter calls after each layer: resident memory stays about one layer's size.

MTP layers (`model.layers.{num_hidden_layers}.*` in DeepSeek's release: the multi-token-prediction draft head)
are skipped with one log line. Layouts, quantizations and tensors r1c does not read are refused from the headers,
naming what they are (`checkpoint_layouts`); FP8 scales are float32 whatever they are stored as (ue8m0 scales may
be float8_e8m0fnu); per-expert FP8 experts with a partial last 128-block are fused padded (`checkpoint_layouts`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from r1c.config import ModelConfig
from r1c.errors import CheckpointError
from r1c.exporter.checkpoint_layouts import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    expert_part_shape,
    fuse_expert,
    fused_expert_shape,
    is_padded,
    layer_index,
    parse_per_expert,
    refuse_foreign_files,
    refuse_unknown_tensors,
    skippable,
)
from r1c.exporter.tensor_source import MetaSource
from r1c.exporter.weight_check import check_weight
from r1c.plugins import fp8

logger = logging.getLogger(__name__)

FUSED_EXPERTS = {".gate_up_proj": ("gate_proj", "up_proj"), ".down_proj": ("down_proj",)}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E8M0": torch.float8_e8m0fnu,
}


def weight_files(root: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint, and the index's weight_map when there is one."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint: {index} is not a valid safetensors index ({e})") from None
        files = [root / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"checkpoint: shard {missing[0]} listed in {index.name} is missing from {root} "
                                  f"({len(missing)} shard(s) missing)")
        return files, weight_map
    single = root / "model.safetensors"
    if single.is_file():
        return [single], None
    found = sorted(root.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"checkpoint: no model.safetensors or model.safetensors.index.json in {root}")
    return found, None


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"checkpoint: {path} is truncated or corrupt ({reason})")


class CheckpointReader(MetaSource):
    """Canonical names -> lazily read tensors of one checkpoint directory (see the module docstring).

    Raises CheckpointError (missing, misshapen, truncated or unknown-layout tensors) or ConfigError.
    """

    def __init__(self, root: str | Path) -> None:
        from r1c.exporter.checkpoint import expected_shapes

        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"checkpoint: directory {self.root} not found")
        refuse_foreign_files(self.root)
        if not (self.root / "config.json").is_file():
            raise CheckpointError(f"checkpoint: {self.root} has no config.json")
        self.config = ModelConfig.from_json(self.root / "config.json")
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, name in the file)
        self.meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        # (prefix, kind) -> proj -> expert -> (file, name)
        self._experts: dict[tuple[str, str], dict[str, dict[int, tuple[Path, str]]]] = {}
        files, weight_map = weight_files(self.root)
        self.files = files
        names_by_file: dict[str, list[str]] = {}
        for name, file in (weight_map or {}).items():
            names_by_file.setdefault(file, []).append(name)
        expected = expected_shapes(self.config)
        headers = [(path, *entry) for path in files
                   for entry in self._header(path, names_by_file.get(path.name) if weight_map is not None else None)]
        mtp = {name for _, name, _, _ in headers if (layer_index(name) or 0) >= self.config.num_hidden_layers}
        # first, from the names alone: tensors of another format or layout explain any misfit that follows
        refuse_unknown_tensors(self.root, self.config, [
            name for _, name, shape, _ in headers
            if not (name in mtp or parse_per_expert(name) or name in expected
                    or name.removesuffix(SCALE_SUFFIX) in expected or skippable(self.config, name, shape))])
        for path, name, shape, dtype in headers:
            if name in mtp:
                continue
            m = parse_per_expert(name)
            if m is not None:
                prefix, expert, proj, kind = m
                self._add_expert(prefix, expert, proj, kind, shape, (path, name))
                self.meta[f"{prefix}.{expert}.{proj}.{kind}"] = (shape, dtype)
            elif name in expected or name.removesuffix(SCALE_SUFFIX) in expected:
                self._where[name] = (path, name)
                self.meta[name] = (shape, dtype)
        self._check_experts_complete()
        self._fused_meta()
        if mtp:
            logger.warning("checkpoint %s: skipped the multi-token-prediction layer (%d tensors, model.layers.%d.*): "
                           "a speculative-decoding draft head that r1c does not export", self.root, len(mtp),
                           self.config.num_hidden_layers)
        self._check(expected)

    # ---- headers ---------------------------------------------------------------------------------------
    def _header(self, path: Path, listed: list[str] | None) -> Iterator[tuple[str, tuple[int, ...], torch.dtype]]:
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                if listed is not None and not present.issuperset(listed):
                    lost = sorted(set(listed) - present)
                    raise CheckpointError(f"checkpoint: tensor {lost[0]} is missing from {path} although the index "
                                          f"lists it there ({len(lost)} missing)")
                out = []
                for name in sorted(listed if listed is not None else present):
                    sl = f.get_slice(name)
                    dtype = torch.float32 if name.endswith(SCALE_SUFFIX) else _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"checkpoint: tensor {name} in {path} has dtype {sl.get_dtype()}, "
                                              "which r1c does not read")
                    out.append((name, tuple(int(d) for d in sl.get_shape()), dtype))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError for I/O)
            raise _corrupt(path, e) from None
        yield from out

    def _add_expert(self, prefix: str, expert: int, proj: str, kind: str, shape: tuple[int, ...],
                    where: tuple[Path, str]) -> None:
        e_count = self.config.n_routed_experts
        name = f"{prefix}.{expert}.{proj}.{kind}"
        if expert >= e_count:
            raise CheckpointError(f"checkpoint {self.root}: tensor {name} is beyond n_routed_experts ({e_count})")
        want = expert_part_shape(self.config, proj, kind)
        if shape != want:
            raise CheckpointError(f"checkpoint {self.root}: tensor {name} has shape {list(shape)}, "
                                  f"expected {list(want)}")
        self._experts.setdefault((prefix, kind), {}).setdefault(proj, {})[expert] = where

    def _check_experts_complete(self) -> None:
        e_count = self.config.n_routed_experts
        for (prefix, kind), group in self._experts.items():
            for proj in ("gate_proj", "up_proj", "down_proj"):
                lost = [e for e in range(e_count) if e not in group.get(proj, {})]
                if lost:
                    n_lost = sum(e_count - len(group.get(p, {})) for p in ("gate_proj", "up_proj", "down_proj"))
                    raise CheckpointError(f"checkpoint {self.root}: tensor {prefix}.{lost[0]}.{proj}.{kind} is "
                                          f"missing ({n_lost} per-expert tensors missing in {prefix})")

    def _fused_meta(self) -> None:
        """Shapes and dtypes of the fused expert tensors that per-expert groups stand for."""
        for prefix, kind in self._experts:
            suffix = SCALE_SUFFIX if kind.endswith(SCALE_SUFFIX) else ""
            for fused, projs in FUSED_EXPERTS.items():
                dtype = self.meta[f"{prefix}.0.{projs[0]}.{kind}"][1]
                self.meta[prefix + fused + suffix] = (fused_expert_shape(self.config, fused, kind, dtype), dtype)
        for key in [k for k in self.meta if ".mlp.experts." in k and k.split(".mlp.experts.")[1][:1].isdigit()]:
            del self.meta[key]

    def _check(self, expected: dict[str, tuple[int, ...]]) -> None:
        missing = [name for name in expected if name not in self.meta]
        for name, (_, dtype) in self.meta.items():
            if dtype == torch.float8_e4m3fn and name + SCALE_SUFFIX not in self.meta:
                missing.append(name + SCALE_SUFFIX)
        if missing:
            raise CheckpointError(f"checkpoint {self.root}: tensor {missing[0]} is missing "
                                  f"({len(missing)} missing in all)")
        for name, shape in expected.items():
            got, dtype = self.meta[name]
            if got != shape and not (dtype == FP8_DTYPE and is_padded(self.config, name, got)):
                raise CheckpointError(f"checkpoint {self.root}: tensor {name} has shape {list(got)}, "
                                      f"expected {list(shape)}")
            scale = self.meta.get(name + SCALE_SUFFIX)
            if scale is not None:
                want = fp8.scale_shape(got)
                if scale[0] != want:
                    raise CheckpointError(f"checkpoint {self.root}: tensor {name}{SCALE_SUFFIX} has shape "
                                          f"{list(scale[0])}, expected {list(want)}")

    # ---- the tensor source protocol (names, shape, dtype: MetaSource; every canonical name, weights and FP8
    # scales, in checkpoint order) ----------------------------------------------------------------------
    @property
    def is_fp8(self) -> bool:
        return any(name.endswith(SCALE_SUFFIX) for name in self.meta)

    @property
    def nbytes(self) -> int:
        """Bytes of every canonical tensor (what an export reads)."""
        return sum(_numel(s) * d.itemsize for s, d in self.meta.values())

    def _read(self, where: tuple[Path, str]) -> torch.Tensor:
        path, name = where
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            tensor = handle.get_tensor(name)
        except Exception as e:
            raise _corrupt(path, e) from None
        check_weight(name, tensor, f"checkpoint {path}")  # every tensor read passes here, once per read
        return tensor.to(torch.float32) if name.endswith(SCALE_SUFFIX) else tensor

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` (canonical); fused expert tensors are assembled here, their layer at a time."""
        if name in self._where:
            return self._read(self._where[name])
        split = _fused_key(name)
        if split is None or split[:2] not in self._experts:
            raise CheckpointError(f"checkpoint {self.root}: no tensor {name}")
        parts = list(self.expert_chunks(name))
        return torch.stack(parts).view(self.shape(name))

    def expert_chunks(self, name: str) -> Iterator[torch.Tensor]:
        """A fused expert tensor one expert at a time ([2I, H] or [H, I], or their scale grids; FP8 with a partial
        last block: padded to [2Ip, H] / [H, Ip]), in its on-disk order."""
        split = _fused_key(name)
        if name in self._where or split is None or split[2] is None:
            yield from self.get(name)
            return
        prefix, kind, fused = split
        assert fused is not None
        group = self._experts[(prefix, kind)]
        for e in range(self.config.n_routed_experts):
            yield fuse_expert(self.config, fused, kind, [self._read(group[p][e]) for p in FUSED_EXPERTS[fused]])

    def release(self) -> None:
        """Close the open shards (their mapped pages go with them)."""
        self._handles.clear()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fused_key(name: str) -> tuple[str, str, str | None] | None:
    """`<prefix>.gate_up_proj[_scale_inv]` -> (prefix, kind, fused suffix) for fused expert names."""
    base = name.removesuffix(SCALE_SUFFIX)
    kind = "weight" + (SCALE_SUFFIX if name != base else "")
    for fused in FUSED_EXPERTS:
        if base.endswith(".mlp.experts" + fused):
            return base.removesuffix(fused), kind, fused
    return None
