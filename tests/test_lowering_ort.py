"""ONNX Runtime lowering: `r1c::MoERouter` -> `r1c::MoEExperts` becomes com.microsoft MoE (+ MoEGroupRouter for
sigmoid scoring where the installed ONNX Runtime has it, else the router's own weights), and the remaining r1c
function bodies are inlined. The proof that ORT's kernels compute the r1c ops: the lowered block equals the
function-body model under ONNX Runtime and the PyTorch references in r1c.plugins, on the routing edge cases of
ARCHITECTURE.md (negative bias, n_group == 1, top_k == E/G*topk_group), without normalization, and in every
topk_method / scoring mode the op defines (DeepSeek-V2's softmax greedy and group_limited_greedy included), in
both router forms (the form without MoEGroupRouter is forced by making the probe answer "absent").
Tolerance: 1e-5 relative (float32; ORT's MoE accumulates in another order).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from r1c.passes import lower_file, lower_moe_to_ort, run_pipeline
from r1c.passes.inline_r1c_functions import InlineR1CFunctionsPass
from r1c.passes.lower_moe_to_ort import LowerMoEToOrtPass, ort_runs, router_form
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


def _without(monkeypatch: pytest.MonkeyPatch, *absent: str) -> None:
    """The lowering's probe answers "absent" for these com.microsoft ops (as an older ONNX Runtime does)."""
    real = lower_moe_to_ort.ort_runs
    monkeypatch.setattr(lower_moe_to_ort, "ort_runs", lambda op: "absent (test)" if op in absent else real(op))


@pytest.mark.parametrize("form", ["installed", "no-MoEGroupRouter"])
@pytest.mark.parametrize("case", CASES)
def test_lower_moe_to_ort_equals_function_bodies_and_reference(case: str, form: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if ort_runs("MoE"):
        pytest.skip(f"nothing to lower to: {ort_runs('MoE')} (test_without_a_cpu_moe_the_block_keeps_its_body)")
    if form != "installed":
        _without(monkeypatch, "MoEGroupRouter")
    rng = np.random.default_rng(len(case))
    kwargs = dict(CASES[case])
    logit_scale = float(kwargs.pop("logit_scale", 1.0))  # sharper softmax: groups differ clearly
    model, w = r1c_moe_model(rng, experts=kwargs.pop("e"), hidden=H, inter=INTER, **kwargs)  # type: ignore[arg-type]
    before = copy(model)
    assert LowerMoEToOrtPass()(model).modified
    expected = router_form(w["attrs"])  # type: ignore[arg-type]
    assert form == "installed" or w["attrs"]["scoring"] == "softmax" or expected == "weights"  # type: ignore[index]
    if expected == "weights":  # the router stays an r1c node (its body inlined by the pipeline's next pass)
        assert op_counts(model)["r1c::MoERouter"] == 1
        InlineR1CFunctionsPass()(model)
    RemoveDeadCodePass()(model)
    counts = op_counts(model)
    assert counts.get("com.microsoft::MoEGroupRouter", 0) == int(expected == "MoEGroupRouter")
    assert counts["com.microsoft::MoE"] == 1
    moe = next(n for n in model.graph if n.op_type == "MoE")
    probs_from = moe.inputs[1].producer().op_type  # type: ignore[union-attr]
    assert probs_from == {"weights": "ScatterElements", "MoEGroupRouter": "MoEGroupRouter"}.get(expected, probs_from)
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


def test_softmax_noaux_tc_lowers_through_the_router_weights() -> None:
    """MoEGroupRouter scores with sigmoid only: a softmax noaux_tc block keeps its router (inlined) and feeds MoE
    its weights; it computes the op (1e-5 against the reference)."""
    rng = np.random.default_rng(11)
    model, w = r1c_moe_model(rng, experts=16, hidden=H, inter=INTER, scoring="softmax")
    model = run_pipeline(model, "onnxruntime")
    counts = op_counts(model)
    assert counts.get("com.microsoft::MoE", 0) == int(ort_runs("MoE") is None)
    assert "com.microsoft::MoEGroupRouter" not in counts
    h = rng.standard_normal((T, H)).astype(np.float32)
    assert max_rel_err(run(model, {"h": h})[0], moe_reference(h, w)) < TOL


def test_without_a_cpu_moe_the_block_keeps_its_body(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An ONNX Runtime without a CPU MoE taking swiglu_fusion (1.22): nothing com.microsoft is emitted, the reason is
    logged, and the inlined bodies compute the op."""
    _without(monkeypatch, "MoE", "MoEGroupRouter")
    rng = np.random.default_rng(5)
    model, w = r1c_moe_model(rng, experts=16, hidden=H, inter=INTER)
    with caplog.at_level(logging.INFO, logger="r1c.passes"):
        model = run_pipeline(model, "onnxruntime")
    assert "not emitting com.microsoft MoE (absent (test))" in caplog.text and "no CPU MoE" in caplog.text
    assert not any(k.startswith(("r1c::", "com.microsoft::MoE")) for k in op_counts(model))
    h = rng.standard_normal((T, H)).astype(np.float32)
    assert max_rel_err(run(model, {"h": h})[0], moe_reference(h, w)) < TOL


def test_the_probe_agrees_with_onnx_runtimes_own_registry() -> None:
    """`ort_runs` against an independent answer: the installed ONNX Runtime's operator schemas (MoEGroupRouter
    registered at all; MoE with the swiglu_fusion attribute) and its CPU kernel registry."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    schemas = {s.name: s for s in ort_c.get_all_operator_schema() if s.domain == "com.microsoft"}
    cpu = {k.op_name for k in ort_c.get_all_opkernel_def() if k.domain == "com.microsoft"
           and k.provider == "CPUExecutionProvider"}
    router = "MoEGroupRouter" in schemas and "MoEGroupRouter" in cpu
    moe = "MoE" in schemas and "swiglu_fusion" in schemas["MoE"].attributes and "MoE" in cpu
    assert (ort_runs("MoEGroupRouter") is None) == router, ort_runs("MoEGroupRouter")
    assert (ort_runs("MoE") is None) == moe, ort_runs("MoE")


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
    assert counts.get("com.microsoft::MoE", 0) == (config.num_moe_layers if ort_runs("MoE") is None else 0)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, config.vocab_size, (2, 5)), "past_lengths": np.array([3, 0]),
             "logits_index": np.array([[4, 0, 2], [1, 3, 3]])}  # any positions, in any order, repeated
    for i in range(config.num_hidden_layers):
        feeds[f"past_c.{i}"] = rng.standard_normal((2, config.kv_lora_rank, 4)).astype(np.float32)
        feeds[f"past_pe.{i}"] = rng.standard_normal((2, config.qk_rope_head_dim, 4)).astype(np.float32)
    for a, b in zip(run(dst, feeds), run(src, feeds)):
        assert max_rel_err(a, b) < TOL
