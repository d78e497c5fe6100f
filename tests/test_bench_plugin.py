"""The `r1c_latency` pytest plugin, driven through pytester: no baseline -> skip; --r1c-update-baselines
records; the same code passes; a planted slowdown fails; a baseline from another host is skipped.

Sleeps stand in for the measured code where the statistic is the point (a sleep's median barely moves on a
busy machine); the engine test uses one ONNX Runtime thread and a tolerance that covers cross-run drift.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from r1c.cli import main

pytest_plugins = ["pytester"]

SLEEPY = """
import os, time

def test_sleepy(r1c_latency):
    s = float(os.environ.get("SLEEP_S", "0.01"))
    ci = r1c_latency.check("sleep", lambda: time.sleep(s), repeat=12, warmup=1)
    assert ci is None or ci.n_a == 12
"""

ENGINE = """
import os
from r1c.runtime import load

def test_decode(r1c_latency):
    engine = load(os.environ["R1C_BUNDLE"], session_options={"intra_op_num_threads": 1})
    r1c_latency.check_generate("tiny", engine, batch=2, prompt_len=16, new_tokens=8, repeat=8, warmup=1)
"""


def _plugin_args() -> list[str]:
    """`-p` the plugin unless its pytest11 entry point is installed (then pytest loads it already)."""
    installed = any(ep.value == "r1c.runtime.bench.pytest_plugin"
                    for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "r1c.runtime.bench.pytest_plugin"]


def test_record_pass_and_catch_a_slowdown(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_lat=SLEEPY)
    args = [*_plugin_args(), "--r1c-max-regression", "50%"]
    r = pytester.runpytest(*args, "-rs")
    r.assert_outcomes(skipped=1)
    r.stdout.fnmatch_lines(["*no latency baseline for test_sleepy::sleep*--r1c-update-baselines*"])

    r = pytester.runpytest(*args, "--r1c-update-baselines")
    r.assert_outcomes(passed=1)
    store = pytester.path / "latency_baselines" / "test_lat.json"
    d = json.loads(store.read_text())
    assert d["schema"] == "r1c-latency-baselines/1"
    assert len(d["entries"]["test_sleepy::sleep"]["samples"]["wall_s"]) == 12
    r.stdout.fnmatch_lines(["*r1c latency*", "recorded*test_sleepy::sleep wall_s*"])

    r = pytester.runpytest(*args)
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["ok*test_sleepy::sleep wall_s*"])

    monkeypatch.setenv("SLEEP_S", "0.05")  # 5x slower
    r = pytester.runpytest(*args)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*latency regression in test_sleepy::sleep beyond 50%*", "REGRESSED*"])

    d["entries"]["test_sleepy::sleep"]["host"]["processor"] = "some other CPU"
    store.write_text(json.dumps(d))
    r = pytester.runpytest(*args, "-rs")
    r.assert_outcomes(skipped=1)
    r.stdout.fnmatch_lines(["*recorded on another host*"])


def test_engine_latency_check(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                              tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("plugin")
    runner = CliRunner()
    assert runner.invoke(main, ["export", "--preset", "tiny", "-o", str(root / "e"), "--no-progress"]).exit_code == 0
    assert runner.invoke(main, ["build", str(root / "e"), "-o", str(root / "b")]).exit_code == 0
    monkeypatch.setenv("R1C_BUNDLE", str(root / "b"))
    pytester.makepyfile(test_engine=ENGINE)
    baselines = pytester.path / "custom"
    args = [*_plugin_args(), "--r1c-baselines", str(baselines), "--r1c-max-regression", "100%"]
    pytester.runpytest(*args, "--r1c-update-baselines").assert_outcomes(passed=1)
    entry = json.loads(Path(baselines / "test_engine.json").read_text())["entries"]["test_decode::tiny[b2_p16_n8]"]
    assert set(entry["samples"]) == {"ttft_s", "tpot_s", "e2e_s"}
    r = pytester.runpytest(*args)
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["ok*test_decode::tiny[[]b2_p16_n8[]] e2e_s*"])
