"""Launch plans, workspace sizes and the kernel library's launch path, on the CPU (nothing is launched on a GPU).

* Workspace: what a plugin declares to TensorRT for the profile's largest token count (`workspace_size`) covers
  the plan of every smaller count, and every region lies inside it, 256-byte aligned.
* AOT coverage: the kernels `r1c build` compiles (`kernel_specs` at the largest count) include every kernel any
  smaller count's plan launches, so a bundle never misses one at run time.
* The enqueue path: `DriverRunner` with a recording fake driver and a library index: each kernel loaded once, at
  prepare time; every launch's grid, block, shared memory and parameter values (device pointers of inputs,
  outputs and workspace regions; integers; floats; NULL scratch pointers) exactly what the plan says.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton", reason="the kernel definitions need triton")

from r1c.errors import BuildError, BundleError
from r1c.plugins.fp8_linear.plan import LinearProblem, linear_plan, splits
from r1c.plugins.fp8_linear.plan import select_config as linear_config
from r1c.plugins.fp8_linear.tensorrt import FP8LinearOp
from r1c.plugins.kernel_library import DriverRunner, KernelLibrary, parameter_template
from r1c.plugins.launch import ALIGN, Buf, Plan
from r1c.plugins.moe_experts.plan import ExpertsProblem, experts_plan, select_config
from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
from r1c.plugins.moe_router.plan import RouterProblem, router_plan
from r1c.plugins.moe_router.reference import SPEC as ROUTER_SPEC
from r1c.plugins.moe_router.tensorrt import MoERouterOp

EXPERTS = ExpertsProblem(300, 4, 16, 256, 128, "float32", "float8_e4m3fn")
LINEAR = LinearProblem(200, 384, 320, "bfloat16")
# the router's modes (topk_method x scoring as DeepSeek-V3 / V2 / V2-Lite route): each its own routing kernel
ROUTER_MODES = {
    "noaux_tc": ROUTER_SPEC.attrs(top_k=4, n_group=4, topk_group=2),
    "group_limited_greedy": ROUTER_SPEC.attrs(top_k=4, n_group=4, topk_group=2, scoring="softmax", norm_topk_prob=0,
                                              topk_method="group_limited_greedy", routed_scaling_factor=16.0),
    "greedy": ROUTER_SPEC.attrs(top_k=4, n_group=4, topk_group=2, scoring="softmax", norm_topk_prob=0,
                                topk_method="greedy", routed_scaling_factor=1.0),
}


def _router_case(attrs: dict[str, Any]) -> tuple[Any, ...]:
    problem = RouterProblem(300, 256, 16, "float32", tuple(sorted(attrs.items())))
    return (MoERouterOp(), attrs, problem, lambda t: router_plan(dataclasses.replace(problem, tokens=t)))


CASES = [
    (MoEExpertsOp(), {}, EXPERTS, lambda t: experts_plan(dataclasses.replace(EXPERTS, tokens=t))),
    (FP8LinearOp(), {}, LINEAR, lambda t: linear_plan(dataclasses.replace(LINEAR, tokens=t))),
    *(_router_case(a) for a in ROUTER_MODES.values()),
]


def _regions_fit(plan: Plan, size: int) -> None:
    for r in plan.regions:
        assert r.offset % ALIGN == 0 and r.offset + r.nbytes <= size, (r, size)
    spans = sorted((r.offset, r.offset + r.nbytes) for r in plan.regions)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans  # no overlap


CASE_IDS = ["experts", "fp8_linear", *(f"router_{m}" for m in ROUTER_MODES)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
def test_workspace_and_compiled_kernels_cover_every_token_count(case: int) -> None:
    op, attrs, problem, plan_at = CASES[case]
    declared = op.workspace_size(attrs, problem)  # what get_workspace_size declares (from the config buckets' ends)
    compiled = {s.key for s in op.kernel_specs(attrs, problem)}
    needed = []
    for t in range(1, problem.tokens + 1):
        plan = plan_at(t)
        needed.append(plan.workspace_size)
        assert plan.workspace_size <= declared, (t, plan.workspace_size, declared)
        _regions_fit(plan, declared)
        missing = {s.name for s in plan.specs() if s.key not in compiled}
        assert not missing, f"tokens={t}: kernels {missing} are not in the compiled set"
    assert declared == max(needed)  # no more than the largest plan, found by trying every token count


def _router_model(path: Path, modes: dict[str, dict[str, Any]], h: int = 32, e: int = 16) -> Path:
    """An ONNX model with one r1c::MoERouter node per entry of `modes` (node name = key), sharing `hidden`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from r1c.plugins import R1C_DOMAIN

    nodes, inits, outputs = [], [], []
    for name, attrs in modes.items():
        inits += [numpy_helper.from_array(np.zeros((e, h), np.float32), f"{name}.gate"),
                  numpy_helper.from_array(np.zeros(e, np.float32), f"{name}.bias")]
        nodes.append(helper.make_node("MoERouter", ["hidden", f"{name}.gate", f"{name}.bias"],
                                      [f"{name}.w", f"{name}.ids"], name=name, domain=R1C_DOMAIN, **attrs))
        outputs += [helper.make_tensor_value_info(f"{name}.w", TensorProto.FLOAT, ["T", attrs["top_k"]]),
                    helper.make_tensor_value_info(f"{name}.ids", TensorProto.INT32, ["T", attrs["top_k"]])]
    graph = helper.make_graph(nodes, "routers", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", h])],
                              outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(R1C_DOMAIN, 1)]),
              str(path))
    return path


