"""Comparisons of benchmark series: ratios between interleaved systems, and the regression gate against a
baseline report (the rule is `stats.GATE_RULE`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r1c.errors import BenchError
from r1c.runtime.bench.runner import METRICS, Series, Workload
from r1c.runtime.bench.stats import GATE_RULE, RatioCI, is_improvement, is_regression, ratio_of_medians

SCHEMA = "r1c-bench/1"  # the --json report (report.py writes it, load_report reads it)


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
    workload both have, by the rule in stats.GATE_RULE."""
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
