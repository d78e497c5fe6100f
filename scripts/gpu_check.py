#!/usr/bin/env python3
"""GPU check of the r1c Triton kernels (MoERouter, MoEExperts FP8) on one H200: the kernel tests run natively, then
one short timing table at DeepSeek-R1 shapes (H 7168, I 2048, 256 experts, top-8; router: 8 groups, top-4 groups)
for 1, 64 and 4096 tokens.

    scripts/gpu_check.sh                      # from the repository root: tests, then the table
    python scripts/gpu_check.py --skip-tests  # the table only
    python scripts/gpu_check.py --dry-run     # tiny shapes; on a CPU the kernels run in Triton's interpreter

Needs PyTorch and Triton only. `r1c` is imported from this checkout with a sys.path shim: the repository root is
put first on sys.path (its `r1c/` package reaches `plugins/` through a symlink), and the pytest child gets the
same root in PYTHONPATH. That is more robust on a bare GPU machine than `pip install -e . --no-deps`, which needs
setuptools>=69 (fetched from the network under build isolation; the machine has no network), writes into
site-packages, and would also register the package's pytest plugin entry point.

Table columns: the kernel; tokens; milliseconds (triton.testing.do_bench, median, L2 flushed between runs);
achieved rate — TB/s if the kernel's floor is memory, TFLOP/s if it is compute; % of floor = floor time / measured
time, where floor = max(bytes / 4.8 TB/s, FLOPs / peak) with peak = 1979 TFLOP/s dense FP8 (experts), 989 dense bf16
(bf16 loop), 67 TFLOP/s float32 CUDA cores (router: its gate GEMM is float32); speedup of the row against its
baseline (router: the PyTorch reference on the GPU; experts_fp8: the bf16 `torch.matmul` loop over experts, whose
per-expert token lists are built before timing); check: router ids equal to the reference's, experts: relative
Frobenius difference to the bf16 loop (FP8 activations and FP8-rounded weights: a few percent expected).
Bytes count every weight byte of the experts that receive a token (and their scales), the activations in and out;
FLOPs are 6*T*K*H*I for the experts and 2*T*E*H for the router.

Budget: one 10-minute call. Kernel tests ~2-4 min (mostly compilation; cut at 300 s), weights ~30 s, timings ~1 min; the
benchmarks stop early (with a note) past --budget seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HBM_BYTES_PER_S = 4.8e12  # H200
FP8_DENSE_FLOPS = 1979e12
BF16_DENSE_FLOPS = 989e12
FP32_FLOPS = 67e12


@dataclasses.dataclass(frozen=True)
class Shapes:
    hidden: int
    inter: int
    experts: int
    top_k: int
    n_group: int
    topk_group: int
    tokens: tuple[int, ...]


R1 = Shapes(hidden=7168, inter=2048, experts=256, top_k=8, n_group=8, topk_group=4, tokens=(1, 64, 4096))
TINY = Shapes(hidden=256, inter=128, experts=8, top_k=2, n_group=4, topk_group=2, tokens=(1, 4, 24))


@dataclasses.dataclass
class Row:
    kernel: str
    tokens: int
    ms: float
    bytes: float
    flops: float
    peak_flops: float
    baseline_ms: float | None
    check: str

    @property
    def memory_bound(self) -> bool:
        return self.bytes / HBM_BYTES_PER_S >= self.flops / self.peak_flops

    @property
    def floor_ms(self) -> float:
        return max(self.bytes / HBM_BYTES_PER_S, self.flops / self.peak_flops) * 1e3

    def cells(self) -> list[str]:
        seconds = self.ms / 1e3
        if self.memory_bound:
            achieved = f"{self.bytes / seconds / 1e12:.2f} TB/s"
        else:
            achieved = f"{self.flops / seconds / 1e12:.1f} TFLOP/s"
        speedup = "-" if self.baseline_ms is None else f"{self.baseline_ms / self.ms:.2f}x"
        return [
            self.kernel,
            str(self.tokens),
            f"{self.ms:.4f}",
            achieved,
            f"{100 * self.floor_ms / self.ms:.1f}%",
            speedup,
            self.check,
        ]


HEADER = ["kernel", "tokens", "ms", "achieved", "% floor", "speedup", "check"]


def format_table(rows: list[Row]) -> str:
    body = [HEADER] + [row.cells() for row in rows]
    widths = [max(len(line[c]) for line in body) for c in range(len(HEADER))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def bench_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=40, return_mode="median"))
    start = time.perf_counter()  # the interpreter (dry run): one call, already warmed by the result check
    fn()
    return (time.perf_counter() - start) * 1e3


# --------------------------------------------------------------------------------------------------------------
# setup


def make_expert_weights(shapes: Shapes, device: torch.device, chunk: int = 8) -> dict[str, torch.Tensor]:
    """Random FP8 block-quantized w13/w2 with their scales, and the same weights in bf16 for the baseline."""
    from r1c.plugins.fp8 import block_shape, dequantize, quantize

    e, h, i = shapes.experts, shapes.hidden, shapes.inter
    out: dict[str, torch.Tensor] = {}
    for name, rows, cols in (("w13", 2 * i, h), ("w2", h, i)):
        q_all = torch.empty(e, rows, cols, dtype=torch.float8_e4m3fn, device=device)
        s_all = torch.empty(e, *block_shape(rows, cols), dtype=torch.float32, device=device)
        b_all = torch.empty(e, rows, cols, dtype=torch.bfloat16, device=device)
        for e0 in range(0, e, chunk):
            w = torch.randn(min(chunk, e - e0), rows, cols, device=device) / cols**0.5
            q, s = quantize(w)
            q_all[e0 : e0 + chunk], s_all[e0 : e0 + chunk] = q, s
            b_all[e0 : e0 + chunk] = dequantize(q, s).to(torch.bfloat16)
            del w, q, s
        out[name], out[f"{name}_scale"], out[f"{name}_bf16"] = q_all, s_all, b_all
    return out


def make_bf16_loop(
    hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """The baseline: a Python loop of bf16 torch.matmul over the experts that got tokens (grouping done here)."""
    t, k = ids.shape
    inter = w13.shape[1] // 2
    flat = ids.reshape(-1).long()
    wflat = weights.reshape(-1).float()
    groups = []
    for ex in torch.unique(flat).tolist():
        pairs = (flat == ex).nonzero().flatten()
        groups.append((ex, pairs // k, pairs))

    def run() -> torch.Tensor:
        out = torch.zeros(t, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        for ex, tok, pairs in groups:
            gu = hidden[tok] @ w13[ex].t()
            act = F.silu(gu[:, :inter]) * gu[:, inter:]
            out.index_add_(0, tok, (act @ w2[ex].t()).float() * wflat[pairs, None])
        return out.to(hidden.dtype)

    return run


# --------------------------------------------------------------------------------------------------------------
# steps


def run_kernel_tests(timeout_s: float) -> int:
    env = {name: v for name, v in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels_triton.py", "-m", "kernels", "-q"]
    cmd += ["-p", "no:cacheprovider"]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"kernel tests: timed out after {timeout_s:.0f}s")
        return 124
    tail = proc.stdout.strip().splitlines()[-25:]
    print("\n".join(tail))
    if proc.returncode:
        print(proc.stderr[-3000:])
    print(f"kernel tests: exit {proc.returncode} in {time.perf_counter() - start:.0f}s", flush=True)
    return proc.returncode


def run_benchmarks(shapes: Shapes, device: torch.device, budget_s: float) -> list[Row]:
    from r1c.plugins.moe_experts.triton_kernel import moe_experts_fp8_triton
    from r1c.plugins.moe_router.reference import moe_router_reference
    from r1c.plugins.moe_router.triton_kernel import moe_router_triton

    start = time.perf_counter()
    e, h, i, k = shapes.experts, shapes.hidden, shapes.inter, shapes.top_k
    gen = torch.Generator(device="cpu").manual_seed(0)
    gate = (torch.randn(e, h, generator=gen) / h**0.5).to(device)
    bias = (torch.randn(e, generator=gen) * 0.01).to(device)
    weights = make_expert_weights(shapes, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"setup: {time.perf_counter() - start:.1f}s", flush=True)
    attrs: dict[str, Any] = dict(
        top_k=k, n_group=shapes.n_group, topk_group=shapes.topk_group, routed_scaling_factor=2.5, norm_topk_prob=1
    )
    fp8_bytes_per_expert = (
        sum(weights[n].numel() * weights[n].element_size() for n in ("w13", "w2", "w13_scale", "w2_scale")) / e
    )
    bf16_bytes_per_expert = sum(weights[n].numel() * 2 for n in ("w13_bf16", "w2_bf16")) / e

    rows: list[Row] = []
    for t in shapes.tokens:
        if time.perf_counter() - start > budget_s:
            print(f"(budget of {budget_s:.0f}s spent: stopping before {t} tokens)")
            break
        hidden = (torch.randn(t, h, generator=gen)).to(device=device, dtype=torch.bfloat16)

        # router: gate GEMM + routing kernel, against the PyTorch reference
        ours = lambda: moe_router_triton(hidden, gate, bias, **attrs)  # noqa: B023
        ref = lambda: moe_router_reference(hidden, gate, bias, **attrs)  # noqa: B023
        topk_w, topk_ids = ours()
        ids_match = float((topk_ids == ref()[1]).all(dim=1).float().mean()) * 100
        router_bytes = t * h * 2 + e * h * 4 + e * 4 + t * k * 8
        ref_ms = bench_ms(ref, device)
        rows.append(
            Row("router", t, bench_ms(ours, device), router_bytes, 2.0 * t * e * h, FP32_FLOPS, ref_ms,
                f"ids {ids_match:.1f}%")
        )  # fmt: skip

        # experts: FP8 Triton against the bf16 torch.matmul loop
        used = int(torch.unique(topk_ids).numel())
        act_bytes = 2 * t * h * 2 + t * k * 8
        flops = 6.0 * t * k * h * i
        loop = make_bf16_loop(hidden, topk_w, topk_ids, weights["w13_bf16"], weights["w2_bf16"])
        fp8_args = (hidden, topk_w, topk_ids, weights["w13"], weights["w2"], weights["w13_scale"], weights["w2_scale"])
        fp8 = lambda: moe_experts_fp8_triton(*fp8_args)  # noqa: B023
        out_loop, out_fp8 = loop().float(), fp8().float()
        rel = float((out_fp8 - out_loop).norm() / out_loop.norm().clamp_min(1e-30))
        loop_ms = bench_ms(loop, device)
        rows.append(
            Row("experts_fp8", t, bench_ms(fp8, device), used * fp8_bytes_per_expert + act_bytes, flops,
                FP8_DENSE_FLOPS, loop_ms, f"rel {rel:.1e}")
        )  # fmt: skip
        rows.append(
            Row("bf16_loop", t, loop_ms, used * bf16_bytes_per_expert + act_bytes, flops, BF16_DENSE_FLOPS, None,
                f"{used} experts")
        )  # fmt: skip
        print(f"{t} tokens done at {time.perf_counter() - start:.1f}s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; interpreter on a CPU; no tests")
    parser.add_argument("--skip-tests", action="store_true", help="only the timing table")
    parser.add_argument("--test-timeout", type=float, default=300.0, help="seconds for the kernel tests")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds for the benchmarks")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if args.dry_run:
        if not cuda and "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import (see the kernel modules)
        shapes, device = TINY, torch.device("cuda" if cuda else "cpu")
    else:
        if not cuda:
            print("gpu_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        shapes, device = R1, torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    import triton

    print(f"triton {triton.__version__}; shapes {shapes}", flush=True)
    status = 0
    if not (args.dry_run or args.skip_tests):
        status = run_kernel_tests(args.test_timeout)
    rows = run_benchmarks(shapes, device, args.budget)
    print(format_table(rows), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
