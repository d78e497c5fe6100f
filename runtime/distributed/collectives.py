"""The collectives on numpy arrays, through torch.distributed (no communication code of r1c's own).

`all_reduce` and `all_gather` are what `r1c::AllReduce` / `r1c::AllGather` mean (their SPECs in
`r1c.plugins.all_reduce` / `all_gather`), on the group the node's `group` attribute names (`groups.GROUPS`).
Arrays are handed to torch without a copy (`torch.from_numpy`); all-reduce works in place on a private copy
when the caller's buffer is read-only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from r1c.errors import BundleError
from r1c.plugins.all_reduce.reference import REDUCTIONS
from r1c.runtime.distributed.groups import group


def all_reduce(x: np.ndarray, group_name: str, reduction: str = "sum") -> np.ndarray:
    """Sum of `x` over the group's ranks (same shape and dtype)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"AllReduce: unknown reduction {reduction!r}")
    if not (x.flags.c_contiguous and x.flags.writeable):
        x = np.array(x, order="C", copy=True)
    dist.all_reduce(torch.from_numpy(x), group=group(group_name))
    return x


def all_gather(x: np.ndarray, group_name: str, axis: int, group_size: int,
               out: np.ndarray | None = None, parts: list[torch.Tensor] | None = None) -> np.ndarray:
    """The group's `x` concatenated along `axis` in group-rank order, written into `out` when given (the caller's
    buffer of the gathered shape; returned). `parts`: receive buffers to reuse (a list, filled here on first use
    and re-made when `x`'s shape or dtype changes), else allocated per call. BundleError when the group does not
    have the `group_size` ranks the node was sharded for."""
    g = group(group_name)
    size = dist.get_world_size(g)
    if size != group_size:
        raise BundleError(f"bundle: AllGather over {group_size} ranks, but this process's {group_name!r} group has "
                          f"{size}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    if parts is None:
        parts = []
    if len(parts) != size or parts[0].shape != t.shape or parts[0].dtype != t.dtype:
        parts[:] = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t, group=g)
    return np.concatenate([p.numpy() for p in parts], axis=axis, out=out)
