"""`r1c bench`: latency and throughput of a bundle over a grid, against peers, a second bundle or a baseline."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

import click

from r1c.errors import BenchError, RegressionError
from r1c.runtime.server.commands import NATIVE_DECODE_OPTION, session_choices

logger = logging.getLogger(__name__)


def _bundle_info(path: Path, manifest: Any) -> dict[str, Any]:
    source = manifest.source or {}
    if "preset" in source:
        label = f"preset {source['preset']} seed {source.get('seed', 0)}"
    elif "checkpoint" in source:
        label = f"checkpoint {source['checkpoint']}"
    else:
        label = "unknown"
    return {"path": str(path), "target": manifest.target,
            "precision": "fp32" if manifest.precision == "none" else manifest.precision,
            "config_hash": manifest.config_hash, "source": source, "source_label": label,
            "session": manifest.target_options.get("session", {})}


HELP = """Time a bundle: time to first token (TTFT), time per output token (TPOT), end-to-end latency (p50, p90,
p99) and output throughput, over the grid --batch x --prompt-len x --new-tokens.

\b
Each sample is one greedy `generate` call of B random prompts of P tokens for N new tokens (no EOS stop).
Every system is warmed up (--warmup calls), then timed in interleaved rounds (one call of each system per
round: r1c, --compare, peers, r1c, ...) so that machine drift lands on all alike: at least --repeat rounds,
and with --budget S more rounds until every median's 95% interval is within +-2% or S seconds pass.

\b
Regression gate (--baseline FILE, a report written by --json; its raw samples are the reference):
  for TTFT, TPOT and E2E of every workload in both runs, ratio = median(now) / median(baseline), with a
  95% percentile-bootstrap confidence interval (2000 resamples of both sample sets). A metric FAILS only when
  the interval's lower bound exceeds 1 + --max-regression: slower beyond the tolerance *and* beyond the noise.
  Any failure exits with code 3. Across separate runs the tolerance must also cover machine drift: on a
  busy shared machine a multi-threaded session's medians move several-fold between runs (its threads stall
  at barriers when another process takes a core); --threads 1 keeps that to the CPU share it loses. For a
  tight A/B use --compare, whose rounds are interleaved and whose intervals resample the rounds as pairs.

