"""Output directories that appear whole or not at all (export, optimize, build share this).

A stage writes into a hidden sibling `.<name>.r1c-<random>` and renames it to `<name>` when done; on any error
or interrupt (SIGINT, and SIGTERM, which the CLI turns into the same) the sibling is removed. A SIGKILL cannot
be caught: the sibling stays, and the next run on the same output path removes it. Each sibling holds a
PARTIAL_MARK file naming the host and process that writes it, so that the next run removes only the leftovers
of writers that are gone, never a directory another live run is writing. Single output files (`--logits-out`)
go through a hidden `.<name>.r1c-<pid>` sibling the same way (`atomic_output_file`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from r1c.errors import R1CError

logger = logging.getLogger(__name__)

PARTIAL_MARK = ".r1c-partial"


def _prefix(out: Path) -> str:
    return f".{out.name}.r1c-"


def check_output_path(out: Path, error: type[R1CError], stage: str) -> None:
    """Refuse a path that names no directory, or whose nearest existing ancestor is not a directory or cannot
    be written (probed by making and removing a hidden directory in it: permissions alone do not tell, e.g.
    for root or on a read-only mount)."""
    if out.name in ("", ".", ".."):
        shown = "empty (or '.')" if str(out) == "." else repr(str(out))
        raise error(f"{stage}: the output path is {shown}; it must name a new directory (e.g. -o out/model)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"{stage}: cannot create {out}: {parent} is not a directory")
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".r1c-probe-", dir=parent))
            except OSError as e:
                raise error(f"{stage}: cannot create {out}: {e.strerror or e}") from None
            break


def check_output_dir(out: Path, error: type[R1CError], stage: str) -> None:
    """Refuse an output that exists and is not an empty directory (nothing of the user's is overwritten)."""
    check_output_path(out, error, stage)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "not an empty directory"
        raise error(f"{stage}: output {out} exists and is {what}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_alive(mark: Path) -> bool:
    """Whether the process named in a partial directory's mark may still be writing it."""
    try:
        host, pid_text = mark.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False  # no readable mark: written by nothing that still runs (the mark is the first thing made)
    if host != socket.gethostname():
        return True  # another machine's run (a shared file system): not ours to judge
    return _pid_alive(pid)


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the partial siblings of `out` left by killed runs (see the module docstring); returns them."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for candidate in out.parent.glob(_prefix(out) + "*"):
        if candidate.is_dir() and not _writer_alive(candidate / PARTIAL_MARK):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
            logger.warning("removed %s, left by an interrupted run", candidate)
    return removed


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, error: type[R1CError], stage: str) -> Iterator[Path]:
    """Yields a sibling temp directory to write into; on success it is renamed to `out`, on any error removed."""
    out = Path(out)
    check_output_dir(out, error, stage)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), dir=out.parent))
    except OSError as e:
        raise error(f"{stage}: cannot create {out}: {e.strerror or e}") from None
    try:
        (tmp / PARTIAL_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary directory
        yield tmp
        (tmp / PARTIAL_MARK).unlink()
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # the disk filled up, a directory vanished, ...
            where = f" ({e.filename})" if e.filename else ""
            raise error(f"{stage}: {e.strerror or e}{where}; nothing was written to {out}") from None
        raise


def check_output_file(path: Path, error: type[R1CError], what: str, *, create_parent: bool = False) -> None:
    """Refuse a file path that cannot be written whole: no name, a directory, a parent that is not a directory,
    or (unless `create_parent`: the writer makes it) a parent that does not exist."""
    if path.name in ("", ".", ".."):
        raise error(f"{what}: {str(path)!r} names no file")
    if path.is_dir():
        raise error(f"{what}: {path} is a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"{what}: {parent} is not a directory")
            break
        if not create_parent:
            raise error(f"{what}: directory {parent} does not exist")


@contextlib.contextmanager
def atomic_output_file(path: Path, error: type[R1CError], what: str) -> Iterator[Path]:
    """Yields a hidden sibling `.<name>.r1c-<pid>` to write; renamed to `path` on success, removed on any error
    (no partial file). Such siblings of processes that are gone (killed) are removed first."""
    check_output_file(path, error, what)
    for stale in path.parent.glob(f".{path.name}.r1c-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.r1c-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise error(f"{what}: cannot write {path}: {e.strerror or e}") from None
        raise
