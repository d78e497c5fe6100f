"""The TensorRT libraries r1c builds with: full TensorRT (`import tensorrt`, NVIDIA data-center GPUs) and TensorRT for
RTX (`tensorrt_rtx_bindings`, whose builder runs without a GPU for an explicit compute capability), behind one set
of helpers: import with a clear error, the logger, versions, and the RTX parser's library link.

TensorRT for RTX's ONNX parser dlopen()s `libtensorrt_rtx.so`, which the wheel ships only as
`libtensorrt_rtx.so.1`, and aborts the process when the name is missing; the loader reads LD_LIBRARY_PATH only at
process start, so `r1c.runtime.trt_rtx` runs RTX builds in a child process whose LD_LIBRARY_PATH holds a
temporary directory with the link (nothing is written into site-packages).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import types
from pathlib import Path
from typing import Any

from r1c.errors import BuildError

logger = logging.getLogger(__name__)

RTX_MODULE = "tensorrt_rtx_bindings"
RTX_LIBS_MODULE = "tensorrt_rtx_libs"
RTX_LIBRARY = "libtensorrt_rtx.so"
RTX_INSTALL = "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"


def import_tensorrt() -> types.ModuleType:
    """The full TensorRT Python module, or a BuildError that says what to do."""
    try:
        import tensorrt
    except ImportError as e:
        raise BuildError(f"TensorRT is not installed: `import tensorrt` failed ({e}); install TensorRT 10.x for "
                         "Hopper (pip install tensorrt-cu12), or use --target onnxruntime / tensorrt-rtx") from None
    return tensorrt


def import_tensorrt_rtx() -> types.ModuleType:
    """TensorRT for RTX's Python module, or a BuildError that says how to install it."""
    try:
        import tensorrt_rtx_bindings
    except ImportError as e:
        raise BuildError(f"TensorRT for RTX is not installed: `import {RTX_MODULE}` failed ({e}); {RTX_INSTALL}"
                         ) from None
    return tensorrt_rtx_bindings


def has_tensorrt_rtx() -> bool:
    return importlib.util.find_spec(RTX_MODULE) is not None


def is_rtx(trt: types.ModuleType) -> bool:
    return trt.__name__.startswith(RTX_MODULE)


def rtx_library_dir() -> Path:
    """The directory of the TensorRT-RTX wheel's shared libraries (libtensorrt_rtx.so.1, the ONNX parser)."""
    spec = importlib.util.find_spec(RTX_LIBS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"TensorRT for RTX's libraries are not installed (no module {RTX_LIBS_MODULE}): "
                         f"{RTX_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def rtx_parser_library_reachable(lib_dir: Path) -> bool:
    """Whether dlopen("libtensorrt_rtx.so") can succeed in this process (beside the parser or on LD_LIBRARY_PATH)."""
    dirs = [lib_dir, *(Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p)]
    return any((d / RTX_LIBRARY).exists() for d in dirs)


def link_rtx_library(lib_dir: Path, into: Path) -> None:
    """Symlink the RTX libraries into `into` under the names the ONNX parser dlopen()s."""
    for real in sorted(lib_dir.glob("libtensorrt_rtx.so.*")):
        for name in (real.name, RTX_LIBRARY):
            link = into / name
            if not link.exists():
                link.symlink_to(real)


def make_logger(trt: types.ModuleType) -> Any:
    """A TensorRT ILogger that forwards to Python logging and keeps the error messages (for BuildError)."""

    def __init__(self: Any) -> None:
        trt.ILogger.__init__(self)
        self.errors = []

    def log(self: Any, severity: Any, msg: str) -> None:
        if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
            self.errors.append(msg)
            logger.error("TensorRT: %s", msg)
        elif severity == trt.ILogger.Severity.WARNING:
            logger.info("TensorRT warning: %s", msg)  # advisory (e.g. int64 bindings); shown with -v
        else:
            logger.debug("TensorRT: %s", msg)

    cls = type("R1CTensorRTLogger", (trt.ILogger,), {"__init__": __init__, "log": log})
    return cls()


def module_version(trt: types.ModuleType) -> str:
    return str(trt.__version__)


def library_key(trt: types.ModuleType) -> str:
    """The manifest's `libraries` key for this TensorRT module."""
    return "tensorrt_rtx" if is_rtx(trt) else "tensorrt"


def parser_version(trt: types.ModuleType) -> str:
    """The ONNX parser's version as the library reports it (what `passes/tensorrt_ops.py` is tied to)."""
    return f"{library_key(trt)} {module_version(trt)} (nv_onnx_parser {trt.get_nv_onnx_parser_version()})"
