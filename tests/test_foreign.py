"""Foreign models (ONNX that r1c did not export) through `r1c optimize` -> `r1c build` -> runtime / `r1c run` /
`r1c bench`, with the graph I/O described from the graph itself (r1c/graph_io.py, runtime/foreign.py).

- Toy causal graphs (tests/foreign_models.py), with a transformers-style cache and without: every logit is
  computed by numpy, so the bundle's logits must equal it within 1e-5 (float32) and its greedy tokens exactly,
  for a batch of prompts of different lengths.
- The stock `torch.onnx` export of transformers' DeepseekV3 (tiny preset, seed 1, no cache; conftest.py's
  `stock_tiny`), exported once at opset 18 (torch's native opset) and brought to 17 (by hand: the only opset-18
  changes it uses) and to 19, 20, 21 (onnxscript's converter, as torch.onnx does; r1c uses ONNX's own): at
  each opset `r1c optimize` fuses every MoE layer (converting the model up to 21); at 17 and 20 the built
  bundle's logits equal the stock model's under ONNX Runtime within 1e-5 relative and its greedy tokens equal
  transformers' `generate`.
- slow: the stock export with past_key_values (one more torch export, ~15 s): described as a past_key_values
  cache, built, generates transformers' tokens; `r1c bench` runs on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from clitools import cli
from foreign_models import toy_model, toy_reference
from stock_models import CONFIG, at_opset

from r1c.exporter.stock import export_stock
from r1c.passes.testing import max_rel_err, op_counts, run
from r1c.runtime import load
from r1c.runtime.foreign import ForeignEngine

TOL = 1e-5
PROMPTS = [[1, 2, 3, 4], [5], [7, 7, 7, 0, 1, 2, 3]]
NEW = 6


def _optimize_and_build(model: Path, root: Path) -> tuple[Path, Path]:
    code, out, err = cli("optimize", model, "-o", root / "opt")
    assert code == 0, err
    assert out.startswith(f"optimized {root / 'opt'}"), out
    code, out, err = cli("build", root / "opt", "-o", root / "bundle")
    assert code == 0, err
    return root / "opt", root / "bundle"


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "past-key-values"])
def test_toy_foreign_model_serves_forward_and_generation(tmp_path: Path, cache: bool) -> None:
    opt, bundle = _optimize_and_build(toy_model(tmp_path / "toy" / "model.onnx", cache=cache), tmp_path)
    described = json.loads((opt / "graph_io.json").read_text())
    assert described["kind"] == "foreign" and described["vocab_size"] == 13
    if cache:
        assert described["kv_cache"]["kind"] == "past_key_values" and described["kv_cache"]["layers"] == 1
        assert described["roles"]["position_ids"] == "position_ids"
    else:
        assert described["kv_cache"] is None
    engine = load(bundle)
    assert isinstance(engine, ForeignEngine) and engine.vocab_size == 13
    want = [toy_reference(p, NEW)[0] for p in PROMPTS]
    assert engine.generate(PROMPTS, NEW) == want
    for p in PROMPTS:
        assert max_rel_err(engine.forward([p])[0], toy_reference(p, 0)[1]) < TOL
    # a wrong position or a lost cache tensor would show: the reference itself moves with them
    assert toy_reference([1, 2, 3, 4], NEW)[0] != toy_reference([2, 3, 4], NEW)[0]
    code, out, err = cli("run", bundle, *[a for p in PROMPTS for a in ("--input-ids", " ".join(map(str, p)))],
                         "--max-new-tokens", NEW)
    assert code == 0, err
    assert out.splitlines() == [f"prompt {i} ({len(p)} tokens) -> {NEW} new tokens: {' '.join(map(str, w))}"
                                for i, (p, w) in enumerate(zip(PROMPTS, want))]
    eos = want[0][1]
    assert engine.generate([PROMPTS[0]], NEW, eos_token_id=eos) == [want[0][:2]]


def test_bench_runs_on_a_foreign_bundle(tmp_path: Path) -> None:
    _, bundle = _optimize_and_build(toy_model(tmp_path / "toy" / "model.onnx", cache=True), tmp_path)
    code, _out, err = cli("bench", bundle, "--batch", "1,2", "--prompt-len", "4", "--new-tokens", "3",
                         "--warmup", "0", "--repeat", "3", "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["status"] for r in report["results"]] == ["ok", "ok"]


# ---- the stock torch.onnx export of transformers' DeepseekV3 at opsets 17-21 --------------------------------
_OPSET_18_CHANGES = {"Pad", "Resize", "ScatterND", "ScatterElements", "OptionalHasElement", "LpPool",
                     "CenterCropPad", "Col2Im", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "Mish",
                     "OptionalGetElement", "GroupNormalization"}
_REDUCE_AXES_INPUT_AT_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def to_opset17(model: ir.Model) -> ir.Model:
    """The same model at opset 17: Split's num_outputs -> explicit sizes, Reduce*'s axes input -> attribute
    (and no noop_with_empty_axes).

    (ONNX's converter has no 18 -> 17 adapter for Split.) Refuses any other op whose meaning changed at 18.
    """
    from r1c.passes._util import const_ints
    from r1c.passes.infer_shapes import InferShapesPass

    InferShapesPass()(model)
    for node in list(model.graph):
        if node.op_type == "Split" and "num_outputs" in node.attributes:
            parts = node.attributes.pop("num_outputs").as_int()
            dim = node.inputs[0].shape[node.attributes["axis"].as_int()]
            sizes = ir.Value(name=f"{node.name}_sizes", const_value=ir.tensor(np.full(parts, dim // parts, np.int64)))
            model.graph.register_initializer(sizes)
            node.resize_inputs(2)
            node.replace_input_with(1, sizes)
        elif node.op_type in _REDUCE_AXES_INPUT_AT_18 and len(node.inputs) > 1:
            axes = const_ints(node.inputs[1])
            assert axes is not None, f"{node.name}: computed axes"
            node.resize_inputs(1)
            node.attributes["axes"] = ir.AttrInt64s("axes", axes)
            noop = node.attributes.pop("noop_with_empty_axes", None)  # new at 18; 0 is 17's behaviour
            assert noop is None or noop.as_int() == 0
        elif node.op_type in ("ScatterND", "ScatterElements"):
            assert node.attributes.get("reduction", ir.AttrString("reduction", "none")).as_string() in (
                "none", "add", "mul")
        else:
            assert node.op_type not in _OPSET_18_CHANGES, node.op_type
    model.opset_imports[""] = 17
    return model


@pytest.fixture(scope="module")
def stock(stock_tiny: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("opsets")
    model, base = stock_tiny["model"], stock_tiny["path"]
    paths = {18: base, **{opset: at_opset(base, opset, root / str(opset) / "model.onnx") for opset in (19, 20, 21)}}
    m = to_opset17(ir.load(base))
    paths[17] = root / "17" / "model.onnx"
    paths[17].parent.mkdir()
    ir.save(m, paths[17], external_data="model.onnx.data")
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 7))
    logits = run(base, {"input_ids": ids})[0]
    for opset, path in paths.items():  # the inputs are what they claim: same model, that opset
        assert ir.load(path).opset_imports[""] == opset
        assert max_rel_err(run(path, {"input_ids": ids})[0], logits) < TOL, opset
    with torch.no_grad():
        prompt = torch.tensor([PROMPTS[2]])
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False)
    return {"paths": paths, "ids": ids, "logits": logits, "greedy": greedy[0, prompt.shape[1]:].tolist()}


@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
def test_optimize_fuses_a_stock_export_at_any_opset(stock: dict, opset: int, tmp_path: Path) -> None:
    code, _out, err = cli("optimize", stock["paths"][opset], "-o", tmp_path / "opt")
    assert code == 0, err
    model = ir.load(tmp_path / "opt" / "model.onnx")
    counts = op_counts(model)
    assert counts["r1c::MoERouter"] == counts["r1c::MoEExperts"] == CONFIG.num_moe_layers
    assert model.opset_imports[""] == 21
    assert max_rel_err(run(tmp_path / "opt" / "model.onnx", {"input_ids": stock["ids"]})[0], stock["logits"]) < TOL
    described = json.loads((tmp_path / "opt" / "graph_io.json").read_text())
    assert described["kind"] == "foreign" and described["kv_cache"] is None
    assert described["vocab_size"] == CONFIG.vocab_size
    if opset in (17, 20):  # converted up from below and from above torch's own opset: build and serve
        code, _, err = cli("build", tmp_path / "opt", "-o", tmp_path / "bundle")
        assert code == 0, err
        engine = load(tmp_path / "bundle")
        assert max_rel_err(engine.forward(stock["ids"]), stock["logits"]) < TOL
        assert engine.generate([PROMPTS[2]], NEW) == [stock["greedy"]]


@pytest.mark.slow
def test_stock_export_with_past_key_values_serves_generation(stock_tiny: dict, tmp_path: Path) -> None:
    model = stock_tiny["model"]
    path = export_stock(model, tmp_path / "stock" / "model.onnx", with_cache=True, opset=18)
    _, bundle = _optimize_and_build(path, tmp_path)
    engine = load(bundle)
    graph_io = engine.manifest.graph_io
    assert graph_io["kv_cache"]["kind"] == "past_key_values"
    assert graph_io["kv_cache"]["layers"] == CONFIG.num_hidden_layers
    for p in PROMPTS:
        with torch.no_grad():
            prompt = torch.tensor([p])
            want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                                  do_sample=False)[0, len(p):].tolist()
            logits = model(prompt).logits[0].numpy()
        assert engine.generate([p], NEW) == [want]
        assert max_rel_err(engine.forward([p])[0], logits) < TOL
    assert engine.generate(PROMPTS, NEW) == [engine.generate([p], NEW)[0] for p in PROMPTS]
    code, _, err = cli("bench", bundle, "--batch", "1", "--prompt-len", "8", "--new-tokens", "4", "--warmup", "0",
                       "--repeat", "3")
    assert code == 0, err
