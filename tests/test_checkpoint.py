"""Checkpoint I/O: layouts, shards, FP8, errors, and the random weights the other tests rely on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1c.config import ModelConfig, preset
from r1c.errors import CheckpointError, ConfigError, R1CError
from r1c.exporter.checkpoint import (
    SCALE_SUFFIX,
    Checkpoint,
    dequantized,
    expected_shapes,
    load_checkpoint,
    model_from_checkpoint,
    quantize_checkpoint_fp8,
    random_checkpoint,
    save_checkpoint,
)
from r1c.exporter.model import DeepseekV3ForCausalLM
from r1c.plugins.fp8 import dequantize, quantize

FP8 = torch.float8_e4m3fn


def tiny(**kw: object) -> ModelConfig:
    return preset("tiny").replace(**kw)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name  # bitwise, fp8 included


def file_keys(root: Path) -> set[str]:
    keys: set[str] = set()
    for f in root.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys.update(h.keys())
    return keys


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return tiny()


@pytest.fixture(scope="module")
def tensors(config: ModelConfig) -> dict[str, torch.Tensor]:
    return random_checkpoint(config, seed=0)


# ---- layouts and shards -----------------------------------------------------------------------------
def test_fused_round_trip(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path, config, tensors)
    ckpt = load_checkpoint(tmp_path)
    assert isinstance(ckpt, Checkpoint) and ckpt.source == tmp_path and ckpt.config == config
    assert_same_tensors(ckpt.tensors, tensors)
    assert list(expected_shapes(config)) == list(tensors)


def test_per_expert_layout_equals_fused(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path / "fused", config, tensors, layout="fused")
    save_checkpoint(tmp_path / "per_expert", config, tensors, layout="per_expert")
    keys = file_keys(tmp_path / "per_expert")
    assert "model.layers.1.mlp.experts.15.up_proj.weight" in keys  # DeepSeek's release names on disk
    assert not any(k.endswith("gate_up_proj") for k in keys)
    assert_same_tensors(load_checkpoint(tmp_path / "per_expert").tensors, load_checkpoint(tmp_path / "fused").tensors)


def test_sharded_equals_single_file(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path / "one", config, tensors)
    save_checkpoint(tmp_path / "shards", config, tensors, layout="per_expert", max_shard_bytes=150_000)
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 4 and all((tmp_path / "shards" / s).is_file() for s in shards)
    assert not (tmp_path / "shards" / "model.safetensors").exists()
    assert_same_tensors(load_checkpoint(tmp_path / "shards").tensors, load_checkpoint(tmp_path / "one").tensors)


def test_tied_embeddings_need_no_lm_head(tmp_path: Path) -> None:
    config = tiny(tie_word_embeddings=True, num_hidden_layers=2)
    tensors = random_checkpoint(config)
    assert "lm_head.weight" not in tensors
    save_checkpoint(tmp_path, config, tensors)
    model = model_from_checkpoint(load_checkpoint(tmp_path))
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- FP8 --------------------------------------------------------------------------------------------------
def test_quantize_picks_linear_and_expert_weights(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    qconfig, q = quantize_checkpoint_fp8(config, tensors)
    assert qconfig.quantization_config is not None and qconfig.quantization_config["quant_method"] == "fp8"
    fp8_names = {n for n, t in q.items() if t.dtype == FP8}
    assert {n + SCALE_SUFFIX for n in fp8_names} == {n for n in q if n.endswith(SCALE_SUFFIX)}
    assert "model.layers.1.mlp.experts.gate_up_proj" in fp8_names
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8_names
    assert "model.layers.2.mlp.shared_experts.down_proj.weight" in fp8_names
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.input_layernorm.weight",
                 "model.layers.1.self_attn.kv_a_layernorm.weight"):
        assert q[kept].dtype == torch.float32, kept
    # every linear weight of the layer is quantized: 2-D names ending in _proj / _with_mqa
    two_d = {n for n, t in tensors.items() if t.dim() >= 2} - {"model.embed_tokens.weight", "lm_head.weight"}
    assert fp8_names == {n for n in two_d if not n.endswith("mlp.gate.weight")}


@pytest.mark.parametrize(("hidden", "inter", "layout"),
                         [(64, 32, "fused"), (128, 128, "fused"), (128, 128, "per_expert")])
def test_fp8_round_trip_keeps_fp8(tmp_path: Path, hidden: int, inter: int, layout: str) -> None:
    config = tiny(hidden_size=hidden, moe_intermediate_size=inter, num_hidden_layers=2)
    qconfig, q = quantize_checkpoint_fp8(config, random_checkpoint(config, seed=1))
    save_checkpoint(tmp_path, qconfig, q, layout=layout)  # type: ignore[arg-type]
    if layout == "per_expert":
        assert f"model.layers.1.mlp.experts.3.up_proj.weight{SCALE_SUFFIX}" in file_keys(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.config.quantization_config == qconfig.quantization_config and ckpt.is_fp8
    assert_same_tensors(ckpt.tensors, q)
    e = config.n_routed_experts
    blocks = -(-inter * 2 // 128), -(-hidden // 128)
    assert ckpt.tensors["model.layers.1.mlp.experts.gate_up_proj"].dtype == FP8
    assert ckpt.tensors["model.layers.1.mlp.experts.gate_up_proj_scale_inv"].shape == (e, *blocks)
    assert ckpt.tensors["model.layers.1.mlp.experts.down_proj_scale_inv"].shape == (e, -(-hidden // 128), 1)
    assert ckpt.tensors["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].dtype == torch.float32


def test_model_from_fp8_checkpoint_is_the_dequantized_model(tmp_path: Path) -> None:
    """Exact: the FP8 model equals a float32 model built from the dequantized weights.

    Against the unquantized weights FP8 is only close: cosine similarity of the logits > 0.9 (routing flips
    on a few tokens make the max error large, so it is not a useful bound).
    """
    config = tiny(num_hidden_layers=2)
    full = random_checkpoint(config, seed=2)
    qconfig, q = quantize_checkpoint_fp8(config, full)
    save_checkpoint(tmp_path, qconfig, q)
    fp8_model = model_from_checkpoint(load_checkpoint(tmp_path))
    assert all(p.dtype == torch.float32 for p in fp8_model.parameters())
    deq = DeepseekV3ForCausalLM(qconfig).eval()
    deq.load_state_dict(dequantized(q), strict=True)
    ref = DeepseekV3ForCausalLM(config).eval()
    ref.load_state_dict(full, strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = fp8_model(ids)
        torch.testing.assert_close(got, deq(ids), rtol=0, atol=0)
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref(ids).flatten(), dim=0)
    assert cos > 0.9


def release_style_fp8(config: ModelConfig, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek's release form: FP8 linear weights, and every routed expert's gate/up/down quantized on its own."""
    _, q = quantize_checkpoint_fp8(config, base)
    out = {n: t for n, t in q.items() if ".mlp.experts." not in n}
    inter = config.moe_intermediate_size
    for i in range(config.first_k_dense_replace, config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        for e in range(config.n_routed_experts):
            w13, w2 = base[f"{p}.gate_up_proj"][e], base[f"{p}.down_proj"][e]
            for proj, w in (("gate_proj", w13[:inter]), ("up_proj", w13[inter:]), ("down_proj", w2)):
                wq, scale = quantize(w)
                out[f"{p}.{e}.{proj}.weight"] = wq.contiguous()
                out[f"{p}.{e}.{proj}.weight{SCALE_SUFFIX}"] = scale.contiguous()
    return out


def test_per_expert_fp8_with_partial_blocks_loads_padded_and_exactly(tmp_path: Path) -> None:
    """moe_intermediate_size 96: each expert's gate and up have their own partial 128-row scale block. Loading pads
    each to 128 rows (zero FP8 rows); dequantized with the config, the experts equal the per-expert dequantization
    bitwise; saved per expert again, the files hold the same tensors."""
    config = tiny(num_hidden_layers=2, moe_intermediate_size=96)
    per_expert = release_style_fp8(config, random_checkpoint(config, seed=4))
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "config.json").write_text(config.replace(quantization_config=None).to_json())
    save_file(per_expert, str(tmp_path / "y" / "model.safetensors"))
    ckpt = load_checkpoint(tmp_path / "y")
    assert ckpt.config.quantization_config is not None  # FP8 tensors without one: described
    w13 = ckpt.tensors["model.layers.1.mlp.experts.gate_up_proj"]
    assert w13.dtype == FP8 and w13.shape == (16, 256, 64)
    assert ckpt.tensors["model.layers.1.mlp.experts.gate_up_proj_scale_inv"].shape == (16, 2, 1)
    assert ckpt.tensors["model.layers.1.mlp.experts.down_proj"].shape == (16, 64, 128)
    deq = dequantized(ckpt.tensors, config=ckpt.config)
    got13, got2 = deq["model.layers.1.mlp.experts.gate_up_proj"], deq["model.layers.1.mlp.experts.down_proj"]
    assert got13.shape == (16, 192, 64) and got2.shape == (16, 64, 96)
    p = "model.layers.1.mlp.experts"
    for e in (0, 15):
        for proj, got in (("gate_proj", got13[e, :96]), ("up_proj", got13[e, 96:]), ("down_proj", got2[e])):
            w, scale = per_expert[f"{p}.{e}.{proj}.weight"], per_expert[f"{p}.{e}.{proj}.weight{SCALE_SUFFIX}"]
            assert torch.equal(got, dequantize(w, scale)), (e, proj)
    model_from_checkpoint(ckpt)  # loads into the config's shapes
    save_checkpoint(tmp_path / "again", ckpt.config, ckpt.tensors, layout="per_expert")
    assert_same_tensors(load_checkpoint(tmp_path / "again").tensors, ckpt.tensors)


