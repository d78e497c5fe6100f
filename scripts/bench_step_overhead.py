#!/usr/bin/env python
"""Per-step Python overhead of r1c's decode step on ONNX Runtime, bindings made once vs every step (issue 11, item 3).

Five things are timed in one process, interleaved round by round (one block of each per round), on one bundle:

  bare           `session.run_with_iobinding(binding)` on a binding made once over a step runner's own buffers
                 (its cache views, logits and new-latent buffers): the graph alone, no Python of r1c's;
  step           `StepRunner.step(ids, 0, ones)` with bindings made once per step shape (the default): ids and
                 lengths copied into the runner's buffers, the `IOBinding` of the shape's key reused, the new
                 latents written into the cache;
  step-fresh     the same runner with `bind_once=False`: a new `StepIO` (cache views, output views) and every
                 input and output bound again each step — the path before this change;
  generate       one decode step of `Engine.generate` (prompt of --prompt-len tokens, batch B; its `on_step`
                 marks): the whole greedy loop per token (bucket check, step, argmax on the logits view, lists);
  generate-fresh the same with the runner's `bind_once=False` and the logits copied to the host before the argmax
                 (`to_host`, as the loop did before; the rest of the loop is the current one).

Per path: its median step time; its overhead over bare (median minus bare's median, with a 95% paired bootstrap
interval over the rounds, `r1c.runtime.bench.stats.paired_diff_ci`); and the time a step spends outside
`run_with_iobinding` (median with its interval, `stats.median_ci`; the session is wrapped by a timer, so both parts
come from the same steps: the most direct measure of the Python around the run). Before vs
after: ratio of medians step-fresh / step and generate-fresh / generate with 95% paired bootstrap intervals
(`r1c.runtime.bench.stats.ratio_of_medians`). Clock: process CPU time by default (at one thread it leaves out the
time other processes hold the core on a shared machine, though not their memory stalls), or the wall clock.
The load average (1 min) is sampled every round and reported.

Usage: python scripts/bench_step_overhead.py BUNDLE [--batch 1,8] [--threads 1] [--steps 32] [--rounds 9]
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

PATHS = ("bare", "step", "step-fresh", "generate", "generate-fresh")
TIMED = PATHS[1:]  # paths whose time outside run_with_iobinding is measured


def bare_binding(session: Any, runner: Any, batch: int) -> Any:
    """A binding over the runner's own buffers for a [batch, 1] decode step of rows [0, batch) (made once)."""
    io = runner.io(0, batch, 1)
    binding = session.io_binding()
    for name, arr in io.feeds().items():
        binding.bind_input(name, "cpu", 0, arr.dtype.type, arr.shape, arr.ctypes.data)
    for name, arr in io.outputs().items():
        binding.bind_output(name, "cpu", 0, arr.dtype.type, arr.shape, arr.ctypes.data)
    return binding


class TimedSession:
    """The session with `run_with_iobinding` timed (the backend's other calls pass through)."""

    def __init__(self, inner: Any, now: Callable[[], float]) -> None:
        self.inner, self.now, self.inside = inner, now, 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run_with_iobinding(self, binding: Any, run_options: Any = None) -> None:
        t0 = self.now()
        self.inner.run_with_iobinding(binding, run_options)
        self.inside += self.now() - t0


@contextlib.contextmanager
def fresh_generate(engine: Any) -> Iterator[None]:
    """`engine.generate` as before bindings were kept: runners with bind_once=False, logits copied to the host."""
    import r1c.runtime.engine as engine_module
    from r1c.runtime.step import to_host

    make = engine._runner

    def runner(*args: Any) -> Any:
        r = make(*args)
        r.bind_once = False
        return r

    engine._runner, host_view = runner, engine_module.host_view
    engine_module.host_view = to_host  # type: ignore[assignment]
    try:
        yield
    finally:
        del engine._runner
        engine_module.host_view = host_view  # type: ignore[assignment]


