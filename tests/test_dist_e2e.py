"""e2e tier: sharded bundles of the tiny preset run as 2 and 4 processes over torch.distributed (gloo).

`r1c build --tensor-parallel T --expert-parallel E` -> `r1c.runtime.load` (this process is rank 0 and spawns the
others) -> the same logits (REL_TOL, float32) and greedy tokens as the one-rank bundle of the same export.
Layouts: TP2 (2 ranks, through `r1c run`), EP2 (2 ranks, collectives as ONNX Runtime custom ops), TP2 x EP2
(4 ranks, mixed, collectives between sub-graphs). Every layout on 2 and 4 ranks is also checked in one process by
tests/test_shard_passes.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from r1c.runtime import load
from tests.dist_helpers import REL_TOL, TinyBundles, cli, export, rel_err

PROMPTS = [[5, 9, 2, 7, 1], [11, 3], [8]]
NEW_TOKENS = 6
# Engine.generate's cache buckets for 5 + 124 tokens are [64, 129]: the run relays the cache once, which the
# followers replay (before cache_replay, a sharded bundle refused any run past its first bucket)
LONG_TOKENS = 124


@pytest.fixture(scope="module")
def bundles(tiny_bundles: TinyBundles) -> TinyBundles:
    return tiny_bundles


@pytest.fixture(scope="module")
def single(bundles: TinyBundles) -> Iterator[dict[str, object]]:
    engine = load(bundles["single"])
    yield {"logits": engine.forward([PROMPTS[0]]), "tokens": engine.generate(PROMPTS, NEW_TOKENS),
           "long": engine.generate(PROMPTS[:1], LONG_TOKENS)[0]}


class _Rank0Watch:
    """Rank 0's share, watched: every step writes its outputs into the io's buffers (`step`), never through
    `run(feeds)` (new outputs each step, then copied in). The buffers are set to NaN first, so every value that
    comes back was written there by this step."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.steps = inner, 0

    def run(self, feeds: Any) -> Any:
        raise AssertionError("rank 0 ran its share through run(feeds): outputs allocated and copied each step")

    def step(self, io: Any) -> None:
        self.steps += 1
        for buf in io.outputs().values():
            buf.fill(np.nan)
        self.inner.step(io)
        assert all(np.isfinite(buf).all() for buf in io.outputs().values())


def _check(bundle: Path, single: dict[str, object]) -> None:
    engine = load(bundle)
    watch = engine.backend.runner = _Rank0Watch(engine.backend.runner)  # type: ignore[attr-defined]
    try:
        logits = engine.forward([PROMPTS[0]])
        assert rel_err(logits, single["logits"]) < REL_TOL  # type: ignore[arg-type]
        assert engine.generate(PROMPTS, NEW_TOKENS) == single["tokens"]
        assert engine.generate(PROMPTS[1:], 3) == [t[:3] for t in single["tokens"][1:]]  # type: ignore[index]
        assert watch.steps >= NEW_TOKENS
    finally:
        engine.backend.close()  # type: ignore[attr-defined]


def test_mixed_layout_on_four_ranks_matches_one_rank(bundles: TinyBundles, single: dict[str, object]) -> None:
    _check(bundles["tp2ep2"], single)  # the default mechanism: sub-graphs split at the collectives


