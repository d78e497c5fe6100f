"""The latency benchmark: time greedy generation over a grid of (batch, prompt length, new tokens).

One *sample* is one `generate` call of B prompts of P random token ids for N new tokens (no EOS stop):
    ttft_s   time to first token: the call's start to the end of the prefill step (step 0);
    tpot_s   time per output token: the mean decode step, (last step - first step) / (steps - 1);
    e2e_s    the whole call; throughput = B * N / e2e_s output tokens per second.
Every system (the bundle, a second bundle, the peers) is warmed up, then timed in rounds: one sample of each
system per round (ABAB...), so slow drift of the machine (other processes, clocks, thermals) lands on all of
them alike. Raw samples are kept: the JSON report is also a baseline for the regression gate.

Legend: B = batch, P = prompt length, N = new tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from r1c.errors import BenchError
from r1c.runtime.bench_stats import (
    GATE_RULE,
    RatioCI,
    Summary,
    is_improvement,
    is_regression,
    median_rel_halfwidth,
    ratio_of_medians,
)

logger = logging.getLogger(__name__)

SCHEMA = "r1c-bench/1"
METRICS = ("ttft_s", "tpot_s", "e2e_s")  # raw per-sample latencies, seconds
THROUGHPUT = "throughput_tok_s"  # derived per sample: B * N / e2e_s
STEADY_REL_HALFWIDTH = 0.02  # budget mode stops once every median's 95% CI is within +-2%

StepCallback = Callable[[int, np.ndarray], None]


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

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeat < 3 or self.budget_s < 0:
            raise BenchError("benchmark: --warmup must be >= 0, --repeat >= 3 (a median needs samples), "
                             "--budget >= 0")


def time_generate(gen: Generator, prompts: Sequence[Sequence[int]], new_tokens: int
                  ) -> tuple[dict[str, float], list[list[int]]]:
    """One timed `generate` call: its ttft/tpot/e2e in seconds and its tokens."""
    marks: list[float] = []

    def on_step(step: int, tokens: np.ndarray) -> None:
        marks.append(time.perf_counter())

    t0 = time.perf_counter()
    out = gen.generate(prompts, new_tokens, eos_token_id=None, on_step=on_step)
    t1 = time.perf_counter()
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
                    _sample(s, rows[s.name], prompts, w.new_tokens, keep=False, first=i == 0)
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
                            and rounds == 0)
                    bar.update()
                active = [s for s in active if rows[s.name].unavailable is None]
                rounds += 1
            logger.info("%s: %d rounds in %.1f s", w.key, rounds, time.perf_counter() - start)
    return series


def _sample(s: System, row: Series, prompts: list[list[int]], new_tokens: int, *, keep: bool, first: bool) -> None:
    assert s.generator is not None
    try:
        sample, tokens = time_generate(s.generator, prompts, new_tokens)
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


# ---- comparisons ---------------------------------------------------------------------------------------
def ratios(series: Sequence[Series], reference: str) -> list[dict[str, Any]]:
    """Every other system against `reference` on each workload: median(other) / median(reference) per metric.

    The rounds were interleaved, so the bootstrap resamples rounds (pairs) jointly.
    """
    by_key = {(s.system, s.workload): s for s in series}
    out: list[dict[str, Any]] = []
    for s in series:
        if s.system == reference:
            continue
        ref = by_key.get((reference, s.workload))
        row: dict[str, Any] = {"system": s.system, "against": reference, **dataclasses.asdict(s.workload),
                               "key": s.workload.key}
        if not s.ok or ref is None or not ref.ok:
            row["status"] = "unavailable"
            row["reason"] = s.unavailable or "no reference samples"
            out.append(row)
            continue
        row["status"] = "ok"
        row["tokens_match"] = None if s.tokens is None or ref.tokens is None else s.tokens == ref.tokens
        for m in METRICS:
            a, b = s.samples[m], ref.samples[m]
            if len(a) >= 3 and len(b) >= 3:
                row[m] = ratio_of_medians(a, b, paired=len(a) == len(b)).to_dict()
        out.append(row)
    return out


@dataclasses.dataclass(frozen=True)
class GateRow:
    workload: Workload
    metric: str
    ci: RatioCI
    regressed: bool
    improved: bool

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.workload), "key": self.workload.key, "metric": self.metric,
                **self.ci.to_dict(), "regressed": self.regressed, "improved": self.improved}


@dataclasses.dataclass(frozen=True)
class GateResult:
    max_regression: float
    rows: list[GateRow]
    baseline: str
    notes: list[str]

    @property
    def passed(self) -> bool:
        return not any(r.regressed for r in self.rows)

    @property
    def failures(self) -> list[GateRow]:
        return [r for r in self.rows if r.regressed]

    def to_dict(self) -> dict[str, Any]:
        return {"rule": GATE_RULE, "max_regression": self.max_regression, "baseline": self.baseline,
                "passed": self.passed, "notes": self.notes, "rows": [r.to_dict() for r in self.rows]}

    def message(self) -> str:
        if self.passed:
            return f"regression gate passed ({len(self.rows)} metrics within {self.max_regression:.0%})"
        worst = max(self.failures, key=lambda r: r.ci.low)
        w = worst.workload
        return (f"regression gate: {len(self.failures)} of {len(self.rows)} metrics slower than the baseline "
                f"beyond {self.max_regression:.0%} (worst: {worst.metric} at B={w.batch} P={w.prompt_len} "
                f"N={w.new_tokens}: {worst.ci.ratio:.2f}x, 95% CI [{worst.ci.low:.2f}, {worst.ci.high:.2f}])")


def load_report(path: str | Path) -> dict[str, Any]:
    """A JSON report written by `r1c bench --json`, checked enough to serve as a baseline."""
    from r1c.jsonfile import read_json_object

    p = Path(path)
    if not p.is_file():
        raise BenchError(f"baseline: {p} not found")
    d = read_json_object(p, BenchError, "baseline")
    if d.get("schema") != SCHEMA or not isinstance(d.get("results"), list):
        raise BenchError(f"baseline: {p} is not an `r1c bench --json` report (schema {SCHEMA})")
    return d


def series_from_report(report: dict[str, Any], system: str = "r1c") -> dict[Workload, dict[str, list[float]]]:
    out: dict[Workload, dict[str, list[float]]] = {}
    for r in report["results"]:
        if r.get("system") != system or r.get("status") != "ok":
            continue
        try:
            w = Workload(int(r["batch"]), int(r["prompt_len"]), int(r["new_tokens"]))
            out[w] = {m: [float(x) for x in v] for m, v in r["samples"].items()}
        except (KeyError, TypeError, ValueError):
            raise BenchError(f"baseline: malformed result for system {system!r}: {str(r)[:120]}") from None
    return out


def gate(current: Sequence[Series], baseline: dict[str, Any], max_regression: float, *,
         metrics: Sequence[str] = METRICS, system: str = "r1c", baseline_system: str | None = None,
         baseline_name: str = "baseline") -> GateResult:
    """Compare `system`'s series with the baseline's (its `baseline_system`, by default the same name) on every
    workload both have, by the rule in bench_stats.GATE_RULE."""
    base = series_from_report(baseline, baseline_system or system)
    rows: list[GateRow] = []
    notes: list[str] = []
    for s in current:
        if s.system != system or not s.ok:
            continue
        ref = base.get(s.workload)
        if ref is None:
            notes.append(f"{s.workload.key}: not in the baseline, not gated")
            continue
        for m in metrics:
            if len(s.samples.get(m, [])) < 3 or len(ref.get(m, [])) < 3:
                continue
            ci = ratio_of_medians(s.samples[m], ref[m])
            rows.append(GateRow(s.workload, m, ci, is_regression(ci, max_regression),
                                is_improvement(ci, max_regression)))
    if not rows:
        raise BenchError(f"regression gate: {baseline_name} has no workload and metric in common with this run "
                         f"(baseline workloads: {', '.join(sorted(w.key for w in base)) or 'none'})")
    return GateResult(max_regression=max_regression, rows=rows, baseline=baseline_name, notes=notes)


# ---- the report ------------------------------------------------------------------------------------------
def host_info() -> dict[str, Any]:
    import onnxruntime

    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                            "processor": _cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_report(*, bundle: dict[str, Any], systems: Sequence[System], series: Sequence[Series], settings: Settings,
                roofline: list[dict[str, Any]] | None = None, bandwidth: float | None = None,
                gate_result: GateResult | None = None) -> dict[str, Any]:
    reference = systems[0].name
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "bundle": bundle,
        "settings": {**dataclasses.asdict(settings), "order": "interleaved rounds", "metrics": list(METRICS)},
        "systems": [{"name": s.name, "info": s.info, "status": "ok" if s.unavailable is None else "unavailable",
                     "reason": s.unavailable} for s in systems],
        "read_bandwidth_bytes_s": bandwidth,
        "results": [s.to_dict() for s in series],
        "ratios": ratios(series, reference),
        "roofline": roofline or [],
        "gate": gate_result.to_dict() if gate_result else None,
    }


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}" if x < 1 else f"{x * 1e3:.0f}"


def _ratio(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"{d['ratio']:.2f} [{d['low']:.2f},{d['high']:.2f}]"


def format_table(report: dict[str, Any]) -> str:
    """The human summary: latencies per system and workload, ratios, roofline, gate."""
    lines: list[str] = []
    b = report["bundle"]
    bw = report.get("read_bandwidth_bytes_s")
    lines.append(f"r1c bench {b.get('path')}  ({b.get('target')}, weights {b.get('precision')}, "
                 f"source {b.get('source_label')})")
    host = report["host"]
    lines.append(f"host: {host['processor']}, {host['cpus']} CPUs" + (f", read bandwidth {bw / 1e9:.1f} GB/s"
                                                                       if bw else ""))
    width = max([len(s["name"]) for s in report["systems"]] + [6])
    head = (f"{'system':<{width}} {'B':>3} {'P':>5} {'N':>4} | {'TTFT ms p50':>11} {'p90':>7} {'p99':>7} | "
            f"{'TPOT ms p50':>11} {'p90':>7} {'p99':>7} | {'E2E ms p50':>10} {'p90':>7} {'p99':>7} | "
            f"{'tok/s':>8} {'n':>4}")
    lines += ["", head, "-" * len(head)]
    for r in report["results"]:
        lead = f"{r['system']:<{width}} {r['batch']:>3} {r['prompt_len']:>5} {r['new_tokens']:>4} |"
        if r["status"] != "ok":
            lines.append(f"{lead} unavailable: {r['reason']}")
            continue
        s = r["summary"]
        cells = []
        for m, w0 in (("ttft_s", 11), ("tpot_s", 11), ("e2e_s", 10)):
            if m in s:
                cells.append(f"{_ms(s[m]['p50']):>{w0}} {_ms(s[m]['p90']):>7} {_ms(s[m]['p99']):>7}")
            else:
                cells.append(f"{'-':>{w0}} {'-':>7} {'-':>7}")
        lines.append(f"{lead} {' | '.join(cells)} | {s[THROUGHPUT]['p50']:>8.1f} {s['e2e_s']['n']:>4}")
    ratio_rows = report.get("ratios") or []
    if ratio_rows:
        ref = ratio_rows[0]["against"]
        lines += ["", f"Ratios against {ref}: median(system) / median({ref}), 95% bootstrap CI over interleaved "
                      f"rounds (> 1: {ref} is faster)"]
        head = (f"{'system':<{width}} {'B':>3} {'P':>5} {'N':>4} | {'TTFT':>18} | {'TPOT':>18} | {'E2E':>18} | "
                f"same tokens")
        lines += [head, "-" * len(head)]
        for r in ratio_rows:
            lead = f"{r['system']:<{width}} {r['batch']:>3} {r['prompt_len']:>5} {r['new_tokens']:>4} |"
            if r["status"] != "ok":
                lines.append(f"{lead} unavailable: {r['reason']}")
                continue
            match = {True: "yes", False: "NO", None: "-"}[r.get("tokens_match")]
            lines.append(f"{lead} {_ratio(r.get('ttft_s')):>18} | {_ratio(r.get('tpot_s')):>18} | "
                         f"{_ratio(r.get('e2e_s')):>18} | {match}")
    roof = report.get("roofline") or []
    if roof:
        lines += ["", "Decode roofline (reference system): bytes one decode step reads / read bandwidth. "
                      "active = what the step needs (touched experts, valid cache);",
                  "executed = what this bundle reads (every expert if it runs the dense function body; "
                  "the whole cache capacity). "
                  "x floor = measured TPOT p50 / floor time."]
        head = (f"{'B':>3} {'P':>5} {'N':>4} | {'active MB':>9} {'floor ms':>8} | {'executed MB':>11} "
                f"{'floor ms':>8} | {'TPOT ms':>8} | {'x active':>8} {'x executed':>10} | {'GB/s':>6}")
        lines += [head, "-" * len(head)]
        for r in roof:
            lead = f"{r['batch']:>3} {r['prompt_len']:>5} {r['new_tokens']:>4} |"
            tpot = r.get("tpot_p50_s")
            if tpot:
                tail = (f"{_ms(tpot):>8} | {r['achieved_over_active_floor']:>8.2f} "
                        f"{r['achieved_over_executed_floor']:>10.2f} | {r['achieved_bandwidth'] / 1e9:>6.2f}")
            else:
                tail = f"{'-':>8} | {'-':>8} {'-':>10} | {'-':>6}"
            lines.append(f"{lead} {r['bytes_active'] / 1e6:>9.1f} {_ms(r['floor_active_s']):>8} | "
                         f"{r['bytes_executed'] / 1e6:>11.1f} {_ms(r['floor_executed_s']):>8} | {tail}")
    g = report.get("gate")
    if g:
        lines += ["", f"Regression gate against {g['baseline']}: {g['rule']} (max_regression "
                      f"{g['max_regression']:.0%})"]
        for r in g["rows"]:
            verdict = "REGRESSED" if r["regressed"] else "improved" if r["improved"] else "ok"
            lines.append(f"  B={r['batch']:<3} P={r['prompt_len']:<5} N={r['new_tokens']:<4} {r['metric']:<7} "
                         f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]  {verdict}")
        lines += [f"  note: {n}" for n in g["notes"]]
        lines.append(f"  {'PASSED' if g['passed'] else 'FAILED'}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".partial")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    tmp.replace(p)


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Latency (TTFT, TPOT, E2E p50 with p90 bars) and throughput against batch size, one line per system and
    (P, N); log-log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in report["results"]:
        if r["status"] == "ok":
            lines.setdefault((r["system"], r["prompt_len"], r["new_tokens"]), []).append(r)
    if not lines:
        raise BenchError("benchmark: nothing to plot (no system produced samples)")
    panels = (("ttft_s", "time to first token (ms)"), ("tpot_s", "time per output token (ms)"),
              ("e2e_s", "end-to-end latency (ms)"), (THROUGHPUT, "throughput (output tokens/s)"))
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    batches = sorted({r["batch"] for rows in lines.values() for r in rows})
    for ax, (metric, label) in zip(axes, panels):
        for (system, p, n), rows in sorted(lines.items()):
            rows = sorted(rows, key=lambda r: r["batch"])
            if metric == THROUGHPUT:  # p50, and the slow side: the throughput of the p90 latency
                y = np.array([r["summary"][THROUGHPUT]["p50"] for r in rows])
                slow = np.array([r["batch"] * r["new_tokens"] / r["summary"]["e2e_s"]["p90"] for r in rows])
                err = [np.maximum(y - slow, 0), np.zeros_like(y)]
            else:
                rows = [r for r in rows if metric in r["summary"]]
                y = np.array([r["summary"][metric]["p50"] * 1e3 for r in rows])
                hi = np.array([r["summary"][metric]["p90"] * 1e3 for r in rows])
                err = [np.zeros_like(y), np.maximum(hi - y, 0)]
            if rows:
                ax.errorbar([r["batch"] for r in rows], y, yerr=err, marker="o", capsize=3,
                            label=f"{system} P={p} N={n}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("batch size")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    b = report["bundle"]
    fig.suptitle(f"r1c bench: {Path(str(b.get('path'))).name} ({b.get('precision')}); p50, bars to the p90 latency")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)

