"""ONNX Runtime lowering: `r1c::MoERouter` -> `r1c::MoEExperts` becomes com.microsoft MoE (+ MoEGroupRouter for
sigmoid scoring), and the remaining r1c function bodies are inlined. The proof that ORT's kernels compute the r1c
ops: the lowered block equals the function-body model under ONNX Runtime and the PyTorch references in r1c.plugins,
on the routing edge cases of ARCHITECTURE.md (negative bias, n_group == 1, top_k == E/G*topk_group), without
normalization, and in every topk_method / scoring mode the op defines (DeepSeek-V2's softmax greedy and
group_limited_greedy included). Tolerance: 1e-5 relative (float32; ORT's MoE accumulates in another order).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from r1c.passes import lower_file, run_pipeline
from r1c.passes.inline_r1c_functions import InlineR1CFunctionsPass
from r1c.passes.lower_moe_to_ort import LowerMoEToOrtPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.testing import copy, max_rel_err, moe_reference, op_counts, r1c_moe_model, run

TOL = 1e-5
T, H, INTER = 9, 32, 16  # tokens, hidden, expert width


CASES = {
    "deepseek": dict(e=16),
    "negative_bias": dict(e=16, bias=-np.linspace(0.5, 1.5, 16)),  # every selection score < 0
    "one_group": dict(e=16, n_group=1, topk_group=1),
    "all_kept_experts": dict(e=16, top_k=8),  # top_k == E / n_group * topk_group
    "no_normalization": dict(e=16, norm_topk_prob=0, routed_scaling_factor=1.5),
    "kimi_k2_384_experts": dict(e=384, n_group=1, topk_group=1, top_k=8, routed_scaling_factor=2.827),
    # DeepSeek-V2 routing (no bias, no normalization): softmax scores, as the V2 checkpoints ship it
    "v2_greedy": dict(e=16, scoring="softmax", topk_method="greedy", norm_topk_prob=0, routed_scaling_factor=1.0,
                      n_group=3, topk_group=5),  # greedy ignores the group attributes
    "v2_group_limited_greedy": dict(e=16, scoring="softmax", topk_method="group_limited_greedy", norm_topk_prob=0,
                                    routed_scaling_factor=16.0, n_group=4, topk_group=2, logit_scale=4.0),
    "v2_group_limited_greedy_all_kept": dict(e=16, scoring="softmax", topk_method="group_limited_greedy",
                                             norm_topk_prob=0, n_group=8, topk_group=2, top_k=4),
    # the same methods on sigmoid scores (the op defines them; MoEGroupRouter with group_topk 1 and no bias)
    "sigmoid_greedy": dict(e=16, topk_method="greedy", norm_topk_prob=0, routed_scaling_factor=2.0),
    "sigmoid_group_limited_greedy": dict(e=16, topk_method="group_limited_greedy", norm_topk_prob=0,
                                         bias=np.linspace(3, -3, 16)),  # a bias the V2 methods must not read
}


@pytest.mark.parametrize("case", CASES)
def test_lower_moe_to_ort_equals_function_bodies_and_reference(case: str) -> None:
    rng = np.random.default_rng(len(case))
    kwargs = dict(CASES[case])
    logit_scale = float(kwargs.pop("logit_scale", 1.0))  # sharper softmax: groups differ clearly
    model, w = r1c_moe_model(rng, experts=kwargs.pop("e"), hidden=H, inter=INTER, **kwargs)  # type: ignore[arg-type]
    before = copy(model)
    assert LowerMoEToOrtPass()(model).modified
    RemoveDeadCodePass()(model)
    counts = op_counts(model)
    sigmoid = w["attrs"]["scoring"] == "sigmoid"  # type: ignore[index]
    assert counts.get("com.microsoft::MoEGroupRouter", 0) == int(sigmoid) and counts["com.microsoft::MoE"] == 1
    assert not any(k.startswith("r1c::") for k in counts) and not model.functions
    assert "w13.interleaved" in model.graph.initializers and "w13" not in model.graph.initializers
    h = (rng.standard_normal((T, H)) * logit_scale).astype(np.float32)
    lowered, bodies = run(model, {"h": h})[0], run(before, {"h": h})[0]
    assert max_rel_err(lowered, bodies) < TOL
    assert max_rel_err(lowered, moe_reference(h, w)) < TOL
    if w["attrs"].get("topk_method") == "group_limited_greedy":  # type: ignore[attr-defined]
        # the group mask matters here: plain top-k would choose other experts for some token
        greedy = {**w, "attrs": {**w["attrs"], "topk_method": "greedy"}}  # type: ignore[dict-item]
        assert max_rel_err(moe_reference(h, greedy), lowered) > 100 * TOL


def test_softmax_noaux_tc_keeps_its_body(caplog: pytest.LogCaptureFixture) -> None:
    """MoEGroupRouter scores with sigmoid only: a softmax noaux_tc block is left (reason logged, by name), then
    inlined, and still computes the op (1e-5 against the reference)."""
    rng = np.random.default_rng(11)
    model, w = r1c_moe_model(rng, experts=16, hidden=H, inter=INTER, scoring="softmax")
    with caplog.at_level(logging.INFO, logger="r1c.passes"):
        assert not LowerMoEToOrtPass()(model).modified
    assert "scoring 'softmax' with topk_method 'noaux_tc'" in caplog.text
    model = run_pipeline(model, "onnxruntime")
    h = rng.standard_normal((T, H)).astype(np.float32)
    assert max_rel_err(run(model, {"h": h})[0], moe_reference(h, w)) < TOL


def test_fp8_experts_keep_their_body_and_their_fp8_weights(caplog: pytest.LogCaptureFixture) -> None:
    """ORT 1.32 has no CPU kernel for FP8 QMoE: the lowering leaves the block (reason logged), then it is inlined;
    the weights stay FP8. Tolerance vs the dequantized reference: 1e-5 (same math). (The onnxruntime pipeline
    dequantizes FP8 experts before this lowering: tests/test_quantize_weights.py.)"""
    rng = np.random.default_rng(7)
    model, w = r1c_moe_model(rng, experts=16, hidden=H, inter=INTER, quant="fp8_block128")
    before = copy(model)
    with caplog.at_level(logging.INFO, logger="r1c.passes"):
        model = ir.passes.Sequential(LowerMoEToOrtPass(), InlineR1CFunctionsPass(), RemoveDeadCodePass())(model).model
    assert "no CPU FP8 MoE" in caplog.text
    assert not any(k.startswith(("r1c::", "com.microsoft::MoE")) for k in op_counts(model))
    dtypes = {v.name: v.const_value.dtype.name for v in model.graph.initializers.values()}
    assert dtypes["w13"] == dtypes["w2"] == "FLOAT8E4M3FN"
    h = rng.standard_normal((T, H)).astype(np.float32)
    out = run(model, {"h": h})[0]
    assert max_rel_err(out, run(before, {"h": h})[0]) < TOL
    assert max_rel_err(out, moe_reference(h, w)) < TOL


def test_inline_r1c_functions_leaves_plain_onnx_with_the_same_outputs() -> None:
    rng = np.random.default_rng(3)
    model, _ = r1c_moe_model(rng, experts=16, hidden=H, inter=INTER)
    before = copy(model)
    assert InlineR1CFunctionsPass()(model).modified
    counts = op_counts(model)
    assert not any(k.startswith("r1c::") for k in counts) and counts["TopK"] == 3
    assert not model.functions
    h = rng.standard_normal((T, H)).astype(np.float32)
    assert max_rel_err(run(model, {"h": h})[0], run(before, {"h": h})[0]) < TOL


def test_onnxruntime_pipeline_on_an_r1c_export(tmp_path: Path) -> None:
    """`r1c build --target onnxruntime` runs this pipeline on `r1c export`'s model: every norm, SwiGLU and
    MoE block of the tiny preset is fused/lowered, and the outputs (logits, new latents) stay equal."""
    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx

    config = preset("tiny")
    src = export_onnx(config, random_checkpoint(config, seed=2), tmp_path / "export", progress=False) / "model.onnx"
    dst = lower_file(src, tmp_path / "work" / "model.onnx", target="onnxruntime")
    counts = op_counts(ir.load(dst))
    skip = counts["com.microsoft::SkipSimplifiedLayerNormalization"]  # residual add + norm (fuse_skip_rmsnorm)
    assert skip == 2 * config.num_hidden_layers
    assert counts["SimplifiedLayerNormalization"] + skip == 4 * config.num_hidden_layers + 1
    assert counts["com.microsoft::QuickGelu"] == config.first_k_dense_replace + config.num_moe_layers
    assert counts["com.microsoft::MoE"] == config.num_moe_layers
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, config.vocab_size, (2, 5)), "past_lengths": np.array([3, 0])}
    for i in range(config.num_hidden_layers):
        feeds[f"past_c.{i}"] = rng.standard_normal((2, config.kv_lora_rank, 4)).astype(np.float32)
        feeds[f"past_pe.{i}"] = rng.standard_normal((2, config.qk_rope_head_dim, 4)).astype(np.float32)
    for a, b in zip(run(dst, feeds), run(src, feeds)):
        assert max_rel_err(a, b) < TOL
