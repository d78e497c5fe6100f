"""Sharded TensorRT bundles over NCCL on a machine with several GPUs (run by scripts/dist_gpu_check.sh).

Under `torchrun --nproc-per-node N`, every process loads the sharded bundle with `r1c.runtime.load`: rank 0 gets
the engine (and drives it), the other ranks serve inside `load` and exit when rank 0 closes it. Rank 0 then
compares with the one-rank ONNX Runtime bundle of the same export (the CPU reference): logits within --rel-tol
(max |a - b| / max |b|), greedy tokens equal; and times --steps decode steps. A second mode (`--nccl-latency`)
measures NCCL all-reduce latency for the message sizes of the 8 x H200 plan (hidden x 2 bytes per token), the
plan's `allreduce_latency_s` assumption.
Exit status 0 only when every check passed; one line per check on rank 0.
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import click
import numpy as np


def nccl_latency_check(sizes: list[int], iters: int = 200) -> int:
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    for size in sizes:
        x = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(20):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        if rank == 0:
            print(f"nccl all_reduce {size:>9} B over {dist.get_world_size()} GPUs: "
                  f"{(time.perf_counter() - start) / iters * 1e6:8.1f} us", flush=True)
    dist.destroy_process_group()
    return 0


def check(sharded: Path, reference: Path, rel_tol: float, steps: int) -> int:
    from r1c.runtime import load

    engine = load(sharded)  # ranks > 0 stay inside load, serving rank 0, and exit when it closes
    prompts = [[(7 * i + 3) % 97 + 2 for i in range(n)] for n in (16, 5, 1)]
    ok = True
    try:
        logits = engine.forward([prompts[0]])
        tokens = engine.generate(prompts, 8)
        stamps: list[float] = []
        engine.generate([prompts[0]], steps, on_step=lambda s, t: stamps.append(time.perf_counter()))
    finally:
        engine.backend.close()  # type: ignore[attr-defined]
    ref = load(reference)
    want_logits, want_tokens = ref.forward([prompts[0]]), ref.generate(prompts, 8)
    rel = float(np.abs(logits.astype(np.float64) - want_logits).max() / np.abs(want_logits).max())
    for name, passed, detail in [("logits", rel < rel_tol, f"max rel err {rel:.2e} (tolerance {rel_tol:.0e})"),
                                 ("greedy tokens", tokens == want_tokens, f"{tokens} vs {want_tokens}")]:
        print(f"{'PASS' if passed else 'FAIL'} {sharded.name} {name}: {detail}", flush=True)
        ok &= passed
    per_step = [b - a for a, b in itertools.pairwise(stamps)]
    print(f"INFO {sharded.name} decode: {1e3 * statistics.median(per_step):.2f} ms/step (batch 1, median of "
          f"{len(per_step)})", flush=True)
    return 0 if ok else 1


@click.command(help=__doc__)
@click.argument("sharded", required=False, type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="the one-rank onnxruntime bundle of the same export")
@click.option("--rel-tol", type=float, default=1e-3, show_default=True,
              help="TensorRT float32 with TF32 off: 1e-3 with margin")
@click.option("--steps", type=int, default=32, show_default=True, help="decode steps timed")
@click.option("--nccl-latency", is_flag=True, help="measure NCCL all-reduce latency instead (no bundle)")
def main(sharded: Path | None, reference: Path | None, rel_tol: float, steps: int, nccl_latency: bool) -> None:
    if nccl_latency:
        sys.exit(nccl_latency_check([14336, 114688, 1 << 20]))  # R1 hidden x bf16 at batch 1 and 8; 1 MiB
    if sharded is None or reference is None:
        raise click.UsageError("give a sharded bundle and --reference")
    sys.exit(check(sharded, reference, rel_tol, steps))


if __name__ == "__main__":
    main()
