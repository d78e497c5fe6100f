"""Temp work lives where the next run finds and removes it (r1c/outdir.py): SIGTERM is handled like SIGINT
(the partial directory is removed, exit 143), and what a SIGKILL leaves (a hidden `.<name>.r1c-*` sibling) is
removed by the next run on that path, while a partial directory whose writer still runs is left alone.

The signals go to real `r1c` processes, sent while their partial directory exists (polled every millisecond;
a run that finished first is retried, up to ATTEMPTS times).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clitools import cli

from r1c.errors import BuildError
from r1c.outdir import PARTIAL_MARK, atomic_output_dir, remove_stale_partials

ATTEMPTS = 5


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.r1c-*"))


def _signal_while_writing(args: list[str], out: Path, sig: int) -> subprocess.CompletedProcess[str] | None:
    """Start `r1c ARGS`, send `sig` once its partial directory exists; None if it finished before that."""
    proc = subprocess.Popen([sys.executable, "-m", "r1c.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if _partials(out):
            proc.send_signal(sig)
            stdout, stderr = proc.communicate(timeout=120)
            return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
        time.sleep(0.001)
    proc.communicate()
    return None


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interrupts")
    code, _, err = cli("export", "--preset", "tiny", "-o", root / "export")
    assert code == 0, err
    return root / "export"


def test_sigterm_during_export_removes_the_partial_directory(tmp_path: Path) -> None:
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"out{attempt}"
        result = _signal_while_writing(["export", "--preset", "tiny", "-o", str(out)], out, signal.SIGTERM)
        if result is None:
            continue
        assert result.returncode == 143, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("r1c: terminated (SIGTERM)"), result.stderr
        assert not out.exists() and not _partials(out)
        return
    pytest.fail(f"the export finished before SIGTERM could be sent, {ATTEMPTS} times")


def test_sigkill_leftovers_are_removed_by_the_next_build(export_dir: Path, tmp_path: Path) -> None:
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"bundle{attempt}"
        result = _signal_while_writing(["build", str(export_dir), "-o", str(out)], out, signal.SIGKILL)
        if result is None:
            continue
        assert result.returncode == -signal.SIGKILL
        left = _partials(out)
        assert len(left) == 1 and not out.exists()  # what SIGKILL leaves
        code, _, err = cli("build", export_dir, "-o", out)
        assert code == 0, err
        assert not _partials(out) and (out / "manifest.json").is_file()
        return
    pytest.fail(f"the build finished before SIGKILL could be sent, {ATTEMPTS} times")


def test_a_live_writers_partial_directory_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    live = tmp_path / f".{out.name}.r1c-live"
    live.mkdir()
    (live / PARTIAL_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    dead = tmp_path / f".{out.name}.r1c-dead"
    dead.mkdir()
    (dead / PARTIAL_MARK).write_text(f"{socket.gethostname()} {_dead_pid()}\n")
    (dead / "model.onnx.data").write_bytes(b"\0" * 1024)
    assert remove_stale_partials(out) == [dead]
    assert live.is_dir() and not dead.exists()
    with atomic_output_dir(out, BuildError, "build") as tmp:
        (tmp / "x").write_text("x")
    assert (out / "x").is_file() and live.is_dir() and [p.name for p in out.iterdir()] == ["x"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_killed_runs_partial_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    from r1c.errors import RuntimeInputError
    from r1c.outdir import atomic_output_file

    target = tmp_path / "logits.npy"
    stale = tmp_path / f".logits.npy.r1c-{_dead_pid()}"
    live = tmp_path / f".logits.npy.r1c-{os.getppid()}"
    stale.write_bytes(b"half")
    live.write_bytes(b"being written")
    with atomic_output_file(target, RuntimeInputError, "--logits-out") as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and not stale.exists() and live.exists()