def test_fused_fp8_with_straddling_blocks_cannot_be_split_per_expert(tmp_path: Path) -> None:
    config = tiny(num_hidden_layers=2)  # moe_intermediate_size 32: a fused 128-row block holds gate and up rows
    qconfig, q = quantize_checkpoint_fp8(config, random_checkpoint(config))
    with pytest.raises(CheckpointError, match="multiple of 128"):
        save_checkpoint(tmp_path / "x", qconfig, q, layout="per_expert")


# ---- errors: the right class, one readable line -----------------------------------------------------------
def expect_error(path: Path, cls: type[R1CError], *fragments: str) -> str:
    with pytest.raises(cls) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


@pytest.fixture
def saved(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> Path:
    return save_checkpoint(tmp_path / "ckpt", config, tensors)


def test_error_missing_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", CheckpointError, "nope", "not found")


def test_error_missing_config(saved: Path) -> None:
    (saved / "config.json").unlink()
    expect_error(saved, CheckpointError, "config.json")


def test_error_unknown_architecture(saved: Path) -> None:
    d = json.loads((saved / "config.json").read_text())
    d.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (saved / "config.json").write_text(json.dumps(d))
    expect_error(saved, ConfigError, "LlamaForCausalLM")


def test_error_no_weights(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    expect_error(saved, CheckpointError, "model.safetensors")


def test_error_missing_tensor(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    gone = ("model.layers.2.self_attn.o_proj.weight", "model.norm.weight")
    save_checkpoint(tmp_path, config, {k: v for k, v in tensors.items() if k not in gone})
    expect_error(tmp_path, CheckpointError, "model.layers.2.self_attn.o_proj.weight", "2 missing")


def test_error_missing_expert(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path, config, tensors, layout="per_expert")
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.2.mlp.experts.5.up_proj.weight"}
    save_file(kept, str(path))
    expect_error(tmp_path, CheckpointError, "model.layers.2.mlp.experts.5.up_proj.weight", "1 per-expert")


def test_error_missing_fp8_scale(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    qconfig, q = quantize_checkpoint_fp8(config, tensors)
    del q["model.layers.0.self_attn.o_proj.weight" + SCALE_SUFFIX]
    save_checkpoint(tmp_path, qconfig, q)
    expect_error(tmp_path, CheckpointError, "model.layers.0.self_attn.o_proj.weight_scale_inv", "1 missing")


def test_error_wrong_shape(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    bad = dict(tensors)
    bad["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(128, 31)
    save_checkpoint(tmp_path, config, bad)
    expect_error(tmp_path, CheckpointError, "model.layers.1.self_attn.kv_b_proj.weight", "[128, 31]", "[128, 32]")


def test_error_wrong_expert_shape(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    bad = dict(tensors)
    bad["model.layers.1.mlp.experts.down_proj"] = torch.zeros(16, 64, 30)
    save_checkpoint(tmp_path, config, bad, layout="per_expert")
    expect_error(tmp_path, CheckpointError, "model.layers.1.mlp.experts.0.down_proj.weight", "[64, 30]", "[64, 32]")


def test_error_truncated_file(saved: Path) -> None:
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(saved, CheckpointError, str(path), "truncated or corrupt")


def test_error_corrupt_shard(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path, config, tensors, max_shard_bytes=150_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(b"\xff" * 64)
    expect_error(tmp_path, CheckpointError, shard.name, "truncated or corrupt")


def test_error_index_names_a_missing_shard(tmp_path: Path, config: ModelConfig,
                                           tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path, config, tensors, max_shard_bytes=150_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    expect_error(tmp_path, CheckpointError, shard.name, "missing")


def test_error_bad_index(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path, config, tensors, max_shard_bytes=150_000)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    expect_error(tmp_path, CheckpointError, "model.safetensors.index.json")


# ---- random weights -----------------------------------------------------------------------------------------
def test_random_checkpoint_is_seeded_and_routes_widely() -> None:
    config = tiny()
    a, b, c = random_checkpoint(config, seed=0), random_checkpoint(config, seed=0), random_checkpoint(config, seed=1)
    assert_same_tensors(a, b)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    for name, shape in expected_shapes(config).items():
        assert tuple(a[name].shape) == shape
    bias = a["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert (bias < 0).any() and (bias > 0).any()
    half = random_checkpoint(config, dtype=torch.bfloat16)
    assert half["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert half["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert half["model.layers.1.mlp.experts.down_proj"].dtype == torch.bfloat16

    model = DeepseekV3ForCausalLM(config).eval()
    model.load_state_dict(a, strict=True)
    routed: list[torch.Tensor] = []
    rms: list[float] = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, i, o: rms.append(o.pow(2).mean().sqrt().item()))
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda m, i, o: routed.append(o[1]))
    ids = torch.randint(0, config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
    assert all(0.3 < r < 10 for r in rms), rms  # the residual stream stays O(1)
    assert logits.std() > 0.5 and torch.isfinite(logits).all()
    for ids_used in routed:  # 64 tokens x 4 of 16 experts: most experts see tokens
        assert ids_used.unique().numel() >= 12
