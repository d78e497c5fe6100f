"""e2e tier: the streaming export (several data files, weights written once, `--weights none`), the MTP skip,
and bundle integrity at load (sizes + fingerprints) against `r1c verify` (every byte).

Memory and time at R1's per-layer shapes are measured by scripts/bench_export_scale.py, not here.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from r1c.cli import main
from r1c.config import preset
from r1c.errors import BundleError
from r1c.exporter.checkpoint import random_checkpoint, save_checkpoint
from r1c.exporter.onnx_export import export_onnx
from r1c.manifest import FINGERPRINT_BLOCK, FINGERPRINT_SAMPLES, read_manifest
from r1c.runtime import load


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def data_files(export: Path) -> list[str]:
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scale")
    config = preset("tiny")
    save_checkpoint(root / "ckpt", config, random_checkpoint(config, seed=3), max_shard_bytes=200_000)
    for args in (("export", str(root / "ckpt"), "--no-progress", "-o", str(root / "export")),
                 ("build", str(root / "export"), "-o", str(root / "bundle"))):
        code, _, err = cli(*args)
        assert code == 0, err
    return {"root": root, "ckpt": root / "ckpt", "export": root / "export", "bundle": root / "bundle"}


def test_several_data_files_give_the_same_bundle_numbers(tiny: dict[str, Path], tmp_path: Path) -> None:
    from r1c.cli import _canonicalize
    from r1c.exporter.checkpoint_reader import CheckpointReader
    from r1c.runtime.build import build_bundle

    reader = CheckpointReader(tiny["ckpt"])
    export_onnx(reader.config, reader, tmp_path / "split", progress=False, max_file_bytes=64 << 10,
                postprocess=_canonicalize)
    files = data_files(tmp_path / "split")
    assert len(files) > 3 and files[0] == "model.onnx.data" and "model.onnx.data.1" in files
    assert all((tmp_path / "split" / f).stat().st_size <= 64 << 10 or f for f in files)
    build_bundle(tmp_path / "split", tmp_path / "bundle")
    ids = np.random.default_rng(1).integers(0, reader.config.vocab_size, size=(2, 7))
    np.testing.assert_array_equal(load(tmp_path / "bundle").forward(ids), load(tiny["bundle"]).forward(ids))


def test_canonicalization_keeps_the_weights_where_the_exporter_wrote_them(tiny: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    from r1c.exporter.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(tiny["ckpt"])
    export_onnx(reader.config, reader, tmp_path / "raw", progress=False)  # no pass pipeline
    raw = (tmp_path / "raw" / "model.onnx.data").read_bytes()
    final = (tiny["export"] / "model.onnx.data").read_bytes()
    assert final[: len(raw)] == raw  # written once; the passes may only append what they created
    model = onnx.load(str(tiny["export"] / "model.onnx"), load_external_data=False)
    raw_model = onnx.load(str(tmp_path / "raw" / "model.onnx"), load_external_data=False)
    where = {t.name: [(e.key, e.value) for e in t.external_data] for t in raw_model.graph.initializer
             if t.external_data}
    kept = [t for t in model.graph.initializer if t.name in where]
    assert len(kept) > 20 and all([(e.key, e.value) for e in t.external_data] == where[t.name] for t in kept)


def test_weights_none_has_the_graph_and_layout_without_bytes(tiny: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = cli("export", str(tiny["ckpt"]), "--weights", "none", "--no-progress", "-o", str(tmp_path / "e"))
    assert code == 0, err
    onnx.checker.check_model(str(tmp_path / "e" / "model.onnx"))
    full = onnx.load(str(tiny["export"] / "model.onnx"), load_external_data=False)
    empty = onnx.load(str(tmp_path / "e" / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in empty.graph.node] == [n.op_type for n in full.graph.node]
    data = tmp_path / "e" / "model.onnx.data"
    assert data.stat().st_size >= 0.9 * (tiny["export"] / "model.onnx.data").stat().st_size
    assert data.stat().st_blocks * 512 < data.stat().st_size / 4  # a sparse file: no weight bytes written
    assert json.loads((tmp_path / "e" / "source.json").read_text())["weights"] == "none"


def test_preset_r1_needs_weights_none() -> None:
    code, _, err = cli("export", "--preset", "r1", "-o", "/nonexistent/x")
    assert code != 0 and "--weights none" in err


def test_mtp_layer_is_skipped_with_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = preset("tiny")
    save_checkpoint(tmp_path, config, random_checkpoint(config, seed=5))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):  # DeepSeek's MTP layer: one past the last
        tensors[f"model.layers.{config.num_hidden_layers}.{k}"] = torch.zeros(4)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        code, _, err = cli("export", str(tmp_path), "--no-progress", "-o", str(tmp_path / "out"))
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(lines) == 1 and f"model.layers.{config.num_hidden_layers}" in lines[0]


# ---- bundle integrity: cheap at load, complete in `r1c verify` ------------------------------------------------
def _unsampled_offset(size: int) -> int:
    """A byte no fingerprint block covers (between the first two sampled blocks)."""
    step = (size - FINGERPRINT_BLOCK) // (FINGERPRINT_SAMPLES - 1)
    assert step > FINGERPRINT_BLOCK + 2, "the data file is too small for this test"
    return FINGERPRINT_BLOCK + (step - FINGERPRINT_BLOCK) // 2


def test_load_checks_sizes_and_fingerprints_verify_checks_every_byte(tiny: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = cli("verify", str(tiny["bundle"]), "--no-progress")
    assert code == 0 and "match their sha256" in out, err
    m = read_manifest(tiny["bundle"])
    assert set(m.file_sizes) == set(m.files) == set(m.file_fingerprints)

    copy = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], copy)
    data = copy / "model.onnx.data"
    with data.open("r+b") as f:  # a flipped byte the fingerprint does not sample: only `verify` sees it
        f.seek(_unsampled_offset(data.stat().st_size))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    read_manifest(copy)  # the cheap check passes
    code, _, err = cli("verify", str(copy), "--no-progress")
    assert code != 0 and "model.onnx.data" in err and "sha256" in err and err.strip().count("\n") == 0

    with data.open("r+b") as f:
        f.truncate(data.stat().st_size - 1)
    with pytest.raises(BundleError, match="bytes, the manifest says"):
        read_manifest(copy)


def test_build_splits_the_weights_into_several_data_files(tiny: dict[str, Path], tmp_path: Path) -> None:
    from r1c.runtime.build import build_bundle

    limit = 64 << 10
    bundle = build_bundle(tiny["export"], tmp_path / "split", max_file_bytes=limit)
    files = data_files(bundle)
    assert len(files) > 3 and files == sorted(p.name for p in bundle.glob("*.data"))
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    per_file: dict[str, list[int]] = {}
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info:
            per_file.setdefault(info["location"], []).append(int(info["length"]))
    for name, lengths in per_file.items():  # within the limit, or one tensor larger than it alone
        assert (bundle / name).stat().st_size <= limit or len(lengths) == 1, name
    m = read_manifest(bundle)
    assert set(files) <= set(m.files) == set(m.file_sizes) == set(m.file_fingerprints)
    ids = np.random.default_rng(2).integers(0, preset("tiny").vocab_size, size=(2, 7))
    np.testing.assert_array_equal(load(bundle).forward(ids), load(tiny["bundle"]).forward(ids))

    victim = bundle / files[-1]  # a later data file, edited in a block the fingerprint samples (its first)
    with victim.open("r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=f"file {victim.name} does not match its fingerprint"):
        load(bundle)
    code, _, err = cli("verify", str(bundle), "--no-progress")
    assert code != 0 and victim.name in err