def test_bundle_kernels_follow_each_router_nodes_mode(tmp_path: Path) -> None:
    """`r1c build`'s kernel library holds, per router node, the routing kernel of that node's topk_method/scoring
    (greedy routes as one group); a mode the op does not define is refused by node name before anything compiles."""
    from r1c.runtime.trt_kernels import model_kernel_specs

    path = _router_model(tmp_path / "model.onnx", ROUTER_MODES)
    routing = [s.constexprs for s in model_kernel_specs(path, 64) if s.name == "moe_router"]
    got = {(c["V3"], c["SOFTMAX"], c["N_GROUP"], c["TOPK_GROUP"], c["PER_GROUP"]) for c in routing}
    assert got == {(True, False, 4, 2, 4), (False, True, 4, 2, 4), (False, True, 1, 1, 16)}, routing
    bad = dict(ROUTER_MODES["greedy"], norm_topk_prob=1)
    with pytest.raises(BuildError, match=r"r1c node v2_norm: .*norm_topk_prob=1 with topk_method 'greedy'"):
        model_kernel_specs(_router_model(tmp_path / "bad.onnx", {"v2_norm": bad}), 64)


def test_experts_config_by_token_count() -> None:
    r1 = ExpertsProblem(1, 8, 256, 7168, 2048, "bfloat16", "float8_e4m3fn")
    picks = {t: select_config(dataclasses.replace(r1, tokens=t)) for t in (1, 4, 5, 64, 512, 1536, 4096)}
    assert picks[1].path == picks[4].path == "decode"  # T*K <= 32
    assert (picks[5].block_m, picks[64].block_m, picks[512].block_m) == (16, 16, 16)  # <= 16 rows per expert
    assert (picks[1536].block_m, picks[1536].gemm1_warps) == (32, 4)
    assert (picks[4096].block_m, picks[4096].gemm1_warps, picks[4096].gemm2_warps) == (64, 8, 4)


def test_fp8_linear_splits_k_for_decode_only() -> None:
    kb = 7168 // 128
    dec = LinearProblem(1, 7168, 576, "bfloat16")  # kv_a_proj: 9 tiles of 64 rows would idle the GPU
    s = splits(dec, linear_config(dec))
    gemm = linear_plan(dec).launches[1]
    per = gemm.args[gemm.spec.arg_names().index("K_PER_SPLIT")]
    assert s > 1 and gemm.grid[1] == s and per * s >= kb and per * (s - 1) < kb  # every split has K blocks
    assert gemm.grid[0] * s >= 200  # ~2 programs per SM of a 132-SM GPU
    # decode too quantizes the activations in a launch of its own (measured faster on the H200 than QUANT_A)
    assert [la.spec.name for la in linear_plan(dec).launches] == ["quant_act_1x128", "fp8_linear", "splitk_reduce"]
    assert not gemm.spec.constexprs["QUANT_A"] and gemm.spec.signature["a_ptr"] == "*fp8e4nv"
    fused = linear_plan(dec, dataclasses.replace(linear_config(dec), fuse_quant=True)).launches[0]
    assert fused.spec.constexprs["QUANT_A"] and fused.spec.signature["a_ptr"] == "*bf16"
    small = LinearProblem(40, 7168, 2048, "bfloat16")
    assert [la.spec.name for la in linear_plan(small).launches] == ["quant_act_1x128", "fp8_linear", "splitk_reduce"]
    pre = LinearProblem(4096, 7168, 2048, "bfloat16")
    assert [la.spec.name for la in linear_plan(pre).launches] == ["quant_act_1x128", "fp8_linear"]
    assert linear_plan(pre).launches[1].grid == (64 * 16, 1, 1)  # 64 x 128 tiles, one warpgroup
    assert linear_plan(pre).launches[1].spec.num_warps == 4


# ---- the enqueue path through a fake CUDA driver ------------------------------------------------------------------
class FakeDriver:
    def __init__(self) -> None:
        self.loaded: list[tuple[str, int]] = []
        self.launches: list[dict[str, Any]] = []
        self.current = 0

    def load_function(self, cubin: bytes, name: str, shared: int) -> str:
        self.loaded.append((name, shared))
        return f"fn:{name}:{len(self.loaded)}"

    def make_current(self) -> None:
        self.current += 1

    def launch(self, fn: Any, grid: Any, block: int, shared: int, stream: int, params: Any) -> None:
        self.launches.append({"fn": fn, "grid": grid, "block": block, "shared": shared, "stream": stream,
                              "params": params})


