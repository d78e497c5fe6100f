"""Serving a sharded bundle: the followers' cache copies follow rank 0's scheduler by replaying its cache journal.

unit: a `LatentCache` driven through random serving traffic (rows added, chunked prefill writes, decode writes,
bucket changes both ways, row moves, pops) with its journal taken as `ShardedBackend.step` takes it, and a
`CacheReplica` fed only those words plus the same step outputs: both hold the same bytes and lengths after every
step; divergence is refused, not served.
e2e: `r1c serve` on TP2 and EP2 bundles of the tiny preset (2 processes, gloo, 127.0.0.1) against the official
`openai` client — concurrent requests of mixed lengths (cache rows move and the bucket changes under them),
streaming, a client disconnect that cancels — give the greedy tokens the one-rank bundle gives each request alone
(up to the documented floating-point tie rule, `serving_helpers.assert_same_greedy`).
"""

from __future__ import annotations

import gc
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from serving_helpers import assert_same_greedy, free_port, metric, openai_client, r1c_cmd, server_process

from r1c.errors import BundleError
from r1c.runtime import load
from r1c.runtime.distributed.cache_replay import CacheJournals, CacheReplica
from r1c.runtime.kvcache import CacheLayout, LatentCache

GRAPH_IO = {"kv_cache": {"layers": 2, "dtype": "float32", "tensors": {
    "c": {"input": "past_c.{layer}", "output": "new_c", "channels": 3},
    "pe": {"input": "past_pe.{layer}", "output": "new_pe", "channels": 2}}},
    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 7]}]}
LAYOUT = CacheLayout.from_graph_io(GRAPH_IO)


def _live(cache: LatentCache) -> list[np.ndarray]:
    """Each live row's filled part, per tensor."""
    return [np.array(cache.view(name, r, r + 1)[:, 0, :, : int(cache.lengths[r])])
            for r in range(cache.rows) for name in ("c", "pe")]


class _Follower:
    """A follower's side of the steps, in this process: the replica and the step outputs it would compute."""

    def __init__(self) -> None:
        self.replica = CacheReplica(GRAPH_IO)

    def step(self, key: int, words: np.ndarray, r0: int, past_lengths: np.ndarray, new: dict[str, Any]) -> None:
        self.replica.apply(key, words)
        s = new["c"].shape[2]  # as `launch.follow`: the step's buffers (lengths checked), written by "the model"
        io = self.replica.step_io(key, r0, np.ones((len(past_lengths), s), np.int64), past_lengths)
        for name, buf in io.new.items():
            buf[...] = new[name]
        io.logits[...] = 0.0
        self.replica.stepped(key, io.outputs())


def _run_step(cache: LatentCache, journals: CacheJournals, follower: _Follower, rng: np.random.Generator,
              r0: int, n_new: list[int]) -> None:
    """One step over rows [r0, r0 + n) as StepRunner + ShardedBackend run it: take the journal, step, write."""
    s = max(n_new)
    new = {name: rng.standard_normal((LAYOUT.layers, len(n_new), s, ch)).astype(np.float32)
           for name, ch in zip(("c", "pe"), LAYOUT.channels)}
    cache.resize(max([int(cache.lengths[r0 + i]) + k for i, k in enumerate(n_new)]
                     + [int(cache.lengths[: cache.rows].max())]))  # as the scheduler: a bucket over every row
    key, words = journals.take(cache)
    follower.step(key, words, r0, cache.lengths[r0:r0 + len(n_new)].copy(), new)
    cache.write(r0, n_new, new)


def test_replayed_journal_keeps_the_follower_copy_identical_through_serving_traffic() -> None:
    rng = np.random.default_rng(0)
    cache = LatentCache(LAYOUT, 6 * 64 * LAYOUT.bytes_per_token, max_rows=6, max_len=64, min_bucket=4)
    journals, follower = CacheJournals(), _Follower()
    kinds = {"moves": 0, "grows": 0, "shrinks": 0}
    for _ in range(300):
        buckets = cache.bucket
        if cache.rows < cache.max_rows and rng.random() < 0.3:  # a request arrives: its prompt in chunks
            r = cache.add_row()
            prompt = int(rng.integers(1, 20))
            while int(cache.lengths[r]) < prompt:
                _run_step(cache, journals, follower, rng, r, [min(int(rng.integers(1, 8)), prompt - int(
                    cache.lengths[r]))])
        elif cache.rows and rng.random() < 0.25:  # a request leaves: the last row fills its hole
            dead = int(rng.integers(0, cache.rows))
            cache.move_row(cache.rows - 1, dead)
            kinds["moves"] += dead != cache.rows - 1
            cache.pop_row()
            longest = int(cache.lengths[: cache.rows].max(initial=1))
            cache.resize(longest)  # may shrink the bucket
        elif cache.rows and int(cache.lengths[: cache.rows].max()) < 60:  # a decode step of every row
            _run_step(cache, journals, follower, rng, 0, [1] * cache.rows)
        kinds["grows"] += cache.bucket > buckets
        kinds["shrinks"] += cache.bucket < buckets
        key, words = journals.take(cache)  # what the next step would carry, replayed now to compare
        follower.replica.apply(key, words)
        copy = follower.replica.caches[key]
        assert (copy.rows, copy.bucket) == (cache.rows, cache.bucket)
        np.testing.assert_array_equal(copy.lengths, cache.lengths)
        for a, b in zip(_live(copy), _live(cache), strict=True):
            np.testing.assert_array_equal(a, b)
    assert min(kinds.values()) > 3, kinds  # the traffic exercised every kind of relayout