\b
Peers (--peer transformers, --peer stock-onnx) run the same weights (rebuilt from the manifest's source) and
requests; their ratios against r1c have the same intervals (> 1: r1c is faster). A peer that cannot be set up
is reported as an "unavailable" row. The decode roofline divides the bytes a step must read (active
parameters, the experts a batch touches, the latent cache) by the measured memory read bandwidth.

\b
Examples:
  r1c bench b.bundle --batch 1,8 --prompt-len 32,128 --new-tokens 16 --json now.json --plot now.png
  r1c bench b.bundle --baseline base.json --max-regression 10%
  r1c bench new.bundle --compare old.bundle --repeat 20
  r1c bench b.bundle --peer transformers --peer stock-onnx --batch 1,8
"""


@click.command("bench", help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--batch", "batch_text", default="1", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--prompt-len", "prompt_text", default="32", show_default=True, help="Prompt lengths, comma-separated.")
@click.option("--new-tokens", "new_text", default="16", show_default=True, help="Output lengths, comma-separated.")
@click.option("--warmup", default=2, show_default=True, help="Untimed calls per system and workload.")
@click.option("--repeat", default=10, show_default=True, help="Timed rounds per workload (at least).")
@click.option("--budget", default=0.0, show_default=True, metavar="SECONDS",
              help="Per workload: more rounds until the medians are steady (95% CI within +-2%) or this time is up.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random prompts.")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="wall: elapsed time; cpu: the process's CPU time (on a shared machine a 1-thread run's CPU time "
                   "leaves out the time other processes held its core; with more threads it counts their spinning).")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="ONNX Runtime intra-op threads and the native decode step's (and torch threads for peers); "
                   "default: the bundle's setting.")
@click.option("--compare", "compare", type=click.Path(path_type=Path), metavar="BUNDLE_B",
              help="Also time a second bundle, interleaved with the first; reports B / A ratios with CIs.")
@click.option("--peer", "peers", multiple=True, type=click.Choice(["transformers", "stock-onnx"]),
              help="Also time a peer stack on the same weights and requests (repeatable).")
@click.option("--peer-cache", type=click.Path(path_type=Path), default=None,
              help="Where the stock-onnx peer's export is kept between runs [default: ~/.cache/r1c/peers].")
@click.option("--baseline", type=click.Path(path_type=Path), metavar="FILE",
              help="Gate against this earlier --json report (see the rule above); exit code 3 on regression.")
@click.option("--max-regression", default="10%", show_default=True,
              help="The gate's tolerance: 10% or 0.1.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), metavar="FILE",
              help="Write the report with every raw sample (usable as a --baseline).")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), metavar="FILE.png",
              help="Plot latency and throughput against batch size.")
@click.option("--roofline/--no-roofline", default=True, show_default=True,
              help="Decode roofline: bytes per step over measured memory read bandwidth.")
@click.option("--bandwidth", type=float, default=None, metavar="GB/S",
              help="Use this read bandwidth instead of measuring it (torch.sum over 1 GiB with --threads threads, "
                   "best of 5).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when a terminal].")
@NATIVE_DECODE_OPTION
def bench_cmd(bundle: Path, batch_text: str, prompt_text: str, new_text: str, warmup: int, repeat: int,
              budget: float, seed: int, clock: str, threads: int | None, compare: Path | None, peers: tuple[str, ...],
              peer_cache: Path | None, baseline: Path | None, max_regression: str, json_out: Path | None,
              plot_out: Path | None, roofline: bool, bandwidth: float | None, progress: bool | None,
              native_decode: bool | None) -> None:
    from r1c.manifest import read_manifest
    from r1c.runtime import load
    from r1c.runtime.bench.compare import gate, load_report
    from r1c.runtime.bench.report import format_table, make_report, plot, write_json
    from r1c.runtime.bench.runner import Settings, System, grid, run_bench
    from r1c.runtime.bench.stats import parse_fraction, parse_int_list

    for path in (bundle, compare):  # the bundles first (their hashes are checked when they load, below)
        if path is not None:
            read_manifest(path, verify_hashes=False)
    workloads = grid(parse_int_list("--batch", batch_text), parse_int_list("--prompt-len", prompt_text),
                     parse_int_list("--new-tokens", new_text))
    settings = Settings(warmup=warmup, repeat=repeat, budget_s=budget, seed=seed, clock=clock)
    tolerance = parse_fraction(max_regression)
    base_report = load_report(baseline) if baseline is not None else None  # fail before the long part
    from r1c.outdir import check_output_file

    for option, path in (("--json", json_out), ("--plot", plot_out)):
        if path is not None:
            check_output_file(path, BenchError, option, create_parent=True)
    show = sys.stderr.isatty() if progress is None else progress
    session = session_choices(threads, None, native_decode)  # for the bundle and --compare alike

    def say(msg: str) -> None:
        click.echo(f"r1c bench: {msg}", err=True)

    engine = load(bundle, session_options=session)
    manifest = engine.manifest
    # which path decoded (r1c.runtime.native_decode): a baseline recorded before it differs for that reason
    native = getattr(getattr(engine, "backend", None), "native", None) is not None
    systems = [System("r1c", engine, info={"bundle": str(bundle), "native_decode": native}, required=True)]
    if compare is not None:
        other = load(compare, session_options=session)
        if other.vocab_size != engine.vocab_size:
            raise BenchError(f"--compare: {compare} has another vocabulary ({other.vocab_size} tokens, "
                             f"{bundle} has {engine.vocab_size})")
        systems.append(System(f"B:{compare.name}", other, info={"bundle": str(compare)}, required=True))
    with contextlib.ExitStack() as stack:
        if peers:
            from r1c.runtime.bench.peers import make_peers

            bundle_session = {**manifest.target_options.get("session", {}), **(session or {})}
            systems += make_peers(peers, manifest, stack, threads=threads, session=bundle_session,
                                  cache_dir=peer_cache, log=say)
        bw = None
        if roofline and not manifest.is_foreign:  # the roofline needs r1c's model config
            if bandwidth is not None:
                bw = bandwidth * 1e9
            else:
                from r1c.runtime.bench.roofline import measure_read_bandwidth

                say("measuring memory read bandwidth")
                bw = measure_read_bandwidth(threads=threads or None)
        series = run_bench(systems, workloads, engine.vocab_size, settings, progress=show)
    roof_rows = _roofline_rows(bundle, manifest, series, bw) if bw else []
    gate_result = None
    if base_report is not None:
        assert baseline is not None
        gate_result = gate(series, base_report, tolerance, baseline_name=str(baseline))
        from r1c.runtime.bench.report import host_info

        base_bundle, base_host, host = base_report.get("bundle", {}), base_report.get("host", {}), host_info()
        if base_bundle.get("config_hash") not in (None, manifest.config_hash):
            gate_result.notes.append("the baseline was measured on a bundle with another model config")
        if (base_host.get("processor"), base_host.get("cpus")) != (host["processor"], host["cpus"]):
            gate_result.notes.append(f"the baseline was measured on another host ({base_host.get('processor')}, "
                                     f"{base_host.get('cpus')} CPUs)")
    report = make_report(bundle=_bundle_info(bundle, manifest), systems=systems, series=series, settings=settings,
                         roofline=roof_rows, bandwidth=bw, gate_result=gate_result)
    click.echo(format_table(report))
    if json_out is not None:
        write_json(report, json_out)
        say(f"wrote {json_out}")
    if plot_out is not None:
        plot(report, plot_out)
        say(f"wrote {plot_out}")
    if gate_result is not None and not gate_result.passed:
        raise RegressionError(gate_result.message())


def _roofline_rows(bundle: Path, manifest: Any, series: Any, bandwidth: float) -> list[dict[str, Any]]:
    from r1c.runtime.bench.roofline import bundle_reads, decode_floor

    rows = []
    config = manifest.config
    reads, source = bundle_reads(bundle, manifest)
    cache_dtype = next((i.get("dtype") for i in manifest.graph_io.get("inputs", []) if i["name"] == "past_c.0"),
                       "float32")
    cache_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(cache_dtype), 4)
    for s in series:
        if s.system != "r1c" or not s.ok:
            continue
        w = s.workload
        floor = decode_floor(reads, config, w.batch, w.prompt_len, w.new_tokens, bandwidth=bandwidth,
                             cache_dtype_bytes=cache_bytes, source=source)
        tpot = s.summary().get("tpot_s")
        rows.append(floor.to_dict(tpot.p50 if tpot is not None else None))
    return rows
