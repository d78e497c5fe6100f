"""Sharded bundles on this machine: equality with one rank, resident memory per rank, decode time per step.

    python scripts/dist_bench.py --preset tiny  --work /tmp/dist-bench            # seconds
    python scripts/dist_bench.py --preset small --work /tmp/dist-bench --json out.json

For the preset (seeded random weights) it exports once, builds the one-rank bundle and one bundle per layout
(`--layouts`, TxE), and then:
1. equality: every layout's logits (a 16-token prompt) within 1e-5 relative of one rank's, and the same greedy
   tokens for a batch of prompts of different lengths;
2. build memory: the peak RSS of each `r1c build` process against the model's weight bytes (the ranks are
   written by streaming: no build holds the whole model);
3. per configuration, in a fresh process: resident memory (VmRSS) of every rank after load + a warm-up
   generate, against the one-rank process, and decode time per step (batch 1), median over the steps; the
   configurations run round-robin (`--repeats`) so that the machine's load spreads over all of them, and the
   times are reported as ratios to one rank (the bundle's default threads: one per core), also run with one
   intra-op thread ("one-thread", what each rank of a 2-rank run gets here). `--mechanisms split,custom_op`
   also times the two ways the ranks run their collectives.
On a machine with fewer cores than ranks, ranks share cores: times show the overheads of sharding (collectives,
control messages, smaller GEMMs), not the speed-up that one device per rank gives.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np


def _rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _r1c(*args: str) -> tuple[float, int]:
    """Run `r1c ARGS` in a child; returns (seconds, that child's peak RSS in KiB, from wait4's rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "r1c.cli", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return time.perf_counter() - start, usage.ru_maxrss


def child(bundle: str, steps: int, prompt_len: int, mechanism: str | None, threads: int | None = None
          ) -> dict[str, Any]:
    """In a fresh process: load, warm up, time `steps` decode steps, report every rank's RSS."""
    import torch  # noqa: F401 - every configuration pays for the same imports (ranks need torch)

    from r1c.runtime import load

    baseline = _rss_kib()
    if mechanism:
        os.environ["R1C_DIST_COLLECTIVES"] = mechanism
    engine = load(bundle, session_options=None if threads is None else {"intra_op_num_threads": threads})
    prompt = [[(7 * i + 3) % engine.vocab_size for i in range(prompt_len)]]
    engine.generate(prompt, 4)  # warm-up
    stamps: list[float] = []
    tokens = engine.generate(prompt, steps, on_step=lambda s, t: stamps.append(time.perf_counter()))
    per_step = [b - a for a, b in itertools.pairwise(stamps)]
    backend = engine.backend
    followers = [p.pid for p in getattr(backend, "processes", [])]
    rss = [_rss_kib()] + [_rss_kib(pid) for pid in followers]
    logits = engine.forward(prompt)[0, -1]
    if hasattr(backend, "close"):
        backend.close()
    return {"baseline_kib": baseline, "rss_kib": rss, "decode_ms": [1e3 * s for s in per_step], "tokens": tokens[0],
            "logits": logits.tolist()}


def _run_child(bundle: Path, work: Path, steps: int, prompt_len: int, mechanism: str | None) -> dict[str, Any]:
    threads = None
    if mechanism == "one-thread":  # the one-rank bundle with one intra-op thread, like each rank of a 2-rank run
        mechanism, threads = None, 1
    out = work / "child.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", str(bundle), "--child-out", str(out), "--steps", str(steps),
           "--prompt-len", str(prompt_len)] + (["--mechanism", mechanism] if mechanism else []) \
        + (["--threads", str(threads)] if threads else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def equality(single: Path, layouts: dict[str, Path]) -> dict[str, Any]:
    from r1c.runtime import load

    prompts = [[(5 * i + 1) % 97 + 2 for i in range(n)] for n in (16, 5, 1)]
    engine = load(single)
    want_logits, want_tokens = engine.forward([prompts[0]]), engine.generate(prompts, 8)
    results = {}
    for name, bundle in layouts.items():
        engine = load(bundle)
        got = engine.forward([prompts[0]])
        rel = float(np.abs(got.astype(np.float64) - want_logits).max() / np.abs(want_logits).max())
        same = engine.generate(prompts, 8) == want_tokens
        engine.backend.close()  # type: ignore[attr-defined]
        results[name] = {"logits_max_rel_err": rel, "same_greedy_tokens": same}
        print(f"equality {name:>6}: logits max rel err {rel:.2e}, same greedy tokens: {same}", flush=True)
    return results


@click.command(help=(__doc__ or "").replace("\n\n", "\n\n\b\n"))  # \b: click prints the paragraph as written
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small"]))
@click.option("--work", "root", type=click.Path(path_type=Path), default=Path("/tmp/r1c-dist-bench"), show_default=True,
              help="exports and bundles go to WORK/PRESET (kept: a later run reuses them)")
@click.option("--layouts", default="2x1,1x2,2x2,4x1,1x4", show_default=True, help="TxE, comma-separated")
@click.option("--mechanisms", default="split", show_default=True, help="split and/or custom_op, for the timing runs")
@click.option("--repeats", type=int, default=3, show_default=True, help="round-robin passes over the configurations")
@click.option("--steps", type=int, default=24, show_default=True, help="decode steps timed per run")
@click.option("--prompt-len", type=int, default=16, show_default=True)
@click.option("--check-only", is_flag=True, help="only the equality check")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="write every number here")
@click.option("--child", "child_bundle", default=None, hidden=True)
@click.option("--child-out", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--threads", type=int, default=None, hidden=True)
@click.option("--mechanism", default=None, hidden=True)
def main(preset: str, root: Path, layouts: str, mechanisms: str, repeats: int, steps: int, prompt_len: int,
         check_only: bool, json_path: Path | None, child_bundle: str | None, child_out: Path | None,
         threads: int | None, mechanism: str | None) -> None:
    if child_bundle:
        if child_out is None:
            raise click.UsageError("--child needs --child-out")
        child_out.write_text(json.dumps(child(child_bundle, steps, prompt_len, mechanism, threads)))
        return
    work = root / preset
    work.mkdir(parents=True, exist_ok=True)
    export = work / "export"
    if not export.exists():
        _r1c("export", "--preset", preset, "--seed", "0", "-o", str(export), "--no-progress")
    weight_bytes = (export / "model.onnx.data").stat().st_size
    report: dict[str, Any] = {"preset": preset, "weight_bytes": weight_bytes, "cores": os.cpu_count(),
                              "build": {}, "runs": {}}
    bundles: dict[str, Path] = {}
    for name in ["1x1", *layouts.split(",")]:
        t, e = (int(x) for x in name.split("x"))
        bundle = work / f"bundle.{name}"
        if not bundle.exists():
            seconds, peak = _r1c("build", str(export), "-o", str(bundle), "--tensor-parallel", str(t),
                                 "--expert-parallel", str(e))
            report["build"][name] = {"seconds": seconds, "peak_rss_kib": peak}
            print(f"build {name:>4}: {seconds:6.1f} s, peak RSS {peak / 1024:8.1f} MiB "
                  f"(weights {weight_bytes / 2**20:.1f} MiB)", flush=True)
        bundles[name] = bundle
    report["equality"] = equality(bundles["1x1"], {k: v for k, v in bundles.items() if k != "1x1"})
    if check_only:
        ok = all(r["logits_max_rel_err"] < 1e-5 and r["same_greedy_tokens"] for r in report["equality"].values())
        sys.exit(0 if ok else 1)

    configs = [("1x1", None), ("1x1", "one-thread")] + [(n, m) for n in bundles if n != "1x1"
                                                       for m in mechanisms.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {f"{n}/{m or 'one-rank'}": [] for n, m in configs}
    for rep in range(repeats):
        for name, mech in configs:
            runs[f"{name}/{mech or 'one-rank'}"].append(_run_child(bundles[name], root, steps, prompt_len, mech))
        print(f"round {rep + 1}/{repeats} done", flush=True)
    one = runs["1x1/one-rank"]
    one_ms = statistics.median(statistics.median(r["decode_ms"]) for r in one)
    one_rss = statistics.median(r["rss_kib"][0] for r in one)
    base = statistics.median(r["baseline_kib"] for r in one)
    print(f"\n{'config':>16} {'ranks':>5} {'decode ms/step':>15} {'vs 1 rank':>9} {'RSS per rank MiB':>28} "
          f"{'RSS/1-rank':>22} {'(RSS-base)/(1-rank - base)':>30}")
    for key, rs in runs.items():
        ms = statistics.median(statistics.median(r["decode_ms"]) for r in rs)
        rss = [statistics.median(r["rss_kib"][i] for r in rs) for i in range(len(rs[0]["rss_kib"]))]
        over = [(x - base) / (one_rss - base) for x in rss]
        report["runs"][key] = {"decode_ms_median": ms, "decode_vs_one_rank": ms / one_ms, "rss_kib": rss,
                               "rss_vs_one_rank": [x / one_rss for x in rss], "model_rss_vs_one_rank": over,
                               "baseline_kib": base, "raw": rs}
        print(f"{key:>16} {len(rss):>5} {ms:15.2f} {ms / one_ms:9.2f} "
              f"{' '.join(f'{x / 1024:6.0f}' for x in rss):>28} {' '.join(f'{x / one_rss:5.2f}' for x in rss):>22} "
              f"{' '.join(f'{x:5.2f}' for x in over):>30}")
    print(f"(process baseline after imports: {base / 1024:.0f} MiB; one-rank RSS {one_rss / 1024:.0f} MiB)")
    if json_path:
        json_path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
