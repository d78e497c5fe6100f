"""Build r1c's CPU kernel library (the `r1c.cpu` custom-op domain: `MoE` in moe_cpu.cc, `Linear` in linear_cpu.cc,
both over panels.h, `MLAAttention` in attention_cpu.cc, `MLABlock` in mla_block_cpu.cc over kernels.h; register.cc
the entry point; and the native decode step, decode_cpu.cc over team.cc, called through ctypes by
r1c/runtime/native_decode.py) and pick the build a host can run.

A bundle carries the library compiled for two x86-64 micro-architecture levels (the psABI's levels, as GCC's
`-march=x86-64-v3` / `-v4` name them): v4 (AVX-512 F/BW/CD/DQ/VL: 16-float registers) and v3 (AVX2 + FMA: 8).
`r1c build` compiles both (g++, about 3 s each, cached under `${R1C_CACHE:-~/.cache/r1c}/cpu-kernels/<key>/`,
the key hashing the sources, the headers, the compiler's version and the flags) against ONNX Runtime's C/C++ API
headers, found at `$R1C_ORT_INCLUDE` when it is set (only there), else in the cache `scripts/fetch_ort_headers.sh`
fills, then at `/usr/include/onnxruntime` (Debian's `libonnxruntime-dev`). At load, `for_host` picks the highest
level whose CPU flags the host has (`/proc/cpuinfo`). The headers' C API version must not be newer than the installed
runtime's (ONNX Runtime 1.N serves API versions up to N).

Errors: `KernelLibraryError` (a `BuildError`) with one line saying what is missing and how to get it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from r1c.errors import BuildError, BundleError

logger = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(f) for f in ("moe_cpu.cc", "linear_cpu.cc", "attention_cpu.cc",
                                                                  "mla_block_cpu.cc", "team.cc", "decode_cpu.cc",
                                                                  "register.cc"))
# what the sources include from beside them
LOCAL_HEADERS = tuple(Path(__file__).with_name(f) for f in ("panels.h", "kernels.h"))
HEADERS = ("onnxruntime_cxx_api.h", "onnxruntime_c_api.h", "onnxruntime_lite_custom_op.h")  # what panels.h includes
SYSTEM_HEADERS = Path("/usr/include/onnxruntime")
# level -> (g++ -march value, the /proc/cpuinfo flags the level requires; x86-64 psABI levels)
LEVELS: dict[str, tuple[str, frozenset[str]]] = {
    "x86-64-v4": ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma",
                                          "bmi2", "f16c", "movbe"})),
    "x86-64-v3": ("x86-64-v3", frozenset({"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "avx"})),
}
# No -Werror: a newer compiler's new warning must not stop a user's build (tests/test_cpu_moe.py compiles with it).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra")


class KernelLibraryError(BuildError):
    """r1c's CPU kernel library cannot be built here (no compiler, no ONNX Runtime headers, not x86-64)."""


