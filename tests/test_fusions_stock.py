"""The fusions on ONNX that r1c did not write: the stock `torch.onnx.export(dynamo=True)` of transformers'
DeepseekV3ForCausalLM (tiny preset, seeded random weights, `batched_mm` experts).

Counted: one MoERouter and one MoEExperts per MoE layer, one RMSNorm per norm (2 per layer, + q_a and kv_a
norms, + the final one), one SwiGLU per dense MLP and shared expert. Tolerance: the optimized model's logits
equal the stock model's under ONNX Runtime within 1e-5 relative (max |a - b| / max |b|, float32), and the
stock model equals transformers' PyTorch logits within 1e-5. The export runs once per session (conftest.py's
`stock_tiny`, ~10 s), at torch's native opset 18; this module takes it to 21 as torch.onnx would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from stock_models import at_opset, hf_model

from r1c.config import preset
from r1c.exporter.checkpoint import random_checkpoint, save_checkpoint
from r1c.exporter.stock import export_stock
from r1c.passes import optimize
from r1c.passes.testing import max_rel_err, op_counts, run

CONFIG = preset("tiny")
TOL = 1e-5
LAYERS, MOE_LAYERS = CONFIG.num_hidden_layers, CONFIG.num_moe_layers
NORMS = LAYERS * (2 + (CONFIG.q_lora_rank is not None) + 1) + 1
SWIGLUS = CONFIG.first_k_dense_replace + MOE_LAYERS * (CONFIG.n_shared_experts > 0)


@pytest.fixture(scope="module")
def stock(tmp_path_factory: pytest.TempPathFactory, stock_tiny: dict) -> dict[str, object]:
    root = tmp_path_factory.mktemp("stock")
    model = stock_tiny["model"]
    path = at_opset(stock_tiny["path"], 21, root / "stock" / "model.onnx")  # what torch.onnx writes at 21
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 9))
    with torch.no_grad():
        torch_logits = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    return {"root": root, "path": path, "ids": ids, "logits": run(path, {"input_ids": ids})[0],
            "torch_logits": torch_logits}


def test_stock_export_is_transformers_model(stock: dict) -> None:
    model = ir.load(stock["path"])
    assert [v.name for v in model.graph.inputs] == ["input_ids"]
    assert [v.name for v in model.graph.outputs] == ["logits"]
    assert not any(k.startswith("r1c::") for k in op_counts(model))
    assert max_rel_err(stock["logits"], stock["torch_logits"]) < TOL


def test_r1c_form_fuses_every_moe_layer(stock: dict) -> None:
    path = optimize(stock["path"], stock["root"] / "r1c", target="r1c")
    counts = op_counts(ir.load(path))
    assert counts["r1c::MoERouter"] == MOE_LAYERS and counts["r1c::MoEExperts"] == MOE_LAYERS
    assert "TopK" not in counts and "GatherND" in counts  # routing gone; attention's GatherND stays
    model = ir.load(path)
    assert {(d, n) for d, n, _ in model.functions} == {("r1c", "MoERouter"), ("r1c", "MoEExperts")}
    assert max_rel_err(run(path, {"input_ids": stock["ids"]})[0], stock["logits"]) < TOL


def test_onnxruntime_pipeline_fuses_and_lowers_with_equal_logits(stock: dict) -> None:
    path = optimize(stock["path"], stock["root"] / "ort", target="onnxruntime")
    counts = op_counts(ir.load(path))
    skip = counts.get("com.microsoft::SkipSimplifiedLayerNormalization", 0)  # residual add + norm
    assert counts["SimplifiedLayerNormalization"] + skip == NORMS and skip > 0
    assert counts["com.microsoft::QuickGelu"] == SWIGLUS
    assert counts["com.microsoft::MoEGroupRouter"] == counts["com.microsoft::MoE"] == MOE_LAYERS
    assert not any(k.startswith("r1c::") for k in counts)
    assert sum(counts.values()) < sum(op_counts(ir.load(stock["path"])).values())
    for batch in (1, 3):
        ids = np.random.default_rng(batch).integers(0, CONFIG.vocab_size, (batch, 6))
        assert max_rel_err(run(path, {"input_ids": ids})[0], run(stock["path"], {"input_ids": ids})[0]) < TOL


def test_tensorrt_pipeline_leaves_bodiless_plugin_nodes(stock: dict) -> None:
    path = optimize(stock["path"], stock["root"] / "trt", target="tensorrt")
    model = ir.load(path)
    counts = op_counts(model)
    assert counts["r1c::MoERouter"] == counts["r1c::MoEExperts"] == MOE_LAYERS
    assert not model.functions
    assert all(n.attributes["plugin_namespace"].as_string() == "r1c" for n in model.graph if n.domain == "r1c")


def test_same_input_gives_byte_identical_files(stock: dict) -> None:
    first = optimize(stock["path"], stock["root"] / "same_a", target="onnxruntime")
    second = optimize(stock["path"], stock["root"] / "same_b", target="onnxruntime")
    for name in ("model.onnx", "model.onnx.data"):
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes()


@pytest.mark.slow
def test_stock_export_with_cache_fuses_and_matches(tmp_path: Path) -> None:
    path = export_stock(hf_model(), tmp_path / "cache" / "model.onnx", with_cache=True)
    model = ir.load(path)
    assert [v.name for v in model.graph.inputs][:4] == ["input_ids", "attention_mask", "past_key_values.0.key",
                                                         "past_key_values.0.value"]
    out = optimize(path, tmp_path / "opt", target="onnxruntime")
    counts = op_counts(ir.load(out))
    assert counts["com.microsoft::MoE"] == MOE_LAYERS
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {"input_ids": rng.integers(0, CONFIG.vocab_size, (2, 3)),
                                    "attention_mask": np.ones((2, 7), np.int64)}
    for i in range(LAYERS):
        feeds[f"past_key_values.{i}.key"] = rng.standard_normal((2, 1, 4, CONFIG.kv_lora_rank)).astype(np.float32)
        feeds[f"past_key_values.{i}.value"] = rng.standard_normal((2, 1, 4, CONFIG.qk_rope_head_dim)).astype(np.float32)
    for a, b in zip(run(out, feeds), run(path, feeds)):
        assert max_rel_err(a, b) < TOL


@pytest.mark.slow
def test_stock_export_from_a_checkpoint_directory(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", CONFIG, random_checkpoint(CONFIG, seed=1))
    path = export_stock(tmp_path / "ckpt", tmp_path / "out" / "model.onnx")
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 5))
    with torch.no_grad():
        expected = hf_model()(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert max_rel_err(run(path, {"input_ids": ids})[0], expected) < TOL
