"""scripts/gpu_check.py on the CPU: its dry run (small shapes, Triton's interpreter) goes through every step's code,
so the one GPU run the project gets cannot fail on a typo, an import or a shape; the table's arithmetic by hand.

The quick dry run (kernels indexed, not compiled: the AOT tests compile) is in the default tier; the full dry run,
which also compiles every kernel in child processes as the GPU run does, is `slow`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["env", "tests", "aot", "weights", "correct", "bench", "sweep", "layer"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _dry_run(tmp_path: Path, *extra: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads((tmp_path / "gpu_check.json").read_text()) if (tmp_path / "gpu_check.json").exists() else {}
    return proc, report


def _check(proc: subprocess.CompletedProcess[str], report: dict, tmp_path: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = report["rows"]
    assert {r["step"] for r in rows} == set(STEPS)
    assert not [r for r in rows if r["status"] == "FAIL"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("| step | item | tokens | ms | TFLOP/s | % peak | GB/s | % HBM | % floor | vs bf16 |")
    assert "| correct | experts FP8 (sorted) |" in table and "| layer | fp8 FP8Linear x21 vs matched f64 |" in table
    assert "| sweep | linear 16x64 w4 s4 fused sk264 |" in table
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.count("| bench ") >= 6  # rows were printed as they came


def test_quick_dry_run_runs_every_step(tmp_path: Path) -> None:
    proc, report = _dry_run(tmp_path, "--quick", "--budget-scale", "4", timeout=600)
    _check(proc, report, tmp_path)


@pytest.mark.slow
def test_full_dry_run_compiles_and_runs_every_step(tmp_path: Path) -> None:
    proc, report = _dry_run(tmp_path, "--budget-scale", "6", "--total", "1500", timeout=1800)
    _check(proc, report, tmp_path)
    assert "| layer | tiny fp32 3 layers vs CPU bundle |" in (tmp_path / "gpu_check.md").read_text()
    aot = [r for r in report["rows"] if r["step"] == "aot"]
    assert aot[0]["status"] == "ok" and "kernels for sm_90" in aot[0]["item"]


def test_a_failing_step_is_a_row_and_the_rest_still_run(tmp_path: Path) -> None:
    """Steps that need the aot step (skipped here) each fail with a row; the run exits 1 and still prints the table."""
    proc, report = _dry_run(tmp_path, "--steps", "weights,correct,layer", timeout=300)
    assert proc.returncode == 1
    by_step = {r["step"]: r for r in report["rows"]}
    assert by_step["weights"]["status"] == "ok"
    assert by_step["correct"]["status"] == by_step["layer"]["status"] == "FAIL"
    assert "gpu_check: 4 rows, 2 failed" in proc.stdout


def test_table_rates_against_the_peaks() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_check_report import PEAKS, Row

    # 1 TFLOP in 1 ms of FP8 with 2.4 GB: 1000 TFLOP/s (50.5% of 1979), 2400 GB/s (50% of 4.8 TB/s); the floor is the
    # compute time 0.505 ms: 50.5%; 3 ms baseline: 3x
    cells = Row("bench", "x", 8, 1.0, 1e12, "fp8", 2.4e9, 3.0).cells()
    assert cells[3:10] == ["1.0000", "1000.0", "50.5", "2400", "50.0", "50.5", "3.00"]
    assert PEAKS == {"hbm": 4.8e12, "fp8": 1979e12, "bf16": 989e12, "tf32": 494e12, "fp32": 67e12}


def _layer_module() -> object:
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check_layer

    return gpu_check_layer


def test_layer_per_op_checks_fail_on_planted_faults() -> None:
    """The layer step's FP8 per-op rows pass on what the kernels compute (the matched float64 model's outputs) and
    fail on a FP8Linear that skips the activation quantization, an experts output off by 1e-3 of its max in one
    element, and a router with two ids swapped in one row (interpreter noise: 1e-5 of the sum of |products|)."""
    import io

    import torch

    layer: Any = _layer_module()  # (puts scripts/ on sys.path)
    from gpu_check_report import Table
    from gpu_check_steps import Ctx

    from r1c.config import preset
    from r1c.plugins.fp8 import dequantize, quantize
    from r1c.plugins.fp8_matched import experts_matched, linear_matched
    from r1c.plugins.moe_router.reference import moe_router_reference

    config = preset("tiny")
    gen = torch.Generator().manual_seed(0)
    t, h, e, i = 14, config.hidden_size, config.n_routed_experts, config.moe_intermediate_size
    x = torch.randn(t, h, generator=gen)
    wq, ws = quantize(torch.randn(96, h, generator=gen) / h**0.5)
    q13, s13 = quantize(torch.randn(e, 2 * i, h, generator=gen) / h**0.5)
    q2, s2 = quantize(torch.randn(e, h, i, generator=gen) / i**0.5)
    gate, bias = torch.randn(e, h, generator=gen) / h**0.5, torch.randn(e, generator=gen) * 0.1
    attrs = layer.router_attrs(config)
    rw, rid = moe_router_reference(x, gate, bias, **attrs)
    ex_in = [x, rw, rid, q13, q2, s13, s2]
    good = {"linear": linear_matched(x, wq, ws).out.float(),
            "experts": experts_matched(*ex_in, quantize_act=True).out.float()}
    unquantized = (x.double() @ dequantize(wq, ws).double().t()).float()
    off = good["experts"].clone()
    off[3, 5] += 1e-3 * off.abs().max()
    swapped = rid.clone()
    swapped[2, [0, 1]] = swapped[2, [1, 0]]

    def rows(linear: torch.Tensor, experts: torch.Tensor, ids: torch.Tensor) -> list[str]:
        calls = [layer.Call("router", [x, gate, bias], [rw, ids]), layer.Call("experts", ex_in, [experts]),
                 layer.Call("linear", [x, wq, ws], [linear])]
        table = Table(io.StringIO(), None)
        layer._check_fp8_ops(Ctx(dry=True, cuda=False, table=table), table, config, {}, calls, t)
        return [r.status for r in table.rows]

    assert rows(good["linear"], good["experts"], rid) == ["ok", "ok", "ok"]
    assert rows(unquantized, good["experts"], rid) == ["ok", "ok", "FAIL"]
    assert rows(good["linear"], off, rid) == ["ok", "FAIL", "ok"]
    assert rows(good["linear"], good["experts"], swapped) == ["FAIL", "ok", "ok"]


def test_hopper_accumulation_model_truncates_within_its_bound() -> None:
    """`hopper_fp8_dot` (the layer row's model of FP8 tensor-core accumulation): with 52 bits it is the exact sum;
    with 13 it errs, by less than 4 instructions x 33 addends x 2^-12 of the sum of |products| (each addend
    truncated below 2^-13 of the largest one, itself at most twice the sum's magnitude bound)."""
    import torch

    from r1c.plugins.fp8_matched import hopper_fp8_dot

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(6, 128, generator=gen).to(torch.float8_e4m3fn).double()
    b = (torch.randn(5, 128, generator=gen) * 4).to(torch.float8_e4m3fn).double()
    exact, mag = a @ b.t(), a.abs() @ b.abs().t()
    assert torch.allclose(hopper_fp8_dot(a, b, bits=52), exact, rtol=0, atol=1e-12)
    err = (hopper_fp8_dot(a, b, bits=13) - exact).abs()
    assert 0 < float(err.max()) and bool((err <= 4 * 33 * 2.0**-12 * mag).all())
