"""The op's definition and its PyTorch reference.

`r1c::AllReduce` has no ONNX function body: it is a collective, bound by the runtime to a torch.distributed
process group (gloo on CPUs, NCCL on GPUs) and by TensorRT to a plugin that takes the NCCL communicator.

Input `input` [*] float32/float16/bfloat16 (every rank of the group gives the same shape and dtype).
Output `output` [*], same shape and dtype: the elementwise sum of `input` over the group's ranks; every rank
receives the same values. Attributes: `group` (string) names the process group: `tp` (the tensor-parallel
group of this rank) or `world` (every rank); the bundle manifest lists each group's ranks
(`r1c.passes.shard_layout.ShardLayout.groups`). `reduction` (string): `sum`, the only one the sharding needs.
The order in which ranks' values are added is the backend's: results agree with the reference to float
rounding, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1c.plugins.all_reduce.spec import REDUCTIONS, SPEC  # noqa: F401 (the definition lives in spec.py)


def all_reduce_reference(inputs: Sequence[torch.Tensor], *, reduction: str = "sum") -> torch.Tensor:
    """The output every rank receives, from each rank's `input` (one tensor per rank, in rank order)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"AllReduce: unknown reduction {reduction!r} (expected one of {REDUCTIONS})")
    if not inputs:
        raise ValueError("AllReduce: needs at least one rank's input")
    if any(t.shape != inputs[0].shape or t.dtype != inputs[0].dtype for t in inputs):
        raise ValueError("AllReduce: every rank must give the same shape and dtype")
    return torch.stack([t.to(torch.float64) for t in inputs]).sum(0).to(inputs[0].dtype)
