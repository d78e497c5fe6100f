"""The latency benchmark: time greedy generation over a grid of (batch, prompt length, new tokens).

One *sample* is one `generate` call of B prompts of P random token ids for N new tokens (no EOS stop):
    ttft_s   time to first token: the call's start to the end of the prefill step (step 0);
    tpot_s   time per output token: the mean decode step, (last step - first step) / (steps - 1);
    e2e_s    the whole call; throughput = B * N / e2e_s output tokens per second.
Every system (the bundle, a second bundle, the peers) is warmed up, then timed in rounds: one sample of each
system per round (ABAB...), so slow drift of the machine (other processes, clocks, thermals) lands on all of
them alike. Raw samples are kept (`report.py` writes them; `compare.py` gates against them).

Legend: B = batch, P = prompt length, N = new tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from r1c.errors import BenchError
from r1c.runtime.bench.stats import Summary, median_rel_halfwidth

logger = logging.getLogger(__name__)

METRICS = ("ttft_s", "tpot_s", "e2e_s")  # raw per-sample latencies, seconds
THROUGHPUT = "throughput_tok_s"  # derived per sample: B * N / e2e_s
STEADY_REL_HALFWIDTH = 0.02  # budget mode stops once every median's 95% CI is within +-2%

StepCallback = Callable[[int, np.ndarray], None]
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class Generator(Protocol):
    """What the benchmark times: `r1c.runtime.Engine` and every peer have this `generate`."""

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_step: StepCallback | None = None) -> list[list[int]]: ...


@dataclasses.dataclass(frozen=True, order=True)
class Workload:
    batch: int
    prompt_len: int
    new_tokens: int

    @property
    def key(self) -> str:
        return f"b{self.batch}_p{self.prompt_len}_n{self.new_tokens}"

    def prompts(self, vocab_size: int, seed: int) -> list[list[int]]:
        """Seeded random ids in [2, V) (0 and 1 are the presets' bos/eos), the same for every system."""
        rng = np.random.default_rng([seed, self.batch, self.prompt_len])
        ids: list[list[int]] = rng.integers(2, vocab_size, size=(self.batch, self.prompt_len)).tolist()
        return ids


def grid(batches: Sequence[int], prompt_lens: Sequence[int], new_tokens: Sequence[int]) -> list[Workload]:
    if not batches or not prompt_lens or not new_tokens:
        raise BenchError("benchmark: the grid needs at least one batch size, prompt length and output length")
    for name, values in (("--batch", batches), ("--prompt-len", prompt_lens), ("--new-tokens", new_tokens)):
        if any(v < 1 for v in values):
            raise BenchError(f"benchmark: {name} values must be >= 1, got {list(values)}")
    return sorted(Workload(b, p, n) for b in dict.fromkeys(batches) for p in dict.fromkeys(prompt_lens)
                  for n in dict.fromkeys(new_tokens))


@dataclasses.dataclass
class System:
    """One thing to time. `generator` is None when it could not be set up (`unavailable` says why)."""

    name: str
    generator: Generator | None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    unavailable: str | None = None
    required: bool = False  # a failure of a required system (the bundle under test) aborts the benchmark


@dataclasses.dataclass
class Series:
    """All samples of one system on one workload."""

    system: str
    workload: Workload
    samples: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {m: [] for m in METRICS})
    tokens: list[list[int]] | None = None  # the first (warm-up) call's output, to check peers agree
    unavailable: str | None = None

    @property
    def ok(self) -> bool:
        return self.unavailable is None and bool(self.samples["e2e_s"])

    def throughput(self) -> list[float]:
        w = self.workload
        return [w.batch * w.new_tokens / t for t in self.samples["e2e_s"]]

    def summary(self) -> dict[str, Summary]:
        out = {m: Summary.of(v) for m, v in self.samples.items() if v}
        if self.samples["e2e_s"]:
            out[THROUGHPUT] = Summary.of(self.throughput())
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"system": self.system, **dataclasses.asdict(self.workload), "key": self.workload.key,
                             "status": "ok" if self.ok else "unavailable", "reason": self.unavailable}
        if self.ok:
            d["samples"] = {m: v for m, v in self.samples.items() if v}
            d["summary"] = {m: s.to_dict() for m, s in self.summary().items()}
        return d