def cache_dir() -> Path:
    root = os.environ.get("R1C_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                        os.path.expanduser("~/.cache"), "r1c")
    return Path(root)


def find_headers() -> Path | None:
    """The directory holding ONNX Runtime's `HEADERS` (order in the module docstring), or None. A set
    `$R1C_ORT_INCLUDE` is the only place looked at (a wrong one is said, not passed over: `why_unavailable`)."""
    env = os.environ.get("R1C_ORT_INCLUDE")
    candidates = [Path(env)] if env else [cache_dir() / "onnxruntime-headers" / "include" / "onnxruntime",
                                          SYSTEM_HEADERS]
    for c in candidates:
        if all((c / h).is_file() for h in HEADERS):
            return c
    return None


def header_api_version(include: Path) -> int:
    """`ORT_API_VERSION` of the headers at `include` (onnxruntime_c_api.h); KernelLibraryError if unreadable."""
    try:
        text = (include / "onnxruntime_c_api.h").read_text(errors="replace")
    except OSError as e:
        raise KernelLibraryError(f"build: cannot read {include}/onnxruntime_c_api.h: {e.strerror}") from None
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not m:
        raise KernelLibraryError(f"build: {include}/onnxruntime_c_api.h has no ORT_API_VERSION")
    return int(m.group(1))


def why_unavailable() -> str | None:
    """None when `compile_libraries` can run here; else why not, in one line with the remedy."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"r1c's CPU kernels are built for x86-64 only (this machine is {platform.machine()})"
    cxx = os.environ.get("CXX")
    if shutil.which(cxx or "g++") is None:
        return f"no C++ compiler: CXX={cxx!r} is not a program" if cxx else "no C++ compiler (install g++, or set CXX)"
    include = find_headers()
    env = os.environ.get("R1C_ORT_INCLUDE")
    if include is None and env:
        return (f"R1C_ORT_INCLUDE={env} does not hold ONNX Runtime's {', '.join(HEADERS)} (point it at "
                "include/onnxruntime, or unset it and run `bash scripts/fetch_ort_headers.sh`)")
    if include is None:
        return ("no ONNX Runtime C/C++ headers (run `bash scripts/fetch_ort_headers.sh`, install Debian 13's "
                "libonnxruntime-dev, or set R1C_ORT_INCLUDE)")
    import onnxruntime as ort

    runtime_api = int(ort.__version__.split(".")[1])
    try:
        header_api = header_api_version(include)
    except KernelLibraryError as e:
        return str(e).removeprefix("build: ")
    if header_api > runtime_api:
        return (f"the ONNX Runtime headers at {include} (C API {header_api}) are newer than the "
                f"installed onnxruntime {ort.__version__}")
    return None


def _compile(level: str, include: Path, notice: Callable[[str], None] | None = None) -> Path:
    """The library for `level`, from the cache or compiled into it (atomically); `notice(message)` before a compile."""
    cxx = os.environ.get("CXX", "g++")
    march, _ = LEVELS[level]
    flags = (*FLAGS, f"-march={march}", "-mtune=generic")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    for part in (*(f.read_bytes() for f in (*SOURCES, *LOCAL_HEADERS)), *((include / h).read_bytes() for h in HEADERS),
                 version.encode(), " ".join(flags).encode()):
        key.update(hashlib.sha256(part).digest())
    out = cache_dir() / "cpu-kernels" / key.hexdigest()[:16] / f"libr1c_cpu.{level}.so"
    if out.is_file():
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()
    except OSError as e:
        raise KernelLibraryError(f"build: r1c's kernel cache {cache_dir()} is not writable ({e.strerror}; set "
                                 "R1C_CACHE to a writable directory)") from None
    cmd = [cxx, *flags, "-I", str(include), *map(str, SOURCES), "-o", str(tmp)]
    logger.info("compiling r1c's CPU kernels for %s: %s", level, " ".join(cmd))
    if notice is not None:
        notice(f"compiling r1c's CPU kernels for {level} into {out.parent} (once per machine and kernel version)")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except BaseException:  # interrupted (or CXX not runnable): no partial file left in the cache
        tmp.unlink(missing_ok=True)
        raise
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = done.stderr.strip().splitlines()
        first = next((line for line in lines if "error" in line), lines[0] if lines else "no output")
        raise KernelLibraryError(f"build: compiling r1c's CPU kernels ({level}) failed: {first.strip()}")
    os.replace(tmp, out)
    return out


def compile_libraries(notice: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The library for every level (level -> path in the cache), compiled where the cache lacks it (`notice` is
    told before each compile: ~30 s each on this project's 2-core VM).
    KernelLibraryError when `why_unavailable()`, the cache is not writable or the compiler fails."""
    why = why_unavailable()
    if why:
        raise KernelLibraryError(f"build: {why}")
    include = find_headers()
    assert include is not None
    return {level: _compile(level, include, notice) for level in LEVELS}


def copy_libraries(compiled: dict[str, Path], dest: Path) -> dict[str, str]:
    """`compile_libraries`' result copied into `dest` (a bundle's `kernels/`); returns level -> file name."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for level, src in compiled.items():
        shutil.copyfile(src, dest / src.name)
        files[level] = src.name
    return files


def host_flags() -> frozenset[str]:
    """The CPU flags of this host (`/proc/cpuinfo`; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(m.group(1).split()) if m else frozenset()


def for_host(files: dict[str, str], flags: frozenset[str] | None = None) -> str:
    """The file (of `files`, level -> name) for the highest level this host runs; BundleError if none."""
    have = host_flags() if flags is None else flags
    for level, (_, needs) in LEVELS.items():
        if level in files and needs <= have:
            return files[level]
    raise BundleError(f"bundle: its CPU kernels are built for {', '.join(sorted(files))}, which this CPU does not "
                      "support (rebuild it with `r1c build --cpu-moe ort`)")
