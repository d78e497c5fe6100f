"""Output directories that appear whole or not at all (export, optimize, build share this)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from r1c.errors import R1CError


def check_output_dir(out: Path, error: type[R1CError], stage: str) -> None:
    """Refuse an output that exists and is not an empty directory (nothing of the user's is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise error(f"{stage}: output {out} exists and is not an empty directory")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, error: type[R1CError], stage: str) -> Iterator[Path]:
    """Yields a sibling temp directory to write into; on success it is renamed to `out`, on any error removed."""
    out = Path(out)
    check_output_dir(out, error, stage)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary directory
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
