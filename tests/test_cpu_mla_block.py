"""r1c's CPU MLA block kernel (`r1c.cpu::MLABlock`, r1c/plugins/cpu_moe/mla_block_cpu.cc) against a float64 NumPy
model of MLA_BLOCK_SPEC's formulas (projections, RMSNorms, rotary embeddings, then ATTENTION_SPEC's attention:
tests/mla_reference.py), and the pass that swaps it in (passes/fuse_cpu_mla_block.py) on the tiny preset against
the same export built with ONNX Runtime's kernels and with the block left unfused.

Tolerance: max |ours - ref| <= 2e-5 * max |ref| per output (float32 against float64; four projections and two norms
before the attention's 1e-5). Shapes: the benchmark model's decode, rows of different cache lengths, a prefill of
several token blocks, dimensions not multiples of a vector or a panel, DeepSeek-V3/R1's attention heads (128 heads,
nope 128, rope 64, kv_lora 512, v 128; config.json of deepseek-ai/DeepSeek-V3) at a smaller hidden size and
q_lora; position_ids as [B, S] and as one start;
1 and 2 threads; every instruction-set level this CPU runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from mla_reference import feeds, reference

from r1c.passes.testing import make_model, max_rel_err, op_counts, run
from r1c.plugins.cpu_moe import ATTENTION_SPEC, MLA_BLOCK_SPEC, pack_linear

TOL = 2e-5
info = onnx.helper.make_tensor_value_info
BOOL, FLOAT, INT64 = onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
SCALE, Q_EPS, KV_EPS = 0.125, 1e-6, 1e-5


def block_model() -> ir.Model:
    names = list(MLA_BLOCK_SPEC.inputs)
    node = onnx.helper.make_node(MLA_BLOCK_SPEC.name, names, list(MLA_BLOCK_SPEC.outputs),
                                 domain=MLA_BLOCK_SPEC.domain, scale=SCALE, q_epsilon=Q_EPS, kv_epsilon=KV_EPS)
    types = {"position_ids": INT64, "past_valid": BOOL, "new_valid": BOOL}
    inputs = [info(n, types.get(n, FLOAT), None) for n in names]
    outputs = [info(n, FLOAT, None) for n in MLA_BLOCK_SPEC.outputs]
    return make_model([node], inputs, outputs, [], extra_opsets={MLA_BLOCK_SPEC.domain: 1})


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [.., R] rotated by cos / sin [.., R/2] (non-interleaved halves)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def block_case(seed: int, b: int, s: int, n: int, d: int, r: int, c: int, vd: int, p: int, lengths: list[int],
               hidden: int, q_lora: int, one_start: bool) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """(the kernel's feeds, [output, c_new, pe_new] in float64)."""
    rng = np.random.default_rng(seed)
    att = feeds(rng, b, s, n, d, r, c, vd, p, lengths)

    def w(k: int, m: int) -> np.ndarray:
        return (rng.standard_normal((k, m)) / np.sqrt(k)).astype(np.float32)

    w_qa, w_qb, w_kva, w_o = w(hidden, q_lora), w(q_lora, n * (d + r)), w(hidden, c + r), w(n * vd, hidden)
    q_norm = (1 + 0.1 * rng.standard_normal(q_lora)).astype(np.float32)
    kv_norm = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    positions = 700
    angles = np.arange(positions)[:, None] * (10000.0 ** (-np.arange(r // 2) / (r // 2)))[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    start = np.asarray(lengths)[:, None] if not one_start else np.full((b, 1), 7)
    pos = start + np.arange(s)[None, :]  # [B, S]
    x = rng.standard_normal((b, s, hidden)).astype(np.float32)
    x64 = {k: v.astype(np.float64) for k, v in
           {"x": x, "qa": w_qa, "qb": w_qb, "kva": w_kva, "o": w_o, "qn": q_norm, "kvn": kv_norm}.items()}
    cp, sp = cos.astype(np.float64)[pos], sin.astype(np.float64)[pos]  # [B, S, R/2]
    q = (rms(x64["x"] @ x64["qa"], x64["qn"], Q_EPS) @ x64["qb"]).reshape(b, s, n, d + r)
    kv = x64["x"] @ x64["kva"]
    c_new, pe_new = rms(kv[..., :c], x64["kvn"], KV_EPS), rope(kv[..., c:], cp, sp)
    att64 = dict(att, q_nope=q[..., :d], q_pe=rope(q[..., d:], cp[:, :, None], sp[:, :, None]).reshape(b, s, n * r),
                 c_new=c_new, pe_new=pe_new)
    out = reference(att64, SCALE) @ x64["o"]
    fed = {"hidden": x, "q_a": pack_linear(w_qa), "q_norm": q_norm, "q_b": pack_linear(w_qb),
           "kv_a": pack_linear(w_kva), "kv_norm": kv_norm,
           "position_ids": np.array([7], np.int64) if one_start else pos.astype(np.int64),
           "cos_cache": cos, "sin_cache": sin, "o": pack_linear(w_o),
           **{k: att[k] for k in ATTENTION_SPEC.inputs[4:]}}
    return fed, [out, c_new, pe_new]


@pytest.mark.parametrize("b,s,n,d,r,c,vd,p,lengths,hidden,q_lora,one_start", [
    (1, 1, 16, 64, 32, 256, 64, 64, [40], 1024, 384, False),  # the benchmark model's decode
    (2, 1, 3, 8, 4, 40, 12, 600, [600, 5], 40, 24, False),  # rows of different lengths, odd sizes
    (2, 20, 16, 8, 4, 16, 8, 1, [1, 0], 64, 48, False),  # a prefill: several token blocks
    (1, 3, 5, 16, 8, 24, 8, 9, [9], 72, 20, True),  # position_ids as one start
    (2, 2, 128, 128, 64, 512, 128, 70, [70, 33], 256, 96, False),  # DeepSeek-V3/R1's heads (N, D, R, C, Vd)
])
def test_block_matches_float64(any_level: Path, b: int, s: int, n: int, d: int, r: int, c: int, vd: int, p: int,
                               lengths: list[int], hidden: int, q_lora: int, one_start: bool) -> None:
    x, want = block_case(b * 100 + s + p, b, s, n, d, r, c, vd, p, lengths, hidden, q_lora, one_start)
    for threads in (1, 2):
        got = run(block_model(), x, threads=threads, custom_ops=[any_level])
        for name, g, ref in zip(MLA_BLOCK_SPEC.outputs, got, want, strict=True):
            assert g.shape == ref.shape and g.dtype == np.float32, name
            assert max_rel_err(g, ref) < TOL, (name, threads, max_rel_err(g, ref))


def test_block_refuses_bad_inputs(kernel: Path) -> None:
    """Shapes that disagree and a position past the cos/sin caches: one error naming the op, nothing computed."""
    x, _ = block_case(0, 1, 2, 4, 8, 4, 16, 8, 10, [10], 32, 16, False)
    bad = dict(x, kv_norm=x["kv_norm"][:8])  # C of 8 against w_uk's 16
    with pytest.raises(Exception, match=r"r1c\.cpu::MLABlock: shapes disagree"):
        run(block_model(), bad, custom_ops=[kernel])
    bad = dict(x, position_ids=np.array([[10, 700]], np.int64))  # the caches hold positions 0 .. 699
    with pytest.raises(Exception, match=r"r1c\.cpu::MLABlock: a position_ids value is outside the cos/sin caches"):
        run(block_model(), bad, custom_ops=[kernel])


def test_pass_fuses_every_layers_block_and_keeps_the_logits(kernel: Path, tmp_path: Path) -> None:
    """The tiny preset built with r1c's kernels: one MLABlock per layer, no RotaryEmbedding, MLAAttention or q/kv
    RMSNorm left, and logits equal (1e-5) to the same export built with ONNX Runtime's kernels and to a build with
    the block left unfused; greedy tokens equal."""
    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.passes import fuse_cpu_mla_block
    from r1c.runtime import load
    from r1c.runtime.build import build_bundle

    config = preset("tiny")
    export = tmp_path / "tiny"
    export_onnx(config, random_checkpoint(config, seed=6), export, progress=False)
    ours = build_bundle(export, tmp_path / "r1c.bundle", cpu_moe="r1c", precision="fp32")
    theirs = build_bundle(export, tmp_path / "ort.bundle", cpu_moe="ort", precision="fp32")
    with pytest.MonkeyPatch.context() as mp:  # the block's form never matches: every layer left unfused
        mp.setattr(fuse_cpu_mla_block, "match", lambda node: (_ for _ in ()).throw(fuse_cpu_mla_block._Miss("off")))
        unfused = build_bundle(export, tmp_path / "unfused.bundle", cpu_moe="r1c", precision="fp32")
    counts = op_counts(ir.load(ours / "model.onnx"))
    block = f"{MLA_BLOCK_SPEC.domain}::{MLA_BLOCK_SPEC.name}"
    assert counts[block] == config.num_hidden_layers
    for gone in ("com.microsoft::RotaryEmbedding", f"{ATTENTION_SPEC.domain}::{ATTENTION_SPEC.name}"):
        assert counts.get(gone, 0) == 0, gone
    before = op_counts(ir.load(unfused / "model.onnx"))
    assert block not in before and before[f"{ATTENTION_SPEC.domain}::{ATTENTION_SPEC.name}"] == config.num_hidden_layers
    assert sum(counts.values()) < sum(before.values()) - 10 * config.num_hidden_layers
    ea, eb, ec = load(ours), load(theirs), load(unfused)
    ids = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 9))
    got = ea.forward(ids)
    assert max_rel_err(got, eb.forward(ids)) < 1e-5
    assert max_rel_err(got, ec.forward(ids)) < 1e-5
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    assert ea.generate(prompts, 8) == eb.generate(prompts, 8)


def _edited_first_layer(bundle: Path, edit: str) -> ir.Model:
    """The unfused bundle's graph with its first layer's block edited so that MLABlock cannot stand for it."""
    model = ir.load(bundle / "model.onnx")
    mla = next(n for n in model.graph if n.op_type == ATTENTION_SPEC.name)
    if edit == "inside value is a graph output":  # the kv_a projection (c_new's RMSNorm reads its slice)
        model.graph.outputs.append(mla.inputs[2].producer().inputs[0].producer().inputs[0])
    elif edit == "rotaries read other positions":  # q_pe's rotary gets positions of its own
        rotary = mla.inputs[1].producer()
        other = ir.Value(name="other_positions", type=rotary.inputs[1].type, shape=rotary.inputs[1].shape)
        model.graph.inputs.append(other)
        rotary.replace_input_with(1, other)
    elif edit == "attention output read twice":
        model.graph.outputs.append(mla.outputs[0])
    return model


@pytest.mark.parametrize("edit", ["inside value is a graph output", "rotaries read other positions",
                                  "attention output read twice"])
def test_pass_leaves_a_block_it_cannot_stand_for(tmp_path: Path, edit: str) -> None:
    """A layer whose block is not the form MLABlock computes keeps its nodes (the reason is logged); the other
    layers fuse."""
    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.passes import fuse_cpu_mla_block
    from r1c.runtime.build import build_bundle

    config = preset("tiny")
    export_onnx(config, random_checkpoint(config, seed=7), tmp_path / "e", progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fuse_cpu_mla_block.FuseCpuMLABlockPass, "swap", lambda self, graph: 0)
        bundle = build_bundle(tmp_path / "e", tmp_path / "unfused.bundle", cpu_moe="r1c", precision="fp32")
    report: dict[str, int] = {}
    fuse_cpu_mla_block.FuseCpuMLABlockPass("r1c", report)(ir.load(bundle / "model.onnx"))
    assert report["nodes"] == config.num_hidden_layers
    fuse_cpu_mla_block.FuseCpuMLABlockPass("r1c", report)(_edited_first_layer(bundle, edit))
    assert report["nodes"] == config.num_hidden_layers - 1
