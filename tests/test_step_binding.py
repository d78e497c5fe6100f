"""unit + e2e tier: bindings made once per step shape (r1c.runtime.step keys, r1c.runtime.ort_backend reuse).

The contract (runtime/step.py): two `StepIO`s with the same non-None key have the same buffers — address, shape,
strides, dtype — in every field, and their cache views are the cache's current views. A stale binding would break
it after a bucket change (the views' shape and stride change), a row move or pop (n changes), another row range
(r0) or a new runner (other buffers). The unit test checks the contract over such a sequence against the cache's
own `feeds`; the e2e test runs the same kind of sequence on the tiny bundle through `OrtBackend` with keyed
bindings and with every step bound afresh (key None, the pre-issue-11 path) and requires equal logits (tolerance
0: the same graph on the same inputs and shapes, one thread), one binding per key, and that the keyed bindings live
on their `StepIO`s (`StepIO.bound`) and are collected with the runner (no binding outlives the buffers it names).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_helpers import text_bundle

import r1c.runtime.step as step_module
from r1c.runtime.kvcache import CacheLayout, LatentCache
from r1c.runtime.step import StepIO, StepRunner

LAYOUT = CacheLayout(layers=2, channels=(5, 2), dtype=np.dtype(np.float32))
Fingerprint = tuple[int, tuple[int, ...], tuple[int, ...], str]


def fingerprint(arr: np.ndarray) -> Fingerprint:
    return int(arr.__array_interface__["data"][0]), tuple(arr.shape), tuple(arr.strides), arr.dtype.str


def buffers(io: StepIO) -> dict[str, Fingerprint]:
    """Address, shape, strides and dtype of every input and output of a step."""
    return {name: fingerprint(a) for name, a in {**io.feeds(), **io.outputs()}.items()}


class Recorder:
    """A step backend that runs nothing and checks the key contract on every step it is given."""

    def __init__(self) -> None:
        self.by_key: dict[Any, dict[str, Fingerprint]] = {}
        self.steps = 0
        self.cache: LatentCache | None = None
        self.r0 = 0  # the first row of the step the test runs next

    def step(self, io: StepIO) -> None:
        assert self.cache is not None and io.key is not None
        self.steps += 1
        seen = buffers(io)
        n = len(io.past_lengths)
        assert io.input_ids.shape[0] == n and io.logits_index is not None
        assert io.logits.shape[:2] == io.logits_index.shape and io.logits_index.shape[0] == n
        current = {name: fingerprint(v) for name, v in self.cache.feeds(self.r0, self.r0 + n).items()}
        assert {k: seen[k] for k in current} == current  # the cache's views now, not those of an older bucket
        assert self.by_key.setdefault(io.key, seen) == seen  # equal keys: equal buffers


class Collector:
    def __init__(self) -> None:
        self.ios: list[StepIO] = []

    def step(self, io: StepIO) -> None:
        self.ios.append(io)


def exercise(rec: Recorder) -> int:
    """A new runner through bucket changes (8 -> 16 -> 64 -> 16), a row move and pop, sub-ranges and a prefill
    chunk; returns its serial."""
    cache = LatentCache(LAYOUT, 4 * 64 * LAYOUT.bytes_per_token, max_rows=4, max_len=64, min_bucket=4)
    rec.cache = cache
    runner = StepRunner(rec, cache, vocab_size=7, max_tokens=32)
    ones = np.ones((3, 1), np.int64)

    def step(ids: np.ndarray, r0: int, n_new: Any) -> None:
        rec.r0 = r0
        runner.step(ids, r0, n_new)

    def decode(r0: int, n: int) -> None:
        cache.resize(int(cache.lengths[r0:r0 + n].max()) + 1)
        step(ones[:n], r0, ones[:n, 0])

    for _ in range(3):
        cache.add_row()
    cache.resize(6)
    step(np.ones((3, 6), np.int64), 0, [6, 2, 4])  # bucket 8
    for _ in range(4):
        decode(0, 3)  # crosses 8 -> 16
    decode(1, 2)
    cache.move_row(2, 0)
    cache.pop_row()
    for _ in range(3):
        decode(0, 2)
    step(np.ones((1, 4), np.int64), 1, [4])  # a prefill chunk of one row
    cache.resize(40)
    assert cache.bucket == 64
    step(ones[:2], 0, ones[:2, 0])
    decode(0, 2)  # back to 16: the views of bucket 16 again
    assert cache.bucket == 16
    return runner._serial


def test_equal_keys_mean_equal_buffers_across_buckets_rows_and_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_module, "MAX_CACHED_STEPS", 3)  # evictions happen: a re-made StepIO keeps its key
    rec = Recorder()
    serials = set()
    for _ in range(2):  # the second runner is made after the first is collected: its keys are new
        serials.add(exercise(rec))
        gc.collect()
    assert len(serials) == 2 and rec.steps == 2 * 12
    assert len(rec.by_key) == 2 * 7  # per runner: (r0, n, S, K, P) = (0,3,6,1,8) (0,3,1,1,8) (0,3,1,1,16)
    #                                  (1,2,1,1,16) (0,2,1,1,16) (1,1,4,1,16) (0,2,1,1,64)


def test_unkeyed_runner_makes_every_step_afresh() -> None:
    backend = Collector()
    cache = LatentCache(LAYOUT, 2 * 16 * LAYOUT.bytes_per_token, max_rows=2, max_len=16, min_bucket=4)
    runner = StepRunner(backend, cache, 7, 8, bind_once=False)
    cache.add_row()
    for _ in range(2):
        runner.step(np.ones((1, 1), np.int64), 0, [1])
    assert [io.key for io in backend.ios] == [None, None] and backend.ios[0] is not backend.ios[1]


def run_sequence(engine: Any, bind_once: bool, max_tokens: int) -> list[np.ndarray]:
    """Prefill 3 rows, decode across a bucket change, drop a row (move + pop), decode a sub-range, return to an
    earlier shape (its binding is reused with new cache contents), grow and shrink the bucket, score without
    storing; the logits of every step."""
    runner = engine._runner(3, 40, max_tokens, 4)
    runner.bind_once = bind_once
    cache = runner.cache
    out: list[np.ndarray] = []

    def step(ids: np.ndarray, r0: int, n_new: Any) -> np.ndarray:
        out.append(np.array(runner.step(ids, r0, n_new)))
        return out[-1]

    def decode(tokens: np.ndarray, r0: int) -> np.ndarray:
        cache.resize(int(cache.lengths[r0:r0 + len(tokens)].max()) + 1)
        return step(tokens, r0, np.ones(len(tokens), np.int64))[:, 0].argmax(-1)[:, None]

    rng = np.random.default_rng(0)
    for _ in range(3):
        cache.add_row()
    cache.resize(6)
    lengths = np.array([6, 3, 5])
    logits = step(rng.integers(2, engine.vocab_size, (3, 6)), 0, lengths)  # bucket 8
    tokens = logits[:, 0].argmax(-1)[:, None]  # each row's last prompt token
    for _ in range(5):
        tokens = decode(tokens, 0)  # 8 -> 16 on the third step
    cache.move_row(2, 0)
    cache.pop_row()
    tokens = tokens[[2, 1]]
    for _ in range(2):
        tokens = decode(tokens, 0)
    tail = decode(tokens[1:], 1)  # rows [1, 2) alone
    tokens = decode(np.concatenate([tokens[:1], tail]), 0)  # the shape (0, 2, 1, 16) again: its binding reused
    cache.resize(40)
    tokens = step(tokens, 0, np.ones(2, np.int64))[:, 0].argmax(-1)[:, None]  # bucket 40
    tokens = decode(tokens, 0)  # back to 16
    step(rng.integers(2, engine.vocab_size, (2, 2)), 0, None)  # scoring only, nothing stored
    assert cache.bucket == 16 and cache.relayouts == 4  # 4 -> 8 -> 16 -> 40 -> 16
    if bind_once:  # each keyed StepIO holds its backend's binding (StepIO.bound) while the runner keeps it
        assert all(io.bound is not None and io.bound[0] is engine.backend for io in runner._ios.values())
    return out


def test_keyed_bindings_give_the_logits_of_fresh_bindings(tmp_path_factory: pytest.TempPathFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from r1c.runtime import load
    from r1c.runtime.ort_backend import OrtBackend

    bundle: Path = text_bundle(tmp_path_factory)
    # ONNX Runtime's bindings (a native decode step binds nothing: tests/test_native_decode.py)
    engine = load(bundle, session_options={"intra_op_num_threads": 1, "native_decode": False})
    binds: list[Any] = []
    alive: list[weakref.ref[Any]] = []  # the keyed bindings: each must die with its runner's StepIO
    real_bind = OrtBackend._bind

    def bind(binding: Any, io: StepIO) -> Any:
        binds.append(io.key)
        if io.key is not None:
            alive.append(weakref.ref(binding))
        return real_bind(binding, io)

    monkeypatch.setattr(OrtBackend, "_bind", staticmethod(bind))
    fresh = run_sequence(engine, bind_once=False, max_tokens=18)
    assert len(binds) == len(fresh) and set(binds) == {None}
    binds.clear()
    for max_tokens in (18, 24):  # a second runner (other buffers) after the first is collected
        keyed = run_sequence(engine, bind_once=True, max_tokens=max_tokens)
        gc.collect()
        assert alive and all(ref() is None for ref in alive)  # kept on the StepIOs, gone with the runner
        alive.clear()
        assert len(keyed) == len(fresh)
        for i, (a, b) in enumerate(zip(keyed, fresh)):
            np.testing.assert_array_equal(a, b, err_msg=f"step {i}")
    # one binding per distinct key, and the keys of the two runners differ; steps of a known key bind nothing
    assert len(binds) == len(set(binds)) and len({k[0] for k in binds}) == 2
    assert len(binds) < 2 * len(fresh)
    assert len({k[1:] for k in binds if k[5] == 16}) >= 3  # bucket 16: (0, 3), (0, 2), (1, 1) rows rebound


class Marker:
    """A step backend whose logits mark where they come from: logits[i, j, :] = the token id at the position they
    are computed for (the graph's `logits_index`, or position j for a graph without that input)."""

    def step(self, io: StepIO) -> None:
        n, s = io.input_ids.shape
        positions = np.tile(np.arange(s), (n, 1)) if io.logits_index is None else io.logits_index
        assert ((positions >= 0) & (positions < s)).all(), positions  # in range, never "from the end"
        io.logits[...] = np.take_along_axis(io.input_ids, positions, 1)[:, :, None]


@pytest.mark.parametrize("selects", [True, False])
def test_a_sampling_step_returns_each_rows_last_token_logits(selects: bool) -> None:
    """With n_new the runner asks the graph for each row's last real token (n_new - 1) and returns [n, 1, V]; a
    scoring step (None) every position, [n, S, V]. A graph without `logits_index` computes all S: the runner picks
    the same positions out."""
    cache = LatentCache(LAYOUT, 3 * 16 * LAYOUT.bytes_per_token, max_rows=3, max_len=16, min_bucket=4)
    runner = StepRunner(Marker(), cache, 7, 24, logits_index=selects)
    for _ in range(3):
        cache.add_row()
    cache.resize(6)
    ids = np.arange(18, dtype=np.int64).reshape(3, 6)
    np.testing.assert_array_equal(runner.step(ids, 0, None), np.repeat(ids[:, :, None], 7, axis=2))
    got = runner.step(ids, 0, [6, 2, 4])
    assert got.shape == (3, 1, 7)
    np.testing.assert_array_equal(got[:, 0, 0], [5, 7, 15])
    got = runner.step(ids, 0, [0, 1, 2])  # a row with no new token: nothing stored, position 0 asked
    np.testing.assert_array_equal(got[:, 0, 0], [0, 6, 13])


class IdsCopy:
    """A step backend that keeps a copy of the ids each step was given."""

    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []

    def step(self, io: StepIO) -> None:
        self.ids.append(io.input_ids.copy())


def test_padding_repeats_each_rows_last_real_token() -> None:
    """A row's positions past its n_new real tokens reach the graph as copies of its last real token (so they
    route like it in an MoE layer instead of pulling other experts through memory); a scoring step (None) and the
    real tokens are passed as given."""
    cache = LatentCache(LAYOUT, 3 * 16 * LAYOUT.bytes_per_token, max_rows=3, max_len=16, min_bucket=4)
    seen = IdsCopy()
    runner = StepRunner(seen, cache, 7, 24)
    for _ in range(3):
        cache.add_row()
    cache.resize(6)
    ids = np.arange(18, dtype=np.int64).reshape(3, 6)
    runner.step(ids, 0, None)
    np.testing.assert_array_equal(seen.ids[-1], ids)
    cache.lengths[:3] = 0
    runner.step(ids, 0, [6, 2, 0])
    np.testing.assert_array_equal(seen.ids[-1], [[0, 1, 2, 3, 4, 5], [6, 7, 7, 7, 7, 7], [12] * 6])
    np.testing.assert_array_equal(ids, np.arange(18).reshape(3, 6))  # the caller's array is not touched