_CT = {"u64": ctypes.c_uint64, "u32": ctypes.c_uint32, "f32": ctypes.c_float}


def _fake_library(tmp: Path, plan: Plan) -> KernelLibrary:
    """An index whose entries follow the plan's specs (PTX types from the argument types, + 2 scratch pointers)."""
    kernels = {}
    for la in plan.launches:
        s = la.spec
        params = ["u64" if t.startswith("*") else "f32" if t == "fp32" else "u32"
                  for t in (s.signature[n] for n in s.arg_names())] + ["u64", "u64"]
        cubin = tmp / f"{s.key}.cubin"
        cubin.write_bytes(s.key.encode())
        kernels[s.key] = {"name": s.name, "function": f"_{s.name}_kernel", "cubin": cubin.name,
                          "sha256": hashlib.sha256(s.key.encode()).hexdigest(),
                          "num_warps": s.num_warps, "shared": 1000 + s.num_warps, "params": params,
                          "args": len(s.arg_names())}
    (tmp / "index.json").write_text(json.dumps({"format": 1, "compute_capability": "9.0", "triton": "x",
                                                "kernels": kernels}))
    return KernelLibrary(tmp)


def _read_params(params: Any, types: list[str]) -> list[Any]:
    return [ctypes.cast(params[i], ctypes.POINTER(_CT[t])).contents.value for i, t in enumerate(types)]


def test_driver_runner_launches_the_plan_with_resolved_pointers(tmp_path: Path) -> None:
    plan = experts_plan(dataclasses.replace(EXPERTS, tokens=100))  # the sorted path: 8 launches
    lib = _fake_library(tmp_path, plan)
    driver = FakeDriver()
    runner = DriverRunner(lib, driver)
    prepared = runner.prepare(plan)
    runner.prepare(plan)
    assert len(driver.loaded) == len({la.spec.key for la in plan.launches})  # each kernel loaded once
    ins, outs, ws, stream = [0x1000 * (i + 1) for i in range(7)], [0xA000], 0x100000, 77
    runner.run(prepared, ins, outs, ws, stream)
    assert driver.current == 1 and len(driver.launches) == len(plan.launches)
    for la, got in zip(plan.launches, driver.launches):
        entry = lib.entry(la.spec)
        assert got["grid"] == la.grid and got["block"] == 32 * la.spec.num_warps and got["stream"] == stream
        assert got["shared"] == entry["shared"]
        values = _read_params(got["params"], entry["params"])
        want: list[Any] = []
        for a in la.args:
            if isinstance(a, Buf):
                want.append({"in": lambda i: ins[i], "out": lambda i: outs[i],
                             "ws": lambda i: ws + plan.regions[i].offset}[a.kind](a.index))
            else:
                want.append(pytest.approx(a) if isinstance(a, float) else a)
        assert values == [*want, 0, 0], la.spec.name  # then the two NULL scratch pointers


def test_kernel_library_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no kernel library"):
        KernelLibrary(tmp_path)
    plan = linear_plan(dataclasses.replace(LINEAR, tokens=3))
    lib = _fake_library(tmp_path, plan)
    other = linear_plan(dataclasses.replace(LINEAR, tokens=150))  # other tiles: kernels the library lacks
    with pytest.raises(BundleError, match=r"has no kernel (quant_act_1x128|fp8_linear)-"):
        DriverRunner(lib, FakeDriver()).prepare(other)
    entry = lib.entry(plan.launches[0].spec)
    with pytest.raises(BundleError, match="arguments"):
        parameter_template(entry, plan.launches[0].args[:-1])
    (tmp_path / entry["cubin"]).write_bytes(b"edited")
    with pytest.raises(BundleError, match="sha256"):
        lib.cubin(plan.launches[0].spec)


def test_kernel_key_covers_the_jit_helpers_a_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library key hashes the kernel's source and its `@triton.jit` callees' (transitively): the experts' GEMM1
    inlines `fp8_triton.quantize_groups`, so an edit there must change that kernel's key (a stale cubin otherwise)."""
    import inspect

    from r1c.plugins import _triton
    from r1c.plugins.fp8_triton import quantize_groups
    from r1c.plugins.moe_experts import kernels

    kernel = kernels._moe_gemm1_swiglu_kernel
    source = _triton._source(kernel)
    assert source.startswith(inspect.getsource(kernel.fn))  # the kernel first, then its callees
    assert inspect.getsource(quantize_groups.fn) in source
    spec = next(s for s in MoEExpertsOp().kernel_specs({}, EXPERTS) if s.kernel is kernel)
    before = spec.key
    real = inspect.getsource
    monkeypatch.setattr(_triton.inspect, "getsource",
                        lambda obj: real(obj) + "# edited\n" if obj is quantize_groups.fn else real(obj))
    _triton._source.cache_clear()  # the sources are cached per kernel
    try:
        assert spec.key != before
    finally:
        monkeypatch.undo()
        _triton._source.cache_clear()
