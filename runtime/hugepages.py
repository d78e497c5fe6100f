"""Anonymous memory backed by transparent huge pages, for data that kernels stream every step.

A decode step reads every weight it touches once, front to back, so its time is bytes over the read bandwidth the
memory it lies in gets. Memory of 4 KiB pages costs a TLB miss every 4 KiB; ONNX Runtime maps a bundle's
`model.onnx.data` from the page cache, in such pages. Measured on the project's 2-core VM (Zen 4, 2 threads,
`torch.sum` over 190 MB, 20 interleaved rounds): a buffer advised `MADV_HUGEPAGE` read 60.5 GB/s where the same
size of 4 KiB pages read 51.3 (1.17x; equal at the VM's slower bandwidth level). Users: `r1c.runtime.kernel_weights`
(the weights of r1c's CPU kernels) and the benchmark's bandwidth probe (`r1c.runtime.bench.roofline.huge_ones`).

Errors: `OSError` / `MemoryError` from the mapping when the memory is not there.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page (PMD) size
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
    boundary and mapped in whole 2 MiB from there (so that each 2 MiB of it can be one page, the last one too, and a
    buffer under 2 MiB still lies in a mapping the kernel deems eligible: smaps' THPeligible is 1 only for a mapping
    that holds an aligned 2 MiB). The array keeps its mapping alive (numpy holds the
    `mmap` as the buffer's base). Where `mmap.madvise` or MADV_HUGEPAGE is missing, or the kernel's setting is
    'never', it is plain anonymous memory (still one private allocation, never the page cache). Raises `OSError` or
    `MemoryError` when the mapping fails."""
    size = -(-max(int(nbytes), 1) // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and thp_mode() in ("always", "madvise"):
        m.madvise(advice)
    buf = np.frombuffer(m, dtype=np.uint8)
    start = (-buf.ctypes.data) % HUGE_PAGE
    return buf[start:start + int(nbytes)]
