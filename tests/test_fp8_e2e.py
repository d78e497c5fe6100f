"""e2e tier, FP8: block-scaled FP8 weights stay FP8 from checkpoint to bundle, and the bundle computes the
same logits as the PyTorch model on the dequantized weights.

Tolerance: 1e-4 relative (max |a - b| / max |b|): both sides use identical dequantized values, so only
float32 rounding differs. The error FP8 itself adds (vs the unquantized model) is measured, not bounded
here: it is reported by `r1c export --precision fp8` in quantization.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import preset
from r1c.exporter.checkpoint import (
    is_quantizable,
    load_checkpoint,
    model_from_checkpoint,
    quantize_checkpoint_fp8,
    random_checkpoint,
    save_checkpoint,
)
from r1c.runtime import load

REL_TOL = 1e-4


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def fp8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    # DeepSeek's release layout (one tensor per expert and projection, each with its own 128x128 scale grid)
    # needs I to fill whole blocks to fuse gate and up scales: I = 128 here, as R1's 2048 does.
    base = preset("tiny").replace(moe_intermediate_size=128)
    config, tensors = quantize_checkpoint_fp8(base, random_checkpoint(base, seed=4))
    save_checkpoint(root / "ckpt", config, tensors, layout="per_expert")
    for args in (("export", str(root / "ckpt"), "-o", str(root / "export")),
                 ("build", str(root / "export"), "-o", str(root / "bundle"))):
        code, _, err = cli(*args)
        assert code == 0, err
    return {"ckpt": root / "ckpt", "export": root / "export", "bundle": root / "bundle"}


def test_fp8_weights_stay_fp8_in_the_files(fp8: dict[str, Path]) -> None:
    ckpt = load_checkpoint(fp8["ckpt"])
    n_fp8 = sum(1 for t in ckpt.tensors.values() if t.dtype == torch.float8_e4m3fn)
    n_quantizable = sum(1 for name, t in ckpt.tensors.items() if is_quantizable(name, t.dim()))
    assert n_fp8 == n_quantizable > 0
    for bundle_file in (fp8["export"] / "model.onnx", fp8["bundle"] / "model.onnx"):
        model = onnx.load(str(bundle_file), load_external_data=False)
        fp8_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
        assert len(fp8_inits) == n_fp8, bundle_file
        big_float = [i.name for i in model.graph.initializer
                     if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 1024
                     and not i.name.endswith("_scale") and "embed" not in i.name and "lm_head" not in i.name
                     and ".gate.weight" not in i.name]
        assert big_float == [], f"weights that should be FP8 were written as float32: {big_float}"


def test_fp8_bundle_equals_dequantized_model(fp8: dict[str, Path]) -> None:
    model = model_from_checkpoint(load_checkpoint(fp8["ckpt"]))
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, size=(2, 10))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    got = load(fp8["bundle"]).forward(ids)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < REL_TOL


def test_export_precision_fp8_quantizes_and_reports(tmp_path: Path) -> None:
    code, _, err = cli("export", "--preset", "tiny", "--precision", "fp8", "-o", str(tmp_path / "q"))
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "quantization.json").read_text())
    # e4m3fn keeps 3 mantissa bits: round-to-nearest gives a relative error of a few percent per tensor
    assert report["tensors"] > 0 and 0.005 < report["mean_relative_error"] < 0.08
    code, _, err = cli("export", "--preset", "tiny", "-o", str(tmp_path / "f32"))
    assert code == 0, err
    fp8_bytes = (tmp_path / "q" / "model.onnx.data").stat().st_size
    f32_bytes = (tmp_path / "f32" / "model.onnx.data").stat().st_size
    assert fp8_bytes < 0.6 * f32_bytes  # embeddings and lm_head stay float32 in the tiny preset


def test_quantization_report_skips_tensors_that_were_fp8_already() -> None:
    from r1c.exporter.quant_report import quantization_report

    config = preset("tiny")
    original = random_checkpoint(config, seed=6)
    _, once = quantize_checkpoint_fp8(config, original)
    _, twice = quantize_checkpoint_fp8(config, once)  # an FP8 checkpoint passes through unchanged
    assert quantization_report(original, once)["tensors"] > 0
    assert quantization_report(once, twice)["tensors"] == 0
