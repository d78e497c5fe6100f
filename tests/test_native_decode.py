"""The native decode step (r1c/runtime/native_decode.py, r1c/plugins/cpu_moe/decode_cpu.cc) against ONNX Runtime's
run of the same bundle graph: logits and new latents of decode steps equal (1e-5 of the largest value) for rows of
different lengths, 1 to 3 threads, across a cache bucket change, a batch of 20 rows (the experts' many-slot path);
the cache written and the lengths advanced as the runner's own write does; greedy generation token for token. Every
graph the decoder does not compute exactly keeps ONNX Runtime (the reason logged), and bad ids or lengths are refused
with nothing written.

The conformance matrix (tests/test_conformance.py) holds the decode steps of every family config equal to
transformers; here the two paths of one bundle are held equal to each other.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cpu_kernels import kernel  # noqa: F401  (the fixture: skips or fails as the other kernel tests do)

from r1c.config import preset
from r1c.errors import RuntimeInputError
from r1c.runtime import load
from r1c.runtime.native_decode import NotNative, physical_cores, read_plan

TOL = 1e-5


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, kernel: Path) -> dict[str, Path]:  # noqa: F811
    """The tiny preset exported and built for onnxruntime (fp32, r1c's kernels) and as an int8 bundle."""
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.runtime.build import build_bundle

    root = tmp_path_factory.mktemp("native")
    config = preset("tiny")
    export_onnx(config, random_checkpoint(config, seed=11), root / "export", progress=False)
    return {"export": root / "export",
            "fp32": build_bundle(root / "export", root / "fp32.bundle", cpu_moe="r1c", precision="fp32"),
            "int8": build_bundle(root / "export", root / "int8.bundle", cpu_moe="r1c", precision="int8")}


def runner(engine: Any, rows: int, max_len: int) -> Any:
    r = engine._runner(rows, max_len, rows * 16, 16)
    for _ in range(rows):
        r.cache.add_row()
    return r


def prefill(r: Any, rng: np.random.Generator, lengths: list[int], vocab: int) -> None:
    ids = rng.integers(0, vocab, (len(lengths), max(lengths)))
    r.cache.resize(max(lengths))
    r.step(ids, 0, np.array(lengths, np.int64))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_steps_equal_onnx_runtime(tiny: dict[str, Path], threads: int) -> None:
    """Three rows of 9, 3 and 14 cached tokens, 12 decode steps (past the first 16-column bucket): logits, the
    latents each step returns and the cache after it equal ONNX Runtime's run of the same graph."""
    native = load(tiny["fp32"], session_options={"intra_op_num_threads": threads})
    ort = load(tiny["fp32"], session_options={"intra_op_num_threads": threads, "native_decode": False})
    assert native.backend.native is not None and ort.backend.native is None
    vocab = native.config.vocab_size
    a, b = runner(native, 3, 40), runner(ort, 3, 40)
    for r in (a, b):
        prefill(r, np.random.default_rng(1), [9, 3, 14], vocab)
    rng = np.random.default_rng(2)
    ones = np.ones(3, np.int64)
    for _ in range(12):
        tok = rng.integers(0, vocab, (3, 1))
        for r in (a, b):
            r.cache.resize(int(r.cache.lengths[:3].max()) + 1)
        got, want = np.array(a.step(tok, 0, ones)), np.array(b.step(tok, 0, ones))
        assert got.shape == want.shape == (3, 1, vocab)
        assert rel(got, want) < TOL
        io_a, io_b = a.io(0, 3, 1, 1), b.io(0, 3, 1, 1)
        for name in ("c", "pe"):
            assert rel(io_a.new[name], io_b.new[name]) < TOL, name
    assert a.cache.lengths[:3].tolist() == b.cache.lengths[:3].tolist() == [21, 15, 26]
    assert a.cache.bucket == b.cache.bucket > 16
    for name, view in a.cache.feeds(0, 3).items():
        theirs = b.cache.feeds(0, 3)[name]
        for row, n in enumerate([21, 15, 26]):
            assert rel(view[row, :, :n], theirs[row, :, :n]) < TOL, (name, row)


def test_a_wide_batch_equals_onnx_runtime(tiny: dict[str, Path]) -> None:
    """20 rows: 80 (token, expert) slots, past the experts' few-slot path (64), so the shared expert's down
    projection runs after the per-panel fc2 loop rather than inside it; two decode steps' logits equal ONNX
    Runtime's."""
    native = load(tiny["fp32"], session_options={"intra_op_num_threads": 2})
    ort = load(tiny["fp32"], session_options={"intra_op_num_threads": 2, "native_decode": False})
    assert native.backend.native is not None
    assert native.config.num_experts_per_tok * 20 > 64
    vocab = native.config.vocab_size
    lengths = [3 + i % 7 for i in range(20)]
    a, b = runner(native, 20, 16), runner(ort, 20, 16)
    for r in (a, b):
        prefill(r, np.random.default_rng(3), lengths, vocab)
    rng = np.random.default_rng(4)
    for _ in range(2):
        tok = rng.integers(0, vocab, (20, 1))
        for r in (a, b):
            r.cache.resize(int(r.cache.lengths[:20].max()) + 1)
        got, want = np.array(a.step(tok, 0, np.ones(20, np.int64))), np.array(b.step(tok, 0, np.ones(20, np.int64)))
        assert got.shape == (20, 1, vocab) and rel(got, want) < TOL


def test_generate_token_for_token(tiny: dict[str, Path]) -> None:
    """Greedy generation of two prompts, 70 tokens (past the 64-column bucket): the same tokens either way."""
    native = load(tiny["fp32"])
    ort = load(tiny["fp32"], session_options={"native_decode": False})
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 2]]
    assert native.generate(prompts, 70) == ort.generate(prompts, 70)


