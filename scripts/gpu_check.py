#!/usr/bin/env python3
"""GPU check of r1c's GPU path, in one command and one table (designed for one H200 in <= 7 minutes).

    bash scripts/gpu_check.sh                      # everything (the device: torch + triton, no TensorRT needed)
    bash scripts/gpu_check.sh --dry-run            # on a CPU: small shapes, kernels in Triton's interpreter, the
                                                   # AOT kernels compiled (not launched: no GPU), every step's code run
    bash scripts/gpu_check.sh --steps aot,bench    # a subset (env always runs)

Steps, each with its own time budget (seconds, `--budget-scale` stretches them); a step that fails or runs out of
time is a FAIL row and the steps after it still run:
  env      the device, its driver, torch and triton versions
  tests    the kernel tests natively (tests/test_kernels_triton.py, tests/test_kernels_fp8_linear.py in a child pytest)
  aot      every kernel the checks below launch, compiled ahead of time for this GPU by this triton in parallel child
           processes (`r1c.plugins.kernel_library.build_library`, as `r1c build` does), with ptxas' register and
           spill counts of the GEMMs
  weights  DeepSeek-R1-shaped weights on the GPU: 256 FP8 experts (H 7168, I 2048), the router, an FP8 7168->2048
           linear, and their bf16 copies for the baselines
  correct  the AOT cubins loaded through the CUDA driver and launched exactly as the plugins' enqueue launches them
           (`DriverRunner.prepare` at shape change, `run` with device pointers), at 1, 64 and 4096 tokens, against
           torch: router ids, experts and FP8 linear within their FP8 error budgets; the router's other modes
           (DeepSeek-V2 group_limited_greedy, V2-Lite greedy, and the op's other scoring combinations, at those
           models' shapes) at 1 and 64 tokens against the PyTorch reference
  bench    the same launches replayed from a CUDA graph: ms (triton.testing.do_bench, median), TFLOP/s and GB/s
           against the H200's peaks (HBM 4.8 TB/s; dense FP8 1979, bf16 989, TF32 494 TFLOP/s, datasheet; the
           router's gate GEMM against TF32) and % of the floor max(bytes / HBM, FLOPs / peak); the bf16 torch
           baseline of each (router: the PyTorch reference; experts: a loop of bf16 matmuls over the used experts,
           grouped beforehand; linear: cuBLAS bf16)
  sweep    other tile configs of the experts (4096 tokens), the FP8 linear and the router's gate GEMM (1 and 4096
           tokens) next to the default each plan picks (same outputs required), and the time of each launch of the
           default 4096-token experts plan (scripts/gpu_check_sweep.py)
  layer    the tiny preset's whole model (every decoder layer) on the GPU, r1c ops through the plugin kernels (FP8:
           dense projections through FP8Linear too): float32 against the CPU bundle (`r1c build`, ONNX Runtime) of
           the same weights within 1e-4 relative; FP8 op by op on the inputs each launch got, against the float64
           model of its kernels within the kernel tests' budgets, and the logits against the same-quantization CPU
           model for information (scripts/gpu_check_layer.py says why that comparison is no budget)
Output: the table, printed row by row (flushed) and again whole at the end; with $OUT (or --out) set,
gpu_check.log, gpu_check.md and gpu_check.json are written there as the run goes. Exit code 1 on any FAIL.

Needs PyTorch and Triton (3.6 or newer); `r1c` is imported from this checkout (the repository root goes first on
sys.path; the pytest child gets it in PYTHONPATH), so nothing is installed. The options are read with click (the
H200 image's python carries it).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_report import Row, StepTimeout, Table, Tee  # noqa: E402

# step name -> seconds of budget
BUDGETS = {"env": 30, "tests": 150, "aot": 100, "weights": 40, "correct": 40, "bench": 60, "sweep": 50, "layer": 60}


def run_steps(steps: list[str], ctx: Any, table: Table, scale: float, end: float) -> None:
    from gpu_check_steps import steps as all_steps

    known = all_steps()
    for name in steps:
        budget = min(BUDGETS[name] * scale, end - time.perf_counter())
        if budget < 5:
            table.add(Row(name, "skipped: the total budget is spent", status="FAIL"))
            continue
        deadline = time.perf_counter() + budget
        start = time.perf_counter()
        print(f"# step {name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
        try:
            known[name](ctx, table, deadline)
        except StepTimeout as e:
            table.add(Row(name, f"out of time ({budget:.0f} s)", check=str(e)[:44], status="FAIL"))
        except Exception as e:  # a failing step is a row; the next steps still run
            traceback.print_exc(file=sys.stderr)
            table.add(Row(name, "error", check=f"{type(e).__name__}: {e}"[:44], status="FAIL"))
        print(f"# step {name} took {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


@click.command(help=(__doc__ or "").splitlines()[0])
@click.option("--dry-run", is_flag=True, help="small shapes on the CPU (Triton's interpreter)")
@click.option("--steps", default=",".join(BUDGETS),
              help=f"comma-separated subset of {','.join(BUDGETS)}")
@click.option("--budget-scale", type=float, default=1.0, show_default=True, help="multiply every step's time budget")
@click.option("--total", type=float, default=390.0, show_default=True,
              help="seconds for the whole check (steps past it are skipped, with a row saying so)")
@click.option("--quick", is_flag=True, help="with --dry-run: kernels indexed, not compiled (tests)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), envvar="OUT", default=None,
              help="directory for gpu_check.log/.md/.json (default: $OUT)")
@click.option("--compile-shard", nargs=2, type=int, default=None, hidden=True)  # I N: a child of the aot step
@click.option("--lib", type=click.Path(path_type=Path), default=None, hidden=True)
@click.option("--cc", type=int, default=None, hidden=True)
def main(**options: Any) -> None:
    sys.exit(check(SimpleNamespace(**options)))


def check(args: SimpleNamespace) -> int:
    """The whole check with the parsed options (`main`'s); returns the exit status (1 on any FAIL row)."""
    if args.compile_shard:  # a child of the aot step
        from gpu_check_steps import compile_shard

        return compile_shard(args.compile_shard[0], args.compile_shard[1], args.lib, args.cc, args.dry_run)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device here (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    if args.dry_run and not cuda and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import (see r1c/plugins/moe_experts)
    steps = ["env", *[s for s in args.steps.split(",") if s and s != "env"]]
    unknown = set(steps) - set(BUDGETS)
    if unknown:
        print(f"gpu_check: unknown steps {sorted(unknown)} (known: {', '.join(BUDGETS)})", file=sys.stderr)
        return 2
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    out = Tee(sys.stdout, args.out / "gpu_check.log" if args.out else None)
    sys.stdout = out  # type: ignore[assignment]
    from gpu_check_steps import Ctx

    start = time.perf_counter()
    table = Table(out, args.out)  # type: ignore[arg-type]
    ctx = Ctx(dry=args.dry_run, cuda=cuda, table=table, quick=args.quick and args.dry_run)
    try:
        run_steps(steps, ctx, table, args.budget_scale, start + args.total)
    finally:
        ctx.close()
    print(f"\ngpu_check: {len(table.rows)} rows, {len(table.failed)} failed, {time.perf_counter() - start:.0f} s"
          f"{' (dry run: interpreter, AOT compiled only)' if args.dry_run else ''}\n")
    print(table.markdown(), flush=True)
    table.save()
    return 1 if table.failed else 0


if __name__ == "__main__":
    main()