def test_expert_parallel_with_custom_op_collectives_matches_one_rank(
        bundles: TinyBundles, single: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime_extensions")
    monkeypatch.setenv("R1C_DIST_COLLECTIVES", "custom_op")
    _check(bundles["ep2"], single)


def test_manifest_names_world_and_rank_files(bundles: TinyBundles) -> None:
    m = json.loads((bundles["tp2ep2"] / "manifest.json").read_text())
    dist = m["target_options"]["distributed"]
    assert dist["world_size"] == 4 and dist["tensor_parallel"] == 2 and dist["expert_parallel"] == 2
    assert dist["groups"] == {"tp": [[0, 1], [2, 3]], "world": [[0, 1, 2, 3]]}
    assert [r["rank"] for r in dist["ranks"]] == [0, 1, 2, 3]
    for r in dist["ranks"]:
        for f in r["files"]:
            assert f in m["files"] and (bundles["tp2ep2"] / f).is_file()


def test_cli_run_on_a_tensor_parallel_bundle(bundles: TinyBundles, single: dict[str, object],
                                             tmp_path: Path) -> None:
    code, out, err = cli("run", str(bundles["tp2"]), "--input-ids", " ".join(map(str, PROMPTS[0])),
                         "--max-new-tokens", str(LONG_TOKENS), "--logits-out", str(tmp_path / "l.npy"))
    assert code == 0, err
    tokens = out.strip().partition(": ")[2]  # `prompt 0 (N tokens) -> M new tokens: ids...`
    assert [int(t) for t in tokens.split()] == single["long"]
    assert rel_err(np.load(tmp_path / "l.npy"), single["logits"][0]) < REL_TOL  # type: ignore[index]


def test_missing_rank_file_is_one_clear_error(bundles: TinyBundles, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundles["tp2"], broken)
    (broken / "model.rank1.onnx").unlink()
    code, _, err = cli("run", str(broken), "--input-ids", "1 2")
    assert code != 0 and err.strip().splitlines() == [
        "r1c: error: bundle: file model.rank1.onnx listed in the manifest is missing"]


def test_build_refuses_a_layout_the_model_does_not_divide(bundles: TinyBundles, tmp_path: Path) -> None:
    code, _, err = cli("build", str(bundles.export), "-o", str(tmp_path / "b"),
                       "--tensor-parallel", "3")
    assert code != 0 and "num_attention_heads = 4 does not split into 3" in err
    assert not (tmp_path / "b").exists()


def test_step_channel_round_trip_with_and_without_overflow() -> None:
    from r1c.runtime.distributed.control import RUN, SLOTS, Step, StepChannel

    sent: list[torch.Tensor] = []
    names = ["input_ids", "past_lengths"]
    sender, receiver = StepChannel(None, names), StepChannel(None, names)
    sender._broadcast = lambda t: sent.append(t.clone())  # type: ignore[method-assign]
    receiver._broadcast = lambda t: t.copy_(sent.pop(0))  # type: ignore[method-assign]
    for tokens in (1, 3 * SLOTS):  # a decode step fits one broadcast; a long prefill needs a second
        ids = np.arange(2 * tokens, dtype=np.int64).reshape(2, tokens)
        words = np.array([2, 2, 4, 1], np.int64)  # a MOVE_ROW 4 -> 1 (cache_replay's journal words)
        step = Step(7, 3, words, {"input_ids": ids, "past_lengths": np.array([5, 0], np.int64)})
        sender.send(RUN, step)
        kind, got = receiver.receive()
        assert kind == RUN and got is not None and not sent
        assert (got.key, got.r0) == (7, 3)
        np.testing.assert_array_equal(got.words, words)
        np.testing.assert_array_equal(got.feeds["input_ids"], ids)
        np.testing.assert_array_equal(got.feeds["past_lengths"], [5, 0])


@pytest.mark.slow
def test_torchrun_launch_matches_one_rank(bundles: TinyBundles, single: dict[str, object]) -> None:
    """`torchrun -m r1c.cli run`: every process loads the bundle; rank 0 prints, the others serve and exit 0."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    cmd = [*torchrun, "-m", "r1c.cli", "run", str(bundles["tp2ep2"]), "--input-ids", " ".join(map(str, PROMPTS[0])),
           "--max-new-tokens", str(NEW_TOKENS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens = proc.stdout.strip().partition(": ")[2]  # `prompt 0 (N tokens) -> M new tokens: ids...`
    assert [int(t) for t in tokens.split()] == single["tokens"][0]  # type: ignore[index]


@pytest.mark.slow
def test_small_preset_every_layout_matches_one_rank(tmp_path: Path) -> None:
    """The small preset (~560 MB) on TP2, EP2, TP2 x EP2, TP4, EP4: logits within 1e-5, same greedy tokens."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "dist_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--preset", "small", "--work", str(tmp_path), "--check-only"],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("same greedy tokens: True") == 5


def test_a_script_without_main_guard_can_load_a_sharded_bundle(bundles: TinyBundles, tmp_path: Path,
                                                               single: dict[str, object]) -> None:
    """Followers do not re-run the caller's script (multiprocessing would, and load again from each follower)."""
    script = tmp_path / "use.py"
    script.write_text("from r1c.runtime import load\n"
                      f"engine = load({str(bundles['ep2'])!r})\n"
                      f"print(*engine.generate([{PROMPTS[0]!r}], {NEW_TOKENS})[0])\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [int(t) for t in proc.stdout.split()] == single["tokens"][0]  # type: ignore[index]


def test_sharded_onnxruntime_build_refuses_a_bfloat16_export(tmp_path: Path) -> None:
    export(tmp_path / "bf16", "--dtype", "bfloat16")
    code, _, err = cli("build", str(tmp_path / "bf16"), "-o", str(tmp_path / "b"), "--tensor-parallel", "2")
    assert code != 0 and "need a float32 export; this one is bfloat16" in err
    assert not (tmp_path / "b").exists()
