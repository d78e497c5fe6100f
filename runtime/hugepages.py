"""Weights in anonymous memory backed by transparent huge pages, for kernels that stream them every step.

A decode step reads every weight it touches once, front to back, so its time is bytes over the read bandwidth the
memory it lies in gets. Memory of 4 KiB pages costs a TLB miss every 4 KiB; ONNX Runtime reads a bundle's external
weights into such pages (or maps `model.onnx.data` from the page cache, whose physical pages are wherever the file
landed). Measured on the project's 2-core VM (Zen 4, 2 threads, `torch.sum` over 190 MB, 20 interleaved rounds):
a buffer advised `MADV_HUGEPAGE` read 60.5 GB/s where the same size of 4 KiB pages read 51.3 (1.17x); one fp32
decode step of the 187M-parameter benchmark checkpoint took 6.95 ms with r1c's kernels reading their weights from
such an arena and 7.81 ms as ONNX Runtime loads them (1.14x), interleaved in one process (README, issue 11 note).

`huge_empty(nbytes)` is such a buffer (Linux `madvise(MADV_HUGEPAGE)`, 2 MiB aligned; plain anonymous memory where
the kernel has no transparent huge pages, `thp_mode()` says which). `load_external(model_path, names)` reads the named
external-data initializers of an ONNX model into one such arena, for `SessionOptions.add_initializer` (ONNX Runtime
then uses the buffers in place: no copy, and no prepacking, which is why `r1c.runtime.ort_backend` hands over only
the weights of r1c's own CPU kernels, which take their weights as they lie).

Errors: `BundleError` when an external-data file is missing or shorter than a tensor's offset + length says.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from io import BufferedReader
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BundleError

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page (PMD) size
ALIGN = 64  # bytes between tensors in an arena: a cache line, what ONNX Runtime's CPU allocator aligns to
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent-huge-page setting: 'always', 'madvise' or 'never' (the bracketed word of
    /sys/kernel/mm/transparent_hugepage/enabled), or 'unavailable' (not Linux, or no such file)."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unavailable"


def huge_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 array of `nbytes` in anonymous memory advised for huge pages, starting on a 2 MiB
    boundary (so that every whole 2 MiB of it can be one page). The array keeps its mapping alive (numpy holds the
    `mmap` as the buffer's base). Where `mmap.madvise` or MADV_HUGEPAGE is missing, or the kernel's setting is
    'never', it is plain anonymous memory (still one sequential allocation, never page cache)."""
    size = max(int(nbytes), 1) + HUGE_PAGE
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and thp_mode() in ("always", "madvise"):
        m.madvise(advice)
    buf = np.frombuffer(m, dtype=np.uint8)
    start = (-buf.ctypes.data) % HUGE_PAGE
    return buf[start:start + int(nbytes)]


def _external(tensor: Any) -> tuple[str, int, int]:
    """(location, offset, length) of an ONNX TensorProto stored as external data (ONNX external-data keys)."""
    entries = {e.key: e.value for e in tensor.external_data}
    length = entries.get("length")
    if length is None:  # the ONNX spec lets length be omitted: the tensor's dtype size times its element count
        import onnx

        count = int(np.prod(tensor.dims, dtype=np.int64))
        length = count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return entries["location"], int(entries.get("offset", 0)), int(length)


def load_external(model_path: Path, names: Iterable[str]) -> dict[str, tuple[np.ndarray, int, tuple[int, ...]]]:
    """The external-data initializers `names` of the ONNX model at `model_path`, read into one `huge_empty` arena:
    {name: (raw bytes as uint8 [length] in the arena, ONNX element type, dims)}; the bytes are the tensor's as stored
    (little-endian, row-major), each tensor 64-byte aligned. Names that are not external-data initializers of the
    model are left out. Reads files in offset order (one pass over each). Raises `BundleError` when a file is
    missing, short, or outside the model's directory (as ONNX Runtime refuses it)."""
    import onnx

    wanted = set(names)
    proto = onnx.load(str(model_path), load_external_data=False)
    tensors = [t for t in proto.graph.initializer
               if t.name in wanted and t.data_location == onnx.TensorProto.EXTERNAL]
    spans = sorted(((*_external(t), t) for t in tensors), key=lambda s: (s[0], s[1]))
    total = sum(-(-length // ALIGN) * ALIGN for _, _, length, _ in spans)
    arena = huge_empty(total)
    out: dict[str, tuple[np.ndarray, int, tuple[int, ...]]] = {}
    at = 0
    opened: dict[str, BufferedReader] = {}
    try:
        for location, offset, length, t in spans:
            f = opened.get(location)
            if f is None:
                root = model_path.parent.resolve()
                path = (root / location).resolve()
                if not path.is_relative_to(root):
                    raise BundleError(f"bundle: weights file {location!r} lies outside {root}")
                try:
                    f = opened[location] = path.open("rb")
                except OSError as e:
                    raise BundleError(f"bundle: cannot read the weights file {path}: {e.strerror}") from None
            f.seek(offset)
            dst = arena[at:at + length]
            if f.readinto(dst.data) != length:
                raise BundleError(f"bundle: {location} is shorter than tensor {t.name} needs "
                                  f"({offset} + {length} bytes)")
            out[t.name] = (dst, int(t.data_type), tuple(int(d) for d in t.dims))
            at += -(-length // ALIGN) * ALIGN
    finally:
        for f in opened.values():
            f.close()
    return out
