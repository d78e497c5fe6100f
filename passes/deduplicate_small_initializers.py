"""Merge identical small initializers (shape constants, scalars, norm weights that happen to be equal).

onnx_ir's DeduplicateHashedInitializersPass, limited to tensors of at most SIZE_LIMIT elements: hashing reads
every tensor it considers, and the weights of a 671B model are not worth reading to find duplicates.
"""

from __future__ import annotations

from onnx_ir.passes.common import DeduplicateHashedInitializersPass

SIZE_LIMIT = 1 << 16  # elements


class DeduplicateSmallInitializersPass(DeduplicateHashedInitializersPass):
    """Deduplicates initializers of at most SIZE_LIMIT elements (by content hash)."""

    def __init__(self) -> None:
        super().__init__(size_limit=SIZE_LIMIT)
