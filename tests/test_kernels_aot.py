"""kernels tier, ahead of time: the kernels the plugins launch, compiled for sm_90 on this CPU (Triton's LLVM and its
bundled ptxas; no GPU or driver), their instructions and resources, and the kernel library a bundle carries.

At DeepSeek-R1 shapes (H 7168, I 2048, 256 experts, top-8; FP8 linear 7168 -> 2048), every kernel any token count
can launch (`PluginOp.kernel_specs`) must: target sm_90a; use FP8 `wgmma` (e4m3 x e4m3 -> f32) where it is a
tensor-core GEMM and CUDA-core FP8 conversions where it is a decode GEMV; pipeline its K loop with cp.async; hold
no register spills (`ptxas -v`: a spilled GEMM main loop is an order of magnitude slower, which is what made the
4096-token prefill reach 10.9% of the FP8 peak on the H200); and take, per its PTX, exactly the plan's arguments
plus Triton's trailing scratch pointers. Compilation runs in child processes (the main process may hold the
interpreter).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

import pytest
from kernels_support import REPO, aot_env

pytestmark = [pytest.mark.kernels, pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="triton is not installed")]

_DRIVER = r"""
import json, re, sys, time, warnings
warnings.filterwarnings("ignore")
shard, shards = int(sys.argv[1]), int(sys.argv[2])
from r1c.plugins._triton import compile_aot, ptx_params, ptxas_resources
from r1c.plugins.r1_kernels import r1_kernel_specs
specs = r1_kernel_specs()
out = {}
for spec in specs[shard::shards]:
    start = time.perf_counter()
    try:
        compiled = compile_aot(spec, 90)
    except Exception as e:
        out[spec.key] = {"name": spec.name, "error": f"{type(e).__name__}: {e}"[-2000:]}
        continue
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    gemm = spec.name in ("moe_gemm1_swiglu", "moe_gemm2", "fp8_linear")
    out[spec.key] = {
        "name": spec.name,
        "constexprs": {k: v for k, v in spec.constexprs.items() if isinstance(v, (int, bool))},
        "warps": spec.num_warps,
        "args": len(spec.arg_names()),
        "params": ptx_params(ptx)[1],
        "target": target.group(1) if target else None,
        "mma": sorted(set(re.findall(r"((?:wgmma\.mma_async|mma\.sync)\.\S+?)(?=\s)", ptx))),
        "cvt_fp8": sorted(set(re.findall(r"(cvt\.\S*e4m3\S*?)(?=\s)", ptx))),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global", ptx)),
        "cubin_bytes": len(compiled.asm["cubin"]),
        "shared": compiled.metadata.shared,
        "resources": ptxas_resources(ptx, 90) if gemm or spec.name.startswith("moe_") else None,
        "seconds": round(time.perf_counter() - start, 2),
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def aot() -> dict[str, Any]:
    start = time.perf_counter()
    shards = 2  # one compiling process per core of the CI machine
    procs = [subprocess.Popen([sys.executable, "-c", _DRIVER, str(i), str(shards)], env=aot_env(), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    results: dict[str, Any] = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0 or not stdout.strip():
            pytest.fail(f"AOT driver failed ({proc.returncode}): {stderr[-3000:]}")
        results |= json.loads(stdout.strip().splitlines()[-1])
    print(f"[aot] compiled {len(results)} kernels for sm_90 in {time.perf_counter() - start:.1f}s")
    for r in results.values():
        print(f"[aot] {r['name']} {r.get('constexprs')} w{r.get('warps')}: smem {r.get('shared')}, "
              f"{r.get('resources')}, mma {r.get('mma')}, {r.get('seconds')}s")
    return results


def _fp8_wgmma(mma: list[str]) -> bool:
    return any(re.match(r"^wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3$", m) for m in mma)


def test_r1_kernels_compile_for_sm90_with_fp8_tensor_cores_and_no_spills(aot: dict[str, Any]) -> None:
    names = {r["name"] for r in aot.values()}
    assert names >= {"router_logits", "moe_router", "moe_count", "moe_offsets", "moe_scatter", "quant_act_1x128",
                     "moe_gemm1_swiglu", "moe_gemm2", "moe_combine", "moe_decode_gemm1", "moe_decode_gemm2_combine",
                     "fp8_linear", "splitk_reduce"}, names
    for key, r in aot.items():
        assert "error" not in r, f"{key}: {r['error']}"
        assert r["target"] == "sm_90a" and r["cubin_bytes"] > 0, r
        assert len(r["params"]) >= r["args"] and set(r["params"][r["args"]:]) <= {"u64"}, r
        if r["resources"] is not None:
            res = r["resources"]
            assert res["spill_stores"] == 0 and res["spill_loads"] == 0, f"{key}: register spills {res}"
        name = r["name"]
        if name in ("moe_gemm1_swiglu", "moe_gemm2", "fp8_linear"):
            assert _fp8_wgmma(r["mma"]), f"{key}: no FP8 wgmma: {r['mma']}"
            assert r["cp_async"] > 0, f"{key}: the K loop is not pipelined with cp.async"
        if name in ("moe_gemm1_swiglu", "quant_act_1x128"):  # FP8 quantization in the epilogue / the kernel
            assert "cvt.rn.satfinite.e4m3x2.f32" in r["cvt_fp8"], f"{key}: {r['cvt_fp8']}"
        if name.startswith("moe_decode"):  # GEMVs on CUDA cores: FP8 converted in registers, no MMA
            assert not r["mma"] and "cvt.rn.f16x2.e4m3x2" in r["cvt_fp8"], f"{key}: {r['mma']} {r['cvt_fp8']}"


def test_prefill_gemms_use_two_warpgroups(aot: dict[str, Any]) -> None:
    """The 64- and 128-row tiles run on 8 warps (two 64-row warpgroups): the configuration that does not spill."""
    big = [r for r in aot.values() if r["name"] in ("moe_gemm1_swiglu", "moe_gemm2", "fp8_linear")
           and r["constexprs"].get("BLOCK_M", 0) >= 64 and not r["constexprs"].get("SWAP_AB")
           and not (r["name"] == "fp8_linear" and r["constexprs"]["BLOCK_M"] == 64)]
    assert big and all(r["warps"] == 8 for r in big), [(r["name"], r["constexprs"], r["warps"]) for r in big]