def test_rows_without_a_new_token_are_not_stored(tiny: dict[str, Path]) -> None:
    """n_new 0 for a row (a scheduler's idle row): nothing stored for it, its length kept; the other row as usual."""
    engine = load(tiny["fp32"])
    r = runner(engine, 2, 32)
    prefill(r, np.random.default_rng(3), [5, 7], engine.config.vocab_size)
    before = {k: v.copy() for k, v in r.cache.feeds(0, 2).items()}
    r.cache.resize(8)
    r.step(np.array([[4], [9]]), 0, np.array([1, 0], np.int64))
    assert r.cache.lengths[:2].tolist() == [6, 7]
    for name, view in r.cache.feeds(0, 2).items():
        assert np.array_equal(view[1], before[name][1]), name
        assert not np.array_equal(view[0, :, 5], before[name][0, :, 5]), name


@pytest.mark.parametrize("bad", ["id past the vocabulary", "negative id", "row past its bucket"])
def test_bad_steps_are_refused_with_nothing_written(tiny: dict[str, Path], bad: str) -> None:
    engine = load(tiny["fp32"])
    r = runner(engine, 2, 32)
    prefill(r, np.random.default_rng(4), [4, 6], engine.config.vocab_size)
    r.cache.resize(7)
    ids = np.array([[3], [8]])
    if bad == "id past the vocabulary":
        ids[1, 0] = engine.config.vocab_size
    elif bad == "negative id":
        ids[0, 0] = -1
    else:
        r.cache.lengths[1] = r.cache.bucket  # full: no column for the new token
    lengths = r.cache.lengths[:2].copy()
    before = {k: v.copy() for k, v in r.cache.feeds(0, 2).items()}
    with pytest.raises(RuntimeInputError, match="r1c native decode: "):
        r.step(ids, 0, np.ones(2, np.int64))
    assert r.cache.lengths[:2].tolist() == lengths.tolist()
    for name, view in r.cache.feeds(0, 2).items():
        assert np.array_equal(view, before[name]), name


