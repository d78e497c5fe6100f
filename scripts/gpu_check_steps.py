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
LAYER_TOKENS = (2, 7)  # the layer step's batch x sequence
# The FP8 tiny model on the GPU vs the same activation quantization on the CPU, relative to max |logit|: float32
# accumulation differences (FP8 tensor cores keep ~14 bits inside a 128-deep block) can move a value across an e4m3
# rounding midpoint (one step, 1/8 to 1/16 of it), and such flips carry through the 3 layers.
FP8_LOGITS_BUDGET = 5e-2


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
    from r1c.plugins.r1_kernels import R1, SMALL, kernel_specs, problems

    shapes, tokens, dtype = (SMALL, 40, "float32") if dry else (R1, 4096, "bfloat16")
    sets: dict[str, list[Any]] = {"ops": kernel_specs(shapes, tokens, dtype)}
    _, _, experts = problems(shapes, tokens, dtype)["experts"]
    from r1c.plugins.moe_experts.plan import experts_plan

    sets["sweep"] = [s for _, c in sweep_configs() for s in experts_plan(experts, c).specs()]
    sets["router-modes"] = [s for op, attrs, p in router_modes(dry).values() for s in op.kernel_specs(attrs, p)]
    for fp8 in (False, True):
        sets[f"tiny-{'fp8' if fp8 else 'fp32'}"] = [s for op, attrs, p in tiny_problems(fp8)
                                                     for s in op.kernel_specs(attrs, p)]
    return sets