def measure(bundle: Path, batch: int, threads: int, prompt_len: int, steps: int, rounds: int, clock: str
            ) -> dict[str, Any]:
    from r1c.runtime import load
    from r1c.runtime.bench.stats import median_ci, paired_diff_ci, ratio_of_medians
    from r1c.runtime.engine import Engine

    now = time.process_time if clock == "cpu" else time.perf_counter
    # ONNX Runtime's step path (what this measures; the native decoder's steps bind nothing, r1c.runtime.native_decode)
    engine = load(bundle, session_options={"intra_op_num_threads": threads, "native_decode": False})
    if not isinstance(engine, Engine) or not hasattr(engine.backend, "session"):
        raise click.ClickException(f"{bundle}: an r1c ONNX Runtime bundle is needed (not foreign, not sharded)")
    session = engine.backend.session
    timed = TimedSession(session, now)
    engine.backend.session = timed
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, engine.vocab_size, size=(batch, prompt_len))
    runner = engine._runner(batch, prompt_len + steps + 1, batch * prompt_len, 64)
    cache = runner.cache
    for _ in range(batch):
        cache.add_row()
    cache.resize(prompt_len + steps + 1)  # the bucket generate() decodes in: the same attention width everywhere
    runner.step(prompts, 0, np.full(batch, prompt_len, np.int64))
    ids = rng.integers(2, engine.vocab_size, size=(batch, 1)).astype(np.int64)
    io = runner.io(0, batch, 1)
    io.input_ids[...] = ids
    io.past_lengths[...] = prompt_len
    if io.logits_index is not None:  # a decode step's one position per row (what StepRunner.step writes)
        io.logits_index[...] = 0
    binding = bare_binding(session, runner, batch)
    ones = np.ones(batch, np.int64)
    samples: dict[str, list[float]] = {p: [] for p in PATHS}
    outside: dict[str, list[float]] = {p: [] for p in TIMED}

    def bare() -> float:
        t0 = now()
        for _ in range(steps):
            session.run_with_iobinding(binding)
        return (now() - t0) / steps

    def via_runner(bind_once: bool, name: str) -> float:
        runner.bind_once = bind_once
        cache.lengths[:batch] = prompt_len
        t0, in0 = now(), timed.inside
        for _ in range(steps):
            runner.step(ids, 0, ones)
        total = (now() - t0) / steps
        outside[name].append(total - (timed.inside - in0) / steps)
        return total

    def via_generate(name: str) -> float:
        marks: list[tuple[float, float]] = []
        engine.generate(prompts.tolist(), steps + 1, on_step=lambda s, t: marks.append((now(), timed.inside)))
        n = len(marks) - 1  # decode steps only (mark 0 ends the prefill)
        total = (marks[-1][0] - marks[0][0]) / n
        outside[name].append(total - (marks[-1][1] - marks[0][1]) / n)
        return total

    def via_generate_fresh() -> float:
        with fresh_generate(engine):
            return via_generate("generate-fresh")

    paths: dict[str, Callable[[], float]] = {
        "bare": bare, "step": lambda: via_runner(True, "step"), "step-fresh": lambda: via_runner(False, "step-fresh"),
        "generate": lambda: via_generate("generate"), "generate-fresh": via_generate_fresh}
    loads: list[float] = []
    gc.disable()
    try:
        for r in range(rounds + 1):
            loads.append(os.getloadavg()[0])
            for name, fn in paths.items():
                t = fn()
                if r:  # round 0 warms up
                    samples[name].append(t)
                elif name in outside:
                    outside[name].pop()
    finally:
        gc.enable()
        runner.bind_once = True
    out: dict[str, Any] = {"batch": batch, "threads": threads, "prompt_len": prompt_len, "steps": steps,
                           "rounds": rounds, "clock": clock, "bucket": cache.bucket,
                           "load_1min": [min(loads), max(loads)]}
    out["bare_ms"] = float(np.median(samples["bare"])) * 1e3
    for name in TIMED:
        out[name] = {"ms": float(np.median(samples[name])) * 1e3,
                     "overhead_us": [v * 1e6 for v in paired_diff_ci(samples[name], samples["bare"])],
                     "outside_us": [v * 1e6 for v in median_ci(outside[name])]}
    for before, after in (("step-fresh", "step"), ("generate-fresh", "generate")):
        ci = ratio_of_medians(samples[before], samples[after], paired=True)
        out[f"{before}/{after}"] = [ci.ratio, ci.low, ci.high]
    out["samples_ms"] = {k: [v * 1e3 for v in vs] for k, vs in samples.items()}
    out["outside_us"] = {k: [v * 1e6 for v in vs] for k, vs in outside.items()}
    return out


def _ci(v: Sequence[float], fmt: str = ".0f") -> str:
    return f"{v[0]:{fmt}} [{v[1]:{fmt}}, {v[2]:{fmt}}]"


def _ints(ctx: click.Context, param: click.Parameter, text: str) -> list[int]:
    from r1c.errors import BenchError
    from r1c.runtime.bench.stats import parse_int_list

    try:
        return parse_int_list(f"--{param.name}", text)
    except BenchError as e:
        raise click.BadParameter(str(e)) from None


@click.command(help=(__doc__ or "").split("\n\n")[0])
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--batch", default="1,8", callback=_ints, help="batch sizes, comma-separated")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="ONNX Runtime intra-op threads (0: one per physical core)")
@click.option("--prompt-len", default=32, show_default=True, help="prompt tokens per row (prefilled once)")
@click.option("--steps", default=32, show_default=True, help="decode steps per path and round")
@click.option("--rounds", default=9, show_default=True, help="timed rounds (after one warm-up round)")
@click.option("--clock", type=click.Choice(["cpu", "wall"]), default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write every sample here")
def main(bundle: Path, batch: list[int], threads: int, prompt_len: int, steps: int, rounds: int, clock: str,
         json_path: Path | None) -> None:
    rows = [measure(bundle, b, threads, prompt_len, steps, rounds, clock) for b in batch]
    click.echo(f"{bundle} ({clock} clock, {threads} thread(s)); per decode step, medians of {rounds} rounds x "
               f"{steps} steps, [95% intervals]; overhead = path median - bare median")
    click.echo("| batch | load 1 min | bare run ms | path | step ms | overhead us | outside the run us | "
               "before / after |")
    click.echo("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        for name in TIMED:
            ratio = r.get(f"{name}/{name.removesuffix('-fresh')}") if name.endswith("-fresh") else None
            click.echo(f"| {r['batch']} | {r['load_1min'][0]:.2f}-{r['load_1min'][1]:.2f} | {r['bare_ms']:.3f} | "
                       f"{name} | {r[name]['ms']:.3f} | {_ci(r[name]['overhead_us'])} | "
                       f"{_ci(r[name]['outside_us'])} | {_ci(ratio, '.3f') if ratio else ''} |")
    if json_path:
        json_path.write_text(json.dumps({"bundle": str(bundle), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
