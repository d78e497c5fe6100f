"""e2e tier: checkpoint -> `r1c export` -> `r1c build --target onnxruntime` -> runtime, on the tiny preset,
compared with r1c's PyTorch model and with transformers' DeepseekV3 on the same weights.

Tolerance: logits agree within 1e-4 relative (max |a - b| / max |b|) in float32; greedy tokens exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import preset
from r1c.exporter.checkpoint import load_checkpoint, model_from_checkpoint, random_checkpoint, save_checkpoint
from r1c.runtime import load

REL_TOL = 1e-4


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    config = preset("tiny")
    save_checkpoint(root / "ckpt", config, random_checkpoint(config, seed=1))
    code, _, err = cli("export", str(root / "ckpt"), "-o", str(root / "export"))
    assert code == 0, err
    code, _, err = cli("build", str(root / "export"), "-o", str(root / "bundle"))
    assert code == 0, err
    return {"ckpt": root / "ckpt", "export": root / "export", "bundle": root / "bundle"}


def test_export_has_r1c_ops_with_functions_and_external_data(tiny: dict[str, Path]) -> None:
    import onnx

    model = onnx.load(str(tiny["export"] / "model.onnx"), load_external_data=False)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    n_moe = preset("tiny").num_moe_layers
    assert ops.count(("r1c", "MoERouter")) == n_moe
    assert ops.count(("r1c", "MoEExperts")) == n_moe
    for node in model.graph.node:
        if node.domain == "r1c":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_namespace"] == b"r1c"
    assert {(f.domain, f.name) for f in model.functions} == {("r1c", "MoERouter"), ("r1c", "MoEExperts")}
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "weights must be external data"
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    io = json.loads((tiny["export"] / "graph_io.json").read_text())
    assert io["kv_cache"]["values_per_token_per_layer"] == preset("tiny").latent_dim


def test_runtime_logits_equal_pytorch_model(tiny: dict[str, Path]) -> None:
    model = model_from_checkpoint(load_checkpoint(tiny["ckpt"]))
    engine = load(tiny["bundle"])
    ids = np.random.default_rng(0).integers(0, engine.vocab_size, size=(3, 11))
    got = engine.forward(ids)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    assert got.shape == want.shape
    assert rel_err(got, want) < REL_TOL


def test_runtime_logits_equal_transformers(tiny: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tiny["ckpt"]), dtype=torch.float32).eval()
    engine = load(tiny["bundle"])
    ids = np.random.default_rng(1).integers(0, engine.vocab_size, size=(2, 9))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel_err(engine.forward(ids), want) < REL_TOL


def test_prefill_logits_of_each_rows_last_token_equal_transformers(tiny: dict[str, Path]) -> None:
    """A sampling prefill of right-padded rows computes logits at each row's last token only (`logits_index`: the
    last layer's MLP and the head run on those positions): equal to transformers' logits there, row by row."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tiny["ckpt"]), dtype=torch.float32).eval()
    engine = load(tiny["bundle"])
    assert engine.selects_logits
    rng = np.random.default_rng(4)
    lengths = np.array([5, 9, 2])
    ids = rng.integers(2, engine.vocab_size, size=(3, 9))
    runner = engine._runner(3, 16, ids.size, 16)
    for _ in range(3):
        runner.cache.add_row()
    runner.cache.resize(9)
    got = np.array(runner.step(ids, 0, lengths))
    assert got.shape == (3, 1, engine.vocab_size)
    for row, n in enumerate(lengths):
        with torch.no_grad():
            want = hf(torch.from_numpy(ids[row:row + 1, :n])).logits[0, -1].numpy()
        assert rel_err(got[row, 0], want) < REL_TOL


def test_generate_batch_of_different_lengths_equals_transformers_greedy(tiny: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tiny["ckpt"]), dtype=torch.float32).eval()
    engine = load(tiny["bundle"])
    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, engine.vocab_size, size=n).tolist() for n in (3, 9, 1, 6)]
    new = 7
    got = engine.generate(prompts, new)
    for prompt, tokens in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        want = out[0, len(prompt):].tolist()
        assert len(want) == new
        assert tokens == want


