"""e2e tier: the serving scheduler on the tiny preset — continuous batching against `Engine.generate` alone,
threads and asyncio, cancellation, back-pressure, chunked prefill, stops, text and chat.

Greedy references: each request run alone through `Engine.generate` (the existing single-caller path); tokens must
be identical except at a float tie (serving_helpers.TIE_TOL, see there).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import assert_same_greedy, mixed_requests, text_bundle

from r1c.errors import RuntimeInputError
from r1c.runtime import load
from r1c.runtime.serving import OverCapacityError, SamplingParams, SchedulerConfig, ServingEngine

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(bundle: Path):  # type: ignore[no-untyped-def]
    return load(bundle, session_options={"intra_op_num_threads": 1})


def wait_until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_64_concurrent_mixed_requests_match_alone(engine) -> None:  # type: ignore[no-untyped-def]
    reqs = mixed_requests(64, engine.vocab_size, seed=1)
    want = [engine.generate([p], m)[0] for p, m in reqs]
    handles: list = [None] * len(reqs)
    with ServingEngine(engine, SchedulerConfig(max_num_seqs=64, max_tokens_per_step=48, min_bucket=16)) as se:
        def submit(i: int) -> None:
            p, m = reqs[i]
            handles[i] = se.submit(p, SamplingParams(max_tokens=m, **GREEDY))

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        outs = [h.result(timeout=120) for h in handles]
        stats = se.stats()
    identical = sum(assert_same_greedy(engine, p, o.token_ids, w) for (p, _), o, w in zip(reqs, outs, want))
    assert identical >= len(reqs) - 1  # a float tie is rare; more than one would mean a real difference
    assert all(o.finish_reason == "length" for o in outs)
    assert stats["finished"] == 64 and stats["running"] == 0 and stats["cache_used_tokens"] == 0


def test_requests_share_steps(engine) -> None:  # type: ignore[no-untyped-def]
    """Continuous batching: 16 requests of 40 tokens each take about 40 steps together, not 640."""
    reqs = [(p, 40) for p, _ in mixed_requests(16, engine.vocab_size, seed=5)]
    with ServingEngine(engine, SchedulerConfig(max_num_seqs=16, min_bucket=16)) as se:
        outs = [h.result(60) for h in [se.submit(p, SamplingParams(max_tokens=m, **GREEDY)) for p, m in reqs]]
        steps = se.stats()["steps"]
    assert all(len(o.token_ids) == 40 for o in outs)
    assert steps < 640 / 4  # the requests' steps overlap (however their submissions interleave with steps)


def test_asyncio_callers_stream_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    reqs = mixed_requests(8, engine.vocab_size, seed=2)
    with ServingEngine(engine, SchedulerConfig(max_num_seqs=8, min_bucket=16)) as se:
        async def one(p: list[int], m: int) -> list[int]:
            h = se.submit(p, SamplingParams(max_tokens=m, **GREEDY))
            return [ev.token_id async for ev in h]

        async def main() -> list[list[int]]:
            return await asyncio.wait_for(asyncio.gather(*(one(p, m) for p, m in reqs)), 60)

        got = asyncio.run(main())
    for (p, m), g in zip(reqs, got):
        assert len(g) == m
        assert_same_greedy(engine, p, g, engine.generate([p], m)[0])


def test_cancel_frees_the_cache_at_once(engine) -> None:  # type: ignore[no-untyped-def]
    with ServingEngine(engine, SchedulerConfig(max_num_seqs=4, min_bucket=16)) as se:
        h = se.submit(list(range(2, 40)), SamplingParams(max_tokens=400, **GREEDY))
        assert h.next(timeout=20) is not None and h.next(timeout=20) is not None
        assert se.stats()["cache_used_tokens"] > 38
        h.cancel()
        events = list(h)
        assert events and events[-1].finish_reason == "cancelled"
        assert len(h.result(5).token_ids) < 400
        wait_until(lambda: se.stats()["running"] == 0 and se.stats()["cache_used_tokens"] == 0, 5)
        assert se.stats()["cancelled"] == 1


def test_full_cache_waits_then_runs_and_refuses_what_never_fits(engine) -> None:  # type: ignore[no-untyped-def]
    layout = engine.cache_layout
    cfg = SchedulerConfig(max_num_seqs=8, min_bucket=16, cache_bytes=64 * layout.bytes_per_token, max_queue=6)
    reqs = mixed_requests(6, engine.vocab_size, seed=3)
    reqs = [(p[:20], 12) for p, _ in reqs]  # each needs <= 32 tokens: two fit in the 64-token cache at once
    with ServingEngine(engine, cfg) as se:
        handles = [se.submit(p, SamplingParams(max_tokens=m, **GREEDY)) for p, m in reqs]
        peak_waiting = 0
        while not all(h._req.stream.ended for h in handles):
            st = se.stats()
            peak_waiting = max(peak_waiting, st["waiting"])
            assert st["running"] <= 2 and st["cache_reserved_tokens"] <= 64
            time.sleep(0.005)
        outs = [h.result(60) for h in handles]
        assert peak_waiting >= 1  # back-pressure: requests queued while the cache was full
        for (p, m), o in zip(reqs, outs):
            assert_same_greedy(engine, p, o.token_ids, engine.generate([p], m)[0])
        with pytest.raises(OverCapacityError, match="more than the cache holds"):
            se.submit(list(range(2, 60)), SamplingParams(max_tokens=20))
        blockers = []
        with pytest.raises(OverCapacityError, match="requests are waiting"):
            for _ in range(20):  # 2 run, max_queue = 6 wait, then the queue is full
                blockers.append(se.submit([5] * 20, SamplingParams(max_tokens=12)))
        assert len(blockers) >= 6
        for b in blockers:
            b.cancel()
        assert all(b.result(20).finish_reason in ("cancelled", "length") for b in blockers)


def test_chunked_prefill_keeps_running_streams_going(engine) -> None:  # type: ignore[no-untyped-def]
    cfg = SchedulerConfig(max_num_seqs=4, max_tokens_per_step=16, min_prefill_chunk=8, min_bucket=16)
    long_prompt = np.random.default_rng(4).integers(2, engine.vocab_size, size=300).tolist()
    with ServingEngine(engine, cfg) as se:
        running = se.submit([7, 8, 9], SamplingParams(max_tokens=200, **GREEDY))
        assert running.next(timeout=20) is not None
        late = se.submit(long_prompt, SamplingParams(max_tokens=2, **GREEDY)).result(60)
        running.cancel()
        ran = running.result(20)
    arrival = late.token_times[0] - late.ttft_s
    meanwhile = [t for t in ran.token_times if arrival <= t <= late.token_times[0]]
    # the 300-token prompt ran in chunks of 15 (16 - one decode row): >= 20 steps, each also gave the running
    # stream a token, instead of one long step during which it got none
    assert len(meanwhile) >= 300 // 15 - 1
    assert_same_greedy(engine, long_prompt, late.token_ids, engine.generate([long_prompt], 2)[0])
    # the running stream shared its calls with the chunks (one padded call per step): its tokens are unchanged
    assert_same_greedy(engine, [7, 8, 9], ran.token_ids, engine.generate([[7, 8, 9]], len(ran.token_ids))[0])


def test_stops_and_max_tokens(engine, bundle: Path) -> None:  # type: ignore[no-untyped-def]
    prompt = [11, 12, 13, 14]
    ref = engine.generate([prompt], 12)[0]
    with ServingEngine(engine, SchedulerConfig(max_num_seqs=4, min_bucket=16)) as se:
        out = se.submit(prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(ref[4],))).result(30)
        k = ref.index(ref[4])
        assert out.token_ids == ref[:k + 1] and out.finish_reason == "stop"
        full = se.submit(prompt, SamplingParams(max_tokens=12, **GREEDY)).result(30)
        assert full.finish_reason == "length" and full.token_ids == ref
        stop = full.text[len(full.text) // 2:][:3]
        cut = se.submit(prompt, SamplingParams(max_tokens=12, temperature=0, stop=(stop,))).result(30)
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
        with pytest.raises(RuntimeInputError, match="maximum context length"):
            se.submit(prompt, SamplingParams(max_tokens=engine.config.max_position_embeddings))
        with pytest.raises(RuntimeInputError, match="out of range"):
            se.submit([engine.vocab_size], SamplingParams())
        with pytest.raises(RuntimeInputError, match="top_p"):
            se.submit(prompt, SamplingParams(top_p=0.0))
        for stop_id in (engine.vocab_size, -1):  # stop ids must be tokens of the model
            with pytest.raises(RuntimeInputError, match=f"stop token id {stop_id} is out of range"):
                se.submit(prompt, SamplingParams(stop_token_ids=(ref[0], stop_id)))


def test_text_prompt_streams_text_and_chat_template(engine) -> None:  # type: ignore[no-untyped-def]
    # export copied the checkpoint's tokenizer files, build copied them into the bundle and hashed them
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(engine.manifest.files)
    assert (engine.bundle_dir.parent / "export" / "tokenizer.json").is_file()
    with ServingEngine(engine, SchedulerConfig(max_num_seqs=4, min_bucket=16)) as se:
        ids = se.tokenize("the quick brown fox")
        assert ids[0] == 0  # <bos> from the tokenizer's post-processor
        h = se.submit("the quick brown fox", SamplingParams(max_tokens=10, **GREEDY))
        pieces = [ev.text for ev in h]
        out = h.result(5)
        assert out.prompt_ids == ids and out.token_ids == engine.generate([ids], 10)[0]
        assert "".join(pieces) == out.text == se.codec.decode(out.token_ids)
        chat = se.chat_prompt([{"role": "user", "content": "hex the fox"}])
        assert se.codec.decode(chat, skip_special_tokens=False) == "<bos><|user|>hex the fox\n<|assistant|>"


def test_step_bytes_ratio_grows_with_the_experts_rows_touch(engine) -> None:  # type: ignore[no-untyped-def]
    """The roofline ratio bench-serving prints beside the 8-stream ITL: 1 for one row; for more rows above 1 and
    at most the row count (the dense weights are shared); the routed experts' share grows as E (1 - (1 - k/E)^B)
    (tiny preset: 16 experts, top 4), so 8 rows read less than 8 times the bytes but more than 2 rows do."""
    from r1c.runtime.serving.bench import step_bytes_ratio

    r1, r2, r8 = (step_bytes_ratio(engine, b, 8, 8) for b in (1, 2, 8))
    assert r1 == pytest.approx(1.0)
    assert 1.0 < r2 < r8 < 8.0


def test_bench_serving_runs_and_reports(bundle: Path) -> None:
    """The benchmark's code paths on a toy size (its numbers come from `r1c bench-serving`, not from tests)."""
    from r1c.runtime.serving.bench import BenchSettings, run_bench

    settings = BenchSettings.parse("1,2", 4, "4,8", "2,4", 40, "9", 0, 1, 2, 0)
    report = run_bench(bundle, SchedulerConfig(min_bucket=16), settings, threads=1, log=lambda s: None)
    assert [lv["streams"] for lv in report.summary["levels"]] == [1, 2]
    assert all(lv["tokens"] >= 8 and lv["tok_s"] > 0 for lv in report.levels)
    assert [r["budget"] for r in report.long_prompt] == [9, 41]
    # chunked (8 prompt tokens beside the running row's 1 a step: 5 steps) vs one piece (1 step); a step under way
    # when the prompt arrives counts too
    assert 40 // 8 <= report.long_prompt[0]["steps"] <= 40 // 8 + 1
    assert 1 <= report.long_prompt[1]["steps"] <= 2
    # the stream's own gaps before the arrival, over its usual gap: at least the 12 kept for that median
    assert all(r["alone_gaps"] >= 12 and 0 < r["alone_p50_over_usual"] <= r["alone_p99_over_usual"]
               <= r["alone_p100_over_usual"] for r in report.long_prompt)
    assert report.bucket is not None and report.bucket["bucket"] < report.bucket["capacity"]
    assert "x one-at-a-time" in report.table() and '"schema"' in report.to_json()
