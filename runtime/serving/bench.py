"""`r1c bench-serving`: what continuous batching buys and costs, measured on one bundle in one process.

1. Concurrency levels: the same R seeded requests (greedy, fixed prompt and output lengths, no EOS stop) run by
   C closed-loop client threads (each submits its next request when the last one ends) for each C in --streams;
   C = 1 is "one at a time". Per level: output tokens/s (all tokens / wall time, the tail with fewer than C
   streams included) and steady tokens/s (tokens until the last request is submitted / that time: C streams
   busy throughout), TTFT p50/p99, inter-token latency (ITL: every gap between a stream's consecutive tokens)
   p50/p99 and its mean (TPOT). Levels run interleaved round by round (--rounds), so machine drift lands on all
   of them; ratios are taken within a round.
2. A long prompt arriving while one stream runs: the stream's usual gap (median before and after), its gaps
   until the long prompt's first token (p50, p90, p99, max), and the long prompt's TTFT, for each step token
   budget in --chunk-budgets and without chunking (the whole prompt in one step); beside them the p99 and max
   of the stream's own gaps before the arrival (400, fewer when max_model_len is short), over the same usual
   gap (what the machine alone does).
3. The capacity bucket: one decode step of --bucket-rows rows holding ~100 tokens, binding a bucket over the
   longest row versus the whole capacity (max_model_len), interleaved.
4. The C ABI: microseconds per call of r1c_engine_info, r1c_next on a ready event and r1c_submit_ids +
   r1c_cancel + r1c_request_free against the Python calls they wrap, in one process, interleaved
   (`r1c.runtime.capi.callcost`).

Legend: R = requests, C = concurrent streams, TTFT = time to first token, ITL = inter-token latency.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BenchError
from r1c.runtime.bench.stats import parse_int_list
from r1c.runtime.engine import Engine, load
from r1c.runtime.kvcache import LatentCache, budget_for
from r1c.runtime.serving.engine import ServingEngine
from r1c.runtime.serving.request import SchedulerConfig
from r1c.runtime.serving.sampling import SamplingParams
from r1c.runtime.serving.stream import RequestOutput
from r1c.runtime.step import StepRunner

SCHEMA = "r1c-bench-serving/1"


def greedy(max_tokens: int) -> SamplingParams:
    """The benchmark's requests: greedy, exactly `max_tokens` tokens (no EOS stop)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _range(option: str, text: str) -> tuple[int, int]:
    try:
        parts = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise BenchError(f"{option} takes min,max integers, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise BenchError(f"{option} takes min,max with 1 <= min <= max, got {text!r}")
    return parts[0], parts[1]


def _ints(option: str, text: str) -> list[int]:
    values = parse_int_list(option, text)
    if any(v < 1 for v in values):
        raise BenchError(f"{option} takes positive integers, got {text!r}")
    return values


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    streams: list[int]
    n_requests: int
    prompt_len: tuple[int, int]
    new_tokens: tuple[int, int]
    long_prompt: int
    chunk_budgets: list[int]
    capi_calls: int
    rounds: int
    bucket_rows: int
    seed: int

    @classmethod
    def parse(cls, streams: str, n_requests: int, prompt: str, new: str, long_prompt: int, chunk_budgets: str,
              capi_calls: int, rounds: int, bucket_rows: int, seed: int) -> BenchSettings:
        if n_requests < 1 or rounds < 1 or long_prompt < 0 or capi_calls < 0 or bucket_rows < 0:
            raise BenchError("--requests and --rounds must be >= 1; --long-prompt, --capi-calls, --bucket-rows >= 0")
        return cls(_ints("--streams", streams), n_requests, _range("--prompt-len", prompt),
                   _range("--new-tokens", new), long_prompt, _ints("--chunk-budgets", chunk_budgets), capi_calls,
                   rounds, bucket_rows, seed)

    def requests(self, vocab: int) -> list[tuple[list[int], int]]:
        rng = np.random.default_rng(self.seed)
        out = []
        for _ in range(self.n_requests):
            n = int(rng.integers(self.prompt_len[0], self.prompt_len[1] + 1))
            m = int(rng.integers(self.new_tokens[0], self.new_tokens[1] + 1))
            out.append((rng.integers(2, vocab, size=n).tolist(), m))
        return out


def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_level(engine: Engine, config: SchedulerConfig, requests: list[tuple[list[int], int]], streams: int
              ) -> dict[str, Any]:
    """All `requests` through `streams` closed-loop client threads; tokens/s, TTFT and ITL percentiles."""
    cfg = dataclasses.replace(config, max_num_seqs=max(config.max_num_seqs, streams))
    outs: list[RequestOutput] = []
    errors: list[BaseException] = []
    order = itertools.count()
    lock = threading.Lock()
    submitted: list[float] = []
    with ServingEngine(engine, cfg) as se:
        def client() -> None:
            try:
                while (i := next(order)) < len(requests):
                    p, m = requests[i]
                    submitted.append(time.perf_counter())
                    out = se.submit(p, greedy(m)).result()
                    with lock:
                        outs.append(out)
            except BaseException as e:  # reported after the level, not lost in a thread
                errors.append(e)

        threads = [threading.Thread(target=client) for _ in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        steps = se.stats()["steps"]
    if errors:
        raise BenchError(f"benchmark: a request failed at {streams} streams: {errors[0]}")
    tokens = sum(len(o.token_ids) for o in outs)
    ttft = [o.ttft_s for o in outs if o.ttft_s is not None]
    itl = [g for o in outs for g in o.inter_token_s]
    # steady state: from the start to the last submission, every client has a request in flight
    end = max(submitted)
    in_window = sum(1 for o in outs for t in o.token_times if t <= end)
    steady = in_window / (end - t0) if len(requests) > streams > 1 else tokens / wall
    return {"streams": streams, "requests": len(outs), "tokens": tokens, "wall_s": wall, "steps": steps,
            "tok_s": tokens / wall, "steady_tok_s": steady, "ttft_p50_ms": _pct(ttft, 50) * 1e3,
            "ttft_p99_ms": _pct(ttft, 99) * 1e3, "itl_p50_ms": _pct(itl, 50) * 1e3, "itl_p99_ms": _pct(itl, 99) * 1e3,
            "tpot_ms": statistics.fmean(itl) * 1e3 if itl else float("nan")}


def long_prompt_gap(engine: Engine, config: SchedulerConfig, long_len: int, budget: int, seed: int,
                    alone: int = 400) -> dict[str, Any]:
    """One stream runs; a `long_len`-token prompt arrives; the stream's gaps while that prompt is prefilled,
    against its usual gap: the median of its gaps before the arrival (`alone` of them) and in the 0.5 s after
    the prompt's first token. The same percentiles of the stream's gaps before the arrival, over the same usual
    gap (`alone_p99_over_usual`, `alone_p100_over_usual`), say how far the machine alone moves a gap."""
    rng = np.random.default_rng([seed, long_len])
    long_prompt = rng.integers(2, engine.vocab_size, size=long_len).tolist()
    cfg = dataclasses.replace(config, max_tokens_per_step=budget, min_prefill_chunk=1,  # exactly `budget` tokens
                              max_num_seqs=max(config.max_num_seqs, 2))
    with ServingEngine(engine, cfg) as se:
        running = se.submit(rng.integers(2, engine.vocab_size, size=16).tolist(), greedy(se.max_model_len - 16))
        alone = max(12, min(alone, (se.max_model_len - 16) // 4))  # leaves the stream tokens for the rest
        for _ in range(alone + 2):  # its usual pace before
            running.next(timeout=600)
        late = se.submit(long_prompt, greedy(1))
        lout = late.result(timeout=3600)
        t_end = time.perf_counter()
        while running.next(timeout=600) is not None and time.perf_counter() < t_end + 0.5:  # and after
            pass
        running.cancel()
        rout = running.result(timeout=600)
    assert lout.ttft_s is not None
    arrival = lout.token_times[0] - lout.ttft_s
    first = lout.token_times[0]
    pairs = list(itertools.pairwise(rout.token_times))
    usual_gaps = [b - a for a, b in pairs[1:] if b < arrival or a > first + 0.1]  # before and after the prefill
    during = [b - a for a, b in pairs if b > arrival and a < first]
    # steps the prefill spanned: the running stream's tokens released after the arrival, up to the step that gave
    # the long prompt its first token (one release time per step; a step under way at the arrival counts too).
    # Read from the scheduler's own time stamps: a counter read from this thread would race with it.
    steps = sum(1 for t in rout.token_times if arrival < t <= first)
    before = [b - a for a, b in pairs[1:] if b < arrival]
    usual = statistics.median(usual_gaps)
    row: dict[str, Any] = {"budget": budget, "long_prompt": long_len, "usual_gap_ms": usual * 1e3,
                           "long_ttft_s": lout.ttft_s, "steps": steps, "gaps": len(during), "alone_gaps": len(before)}
    for q in (50, 99, 100):
        row[f"alone_p{q}_over_usual"] = _pct(before, q) / usual
    for q in (50, 90, 99, 100):
        row[f"p{q}_gap_ms"] = _pct(during, q) * 1e3
        row[f"p{q}_over_usual"] = _pct(during, q) / usual
    return row


def bucket_effect(engine: Engine, rows: int, filled: int, reps: int = 5) -> dict[str, Any]:
    """One decode step over `rows` rows of `filled` tokens: bound at a bucket over them vs at full capacity."""
    max_len = engine.config.max_position_embeddings
    layout = engine.cache_layout
    caches = {"bucket": LatentCache(layout, budget_for(layout, rows, max_len), max_rows=rows, max_len=max_len),
              "capacity": LatentCache(layout, budget_for(layout, rows, max_len), max_rows=rows, max_len=max_len,
                                      min_bucket=max_len)}
    runners = {}
    for name, cache in caches.items():
        for _ in range(rows):
            cache.add_row()
        cache.lengths[:rows] = filled
        cache.contents_unused = True  # lengths without latents: timing only (a sharded engine copies the lengths)
        cache.resize(filled + 1)
        runners[name] = StepRunner(engine.backend, cache, engine.vocab_size, rows, logits_index=engine.selects_logits)
    ids = np.random.default_rng(0).integers(2, engine.vocab_size, size=(rows, 1))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(reps + 1):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.step(ids, 0, None)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"rows": rows, "filled": filled, "bucket": caches["bucket"].bucket, "capacity": max_len,
            "bucket_ms": med["bucket"], "capacity_ms": med["capacity"], "speedup": med["capacity"] / med["bucket"]}


def capi_costs(bundle: Path, calls: int, log: Callable[[str], None]) -> dict[str, Any]:
    from r1c.runtime.capi.build import build_capi
    from r1c.runtime.capi.callcost import measure

    try:
        inst = build_capi(progress=log)
    except Exception as e:  # no cmake / compiler here: say so in the report
        return {"status": "unavailable", "reason": str(e).splitlines()[0]}
    return {"status": "ok", "library": str(inst.library), "per_call": measure(inst.library, bundle, calls, log=log)}


@dataclasses.dataclass
class Report:
    settings: dict[str, Any]
    bundle: str
    levels: list[dict[str, Any]]
    summary: dict[str, Any]
    long_prompt: list[dict[str, Any]]
    bucket: dict[str, Any] | None
    capi: dict[str, Any] | None
    host: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **dataclasses.asdict(self)}, indent=2) + "\n"

    def table(self) -> str:
        lines = [f"Serving benchmark: {self.bundle}  ({self.settings['n_requests']} requests, prompts "
                 f"{self.settings['prompt_len']}, outputs {self.settings['new_tokens']}, "
                 f"{self.settings['rounds']} round(s); medians over rounds)",
                 "| streams | tok/s | x one-at-a-time | steady tok/s | x | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
                 "| ITL p99 ms | TPOT ms |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for lv in self.summary["levels"]:
            lines.append(f"| {lv['streams']} | {lv['tok_s']:.1f} | {lv['ratio']:.2f} | {lv['steady_tok_s']:.1f} | "
                         f"{lv['steady_ratio']:.2f} | {lv['ttft_p50_ms']:.0f} | "
                         f"{lv['ttft_p99_ms']:.0f} | {lv['itl_p50_ms']:.1f} | {lv['itl_p99_ms']:.1f} | "
                         f"{lv['tpot_ms']:.1f} |")
        for key, text in (("itl_p99_8_over_tpot_1", "p99 ITL at 8 streams / single-stream TPOT"),
                          ("tpot_8_over_tpot_1", "mean ITL (TPOT) at 8 streams / single-stream TPOT"),
                          ("step_bytes_8_over_1", "bytes an 8-row decode step reads / a 1-row step's (this "
                                                  "bundle's roofline: the mean ITL ratio above where decode is "
                                                  "bandwidth-bound and both steps run at the same share of "
                                                  "their floors)")):
            if key in self.summary:
                lines.append(f"{text}: {self.summary[key]:.2f}")
        if self.long_prompt:
            lines += ["", f"A {self.long_prompt[0]['long_prompt']}-token prompt arrives while one stream runs "
                          "(the stream's gaps until that prompt's first token, and its gaps before the prompt "
                          "arrived, over its usual gap):",
                      "| step token budget | usual gap ms | p50 gap | p90 gap | p99 gap | max gap | long prompt TTFT s "
                      "| steps | alone before: p99 / max |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for r in self.long_prompt:
                cells = " | ".join(f"{r[f'p{q}_gap_ms']:.1f} ms ({r[f'p{q}_over_usual']:.1f}x)"
                                   for q in (50, 90, 99, 100))
                alone = (f"{r['alone_p99_over_usual']:.1f}x / {r['alone_p100_over_usual']:.1f}x "
                         f"({r['alone_gaps']} gaps)" if "alone_gaps" in r else "-")
                lines.append(f"| {r['budget']} | {r['usual_gap_ms']:.1f} | {cells} | {r['long_ttft_s']:.1f} | "
                             f"{r['steps']} | {alone} |")
        if self.bucket:
            b = self.bucket
            lines += ["", f"Decode step, {b['rows']} rows of {b['filled']} tokens: bucket {b['bucket']} "
                          f"{b['bucket_ms']:.1f} ms vs whole capacity {b['capacity']} {b['capacity_ms']:.1f} ms "
                          f"({b['speedup']:.2f}x)"]
        if self.capi:
            lines.append("")
            if self.capi["status"] != "ok":
                lines.append(f"C ABI call cost: {self.capi['status']} ({self.capi.get('reason')})")
            else:
                lines += ["C ABI call cost (us per call, CPU time of the calling thread; wall clock in brackets):",
                          "| call | C ABI | Python | added |", "| --- | ---: | ---: | ---: |"]
                names = {"engine_info": "r1c_engine_info", "next_ready": "r1c_next (ready event)",
                         "submit_cancel": "r1c_submit_ids + r1c_cancel + free (queued request)"}
                for k, v in self.capi["per_call"].items():
                    lines.append(f"| {names[k]} | {v['c_us']:.1f} ({v['c_wall_us']:.1f}) | {v['python_us']:.1f} "
                                 f"({v['python_wall_us']:.1f}) | {v['added_us']:.1f} |")
        return "\n".join(lines)


def _summarize(rounds: list[list[dict[str, Any]]]) -> dict[str, Any]:
    by: dict[int, list[dict[str, Any]]] = {}
    ratios: dict[tuple[int, str], list[float]] = {}
    for levels in rounds:
        base = next((lv for lv in levels if lv["streams"] == 1), None)
        for lv in levels:
            by.setdefault(lv["streams"], []).append(lv)
            if base is not None:
                for key in ("tok_s", "steady_tok_s"):
                    ratios.setdefault((lv["streams"], key), []).append(lv[key] / base["tok_s"])
    keys = ("tok_s", "steady_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_ms")
    nan = [float("nan")]
    levels = [{"streams": s, **{k: statistics.median(x[k] for x in lvs) for k in keys},
               "ratio": statistics.median(ratios.get((s, "tok_s"), nan)),
               "steady_ratio": statistics.median(ratios.get((s, "steady_tok_s"), nan))}
              for s, lvs in sorted(by.items())]
    out: dict[str, Any] = {"levels": levels}
    if 1 in by and 8 in by:
        per_round = [r8["itl_p99_ms"] / r1["tpot_ms"] for r1, r8 in zip(by[1], by[8])]
        out["itl_p99_8_over_tpot_1"] = statistics.median(per_round)
        out["tpot_8_over_tpot_1"] = statistics.median(r8["tpot_ms"] / r1["tpot_ms"] for r1, r8 in zip(by[1], by[8]))
    return out


def step_bytes_ratio(engine: Engine, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes one decode step of `rows` rows must read over those of a 1-row step, from the bundle's own weights
    and kernels (`r1c.runtime.bench.roofline`: the routed experts that `rows` tokens touch in expectation, the
    cache at prompt_len + new_tokens / 2). Where decode is bound by memory bandwidth and every step of the
    `rows`-stream run has `rows` rows, the mean inter-token gap at `rows` streams over the single-stream TPOT
    equals this ratio when both steps run at the same share of their floors (lower only if the larger step is
    the closer to its floor). A model whose weights fit in cache (the tiny preset) is not bound by it."""
    from r1c.runtime.bench.roofline import bundle_reads, decode_floor

    reads, _ = bundle_reads(engine.bundle_dir, engine.manifest)

    def step_bytes(b: int) -> float:
        return decode_floor(reads, engine.config, b, prompt_len, new_tokens, bandwidth=1.0).bytes_active

    return step_bytes(rows) / step_bytes(1)


def run_bench(bundle: Path, config: SchedulerConfig, settings: BenchSettings, *, threads: int | None = None,
              log: Callable[[str], None] = print) -> Report:
    engine = load(bundle, session_options=None if threads is None else {"intra_op_num_threads": threads})
    if not isinstance(engine, Engine):
        raise BenchError("benchmark: serving needs an r1c bundle with a latent cache (not a foreign model's)")
    requests = settings.requests(engine.vocab_size)
    longest = settings.prompt_len[1] + settings.new_tokens[1]
    if longest > engine.config.max_position_embeddings:
        raise BenchError(f"benchmark: prompt + output up to {longest} tokens exceed the model's "
                         f"max_position_embeddings ({engine.config.max_position_embeddings})")
    if settings.long_prompt and settings.long_prompt + 32 > engine.config.max_position_embeddings:
        raise BenchError(f"benchmark: --long-prompt {settings.long_prompt} does not fit the model's "
                         f"max_position_embeddings ({engine.config.max_position_embeddings}); 0 skips it")
    log("warm-up")
    run_level(engine, config, requests[:4], 2)
    rounds = []
    for r in range(settings.rounds):
        levels = []
        for s in settings.streams:
            log(f"round {r + 1}/{settings.rounds}: {s} stream(s)")
            levels.append(run_level(engine, config, requests, s))
            log(f"  {levels[-1]['tok_s']:.1f} tok/s, ITL p99 {levels[-1]['itl_p99_ms']:.1f} ms")
        rounds.append(levels)
    long_rows = []
    if settings.long_prompt:
        by_budget: dict[int, list[dict[str, Any]]] = {}
        for r in range(settings.rounds):  # interleaved like the levels
            for budget in [*settings.chunk_budgets, settings.long_prompt + 1]:
                log(f"round {r + 1}/{settings.rounds}: long prompt, step budget {budget}")
                by_budget.setdefault(budget, []).append(
                    long_prompt_gap(engine, config, settings.long_prompt, budget, settings.seed))
        long_rows = [{k: (statistics.median(x[k] for x in rows) if isinstance(rows[0][k], float) else rows[0][k])
                      for k in rows[0]} for rows in by_budget.values()]
    bucket = None
    if settings.bucket_rows:
        log("capacity bucket vs whole capacity")
        bucket = bucket_effect(engine, settings.bucket_rows, 100)
    capi = None
    if settings.capi_calls:
        log("C ABI call cost")
        capi = capi_costs(bundle, settings.capi_calls, log)
    host = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg": os.getloadavg(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    cfg = dataclasses.asdict(config)
    summary = _summarize(rounds)
    if "tpot_8_over_tpot_1" in summary:
        summary["step_bytes_8_over_1"] = step_bytes_ratio(engine, 8, sum(settings.prompt_len) // 2,
                                                          sum(settings.new_tokens) // 2)
    return Report(settings={**dataclasses.asdict(settings), "scheduler": cfg, "threads": threads},
                  bundle=str(bundle), levels=[lv for levels in rounds for lv in levels], summary=summary,
                  long_prompt=long_rows, bucket=bucket, capi=capi, host=host)