@dataclasses.dataclass(frozen=True)
class Settings:
    warmup: int = 2
    repeat: int = 10  # timed rounds per workload, at least
    budget_s: float = 0.0  # then more rounds until the medians are steady or this many seconds per workload pass
    seed: int = 0
    max_rounds: int = 1000
    # "wall": time.perf_counter; "cpu": time.process_time, the CPU time of the whole process (all its threads): on
    # a shared machine a single-threaded system's CPU time does not count the time other processes took its
    # core (it still counts the memory stalls they cause); with several threads it also counts their spinning.
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise BenchError(f"benchmark: --warmup must be >= 0, got {self.warmup}")
        if self.repeat < 3:
            raise BenchError(f"benchmark: --repeat must be >= 3 (a median needs samples), got {self.repeat}")
        if self.budget_s < 0:
            raise BenchError(f"benchmark: --budget must be >= 0 seconds, got {self.budget_s:g}")
        if self.clock not in CLOCKS:
            raise BenchError(f"benchmark: unknown clock {self.clock!r} (choose from {', '.join(CLOCKS)})")


def time_generate(gen: Generator, prompts: Sequence[Sequence[int]], new_tokens: int, clock: str = "wall"
                  ) -> tuple[dict[str, float], list[list[int]]]:
    """One timed `generate` call: its ttft/tpot/e2e in seconds (of `clock`, see Settings) and its tokens."""
    marks: list[float] = []
    now = CLOCKS[clock]

    def on_step(step: int, tokens: np.ndarray) -> None:
        marks.append(now())

    t0 = now()
    out = gen.generate(prompts, new_tokens, eos_token_id=None, on_step=on_step)
    t1 = now()
    if not marks:
        raise BenchError("benchmark: generate never reported a step (on_step was not called)")
    sample = {"ttft_s": marks[0] - t0, "e2e_s": t1 - t0}
    if len(marks) > 1:
        sample["tpot_s"] = (marks[-1] - marks[0]) / (len(marks) - 1)
    return sample, out


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection while timing (a collection inside a sample is noise, not the system's latency);
    the caller collects between workloads."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _progress(total: int | None, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="call", dynamic_ncols=True, leave=False)


def run_bench(systems: Sequence[System], workloads: Sequence[Workload], vocab_size: int, settings: Settings,
              *, progress: bool = False) -> list[Series]:
    """Warm up and time every available system on every workload, interleaved round by round."""
    live = [s for s in systems if s.generator is not None]
    total = None if settings.budget_s else len(workloads) * len(live) * (settings.warmup + settings.repeat)
    series: list[Series] = []
    with _progress(total, progress) as bar, gc_paused():
        for w in workloads:
            gc.collect()
            prompts = w.prompts(vocab_size, settings.seed)
            rows = {s.name: Series(s.name, w, unavailable=s.unavailable) for s in systems}
            series.extend(rows.values())
            active = [s for s in live if rows[s.name].unavailable is None]
            bar.set_postfix_str(f"B={w.batch} P={w.prompt_len} N={w.new_tokens}")
            for s in active:
                for i in range(settings.warmup):
                    _sample(s, rows[s.name], prompts, w.new_tokens, keep=False, first=i == 0, clock=settings.clock)
                    bar.update()
            active = [s for s in active if rows[s.name].unavailable is None]
            start = time.perf_counter()
            rounds = 0
            while active and rounds < settings.max_rounds:
                if rounds >= settings.repeat and (time.perf_counter() - start >= settings.budget_s
                                                  or _steady(rows[s.name] for s in active)):
                    break
                for s in active:
                    _sample(s, rows[s.name], prompts, w.new_tokens, keep=True, first=settings.warmup == 0
                            and rounds == 0, clock=settings.clock)
                    bar.update()
                active = [s for s in active if rows[s.name].unavailable is None]
                rounds += 1
            logger.info("%s: %d rounds in %.1f s", w.key, rounds, time.perf_counter() - start)
    return series


def _sample(s: System, row: Series, prompts: list[list[int]], new_tokens: int, *, keep: bool, first: bool,
            clock: str = "wall") -> None:
    assert s.generator is not None
    try:
        sample, tokens = time_generate(s.generator, prompts, new_tokens, clock)
    except BenchError:
        raise
    except Exception as e:  # a peer that fails mid-run becomes an "unavailable" row, not a crash
        if s.required:
            raise
        row.unavailable = f"failed while running: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        for values in row.samples.values():
            values.clear()
        logger.warning("%s: %s", s.name, row.unavailable)
        return
    if first:
        row.tokens = tokens
    if keep:
        for m, v in sample.items():
            row.samples[m].append(v)


def _steady(rows: Any) -> bool:
    return all(median_rel_halfwidth(r.samples["e2e_s"]) <= STEADY_REL_HALFWIDTH for r in rows)