def test_graphs_it_does_not_compute_keep_onnx_runtime(tiny: dict[str, Path], caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    """An int8 bundle (no MLABlock) and the option off: no native decoder, the reason logged."""
    with caplog.at_level(logging.INFO, logger="r1c.runtime.native_decode"):
        engine = load(tiny["int8"])
    assert engine.backend.native is None
    assert f"native decode off for {tiny['int8'].name}: no r1c.cpu::MLABlock: " in caplog.text
    assert load(tiny["fp32"], session_options={"native_decode": False}).backend.native is None


def _graph(bundle: Path) -> onnx.GraphProto:
    return onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph


def _edit(graph: onnx.GraphProto, edit: str) -> None:
    """A change of the fp32 graph's math that the walk must notice."""
    nodes = list(graph.node)
    if edit == "cos scaled":  # a factor on cos alone (YaRN's attention factor scales both tables alike)
        cos = next(n for n in nodes if n.op_type == "Cos")
        scale = onnx.helper.make_tensor("cos_scale", onnx.TensorProto.FLOAT, [], [1.2])
        graph.initializer.append(scale)
        mul = onnx.helper.make_node("Mul", [cos.output[0], "cos_scale"], ["cos_scaled"])
        for n in nodes:
            n.input[:] = ["cos_scaled" if i == cos.output[0] else i for i in n.input]
        graph.node.insert(list(graph.node).index(cos) + 1, mul)
    elif edit == "unnormalized routing":
        moe = next(n for n in nodes if n.op_type == "MoE")
        for a in moe.attribute:
            if a.name == "normalize_routing_weights":
                a.i = 0
    elif edit == "experts' sum scaled":  # a node on the residual path the walk does not know
        add = next(n for n in nodes if n.op_type == "Add" and any("MoEExperts" in i for i in n.input))
        out = add.output[0]
        add.output[0] = f"{out}.unscaled"
        graph.node.insert(list(graph.node).index(add) + 1, onnx.helper.make_node(
            "Mul", [f"{out}.unscaled", "cos_scale"], [out]))
        graph.initializer.append(onnx.helper.make_tensor("cos_scale", onnx.TensorProto.FLOAT, [], [1.2]))
    elif edit == "GELU for SiLU":  # QuickGelu's alpha of the sigmoid GELU approximation
        gelu = next(n for n in nodes if n.op_type == "QuickGelu")
        gelu.attribute.append(onnx.helper.make_attribute("alpha", 1.702))
        del gelu.attribute[: len(gelu.attribute) - 1]


@pytest.mark.parametrize("edit, reason", [("cos scaled", "sin and cos of different angles"),
                                          ("unnormalized routing", "routing weights not normalized"),
                                          ("experts' sum scaled", "is not read by one Reshape node alone"),
                                          ("GELU for SiLU", "QuickGelu alpha is not 1")])
def test_walk_refuses_a_graph_it_does_not_compute(tiny: dict[str, Path], edit: str, reason: str) -> None:
    graph = _graph(tiny["fp32"])
    plan = read_plan(graph)
    assert len(plan["layers"]) == preset("tiny").num_hidden_layers
    _edit(graph, edit)
    with pytest.raises(NotNative, match=reason):
        read_plan(graph)


def test_plan_reads_the_configs_shapes(tiny: dict[str, Path]) -> None:
    """The walk's sizes and attributes are the config's."""
    c = preset("tiny")
    plan = read_plan(_graph(tiny["fp32"]))
    m = plan["model"]
    assert (m["hidden"], m["vocab"], m["q_lora"], m["heads"], m["nope"], m["rope"], m["kv_lora"], m["v_head"]) == (
        c.hidden_size, c.vocab_size, c.q_lora_rank, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
        c.kv_lora_rank, c.v_head_dim)
    dense = plan["layers"][: c.first_k_dense_replace]
    moe = plan["layers"][c.first_k_dense_replace:]
    assert all("router" not in layer and layer["inter"] == c.intermediate_size for layer in dense)
    for layer in moe:
        assert (layer["experts"], layer["top_k"], layer["n_group"], layer["topk_group"], layer["group_topk"]) == (
            c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, 2)
        assert layer["inter"] == c.moe_intermediate_size * c.n_shared_experts


def test_physical_cores_is_a_positive_count() -> None:
    import os

    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_command_line_passes_only_the_choice_made() -> None:
    """`r1c run` / `r1c serve`: --native-decode / --no-native-decode override the bundle's session option, and
    neither leaves the bundle's own (a manifest may say false)."""
    from r1c.runtime.server.commands import session_choices

    assert session_choices(None, None, None) is None
    assert session_choices(None, None, True) == {"native_decode": True}
    assert session_choices(2, None, False) == {"intra_op_num_threads": 2, "native_decode": False}


def test_run_command_threads_and_path_give_the_same_tokens(tiny: dict[str, Path]) -> None:
    """`r1c run --threads 1 --no-native-decode` (ONNX Runtime, one thread) and `--threads 1` (the native step on
    one thread, as its log line says) print the tokens the default run (the bundle's threads) prints."""
    from clitools import cli

    args = ("run", tiny["fp32"], "--input-ids", "1 2 3", "--input-ids", "9 8", "--max-new-tokens", "6", "--json")
    code, default, err = cli(*args)
    assert code == 0, err
    code, other, err = cli(*args, "--threads", "1", "--no-native-decode")
    assert code == 0, err
    assert json.loads(other) == json.loads(default)
    code, one, err = cli("-v", *args, "--threads", "1")  # the native step, on the thread count asked for
    assert code == 0 and json.loads(one) == json.loads(default), err
    assert "1 thread(s)" in err, err

