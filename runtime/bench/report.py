"""The benchmark's report: host description, the JSON document (raw samples, ratios, roofline, gate), the
human table and the latency/throughput plot."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BenchError
from r1c.runtime.bench.compare import SCHEMA, GateResult, ratios
from r1c.runtime.bench.runner import METRICS, THROUGHPUT, Series, Settings, System


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
        source = "the bundle's lowered model" if roof[0].get("source", "bundle") == "bundle" else "the config"
        lines += ["", f"Decode roofline (reference system; bytes from {source}): bytes one decode step reads / read "
                      "bandwidth. active = what the step needs (weights as stored, touched experts, valid cache);",
                  "executed = what this bundle reads (as its kernels read them: FP8 folded to float32 at load, every "
                  "expert of a dense body, the whole cache capacity). x floor = measured TPOT p50 / floor time."]
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
