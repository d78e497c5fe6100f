"""Running the `r1c` CLI in-process from tests, and what every failing command must look like."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from r1c.cli import main


def cli(*args: str | Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `r1c ARGS...`, run in this process."""
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def error_line(code: int, err: str) -> str:
    """The one `r1c: error: ...` line a failed command printed (asserts there is exactly that)."""
    assert code != 0, "the command succeeded"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("r1c: error: "), err
    return lines[0]
