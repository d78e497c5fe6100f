"""Build and install the C ABI with CMake (`r1c capi`): libr1c.so, r1c.h, r1c.hpp, a CMake package and r1c.pc.

The library embeds the Python that builds it (`sys.executable`, so its venv and r1c are found at run time). The
install prefix is keyed by the sources, that Python and the r1c version, so a changed source or another venv
builds afresh; an up-to-date prefix is reused. Needs cmake, a C compiler and Python's headers and shared library
(Debian: `apt-get install cmake g++ python3-dev`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import r1c
from r1c.errors import BuildError

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent
SOURCES = ("CMakeLists.txt", "src/r1c.c", "tools/probe.c", "include/r1c/r1c.h", "include/r1c/r1c.hpp",
           "cmake/r1cConfig.cmake", "cmake/r1c.pc.in")
STAMP = "r1c-capi.key"


@dataclasses.dataclass(frozen=True)
class CapiInstall:
    prefix: Path

    @property
    def include_dir(self) -> Path:
        return self.prefix / "include"

    @property
    def lib_dir(self) -> Path:
        return self.prefix / "lib"

    @property
    def library(self) -> Path:
        return self.lib_dir / "libr1c.so"

    @property
    def probe(self) -> Path:
        return self.prefix / "bin" / "r1c_capi_probe"


def build_key() -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        h.update(rel.encode() + b"\0" + (SOURCE / rel).read_bytes() + b"\0")
    h.update(sys.executable.encode() + b"\0" + r1c.__version__.encode())
    return h.hexdigest()[:16]


def default_prefix() -> Path:
    env = os.environ.get("R1C_CAPI_PREFIX")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "r1c" / "capi" / build_key()


def check_prefix(prefix: Path) -> None:
    """Refuse an install prefix that cannot be written, or that holds something other than an earlier install (a
    build replaces the prefix whole: it must never remove a directory of the user's). Raises `BuildError`."""
    from r1c.outdir import check_output_path

    check_output_path(prefix, BuildError, "capi")
    if prefix.exists() and not prefix.is_dir():
        raise BuildError(f"capi: install prefix {prefix} exists and is a file")
    if prefix.is_dir() and any(prefix.iterdir()) and not (prefix / STAMP).is_file():
        raise BuildError(f"capi: install prefix {prefix} holds files of something else (no {STAMP}); a build "
                         "replaces the prefix whole, so give a new or empty directory")


def build_capi(dest: Path | None = None, *, force: bool = False,
               progress: Callable[[str], None] | None = None) -> CapiInstall:
    """Build and install into `dest` (default `default_prefix()`) unless it is up to date; raises `BuildError`."""
    prefix = Path(dest) if dest is not None else default_prefix()
    inst = CapiInstall(prefix)
    key = build_key()
    if not force and inst.library.is_file() and (prefix / STAMP).is_file() and (prefix / STAMP).read_text() == key:
        return inst
    check_prefix(prefix)
    if shutil.which("cmake") is None:
        raise BuildError("capi: cmake is not installed (Debian: apt-get install cmake g++ python3-dev)")
    work = prefix.with_name(prefix.name + f".build-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    stage = work / "install"
    if progress is not None:
        progress(f"capi: building libr1c into {prefix}")
    cmds = [
        ["cmake", "-S", str(SOURCE), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
         f"-DPython3_EXECUTABLE={sys.executable}", f"-DCMAKE_INSTALL_PREFIX={prefix}"],
        ["cmake", "--build", str(work / "build"), "--parallel", str(max(1, min(os.cpu_count() or 1, 4)))],
        ["cmake", "--install", str(work / "build"), "--prefix", str(stage)],
    ]
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            shutil.rmtree(work, ignore_errors=True)
            raise BuildError(f"capi: `{' '.join(cmd[:2])}` failed:\n{tail}")
    (stage / STAMP).write_text(key)
    # The pkg-config and CMake files name the final prefix; the staged tree moves there whole.
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    stage.rename(prefix)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("built %s", inst.library)
    return inst