def test_a_cache_seen_late_is_refused_with_tokens_unless_unused_then_copied_and_freed() -> None:
    journals, follower = CacheJournals(), _Follower()
    cache = LatentCache(LAYOUT, 4 * 32 * LAYOUT.bytes_per_token, max_rows=4, max_len=32, min_bucket=8)
    for _ in range(3):
        cache.add_row()
    cache.lengths[:3] = [5, 0, 2]  # set directly before any step (r1c bench-serving's bucket measurement does)
    cache.resize(16)
    with pytest.raises(BundleError, match=r"already hold \[5, 0, 2\] tokens"):
        journals.take(cache)  # the followers would get the lengths without the latents
    assert cache.journal is None
    cache.contents_unused = True  # ... which a timing measurement says it does not need
    key, words = journals.take(cache)
    follower.replica.apply(key, words)
    copy = follower.replica.caches[key]
    assert (copy.rows, copy.bucket, copy.capacity_tokens) == (3, 16, cache.capacity_tokens)
    np.testing.assert_array_equal(copy.lengths[:3], [5, 0, 2])
    other = LatentCache(LAYOUT, 32 * LAYOUT.bytes_per_token, max_rows=1, max_len=32)
    other_key, words = journals.take(other)
    follower.replica.apply(other_key, words)
    del other
    gc.collect()
    key, words = journals.take(cache)
    follower.replica.apply(key, words)
    assert set(follower.replica.caches) == {key}  # the collected cache's copy went with it
    with pytest.raises(BundleError, match="another sharded engine"):
        CacheJournals().take(cache)
    journals.close()
    assert cache.journal is None


def test_follower_output_buffers_are_reused_per_cache_and_never_shared() -> None:
    """A step of cache A keeps its latents in A's buffers until A's next step carries the WRITE; a step of cache B in
    between (another engine call) must not overwrite them. Buffers grow when a step needs more tokens."""
    journals, follower = CacheJournals(), _Follower()
    caches = [LatentCache(LAYOUT, 2 * 16 * LAYOUT.bytes_per_token, max_rows=2, max_len=16, min_bucket=16)
              for _ in range(2)]
    rng = np.random.default_rng(1)
    for cache in caches:
        cache.add_row()
    addresses = []
    for n_new in ([3], [1], [1], [2]):
        for cache in caches:  # A, B, A, B, ...: every WRITE arrives after a step of the other cache
            _run_step(cache, journals, follower, rng, 0, n_new)
            key = journals._keys[cache]
            addresses.append((key, follower.replica._buffers[key]["c"].ctypes.data))
    for cache in caches:
        key, words = journals.take(cache)
        follower.replica.apply(key, words)
        copy = follower.replica.caches[key]
        for a, b in zip(_live(copy), _live(cache), strict=True):
            np.testing.assert_array_equal(a, b)
    by_key = {k: {a for kk, a in addresses if kk == k} for k, _ in addresses}
    assert len(by_key) == 2 and all(len(a) == 1 for a in by_key.values())  # reused across steps of a cache
    assert not set.intersection(*by_key.values())  # and not shared between caches


def test_a_diverged_copy_is_refused() -> None:
    journals, follower = CacheJournals(), _Follower()
    cache = LatentCache(LAYOUT, 2 * 16 * LAYOUT.bytes_per_token, max_rows=2, max_len=16, min_bucket=16)
    cache.add_row()
    key, words = journals.take(cache)
    follower.replica.apply(key, words)
    with pytest.raises(BundleError, match="disagrees with rank 0"):
        follower.replica.feeds(key, 0, np.array([3], np.int64))  # rank 0 says 3 cached tokens, the copy has 0
    cache.write(0, [1], {"c": np.zeros((2, 1, 1, 3), np.float32), "pe": np.zeros((2, 1, 1, 2), np.float32)})
    key, words = journals.take(cache)
    with pytest.raises(BundleError, match="did not run"):
        follower.replica.apply(key, words)  # a write of a step this follower never ran


# ---- e2e: r1c serve on sharded bundles --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_bundles: Any) -> Any:
    return load(tiny_bundles["single"], session_options={"intra_op_num_threads": 1})


