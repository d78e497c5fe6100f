#!/usr/bin/env python3
"""Stock ONNX vs r1c-optimized ONNX under ONNX Runtime, side by side in one process.

    python scripts/bench_passes.py                       # tiny preset, seq 128, prefill at batch 1 and 8
    python scripts/bench_passes.py --preset small --seq 256 --repeats 20 --json

The stock model is `torch.onnx.export(dynamo=True)` of transformers' DeepseekV3ForCausalLM (exporter/stock.py,
seeded random weights); the optimized one is `r1c optimize --target onnxruntime` of that file. Both run in
the same process with the same session options (ORT_ENABLE_ALL, --threads intra-op threads), and their
runs alternate so drift hits both alike. Reported per batch: median prefill latency of each and the ratio
stock / optimized (> 1: r1c is faster), plus the logits' max relative difference; and the graph before and
after the pipeline: node count and bytes on disk (model file + external data).

Memory: transformers' batched_mm experts gather a copy of the expert weights for every (token, expert) pair,
B*S*top_k*3*H*I*4 bytes in the stock graph (8.6 GiB for `small` at batch 8, seq 128). A batch whose gather
exceeds --max-gather-gib is skipped, with a note, rather than taking the machine down.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np


def _file_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.parent.iterdir() if p.name.startswith(model.name))


def _nodes(model: Path) -> int:
    import onnx_ir as ir

    return len(ir.load(model).graph)


def stock_gather_gib(config: Any, batch: int, seq: int) -> float:
    """Bytes of expert weights the stock batched_mm graph gathers for one prefill, in GiB."""
    pairs = batch * seq * config.num_experts_per_tok
    return pairs * 3 * config.hidden_size * config.moe_intermediate_size * 4 / 2**30


def bench(preset_name: str, seq: int, batches: list[int], repeats: int, warmup: int, threads: int,
          work: Path, max_gather_gib: float = 4.0) -> dict[str, Any]:
    import torch
    import transformers

    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.stock import export_stock, hf_config
    from r1c.passes import optimize
    from r1c.passes.testing import max_rel_err, session

    config = preset(preset_name)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf_config(config)).eval()
    model.load_state_dict(random_checkpoint(config, seed=0), strict=False)
    t0 = time.perf_counter()
    stock = export_stock(model, work / "stock" / "model.onnx")
    t1 = time.perf_counter()
    optimized = optimize(stock, work / "optimized", target="onnxruntime")
    t2 = time.perf_counter()
    del model
    sessions = {"stock": session(stock, threads=threads), "optimized": session(optimized, threads=threads)}
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "preset": preset_name, "seq": seq, "threads": threads, "repeats": repeats,
        "export_s": round(t1 - t0, 2), "optimize_s": round(t2 - t1, 2),
        "graph": {"stock": {"nodes": _nodes(stock), "bytes": _file_bytes(stock)},
                  "optimized": {"nodes": _nodes(optimized), "bytes": _file_bytes(optimized)}},
        "prefill": [],
    }
    for batch in batches:
        gib = stock_gather_gib(config, batch, seq)
        if gib > max_gather_gib:
            result["prefill"].append({"batch": batch, "skipped": f"stock would gather {gib:.1f} GiB of expert weights"})
            continue
        feeds = {"input_ids": rng.integers(0, config.vocab_size, (batch, seq))}
        outputs = {name: s.run(None, feeds)[0] for name, s in sessions.items()}
        for _ in range(warmup):
            for s in sessions.values():
                s.run(None, feeds)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(repeats):
            order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
            for name in order:
                start = time.perf_counter()
                sessions[name].run(None, feeds)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        result["prefill"].append({
            "batch": batch, "stock_ms": round(med["stock"], 3), "optimized_ms": round(med["optimized"], 3),
            "speedup": round(med["stock"] / med["optimized"], 3),
            "max_rel_err": float(f"{max_rel_err(outputs['optimized'], outputs['stock']):.2e}")})
    return result


def report(r: dict[str, Any]) -> str:
    g = r["graph"]
    lines = [f"preset {r['preset']}, prefill of {r['seq']} tokens, {r['threads']} intra-op threads, "
             f"median of {r['repeats']} (export {r['export_s']} s, optimize {r['optimize_s']} s)",
             f"{'':>10} {'nodes':>8} {'bytes':>14}",
             f"{'stock':>10} {g['stock']['nodes']:>8} {g['stock']['bytes']:>14,}",
             f"{'optimized':>10} {g['optimized']['nodes']:>8} {g['optimized']['bytes']:>14,}",
             f"{'ratio':>10} {g['optimized']['nodes'] / g['stock']['nodes']:>8.3f} "
             f"{g['optimized']['bytes'] / g['stock']['bytes']:>14.3f}",
             f"{'batch':>6} {'stock ms':>10} {'r1c ms':>10} {'stock/r1c':>10} {'max rel err':>12}"]
    lines += [f"{p['batch']:>6} skipped: {p['skipped']}" if "skipped" in p else
              f"{p['batch']:>6} {p['stock_ms']:>10.2f} {p['optimized_ms']:>10.2f} {p['speedup']:>10.2f}x "
              f"{p['max_rel_err']:>11.1e}" for p in r["prefill"]]
    return "\n".join(lines)


@click.command(help=(__doc__ or "").replace("\n\n", "\n\n\b\n"))  # \b: click prints the paragraph as written
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small"]))
@click.option("--seq", type=int, default=128, show_default=True, help="prompt tokens per row")
@click.option("--batches", default="1,8", show_default=True, help="comma-separated batch sizes")
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True, help="ONNX Runtime intra-op threads")
@click.option("--max-gather-gib", type=float, default=4.0, show_default=True,
              help="skip a batch whose stock graph would gather more expert weights than this")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="keep the models here (default: a temp dir)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def main(preset: str, seq: int, batches: str, repeats: int, warmup: int, threads: int, max_gather_gib: float,
         work: Path | None, as_json: bool) -> None:
    batch_sizes = [int(b) for b in batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="r1c_bench_passes.") as tmp:
        if work is not None and any(work.glob("*")):
            print(f"bench_passes: {work} is not empty", file=sys.stderr)
            sys.exit(2)
        result = bench(preset, seq, batch_sizes, repeats, warmup, threads, work or Path(tmp), max_gather_gib)
    print(json.dumps(result, indent=2) if as_json else report(result))


if __name__ == "__main__":
    main()
