"""The GPU check's steps (see scripts/gpu_check.py for what each one shows). Every kernel launch goes through the
plugins' own path: the op's `problem` -> `plan` -> `DriverRunner.prepare` (at shape change) -> `run` with device
pointers on the current stream, from the kernel library the `aot` step compiled. On a CPU (--dry-run) the plans run
through Triton's interpreter instead, and the library is only prepared against a recording fake driver (every
kernel of every plan present, every argument packed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_check_report import Row, Table, check_deadline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "gpu_check.py"
GEMMS = ("moe_gemm1_swiglu", "moe_gemm2", "fp8_linear", "router_logits")  # ptxas resources reported


# ---- shared state --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Ctx:
    dry: bool
    cuda: bool
    table: Table
    quick: bool = False  # a dry run for the test suite: kernels indexed, not compiled; fewer sweep configs
    work: Path = dataclasses.field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="r1c-gpu-check-")))
    library: Any = None  # KernelLibrary
    runner: Any = None  # DriverRunner
    weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    launched: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict)  # (op, T) -> Launched

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")

    @property
    def shapes(self) -> Any:
        from r1c.plugins.r1_kernels import R1, SMALL

        return SMALL if self.dry else R1

    @property
    def tokens(self) -> tuple[int, ...]:
        return ((1, 40) if self.quick else (1, 4, 40)) if self.dry else (1, 64, 4096)

    @property
    def hidden_dtype(self) -> torch.dtype:
        return torch.float32 if self.dry else torch.bfloat16

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.work, ignore_errors=True)


def spec_sets(dry: bool) -> dict[str, list[Any]]:
    """Every kernel the steps launch, by set (the aot step's children rebuild the same lists)."""
    from gpu_check_layer import tiny_problems
    from gpu_check_sweep import sweep_specs

    from r1c.plugins.r1_kernels import R1, SMALL, kernel_specs

    shapes, tokens, dtype = (SMALL, 40, "float32") if dry else (R1, 4096, "bfloat16")
    sets: dict[str, list[Any]] = {"ops": kernel_specs(shapes, tokens, dtype), "sweep": sweep_specs(dry)}
    sets["router-modes"] = [s for op, attrs, p in router_modes(dry).values() for s in op.kernel_specs(attrs, p)]
    for fp8 in (False, True):
        sets[f"tiny-{'fp8' if fp8 else 'fp32'}"] = [s for op, attrs, p in tiny_problems(fp8)
                                                     for s in op.kernel_specs(attrs, p)]
    return sets


def router_mode_tokens(dry: bool) -> tuple[int, int]:
    """The correct step's token counts for the router's other modes: a decode row and a small batch (the gate
    GEMM's two split-H configs)."""
    return (1, 40) if dry else (1, 64)


def router_modes(dry: bool) -> dict[str, tuple[Any, dict[str, Any], Any]]:
    from r1c.plugins.r1_kernels import router_mode_problems

    return router_mode_problems(dry, max(router_mode_tokens(dry)), "float32" if dry else "bfloat16")


def compile_shard(shard: int, shards: int, lib: Path, cc: int, dry: bool) -> int:
    """The aot step's child: compile every shards-th kernel into lib/ (index-<shard>.json), with ptxas resources of
    the GEMMs into resources-<shard>.json."""
    from r1c.plugins._triton import compile_aot, ptxas_resources
    from r1c.plugins.kernel_library import build_library

    unique = {s.key: s for specs in spec_sets(dry).values() for s in specs}
    mine = [unique[k] for k in sorted(unique)][shard::shards]
    build_library(mine, lib, cc, index_name=f"index-{shard}.json")
    resources = {}
    for s in mine:
        if s.name in GEMMS:
            resources[s.key] = {"name": s.name, "warps": s.num_warps,
                                "block_m": s.constexprs.get("BLOCK_M", s.constexprs.get("BLOCK_T")),
                                **ptxas_resources(compile_aot(s, cc).asm["ptx"], cc)}
    (lib / f"resources-{shard}.json").write_text(json.dumps(resources))
    return 0


def index_only(lib: Path, specs: Sequence[Any]) -> Any:
    """A kernel library index of `specs` with no cubins compiled (parameters from the argument types, then Triton's
    two scratch pointers): enough to prepare plans against FakeDriver."""
    import hashlib

    from r1c.plugins.kernel_library import KernelLibrary

    lib.mkdir(parents=True, exist_ok=True)
    kernels = {}
    for s in {s.key: s for s in specs}.values():
        (lib / f"{s.key}.cubin").write_bytes(s.key.encode())
        types = [s.signature[n] for n in s.arg_names()]
        kernels[s.key] = {"name": s.name, "function": s.name, "cubin": f"{s.key}.cubin", "num_warps": s.num_warps,
                          "sha256": hashlib.sha256(s.key.encode()).hexdigest(), "shared": 0, "args": len(types),
                          "params": [("u64" if t.startswith("*") else "f32" if t == "fp32" else "u32") for t in types]
                          + ["u64", "u64"]}
    (lib / "index.json").write_text(json.dumps({"format": 1, "compute_capability": "9.0", "triton": "none",
                                                "kernels": kernels}))
    return KernelLibrary(lib)


# ---- launching plans the way the plugins do ----------------------------------------------------------------------
class FakeDriver:
    """Stands in for the CUDA driver in a dry run: records loads and launches (no GPU to launch on)."""

    def __init__(self) -> None:
        self.launches = 0

    def load_function(self, cubin: bytes, name: str, shared: int) -> str:
        return name

    def make_current(self) -> None:
        pass

    def launch(self, fn: Any, grid: Any, block: int, shared: int, stream: int, params: Any) -> None:
        self.launches += 1


@dataclasses.dataclass
class Launched:
    plan: Any
    prepared: Any
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    workspace: torch.Tensor

    def run(self, ctx: Ctx) -> None:
        """One enqueue: pointers in, kernels launched on the current stream (the interpreter in a dry run)."""
        if ctx.cuda:
            ctx.runner.run(self.prepared, [t.data_ptr() for t in self.inputs], [t.data_ptr() for t in self.outputs],
                           self.workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
        else:
            from r1c.plugins.launch import TritonRunner

            ctx.runner.run(self.prepared, [t.data_ptr() for t in self.inputs], [t.data_ptr() for t in self.outputs],
                           self.workspace.data_ptr(), 0)  # packs every argument (fake driver)
            TritonRunner().run(self.plan, self.inputs, self.outputs, self.workspace)


def output_buffers(name: str, problem: Any, device: torch.device) -> list[torch.Tensor]:
    dt = getattr(torch, getattr(problem, "hidden_dtype", getattr(problem, "x_dtype", "float32")))
    if name == "router":
        k = dict(problem.attrs)["top_k"]
        return [torch.empty(problem.tokens, k, device=device), torch.empty(problem.tokens, k, dtype=torch.int32,
                                                                            device=device)]
    if name == "experts":
        return [torch.empty(problem.tokens, problem.hidden, dtype=dt, device=device)]
    return [torch.empty(problem.tokens, problem.out_features, dtype=dt, device=device)]


def launch_op(ctx: Ctx, name: str, op: Any, attrs: dict[str, Any], inputs: Sequence[torch.Tensor],
              plan: Any = None) -> Launched:
    """Plan, prepare and run `op` on `inputs` as the plugin would (returns what ran, for replays)."""
    shapes = [tuple(t.shape) for t in inputs]
    dtypes = [str(t.dtype).removeprefix("torch.") for t in inputs]
    problem = op.problem(attrs, shapes, dtypes)
    plan = plan or op.plan(attrs, problem)
    outputs = output_buffers(name, problem, ctx.device)
    ws = torch.empty(max(plan.workspace_size, 1), dtype=torch.uint8, device=ctx.device)
    launched = Launched(plan, ctx.runner.prepare(plan), list(inputs), outputs, ws)
    launched.run(ctx)
    return launched


def graph_ms(ctx: Ctx, fn: Callable[[], None]) -> float:
    """Median ms of `fn` replayed from a CUDA graph (the interpreter's wall time in a dry run)."""
    if not ctx.cuda:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm: nothing is loaded or allocated during capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(do_bench(graph.replay, warmup=10, rep=60, return_mode="median"))


def torch_ms(ctx: Ctx, fn: Callable[[], Any]) -> float:
    if not ctx.cuda:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=40, return_mode="median"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- steps -------------------------------------------------------------------------------------------------------
def step_env(ctx: Ctx, table: Table, deadline: float) -> None:
    import triton

    if ctx.cuda:
        from r1c.plugins.cuda_driver import CudaDriver

        major, minor = torch.cuda.get_device_capability()
        v = CudaDriver().driver_version()
        item = f"{torch.cuda.get_device_name()} sm_{major}{minor}"
        check = f"driver CUDA {v // 1000}.{v % 1000 // 10}; torch {torch.__version__}; triton {triton.__version__}"
    else:
        item, check = "CPU: Triton interpreter (dry run)", f"torch {torch.__version__}; triton {triton.__version__}"
    table.env = {"device": item, "versions": check}
    table.add(Row("env", item[:34], check=check[:44]))


TEST_GROUPS = {  # run side by side: the time is JIT compilation of each test's kernel variants
    "router, alignment, quantization": ["tests/test_kernels_triton.py", "-k",
                                        "router or align or bitwise or rejects"],
    "experts (sorted, decode, unquantized)": ["tests/test_kernels_triton.py", "-k",
                                              "sorted or decode or unquantized"],
    "FP8 linear": ["tests/test_kernels_fp8_linear.py"],
}


def step_tests(ctx: Ctx, table: Table, deadline: float) -> None:
    if ctx.dry:
        table.add(Row("tests", "kernel tests (native)", check="dry run: not run (scripts/test.sh runs them)",
                      status="skip"))
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    start = time.perf_counter()
    procs = {}
    for label, args in TEST_GROUPS.items():
        cmd = [sys.executable, "-m", "pytest", *args, "-m", "kernels", "-q", "-p", "no:cacheprovider"]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        log = ctx.work / f"tests-{len(procs)}.log"
        procs[label] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT),
                        log)
    for label, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(5.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            print(log.read_text()[-3000:], flush=True)
            table.add(Row("tests", label[:34], check="timed out", status="FAIL"))
            continue
        out = log.read_text()
        print("\n".join(out.strip().splitlines()[-25:]), flush=True)
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", out)}
        ok = proc.returncode == 0 and not counts.get("failed") and not counts.get("error") \
            and not counts.get("errors")
        summary = ", ".join(f"{n} {k}" for k, n in counts.items()) or f"exit {proc.returncode}"
        table.add(Row("tests", label[:34], check=f"{summary}; {time.perf_counter() - start:.0f} s"[:44],
                      status="ok" if ok else "FAIL"))


def step_aot(ctx: Ctx, table: Table, deadline: float) -> None:
    from r1c.plugins.kernel_library import DriverRunner, KernelLibrary, merge_indexes

    cc = 90 if not ctx.cuda else int("".join(map(str, torch.cuda.get_device_capability())))
    sets = spec_sets(ctx.dry)
    if ctx.quick:  # the test suite's dry run: the compile path is the AOT tests' business
        ctx.library = index_only(ctx.work / "kernels", [s for specs in sets.values() for s in specs])
        ctx.runner = DriverRunner(ctx.library, FakeDriver())
        table.add(Row("aot", f"{len(ctx.library.entries)} kernels indexed", check="--quick: not compiled",
                      status="skip"))
        return
    total = len({s.key for specs in sets.values() for s in specs})
    shards = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2, 12, total))
    lib = ctx.work / "kernels"
    lib.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    start = time.perf_counter()
    cmd = [sys.executable, str(SCRIPT), "--lib", str(lib), "--cc", str(cc), *(["--dry-run"] if ctx.dry else [])]
    logs = [ctx.work / f"compile-{i}.log" for i in range(shards)]
    procs = [subprocess.Popen([*cmd, "--compile-shard", str(i), str(shards)], env=env, cwd=REPO,
                              stdout=log.open("w"), stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    failed = []
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=max(5.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        if p.returncode:
            failed.append(i)
            print(logs[i].read_text()[-3000:], file=sys.stderr, flush=True)
    if failed:
        table.add(Row("aot", f"compile shards {failed} failed", check="see the log", status="FAIL"))
        return
    index = merge_indexes(lib, [f"index-{i}.json" for i in range(shards)])
    ctx.library = KernelLibrary(lib)
    ctx.runner = DriverRunner(ctx.library, None if ctx.cuda else FakeDriver())
    import triton

    table.add(Row("aot", f"{len(index['kernels'])} kernels for sm_{cc}, {shards} procs",
                  check=f"{time.perf_counter() - start:.0f} s, triton {triton.__version__}",
                  status="ok" if len(index["kernels"]) == total else "FAIL"))
    res: dict[str, Any] = {}
    for i in range(shards):
        res |= json.loads((lib / f"resources-{i}.json").read_text())
    used = {s.key for name, specs in sets.items() if name != "sweep" for s in specs}  # what the plans pick
    picked = [r for k, r in res.items() if k in used]
    spills = sum(r["spill_stores"] + r["spill_loads"] for r in picked)
    worst = max(picked, key=lambda r: r["registers"]) if picked else {}
    table.add(Row("aot", f"ptxas: {len(picked)} GEMMs the plans pick", check=f"spill bytes {spills}; max "
                  f"{worst.get('registers')} regs ({worst.get('name')} m{worst.get('block_m')})"[:44],
                  status="ok" if spills == 0 else "warn"))
    for k, r in res.items():
        print(f"  ptxas {r['name']} m{r['block_m']} w{r['warps']}: {r['registers']} registers, "
              f"{r['spill_stores']} B spill stores{'' if k in used else ' (sweep only)'}", flush=True)


def make_expert_weights(e: int, h: int, i: int, device: torch.device, chunk: int = 8) -> dict[str, torch.Tensor]:
    """Random FP8 block-quantized w13/w2 with their scales, and the same weights in bf16 for the baseline."""
    from r1c.plugins.fp8 import block_shape, dequantize, quantize

    out: dict[str, torch.Tensor] = {}
    for name, rows, cols in (("w13", 2 * i, h), ("w2", h, i)):
        q_all = torch.empty(e, rows, cols, dtype=torch.float8_e4m3fn, device=device)
        s_all = torch.empty(e, *block_shape(rows, cols), dtype=torch.float32, device=device)
        b_all = torch.empty(e, rows, cols, dtype=torch.bfloat16, device=device)
        for e0 in range(0, e, chunk):
            w = torch.randn(min(chunk, e - e0), rows, cols, device=device) / cols**0.5
            q, s = quantize(w)
            q_all[e0:e0 + chunk], s_all[e0:e0 + chunk] = q, s
            b_all[e0:e0 + chunk] = dequantize(q, s).to(torch.bfloat16)
            del w, q, s
        out[name], out[f"{name}_scale"], out[f"{name}_bf16"] = q_all, s_all, b_all
    return out


def step_weights(ctx: Ctx, table: Table, deadline: float) -> None:
    from r1c.plugins.fp8 import dequantize, quantize

    s, dev = ctx.shapes, ctx.device
    start = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = make_expert_weights(s.experts, s.hidden, s.inter, dev)
    w["gate"] = (torch.randn(s.experts, s.hidden, generator=gen) / s.hidden**0.5).to(dev)
    w["bias"] = (torch.randn(s.experts, generator=gen) * 0.01).to(dev)
    k, n = s.linear
    q, sc = quantize(torch.randn(n, k, device=dev) / k**0.5)
    w["lin"], w["lin_scale"], w["lin_bf16"] = q, sc, dequantize(q, sc).to(torch.bfloat16)
    if ctx.cuda:
        torch.cuda.synchronize()
    ctx.weights = w
    gb = sum(t.numel() * t.element_size() for t in w.values()) / 1e9
    table.add(Row("weights", f"E{s.experts} H{s.hidden} I{s.inter}, lin {k}->{n}",
                  check=f"{gb:.1f} GB on {dev.type}, {time.perf_counter() - start:.1f} s"))


def _bf16_loop(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The baseline: a Python loop of bf16 torch.matmul over the experts that got tokens (grouping done here)."""
    t, k = ids.shape
    inter = w13.shape[1] // 2
    flat, wflat = ids.reshape(-1).long(), weights.reshape(-1).float()
    groups = [(ex, (flat == ex).nonzero().flatten()) for ex in torch.unique(flat).tolist()]
    groups = [(ex, pairs // k, pairs) for ex, pairs in groups]
    x = hidden.to(torch.bfloat16)

    def run() -> torch.Tensor:
        out = torch.zeros(t, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        for ex, tok, pairs in groups:
            gu = x[tok] @ w13[ex].t()
            act = F.silu(gu[:, :inter]) * gu[:, inter:]
            out.index_add_(0, tok, (act @ w2[ex].t()).float() * wflat[pairs, None])
        return out

    return run


def step_correct(ctx: Ctx, table: Table, deadline: float) -> None:
    from r1c.plugins.moe_router.reference import moe_router_reference
    from r1c.plugins.r1_kernels import problems

    if ctx.runner is None or not ctx.weights:
        table.add(Row("correct", "needs the aot and weights steps", status="FAIL"))
        return
    w, s = ctx.weights, ctx.shapes
    ops = problems(s, max(ctx.tokens), str(ctx.hidden_dtype).removeprefix("torch."))
    gen = torch.Generator(device="cpu").manual_seed(1)
    for t in ctx.tokens:
        check_deadline(deadline, f"{t} tokens")
        hidden = torch.randn(t, s.hidden, generator=gen).to(ctx.device, ctx.hidden_dtype)
        op, attrs, _ = ops["router"]
        la = launch_op(ctx, "router", op, attrs, [hidden, w["gate"], w["bias"]])
        ctx.launched[("router", t)] = la
        ref_w, ref_ids = moe_router_reference(hidden, w["gate"], w["bias"], **attrs)
        same = float((la.outputs[1] == ref_ids).all(dim=1).float().mean())
        table.add(Row("correct", "router (AOT, driver)", t, check=f"ids equal in {100 * same:.1f}% rows (>= 99%)",
                      status="ok" if same >= 0.99 else "FAIL"))

        op, attrs, _ = ops["experts"]
        topk_w, topk_ids = ref_w.contiguous(), ref_ids.contiguous()
        la = launch_op(ctx, "experts", op, attrs, [hidden, topk_w, topk_ids, w["w13"], w["w2"], w["w13_scale"],
                                                   w["w2_scale"]])
        ctx.launched[("experts", t)] = la
        want = _bf16_loop(hidden, topk_w, topk_ids, w["w13_bf16"], w["w2_bf16"])()
        err = rel(la.outputs[0].float(), want)
        decode = la.plan.launches[0].spec.name.startswith("moe_decode")
        budget = 2e-2 if decode else 8e-2  # decode: unquantized activations; sorted: FP8 1x128 activations
        table.add(Row("correct", f"experts FP8 ({'decode' if decode else 'sorted'})", t,
                      check=f"rel {err:.1e} vs bf16 loop (<= {budget:.0e})", status="ok" if err <= budget else "FAIL"))

        op, attrs, _ = ops["linear"]
        k = s.linear[0]
        x = torch.randn(t, k, generator=gen).to(ctx.device, ctx.hidden_dtype)
        la = launch_op(ctx, "linear", op, attrs, [x, w["lin"], w["lin_scale"]])
        ctx.launched[("linear", t)] = la
        err = rel(la.outputs[0].float(), x.float() @ w["lin_bf16"].float().t())
        check, ok = f"rel {err:.1e} vs dequantized (<= 4e-02)", err <= 4e-2
        if t <= 64:  # and elementwise against the same quantization (float64 on the CPU: small T only)
            worst = _linear_vs_matched(ctx, x, la.outputs[0])
            check, ok = f"{err:.1e} vs deq (4e-2); {worst:.2f} of matched bound", ok and worst <= 1
        table.add(Row("correct", "FP8 linear (AOT, driver)", t, check=check, status="ok" if ok else "FAIL"))
    correct_router_modes(ctx, table, deadline)


def _linear_vs_matched(ctx: Ctx, x: torch.Tensor, y: torch.Tensor) -> float:
    """max |y - matched| / bound: `r1c.plugins.fp8_matched.linear_matched` of the same x and weights, bound
    2e-3 (1e-5 in the interpreter) of the sum of |products| plus the rounding to y's dtype (half a bf16/fp16 ulp)."""
    from r1c.plugins.fp8_matched import linear_matched

    w = ctx.weights
    m = linear_matched(x.cpu(), w["lin"].cpu(), w["lin_scale"].cpu())
    noise = 2e-3 if ctx.cuda else 1e-5
    half_ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(y.dtype, 0.0) * 1.01
    bound = noise * m.mag + half_ulp * m.out.abs() + 1e-30
    return float(((y.cpu().double() - m.out).abs() / bound).max())


def correct_router_modes(ctx: Ctx, table: Table, deadline: float) -> None:
    """The router's other modes (r1_kernels.ROUTER_MODES: DeepSeek-V2 / V2-Lite routing and the op's other scoring
    combinations) launched from the AOT library as the plugin does, against the PyTorch reference: ids equal in
    >= 99% of rows (100% of one), weights of the equal rows within 1e-4 of the largest (float32 throughout; only the
    gate GEMM's summation order differs). The bias is random and non-zero: the V2 methods must not read it."""
    from r1c.plugins.moe_router.reference import moe_router_reference

    gen = torch.Generator(device="cpu").manual_seed(2)
    for label, (op, attrs, problem) in router_modes(ctx.dry).items():
        gate = (torch.randn(problem.experts, problem.hidden, generator=gen) / problem.hidden**0.5).to(ctx.device)
        bias = (torch.randn(problem.experts, generator=gen) * 0.05).to(ctx.device)
        for t in router_mode_tokens(ctx.dry):
            check_deadline(deadline, f"router {label}, {t} tokens")
            hidden = torch.randn(t, problem.hidden, generator=gen).to(ctx.device, ctx.hidden_dtype)
            la = launch_op(ctx, "router", op, attrs, [hidden, gate, bias])
            ref_w, ref_ids = moe_router_reference(hidden, gate, bias, **attrs)
            rows = (la.outputs[1] == ref_ids).all(dim=1)
            same = float(rows.float().mean())
            w_err = float((la.outputs[0][rows] - ref_w[rows]).abs().max() / ref_w.abs().max()) if rows.any() else 1.0
            ok = same >= 0.99 and w_err <= 1e-4
            table.add(Row("correct", f"router {label}"[:34], t,
                          check=f"ids {100 * same:.0f}% rows, w {w_err:.0e} (1e-4)", status="ok" if ok else "FAIL"))


def step_bench(ctx: Ctx, table: Table, deadline: float) -> None:
    from r1c.plugins.moe_router.reference import moe_router_reference

    if not ctx.launched:
        table.add(Row("bench", "needs the correct step", status="FAIL"))
        return
    w, s = ctx.weights, ctx.shapes
    fp8_expert = sum(w[n].numel() * w[n].element_size() for n in ("w13", "w2", "w13_scale", "w2_scale")) / s.experts
    bf16_expert = sum(w[n].numel() * 2 for n in ("w13_bf16", "w2_bf16")) / s.experts
    for t in ctx.tokens:
        check_deadline(deadline, f"{t} tokens")
        la = ctx.launched[("router", t)]
        hidden, gate, bias = la.inputs
        router_ms = graph_ms(ctx, lambda la=la: la.run(ctx))
        k = la.outputs[0].shape[1]
        ref_attrs = {"top_k": s.top_k, "n_group": s.n_group, "topk_group": s.topk_group,
                     "routed_scaling_factor": 2.5, "norm_topk_prob": 1}
        base = torch_ms(ctx, lambda h=hidden, g=gate, b=bias, a=ref_attrs: moe_router_reference(h, g, b, **a))
        table.add(Row("bench", "router (gate GEMM + routing)", t, router_ms, 2.0 * t * s.experts * s.hidden,
                      "tf32", t * s.hidden * 2 + s.experts * s.hidden * 4 + t * k * 8, base,
                      check="baseline: PyTorch reference"))

        la = ctx.launched[("experts", t)]
        used = int(torch.unique(la.inputs[2]).numel())
        act = 2 * t * s.hidden * 2 + t * s.top_k * 8
        flops = 6.0 * t * s.top_k * s.hidden * s.inter
        loop = _bf16_loop(*la.inputs[:3], w["w13_bf16"], w["w2_bf16"])
        loop_ms = torch_ms(ctx, loop)
        ms = graph_ms(ctx, lambda la=la: la.run(ctx))
        table.add(Row("bench", f"experts FP8, {used} experts read", t, ms, flops, "fp8", used * fp8_expert + act,
                      loop_ms, check=f"{len(la.plan.launches)} launches, ws {la.plan.workspace_size / 2**20:.0f} MiB"))
        table.add(Row("bench", "  bf16 matmul loop (baseline)", t, loop_ms, flops, "bf16", used * bf16_expert + act,
                      check=f"{used} experts"))

        la = ctx.launched[("linear", t)]
        k_in, n = s.linear
        x = la.inputs[0]
        lin_ms = graph_ms(ctx, lambda la=la: la.run(ctx))
        wb = w["lin_bf16"]
        base = torch_ms(ctx, lambda x=x, wb=wb: x.to(torch.bfloat16) @ wb.t())
        gemm = next(x for x in la.plan.launches if x.spec.name == "fp8_linear")
        table.add(Row("bench", f"FP8 linear {k_in}->{n}", t, lin_ms, 2.0 * t * k_in * n, "fp8",
                      n * k_in + n * k_in / 128**2 * 4 + t * (k_in + n) * 2, base,
                      check=f"{len(la.plan.launches)} launches, split-K {gemm.grid[1]}; base cuBLAS bf16"))


def steps() -> dict[str, Callable[[Ctx, Table, float], None]]:
    """Every step by name (the sweep and layer steps live in their own modules)."""
    from gpu_check_layer import step_layer
    from gpu_check_sweep import step_sweep

    return {"env": step_env, "tests": step_tests, "aot": step_aot, "weights": step_weights, "correct": step_correct,
            "bench": step_bench, "sweep": step_sweep, "layer": step_layer}
