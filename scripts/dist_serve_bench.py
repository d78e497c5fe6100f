"""Serving a sharded bundle on this machine: the scheduler's traffic on one rank and on N ranks, side by side.

    python scripts/dist_serve_bench.py --preset tiny --layout 2x1 --work /tmp/dist-serve   # TP2
    python scripts/dist_serve_bench.py --preset small --layout 1x2 --work /tmp/dist-serve  # EP2

Exports the preset (seeded random weights) once, builds the one-rank bundle and the TxE bundle (`--layout`), loads
both in this process (the sharded one starts its follower ranks: gloo on 127.0.0.1) with one intra-op thread per
rank, and runs the same serving workload through `ServingEngine` on each, interleaved (`--rounds`): `--requests`
greedy requests of mixed prompt and output lengths submitted at once (more than `--max-num-seqs`, so rows join and
leave, the cache's rows move and its bucket changes). Reported per round: the wall time, scheduler steps and
backend calls, ms per scheduler step, and for the sharded run the control overhead — rank 0's time inside the
step broadcast (`ShardedBackend.control_s`: packing the ids, lengths and cache journal, and the gloo broadcast,
which also waits for followers still busy with the previous step) per backend call; and whether every request got
the one-rank bundle's tokens. With fewer cores than ranks (2 here) the ranks share cores: this shows overheads,
not the speed-up of one device per rank. One sharded world per process (torch.distributed's default group).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np


def _r1c(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "r1c.cli", *args], check=True)


def _bundles(preset: str, layout: str, work: Path) -> tuple[Path, Path]:
    t, e = (int(x) for x in layout.split("x"))
    export, single, sharded = work / preset / "export", work / preset / "single", work / preset / f"bundle.{layout}"
    if not (export / "model.onnx").is_file():
        _r1c("export", "--preset", preset, "--seed", "3", "-o", str(export))
    if not (single / "manifest.json").is_file():
        _r1c("build", str(export), "-o", str(single))
    if not (sharded / "manifest.json").is_file():
        _r1c("build", str(export), "-o", str(sharded), "--tensor-parallel", str(t), "--expert-parallel", str(e))
    return single, sharded


def _workload(vocab: int, n: int, max_len: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, m = int(rng.integers(1, max_len // 2)), int(rng.integers(1, max_len // 2))
        out.append((rng.integers(2, vocab, size=p).tolist(), m))
    return out


def _round(serving: Any, backend: Any, requests: list[tuple[list[int], int]]) -> dict[str, Any]:
    from r1c.runtime.serving import SamplingParams

    before = serving.stats()
    calls0, control0 = getattr(backend, "steps", 0), getattr(backend, "control_s", 0.0)
    t0 = time.perf_counter()
    handles = [serving.submit(p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)) for p, m in requests]
    tokens = [h.result(timeout=3600).token_ids for h in handles]
    wall = time.perf_counter() - t0
    after = serving.stats()
    steps = after["steps"] - before["steps"]
    calls = getattr(backend, "steps", 0) - calls0
    row = {"wall_s": wall, "steps": steps, "ms_per_step": 1e3 * wall / steps,
           "relayouts": after["relayouts"] - before["relayouts"], "tokens": tokens}
    if calls:
        row |= {"backend_calls": calls, "control_ms_per_call": 1e3 * (backend.control_s - control0) / calls}
    return row


def _layout(ctx: click.Context, param: click.Parameter, text: str) -> str:
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise click.BadParameter(f"TxE with positive integers (e.g. 2x1), got {text!r}")
    return text


@click.command(help=(__doc__ or "").replace("\n\n    python", "\n\n\b\n    python", 1))  # \b: keep the usage lines
@click.option("--preset", default="tiny", show_default=True)
@click.option("--layout", default="2x1", show_default=True, callback=_layout, help="TxE (tensor x expert parallel)")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/dist-serve"),
              show_default=True)
@click.option("--requests", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-len", type=click.IntRange(min=4), default=96, show_default=True,
              help="prompt and output lengths are drawn below half this")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(preset: str, layout: str, work: Path, requests: int, max_num_seqs: int, max_len: int, rounds: int,
         json_path: Path | None) -> None:
    args = {"preset": preset, "layout": layout, "work": work, "requests": requests, "max_num_seqs": max_num_seqs,
            "max_len": max_len, "rounds": rounds, "json": json_path}
    from r1c.runtime import load
    from r1c.runtime.serving import SchedulerConfig, ServingEngine

    single_dir, sharded_dir = _bundles(preset, layout, work)
    threads = {"intra_op_num_threads": 1}
    engines = {"one rank": load(single_dir, session_options=threads),
               f"{layout}": load(sharded_dir, session_options=threads)}
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_tokens_per_step=64, min_bucket=16)
    servings = {name: ServingEngine(e, config) for name, e in engines.items()}
    workload = _workload(engines["one rank"].vocab_size, requests, max_len, seed=1)
    for name, s in servings.items():  # warm-up
        _round(s, engines[name].backend, workload[:4])
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in servings}
    for _ in range(rounds):
        for name, s in servings.items():
            rows[name].append(_round(s, engines[name].backend, workload))
    for s in servings.values():
        s.close()
    engines[layout].backend.close()

    ref = rows["one rank"][0]["tokens"]
    print(f"{preset}, {requests} requests (max-num-seqs {max_num_seqs}), medians of {rounds} "
          "interleaved rounds")
    print("| bundle | wall s | scheduler steps | ms/step | x one rank | relayouts | control ms/call | "
          "backend calls | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = statistics.median(r["ms_per_step"] for r in rows["one rank"])
    summary = {}
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "tokens"}
        same = sum(t == w for r in rs for t, w in zip(r["tokens"], ref))
        summary[name] = {**med, "same_tokens": same, "of": len(ref) * len(rs)}
        control = f"{med['control_ms_per_call']:.2f}" if "control_ms_per_call" in med else "-"
        calls = f"{med['backend_calls']:.0f}" if "backend_calls" in med else "-"
        print(f"| {name} | {med['wall_s']:.2f} | {med['steps']:.0f} | {med['ms_per_step']:.2f} | "
              f"{med['ms_per_step'] / base:.2f} | {med['relayouts']:.0f} | {control} | {calls} | "
              f"{same}/{len(ref) * len(rs)} |")
    if json_path is not None:
        json_path.write_text(json.dumps({"args": {k: str(v) for k, v in args.items()}, "summary": summary,
                                         "rounds": {n: [{k: v for k, v in r.items() if k != "tokens"} for r in rs]
                                                    for n, rs in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
