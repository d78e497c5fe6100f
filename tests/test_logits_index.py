"""e2e tier: the graph input `logits_index` (logits only where a step samples) on the tiny preset, with ONNX Runtime.

- A graph exported before that input (no `logits_index`; logits at every position) still runs: built today, its
  `forward`, `generate` and serving give what today's export gives (logits within 1e-5 relative: the same weights
  and kernels, the last layer run on all positions instead of the kept ones; greedy tokens identical up to a float
  tie). Such a graph is made here from today's export by computing the index inside the graph as every position
  (`legacy_export`), which is what the older exporter's last layer did.
- The serving scheduler with `prefill_pad_tokens` > 0 puts rows of different lengths in one padded call: each row
  must still sample at its own last real token (the reference: each request alone through `Engine.generate`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from serving_helpers import assert_same_greedy

from r1c.config import preset
from r1c.exporter.checkpoint import random_checkpoint
from r1c.exporter.onnx_export import export_onnx
from r1c.graph_io import LOGITS_INDEX
from r1c.runtime import load
from r1c.runtime.build import build_bundle
from r1c.runtime.serving import SamplingParams, SchedulerConfig, ServingEngine

PROMPTS = [[5, 9, 2], [17, 3, 8, 44, 12, 6, 31], [2], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70], [8, 8]]
NEW_TOKENS = 6


def legacy_export(src: Path, dst: Path) -> None:
    """A copy of the export `src` as r1c exported it before `logits_index`: the input removed from the graph and
    from graph_io.json, its uses fed every position instead (Range(S) expanded to [B, S]), logits [B, S, V]."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx*"))
    model = ir.load(src / "model.onnx")
    g = model.graph
    index = next(v for v in g.inputs if v.name == LOGITS_INDEX)
    ids = next(v for v in g.inputs if v.name == "input_ids")

    def const(value: object) -> ir.Node:
        return ir.node("Constant", [], attributes={"value": ir.tensor(np.array(value, np.int64))})

    shape, zero, one, axis = ir.node("Shape", [ids]), const(0), const(1), const([1])
    gather = ir.node("Gather", [shape.outputs[0], axis.outputs[0]], attributes={"axis": 0})
    seq = ir.node("Squeeze", [gather.outputs[0]])
    positions = ir.node("Range", [zero.outputs[0], seq.outputs[0], one.outputs[0]])
    every = ir.node("Expand", [positions.outputs[0], shape.outputs[0]])
    first = next(iter(g))
    for node in (shape, zero, one, axis, gather, seq, positions, every):
        g.insert_before(first, node)
    index.replace_all_uses_with(every.outputs[0])
    g.inputs.remove(index)
    ir.save(model, dst / "model.onnx", external_data="model.onnx.data")
    gio = json.loads((dst / "graph_io.json").read_text())
    gio["inputs"] = [i for i in gio["inputs"] if i["name"] != LOGITS_INDEX]
    for out in gio["outputs"]:
        if out["name"] == "logits":
            out["shape"] = ["batch", "seq", out["shape"][2]]
    (dst / "graph_io.json").write_text(json.dumps(gio, indent=1))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("logits_index")
    config = preset("tiny")
    export_onnx(config, random_checkpoint(config, seed=3), root / "export", progress=False)
    legacy_export(root / "export", root / "legacy")
    return {"today": build_bundle(root / "export", root / "today.bundle"),
            "legacy": build_bundle(root / "legacy", root / "legacy.bundle")}


def test_an_export_without_logits_index_runs_as_todays(bundles: dict[str, Path]) -> None:
    today, legacy = load(bundles["today"]), load(bundles["legacy"])
    assert today.selects_logits and not legacy.selects_logits
    ids = np.random.default_rng(0).integers(2, today.vocab_size, size=(2, 7))
    want = today.forward(ids)
    got = legacy.forward(ids)
    assert got.shape == want.shape == (2, 7, today.vocab_size)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-5
    for prompt, a, b in zip(PROMPTS, legacy.generate(PROMPTS, NEW_TOKENS), today.generate(PROMPTS, NEW_TOKENS)):
        assert_same_greedy(today, prompt, a, b)


@pytest.mark.parametrize("which", ["today", "legacy"])
def test_padded_prefill_calls_sample_each_rows_last_token(bundles: dict[str, Path], which: str) -> None:
    """prefill_pad_tokens lets prompts of different lengths (and the decoding rows) share one right-padded call;
    each row's token must come from its own last real position, not the call's last column."""
    engine = load(bundles[which], session_options={"intra_op_num_threads": 1})
    want = [engine.generate([p], NEW_TOKENS)[0] for p in PROMPTS]
    calls: list[list[int]] = []
    with ServingEngine(engine, SchedulerConfig(max_num_seqs=8, prefill_pad_tokens=1000, min_bucket=16)) as se:
        step = se.scheduler.runner.step

        def spy(ids: np.ndarray, r0: int, n_new: np.ndarray | None) -> np.ndarray:
            calls.append([] if n_new is None else [int(n) for n in n_new])
            return step(ids, r0, n_new)

        se.scheduler.runner.step = spy  # type: ignore[method-assign]
        handles = [se.submit(p, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
                   for p in PROMPTS]
        outs = [h.result(timeout=60).token_ids for h in handles]
    assert any(len(set(c)) > 1 for c in calls), calls  # some call padded rows of different lengths together
    for prompt, got, w in zip(PROMPTS, outs, want):
        assert_same_greedy(engine, prompt, got, w)
