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
    assert "| correct | experts FP8 (sorted) |" in table and "| layer | tiny fp8 vs same-quantization CPU |" in table
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
    assert PEAKS == {"hbm": 4.8e12, "fp8": 1979e12, "bf16": 989e12, "fp32": 67e12}