def _requests(vocab: int) -> list[tuple[list[int], int]]:
    """Mixed prompt and output lengths; several cross the scheduler's 64-token bucket (a relayout) and finish at
    different steps (row moves)."""
    rng = np.random.default_rng(5)
    lengths = [(3, 12), (50, 30), (1, 20), (20, 5), (40, 40), (7, 1), (60, 10), (12, 25)]
    return [(rng.integers(2, vocab, size=p).tolist(), m) for p, m in lengths]


def _complete(url: str, prompt: list[int], max_tokens: int, stream: bool) -> list[int]:
    c = openai_client(url)
    kw: dict[str, Any] = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                          "extra_body": {"ignore_eos": True}}
    if stream:
        return [t for ch in c.completions.create(stream=True, **kw) for t in ch.choices[0].model_extra["token_ids"]]
    return list(c.completions.create(**kw).choices[0].model_extra["token_ids"])


def _disconnect_midway(url: str, prompt: list[int]) -> None:
    """A streaming request whose client reads its first tokens and then goes away (the server must cancel it)."""
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                      "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        got = b""
        while got.count(b"data: ") < 3:
            got += s.recv(65536)


@pytest.fixture(scope="module", params=["tp2", "ep2"])
def sharded_server(request: pytest.FixtureRequest, tiny_bundles: Any) -> Iterator[str]:
    port = free_port()
    cmd = r1c_cmd("serve", str(tiny_bundles[request.param]), "--port", str(port), "--threads", "1",
                  "--max-num-seqs", "6", "--max-tokens-per-step", "48", "--model-name", "m")
    with server_process(cmd, port) as url:
        yield url


def test_serve_on_a_sharded_bundle_matches_one_rank(sharded_server: str, reference: Any) -> None:
    url = sharded_server
    reqs = _requests(reference.vocab_size)
    want = [reference.generate([p], m)[0] for p, m in reqs]
    cancelled = metric(url, "r1c_requests_cancelled_total")
    with ThreadPoolExecutor(len(reqs) + 1) as pool:  # all at once: more than max_num_seqs, so some wait
        gone = pool.submit(_disconnect_midway, url, reqs[4][0])
        futures = [pool.submit(_complete, url, p, m, i % 2 == 0) for i, (p, m) in enumerate(reqs)]
        got = [f.result(timeout=120) for f in futures]
        gone.result(timeout=120)
    identical = sum(assert_same_greedy(reference, p, g, w) for (p, _), g, w in zip(reqs, got, want))
    assert identical >= len(reqs) - 1  # at most one floating-point tie (serving_helpers.TIE_TOL)
    deadline = time.monotonic() + 30
    while not (metric(url, "r1c_requests_cancelled_total") >= cancelled + 1
               and metric(url, "r1c_running_sequences") == 0 and metric(url, "r1c_cache_used_tokens") == 0):
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.05)
    # after the cancellation freed its rows, the world still serves the same tokens
    assert _complete(url, reqs[1][0], 30, True) == want[1]


def test_serving_engine_api_on_a_sharded_bundle_runs_beside_engine_generate(tiny_bundles: Any,
                                                                             reference: Any) -> None:
    """The Python API in-process: `ServingEngine` and `Engine.generate` share one sharded world (their steps are
    serialised, each cache replayed under its own key)."""
    from r1c.runtime.serving import SamplingParams, SchedulerConfig, ServingEngine

    engine = load(tiny_bundles["tp2"], session_options={"intra_op_num_threads": 1})
    try:
        serving = ServingEngine(engine, SchedulerConfig(max_num_seqs=4, max_tokens_per_step=24, min_bucket=8))
        reqs = _requests(engine.vocab_size)[:5]
        handles = [serving.submit(p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)) for p, m in reqs]
        alone = engine.generate([reqs[0][0]], 12)[0]  # from this thread, while the scheduler thread steps
        got = [h.result(timeout=120).token_ids for h in handles]
        serving.close()
        assert alone == reference.generate([reqs[0][0]], 12)[0]
        for (p, m), g in zip(reqs, got):
            assert_same_greedy(reference, p, g, reference.generate([p], m)[0])
        assert serving.stats()["relayouts"] >= 2
    finally:
        engine.backend.close()


@pytest.mark.slow
def test_dist_serve_bench_script_runs(tmp_path: Any) -> None:
    """`scripts/dist_serve_bench.py` (the measurement in the closing note) end to end on the tiny preset, ~25 s:
    slow because it exports and builds its own bundles and starts its own world."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "dist_serve_bench.py"
    proc = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--layout", "1x2", "--work",
                           str(tmp_path), "--rounds", "1", "--requests", "10", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["1x2"]["relayouts"] >= 1 and summary["1x2"]["control_ms_per_call"] > 0
    assert summary["1x2"]["same_tokens"] >= summary["1x2"]["of"] - 1  # at most one floating-point tie
