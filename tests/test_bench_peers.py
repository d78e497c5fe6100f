"""e2e tier: `r1c bench --peer` (transformers, stock torch.onnx export under ONNX Runtime) on the tiny preset.
The peers must produce r1c's greedy tokens exactly (float32, same weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import preset
from r1c.errors import ExportError
from r1c.exporter.checkpoint import load_checkpoint, random_checkpoint, save_checkpoint
from r1c.manifest import read_manifest
from r1c.runtime.bench.peers import PeerUnavailable, rebuild_weights

FAST = ["--warmup", "1", "--repeat", "3", "--threads", "1", "--no-progress", "--no-roofline"]


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peers")
    code, _, err = cli("export", "--preset", "tiny", "--seed", "3", "-o", str(root / "export"), "--no-progress")
    assert code == 0, err
    code, _, err = cli("build", str(root / "export"), "-o", str(root / "bundle"))
    assert code == 0, err
    return {"root": root, "bundle": root / "bundle"}


def bundle_copy(src: Path, dst: Path, **source: Any) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["source"] = source
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


# ---- weights for the peers ----------------------------------------------------------------------------------
def test_rebuild_weights_from_preset_and_checkpoint(built: dict[str, Path], tmp_path: Path) -> None:
    m = read_manifest(built["bundle"], verify_hashes=False)
    config, tensors = rebuild_weights(m)
    want = random_checkpoint(preset("tiny"), seed=3)
    assert config.hash() == m.config.hash() and set(tensors) == set(want)
    assert all(torch.equal(tensors[k], want[k]) for k in want)

    save_checkpoint(tmp_path / "ckpt", preset("tiny"), random_checkpoint(preset("tiny"), seed=5))
    m.source = {"checkpoint": str(tmp_path / "ckpt"), "precision": "auto"}
    _, from_ckpt = rebuild_weights(m)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(from_ckpt[k], ckpt.tensors[k]) for k in ckpt.tensors)
    m.source = {"checkpoint": str(tmp_path / "gone")}
    with pytest.raises(PeerUnavailable, match="not there"):
        rebuild_weights(m)
    m.source = {}
    with pytest.raises(PeerUnavailable, match="no source"):
        rebuild_weights(m)


# ---- the peers in `r1c bench` ------------------------------------------------------------------------------
@pytest.mark.slow  # the stock torch.onnx export takes ~20 s even for the tiny preset
def test_bench_with_both_peers(built: dict[str, Path]) -> None:
    out = built["root"] / "peers.json"
    code, stdout, err = cli("bench", str(built["bundle"]), "--batch", "1,2", "--prompt-len", "5", "--new-tokens", "4",
                            "--peer", "transformers", "--peer", "stock-onnx", "--peer-cache",
                            str(built["root"] / "cache"), "--json", str(out), *FAST)
    assert code == 0, err
    d = json.loads(out.read_text())
    assert [s["name"] for s in d["systems"]] == ["r1c", "transformers", "stock-onnx"]
    assert all(s["status"] == "ok" for s in d["systems"]), d["systems"]
    assert len(d["ratios"]) == 4
    for r in d["ratios"]:
        assert r["status"] == "ok" and r["against"] == "r1c"
        assert r["tokens_match"] is True, r  # same weights, same greedy tokens
        assert all(r[m]["low"] <= r[m]["ratio"] <= r[m]["high"] for m in ("ttft_s", "tpot_s", "e2e_s"))
    assert "Ratios against r1c" in stdout and "transformers" in stdout and "stock-onnx" in stdout
    assert (built["root"] / "cache").is_dir()  # the export is kept for the next run


def test_unavailable_peers_are_rows_not_crashes(built: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(*args: Any, **kwargs: Any) -> Path:
        raise ExportError("stock export: torch.onnx.export failed (planted)")

    monkeypatch.setattr("r1c.exporter.stock.export_stock", broken_export)
    code, stdout, err = cli("bench", str(built["bundle"]), "--batch", "1", "--prompt-len", "4", "--new-tokens", "3",
                            "--peer", "stock-onnx", "--peer-cache", str(tmp_path / "cache"),
                            "--json", str(tmp_path / "r.json"), *FAST)
    assert code == 0, err
    d = json.loads((tmp_path / "r.json").read_text())
    stock = d["systems"][1]
    assert stock["status"] == "unavailable" and "planted" in stock["reason"]
    assert "stock-onnx" in stdout and "unavailable: stock export: torch.onnx.export failed (planted)" in stdout

    no_source = bundle_copy(built["bundle"], tmp_path / "nosource")
    code, stdout, err = cli("bench", str(no_source), "--batch", "1", "--prompt-len", "4", "--new-tokens", "3",
                            "--peer", "transformers", *FAST)
    assert code == 0, err
    assert "unavailable: the bundle's manifest records no source" in stdout

def test_peers_build_the_bundles_architecture_from_a_padded_fp8_checkpoint(built: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """A DeepSeek-V2 bundle's peers are transformers' DeepseekV2ForCausalLM (not V3), from its source checkpoint in
    DeepSeek's release form with partial FP8 blocks (moe_intermediate_size 96: loaded padded, cut back for
    transformers): the transformers peer's greedy tokens and the stock exporter's model's logits equal transformers'
    own V2 model built from the same config.json on the per-expert dequantized weights (1e-5)."""
    import conformance as cf

    from r1c.exporter.stock import load_hf_model
    from r1c.runtime.bench.peers import TransformersPeer

    config_json = cf.BASE_V2_LITE | {"moe_intermediate_size": 96}
    file_tensors, reference = cf.release_fp8(cf.parse(config_json), cf.weights(cf.parse(config_json), seed=7))
    ckpt_dir = cf.write_checkpoint(tmp_path / "v2", config_json, file_tensors)
    assert load_checkpoint(ckpt_dir).tensors["model.layers.1.mlp.experts.down_proj"].shape[-1] == 128  # padded
    m = read_manifest(built["bundle"], verify_hashes=False)
    m.model_config = load_checkpoint(ckpt_dir).config.to_hf_dict()
    m.source = {"checkpoint": str(ckpt_dir), "precision": "auto"}
    config, tensors = rebuild_weights(m)
    want = cf.transformers_model(config_json, reference)
    prompt = [5, 9, 2, 7]

    peer = TransformersPeer(save_checkpoint(tmp_path / "peer", config, tensors), config, threads=1)
    assert type(peer.model).__name__ == peer.info["model_class"] == "DeepseekV2ForCausalLM"
    assert peer.generate([prompt], 4) == [cf.transformers_greedy(want, prompt, 4)]

    stock = load_hf_model(ckpt_dir)
    assert type(stock).__name__ == "DeepseekV2ForCausalLM"
    with torch.no_grad():
        got, ref = stock(torch.tensor([prompt])).logits, want(torch.tensor([prompt])).logits
    assert cf.rel_err(got, ref) <= 1e-5
