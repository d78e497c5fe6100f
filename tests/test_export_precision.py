"""e2e tier: `r1c export --precision fp8 | fp32` streamed (each tensor quantized or dequantized as the exporter
reads it) gives exactly what the in-memory transforms give (`quantize_checkpoint_fp8`, `dequantized`): the
same data-file bytes and the same quantization.json; and the tensors alive at once do not grow with the model.

Peak RSS at R1's per-layer shapes is measured by scripts/bench_export_scale.py --precision, not here.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from click.testing import CliRunner

from r1c.cli import _finish_export, main
from r1c.config import ModelConfig, preset
from r1c.exporter.checkpoint import (
    dequantized,
    load_checkpoint,
    quantize_checkpoint_fp8,
    random_checkpoint,
    save_checkpoint,
)
from r1c.exporter.checkpoint_reader import CheckpointReader
from r1c.exporter.onnx_export import export_onnx
from r1c.exporter.precision_source import SLAB_ELEMENTS, Fp8Quantizer, quantize_slabs, with_precision
from r1c.exporter.quant_report import quantization_report
from r1c.plugins import fp8

# whole 128-row blocks in every expert (DeepSeek's per-expert layout fuses gate/up scales only then)
BASE = preset("tiny").replace(moe_intermediate_size=128)


def cli(*args: str) -> None:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.stderr


def make_checkpoint(root: Path, config: ModelConfig, fp8_weights: bool) -> Path:
    tensors = random_checkpoint(config, seed=7, dtype=torch.bfloat16)
    if fp8_weights:
        config, tensors = quantize_checkpoint_fp8(config, tensors)
    return save_checkpoint(root, config, tensors, layout="per_expert", max_shard_bytes=300_000)


def data_bytes(export: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(export.glob("model.onnx.data*"))}


def in_memory_export(config: ModelConfig, tensors: dict[str, torch.Tensor], out: Path, dtype: str) -> Path:
    return export_onnx(config, tensors, out, dtype=dtype, progress=False,
                       postprocess=lambda d: _finish_export(None, d))


def test_streamed_fp8_equals_the_in_memory_quantization(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", BASE, fp8_weights=False)
    cli("export", str(ckpt), "--precision", "fp8", "--dtype", "bfloat16", "--no-progress", "-o", str(tmp_path / "s"))
    original = load_checkpoint(ckpt).tensors
    config, quantized = quantize_checkpoint_fp8(BASE, original)
    in_memory_export(config, quantized, tmp_path / "m", "bfloat16")
    assert data_bytes(tmp_path / "s") == data_bytes(tmp_path / "m")
    got = json.loads((tmp_path / "s" / "quantization.json").read_text())
    want = quantization_report(original, quantized)
    assert got["tensors"] == want["tensors"] > 10 and got["per_tensor"].keys() == want["per_tensor"].keys()
    for key in ("mean_relative_error", "max_relative_error"):
        assert got[key] == pytest.approx(want[key], rel=1e-5)
    for name, err in want["per_tensor"].items():
        assert got["per_tensor"][name] == pytest.approx(err, rel=1e-5), name
    model = onnx.load(str(tmp_path / "s" / "model.onnx"), load_external_data=False)
    assert sum(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer) == want["tensors"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_fp32_equals_the_in_memory_dequantization(tmp_path: Path, dtype: str) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", BASE, fp8_weights=True)
    cli("export", str(ckpt), "--precision", "fp32", "--dtype", dtype, "--no-progress", "-o", str(tmp_path / "s"))
    loaded = load_checkpoint(ckpt)
    in_memory_export(loaded.config.replace(quantization_config=None), dequantized(loaded.tensors), tmp_path / "m",
                     dtype)
    assert data_bytes(tmp_path / "s") == data_bytes(tmp_path / "m")
    model = onnx.load(str(tmp_path / "s" / "model.onnx"), load_external_data=False)
    assert not any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)


def test_slabs_are_bit_identical_to_the_whole_tensor_quantization() -> None:
    w = torch.randn(3 * 128 + 50, SLAB_ELEMENTS // 256 + 7) * 3  # several slabs, partial blocks both ways
    q, s = quantize_slabs(w)
    q_ref, s_ref = fp8.quantize(w)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


class Tracked:
    """A tensor source that counts the bytes of the tensors it handed out that are still alive (and the peak)."""

    def __init__(self, source: Any) -> None:
        self.src = source
        self.alive = 0
        self.peak = 0

    def __getattr__(self, name: str) -> Any:  # names, shape, dtype, __contains__ via the protocol below
        return getattr(self.src, name)

    def __contains__(self, name: str) -> bool:
        return name in self.src

    def _track(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.alive += n
        self.peak = max(self.peak, self.alive)
        weakref.finalize(t, self._gone, n)
        return t

    def _gone(self, n: int) -> None:
        self.alive -= n

    def get(self, name: str) -> torch.Tensor:
        return self._track(self.src.get(name))

    def expert_chunks(self, name: str) -> Iterator[torch.Tensor]:
        for t in self.src.expert_chunks(name):
            yield self._track(t)


@pytest.mark.parametrize("precision", ["fp8", "fp32"])
def test_tensors_alive_at_once_do_not_grow_with_the_model(tmp_path: Path, precision: str) -> None:
    peaks = {}
    for layers in (3, 6):
        config = BASE.replace(num_hidden_layers=layers)
        ckpt = make_checkpoint(tmp_path / f"ckpt{layers}", config, fp8_weights=precision == "fp32")
        reader = Tracked(CheckpointReader(ckpt))  # what is read from the shards
        config, source, quantizer = with_precision(reader.config, reader, precision, "float32")
        outer = Tracked(source)  # what the (de)quantizer hands to the exporter
        export_onnx(config, outer, tmp_path / f"out{layers}", progress=False)  # type: ignore[arg-type]
        if quantizer is not None:
            assert isinstance(quantizer, Fp8Quantizer) and quantizer.report()["tensors"] > 0
        total = sum(torch.Size(reader.shape(n)).numel() * reader.dtype(n).itemsize for n in reader.names)
        peaks[layers] = (reader.peak, outer.peak, total)
    (r3, o3, total3), (r6, o6, total6) = peaks[3], peaks[6]
    assert total6 > 1.5 * total3  # the model grew ...
    assert r6 <= r3 and o6 <= o3  # ... what is held at once did not
    assert r6 < total6 / 4 and o6 < total6 / 2