def router_mode_tokens(dry: bool) -> tuple[int, int]:
    """The correct step's token counts for the router's other modes: a decode row and a small batch (both gate GEMM
    paths: CUDA cores up to 8 tokens, tl.dot beyond)."""
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
        if s.name in ("moe_gemm1_swiglu", "moe_gemm2", "fp8_linear"):
            resources[s.key] = {"name": s.name, "warps": s.num_warps, "block_m": s.constexprs.get("BLOCK_M"),
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
        table.add(Row("correct", "FP8 linear (AOT, driver)", t, check=f"rel {err:.1e} vs dequantized (<= 4e-02)",
                      status="ok" if err <= 4e-2 else "FAIL"))
    correct_router_modes(ctx, table, deadline)


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
        table.add(Row("bench", "router (gate GEMM fp32 + routing)", t, router_ms, 2.0 * t * s.experts * s.hidden,
                      "fp32", t * s.hidden * 2 + s.experts * s.hidden * 4 + t * k * 8, base,
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
        splits = la.plan.launches[1].grid[1]
        table.add(Row("bench", f"FP8 linear {k_in}->{n}", t, lin_ms, 2.0 * t * k_in * n, "fp8",
                      n * k_in + n * k_in / 128**2 * 4 + t * (k_in + n) * 2, base,
                      check=f"split-K {splits}; baseline: cuBLAS bf16"))


def sweep_configs() -> list[tuple[str, Any]]:
    """Tile configs of the experts' sorted path tried at the largest token count (the first is the default)."""
    from r1c.plugins.moe_experts.plan import ExpertsConfig

    return [
        ("m64 w8/w8 s3/s4 (default)", ExpertsConfig("sorted", 64, 8, 3, 8, 4)),
        ("m64 w8/w8 s4/s4", ExpertsConfig("sorted", 64, 8, 4, 8, 4)),
        ("m64 w8/w8 s2/s3", ExpertsConfig("sorted", 64, 8, 2, 8, 3)),
        ("m64 w4/w4 s3/s4 (before: spills)", ExpertsConfig("sorted", 64, 4, 3, 4, 4)),
        ("m32 swapAB w4/w4", ExpertsConfig("sorted", 32, 4, 3, 4, 4)),
        ("m64 w8/w4 s3/s4", ExpertsConfig("sorted", 64, 8, 3, 4, 4)),
    ]


def step_sweep(ctx: Ctx, table: Table, deadline: float) -> None:
    from r1c.plugins.moe_experts.plan import experts_plan
    from r1c.plugins.r1_kernels import problems

    t = max(ctx.tokens)
    default = ctx.launched.get(("experts", t))
    if default is None:
        table.add(Row("sweep", "needs the correct step", status="FAIL"))
        return
    s = ctx.shapes
    op, attrs, _ = problems(s, t, str(ctx.hidden_dtype).removeprefix("torch."))["experts"]
    problem = op.problem(attrs, [tuple(x.shape) for x in default.inputs],
                         [str(x.dtype).removeprefix("torch.") for x in default.inputs])
    flops = 6.0 * t * s.top_k * s.hidden * s.inter
    base_ms = None
    for label, config in sweep_configs()[:1 if ctx.quick else None]:
        check_deadline(deadline, label)
        la = launch_op(ctx, "experts", op, attrs, default.inputs, plan=experts_plan(problem, config))
        diff = rel(la.outputs[0].float(), default.outputs[0].float())
        ms = graph_ms(ctx, lambda la=la: la.run(ctx))
        base_ms = base_ms or ms
        table.add(Row("sweep", f"experts {label}"[:34], t, ms, flops, "fp8", baseline_ms=None,
                      check=f"{base_ms / ms:.2f}x default; out rel diff {diff:.0e}",
                      status="ok" if diff <= 1e-2 else "FAIL"))
    from r1c.plugins.kernel_library import PreparedPlan

    default.run(ctx)  # every intermediate valid, then each launch alone
    for i, one in enumerate(default.prepared.launches):
        check_deadline(deadline, "stage timings")
        single = dataclasses.replace(default, prepared=PreparedPlan((one,), default.prepared.offsets),
                                     plan=dataclasses.replace(default.plan, launches=(default.plan.launches[i],)))
        ms = graph_ms(ctx, lambda single=single: single.run(ctx))
        table.add(Row("sweep", f"  stage {default.plan.launches[i].spec.name}", t, ms,
                      check=f"grid {list(one.grid)}, {one.block // 32} warps, smem {one.shared}"))


# ---- the tiny model on the GPU against the CPU bundle --------------------------------------------------------------
def tiny_checkpoint(fp8: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    from r1c.config import preset
    from r1c.exporter.checkpoint import quantize_checkpoint_fp8, random_checkpoint

    config = preset("tiny")
    tensors = random_checkpoint(config, seed=0)
    return quantize_checkpoint_fp8(config, tensors) if fp8 else (config, tensors)


def _fp8_linears(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """module name -> weight name of the FP8 linear layers the TensorRT lowering makes FP8Linear (kv_b is absorbed
    into the attention instead, and stays dequantized)."""
    return {n.removesuffix(".weight"): n for n, t in tensors.items()
            if n.endswith(".weight") and t.dtype == torch.float8_e4m3fn and t.dim() == 2 and "kv_b_proj" not in n}


def tiny_problems(fp8: bool) -> list[tuple[Any, dict[str, Any], Any]]:
    """The plugin problems of the tiny model at LAYER_TOKENS tokens (what the layer step launches)."""
    from r1c.plugins.fp8_linear.plan import LinearProblem
    from r1c.plugins.fp8_linear.tensorrt import FP8LinearOp
    from r1c.plugins.moe_experts.plan import ExpertsProblem
    from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
    from r1c.plugins.moe_router.plan import RouterProblem
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    config, tensors = tiny_checkpoint(fp8)
    tokens = LAYER_TOKENS[0] * LAYER_TOKENS[1]
    router = MoERouterOp()
    attrs = router_attrs(config)
    out: list[tuple[Any, dict[str, Any], Any]] = [
        (router, attrs, RouterProblem(tokens, config.hidden_size, config.n_routed_experts, "float32",
                                      tuple(sorted(attrs.items())))),
        (MoEExpertsOp(), {}, ExpertsProblem(tokens, config.num_experts_per_tok, config.n_routed_experts,
                                            config.hidden_size, config.moe_intermediate_size, "float32",
                                            "float8_e4m3fn" if fp8 else "float32")),
    ]
    shapes = {tuple(tensors[w].shape) for w in _fp8_linears(tensors).values()}
    out += [(FP8LinearOp(), {}, LinearProblem(tokens, k, n, "float32")) for n, k in sorted(shapes)]
    return out


def router_attrs(config: Any) -> dict[str, Any]:
    from r1c.exporter.model import Router
    from r1c.plugins.moe_router.reference import SPEC

    with torch.device("meta"):
        return SPEC.attrs(**Router(config).op_attributes())


def _patch(ctx: Ctx, model: Any, tensors: dict[str, torch.Tensor], fp8: bool) -> dict[str, int]:
    """Route the model's r1c ops (and, FP8, its FP8 linears) through the plugin kernels; returns launch counts."""
    from r1c.plugins.fp8_linear.tensorrt import FP8LinearOp
    from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    counts = {"router": 0, "experts": 0, "linear": 0}
    dev = ctx.device
    attrs = router_attrs(model.config)
    for i, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        gate, experts = layer.mlp.gate, layer.mlp.experts
        p = f"model.layers.{i}.mlp.experts."
        if fp8:
            ew = [tensors[p + n].to(dev) for n in ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv",
                                                   "down_proj_scale_inv")]
        else:
            ew = [experts.gate_up_proj.data, experts.down_proj.data]

        def route(x: torch.Tensor, gate: Any = gate) -> tuple[torch.Tensor, torch.Tensor]:
            counts["router"] += 1
            out = launch_op(ctx, "router", MoERouterOp(), attrs,
                            [x.contiguous(), gate.weight.data, gate.e_score_correction_bias.data]).outputs
            return out[0], out[1]

        def experts_fn(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, ew: Any = ew) -> torch.Tensor:
            counts["experts"] += 1
            a = MoEExpertsOp.spec.attrs(quant="fp8_block128" if fp8 else "none")
            return launch_op(ctx, "experts", MoEExpertsOp(), a, [x.contiguous(), w.float().contiguous(),
                                                                 ids.int().contiguous(), *ew]).outputs[0]

        gate.forward = route
        experts.forward = experts_fn
    if fp8:
        modules = dict(model.named_modules())
        for name, weight in _fp8_linears(tensors).items():
            wq, sc = tensors[weight].to(dev), tensors[weight + "_scale_inv"].to(dev)

            def linear(x: torch.Tensor, wq: torch.Tensor = wq, sc: torch.Tensor = sc) -> torch.Tensor:
                counts["linear"] += 1
                lead = x.shape[:-1]
                out = launch_op(ctx, "linear", FP8LinearOp(), {"block_size": 128},
                                [x.reshape(-1, x.shape[-1]).contiguous(), wq, sc]).outputs[0]
                return out.view(*lead, -1)

            modules[name].forward = linear
    return counts


def step_layer(ctx: Ctx, table: Table, deadline: float) -> None:
    """float32: the GPU model against the CPU bundle (1e-4 of max |logit|). FP8: the GPU kernels quantize activations
    per token and 128 channels, the CPU bundle does not (ONNX Runtime dequantizes the weights and multiplies in
    float32), and on this tiny random model that alone moves the logits by ~15-30% of their max; so the FP8 model is
    checked against the CPU PyTorch model with the same activation quantization (`_matched_fp8`), within
    FP8_LOGITS_BUDGET, and its distance to the bundle is reported."""
    import numpy as np

    from r1c.exporter.checkpoint import Checkpoint, model_from_checkpoint
    from r1c.exporter.onnx_export import export_onnx

    if ctx.runner is None:
        table.add(Row("layer", "needs the aot step", status="FAIL"))
        return
    ids = np.random.default_rng(0).integers(0, 100, size=LAYER_TOKENS)
    for fp8 in (True,) if ctx.quick else (False, True):
        name = "fp8" if fp8 else "fp32"
        check_deadline(deadline, f"the {name} model")
        config, tensors = tiny_checkpoint(fp8)
        export = ctx.work / f"tiny-{name}"
        export_onnx(config, tensors, export, progress=False)
        bundle, what = _cpu_logits(export, ctx.work / f"tiny-{name}.bundle", ids)
        model = model_from_checkpoint(Checkpoint(config, tensors, export)).to(ctx.device)
        counts = _patch(ctx, model, tensors, fp8)
        with torch.no_grad():
            gpu = model(torch.from_numpy(ids).to(ctx.device)).float().cpu().numpy()
        launches = "+".join(f"{v} {k[:3]}" for k, v in counts.items() if v)
        to_bundle = float(np.abs(gpu - bundle).max() / np.abs(bundle).max())
        if not fp8:
            table.add(Row("layer", f"tiny fp32 {config.num_hidden_layers} layers vs {what}", int(ids.size),
                          check=f"rel {to_bundle:.1e} (<= 1e-04); {launches}"[:44],
                          status="ok" if to_bundle <= 1e-4 and counts["experts"] else "FAIL"))
            continue
        matched = _matched_fp8(config, tensors, ids)
        err = float(np.abs(gpu - matched).max() / np.abs(matched).max())
        top1 = float((gpu.argmax(-1) == matched.argmax(-1)).mean())
        table.add(Row("layer", "tiny fp8 vs same-quantization CPU", int(ids.size),
                      check=f"rel {err:.1e} (<= {FP8_LOGITS_BUDGET:.0e}) top-1 {100 * top1:.0f}%; {launches}"[:44],
                      status="ok" if err <= FP8_LOGITS_BUDGET and counts["linear"] else "FAIL"))
        table.add(Row("layer", f"  tiny fp8 vs {what} (info)", int(ids.size),
                      check=f"rel {to_bundle:.1e}: 1x128 FP8 activations (budget)"[:44]))


def _matched_fp8(config: Any, tensors: dict[str, torch.Tensor], ids: Any) -> Any:
    """The FP8 tiny model on the CPU in float32 with the kernels' activation quantization: FP8 linears quantize x
    per token and 128 channels; the experts do on their sorted path (T*K > 32: hidden, and the SwiGLU output),
    not on their decode path; the router and everything else exact."""
    from r1c.exporter.checkpoint import Checkpoint, model_from_checkpoint
    from r1c.plugins.fp8 import dequantize
    from r1c.plugins.fp8_linear import fp8_linear_reference
    from r1c.plugins.fp8_triton import quantize_act_1x128_reference
    from r1c.plugins.moe_experts.plan import DECODE_MAX_PAIRS
    from r1c.plugins.moe_experts.reference import moe_experts_reference

    def qx(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        q, s = quantize_act_1x128_reference(flat)
        return (q.float() * s.repeat_interleave(128, 1)[:, :flat.shape[1]]).view(x.shape)

    model = model_from_checkpoint(Checkpoint(config, tensors, Path(".")))
    modules = dict(model.named_modules())
    for name, weight in _fp8_linears(tensors).items():
        wq, sc = tensors[weight], tensors[weight + "_scale_inv"]
        modules[name].forward = lambda x, wq=wq, sc=sc: fp8_linear_reference(qx(x), wq, sc)
    for i, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        p = f"model.layers.{i}.mlp.experts."
        w13 = dequantize(tensors[p + "gate_up_proj"], tensors[p + "gate_up_proj_scale_inv"])
        w2 = dequantize(tensors[p + "down_proj"], tensors[p + "down_proj_scale_inv"])

        def experts(x: torch.Tensor, w: torch.Tensor, e_ids: torch.Tensor, w13: torch.Tensor = w13,
                    w2: torch.Tensor = w2) -> torch.Tensor:
            t, k = e_ids.shape
            if t * k <= DECODE_MAX_PAIRS:
                return moe_experts_reference(x, w, e_ids, w13, w2)
            xq, inter = qx(x), w13.shape[1] // 2
            out = torch.zeros_like(x)
            flat = e_ids.reshape(-1).long()
            for ex in flat.unique().tolist():
                pairs = (flat == ex).nonzero().flatten()
                gu = xq[pairs // k] @ w13[ex].t()
                act = qx(F.silu(gu[:, :inter]) * gu[:, inter:])
                out.index_add_(0, pairs // k, (act @ w2[ex].t()) * w.reshape(-1)[pairs, None])
            return out

        layer.mlp.experts.forward = experts
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


def _cpu_logits(export: Path, bundle: Path, ids: Any) -> tuple[Any, str]:
    """Logits of the CPU bundle (`r1c build`, ONNX Runtime); if this machine's onnx-ir/onnxscript cannot run the
    build, ONNX Runtime on the export itself (the graph the bundle is lowered from), and the row says so."""
    from r1c.errors import R1CError
    from r1c.runtime import load
    from r1c.runtime.build import build_bundle

    try:
        build_bundle(export, bundle)
        return load(bundle).forward(ids), "CPU bundle"
    except (R1CError, ImportError) as e:
        print(f"layer: the CPU bundle did not build here ({e}); ONNX Runtime on the export instead", flush=True)
    import numpy as np
    import onnxruntime as ort

    from r1c.config import ModelConfig

    c = ModelConfig.from_json(export / "config.json")
    feeds = {"input_ids": ids.astype(np.int64), "past_lengths": np.zeros(ids.shape[0], np.int64)}
    for layer in range(c.num_hidden_layers):
        feeds[f"past_c.{layer}"] = np.zeros((ids.shape[0], c.kv_lora_rank, 1), np.float32)
        feeds[f"past_pe.{layer}"] = np.zeros((ids.shape[0], c.qk_rope_head_dim, 1), np.float32)
    sess = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], feeds)[0], "ORT on export"


STEPS: dict[str, Callable[[Ctx, Table, float], None]] = {
    "env": step_env, "tests": step_tests, "aot": step_aot, "weights": step_weights, "correct": step_correct,
    "bench": step_bench, "sweep": step_sweep, "layer": step_layer,
}