def test_cli_run_prints_tokens_and_saves_logits(tiny: dict[str, Path], tmp_path: Path) -> None:
    logits_path = tmp_path / "logits.npy"
    code, out, err = cli("run", str(tiny["bundle"]), "--input-ids", "1 2 3", "--max-new-tokens", "4",
                         "--logits-out", str(logits_path))
    assert code == 0, err
    label, _, ids = out.strip().partition(": ")
    assert label == "prompt 0 (3 tokens) -> 4 new tokens"
    tokens = [int(t) for t in ids.split()]
    engine = load(tiny["bundle"])
    assert tokens == engine.generate([[1, 2, 3]], 4)[0]
    np.testing.assert_array_equal(np.load(logits_path), engine.forward([[1, 2, 3]])[0])


# ---- bad input: one readable line, a non-zero exit, nothing half-written ------------------------------
def assert_clean_failure(code: int, err: str, out_dir: Path, needle: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("r1c: error: ") and needle in lines[0], lines[0]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")], "temp dir left"


def test_export_missing_directory(tmp_path: Path) -> None:
    code, _, err = cli("export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", "nope")


def test_export_unknown_architecture(tmp_path: Path) -> None:
    config = preset("tiny")
    save_checkpoint(tmp_path / "ckpt", config, random_checkpoint(config))
    d = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    d["architectures"], d["model_type"] = ["LlamaForCausalLM"], "llama"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(d))
    code, _, err = cli("export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", "LlamaForCausalLM")


def test_export_missing_tensor(tmp_path: Path) -> None:
    config = preset("tiny")
    tensors = random_checkpoint(config)
    del tensors["model.layers.1.mlp.experts.down_proj"]
    save_checkpoint(tmp_path / "ckpt", config, tensors)
    code, _, err = cli("export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", "model.layers.1.mlp.experts.down_proj")


def test_export_truncated_safetensors(tmp_path: Path) -> None:
    config = preset("tiny")
    save_checkpoint(tmp_path / "ckpt", config, random_checkpoint(config))
    f = tmp_path / "ckpt" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = cli("export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"))
    assert_clean_failure(code, err, tmp_path / "out", "model.safetensors")


def test_run_token_out_of_range(tiny: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = cli("run", str(tiny["bundle"]), "--input-ids", f"1 {preset('tiny').vocab_size}")
    assert code != 0 and out == ""
    assert err.strip().count("\n") == 0 and "out of range" in err


def test_generate_refuses_an_eos_token_outside_the_vocabulary(tiny: dict[str, Path]) -> None:
    from r1c.errors import RuntimeInputError

    engine = load(tiny["bundle"])
    vocab = engine.vocab_size
    for eos in (vocab, -1, True, 2.0, "3"):
        with pytest.raises(RuntimeInputError, match=f"eos_token_id {eos!r} is not a token of this model"):
            engine.generate([[1, 2]], 3, eos_token_id=eos)  # type: ignore[arg-type]
    first = engine.generate([[1, 2]], 1)[0][0]  # an in-vocabulary eos (numpy ints too) still stops the row
    assert engine.generate([[1, 2]], 3, eos_token_id=np.int64(first)) == [[first]]
    assert engine.generate([[1, 2]], 3, eos_token_id=vocab - 1 if first != vocab - 1 else 0)[0][0] == first


def test_build_refuses_existing_output_and_leaves_it(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = cli("build", str(tiny["export"]), "-o", str(out))
    assert code != 0 and "not an empty directory" in err
    assert (out / "keep.txt").read_text() == "x"


def test_bundle_with_edited_file_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny["bundle"], copy)
    with (copy / "model.onnx.data").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    code, _, err = cli("run", str(copy), "--input-ids", "1 2")
    assert code != 0 and "sha256" in err and err.strip().count("\n") == 0


def test_export_is_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = cli("export", str(tiny["ckpt"]), "-o", str(tmp_path / "again"))
    assert code == 0, err
    for name in ("model.onnx", "model.onnx.data", "graph_io.json", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny["export"] / name).read_bytes(), name
