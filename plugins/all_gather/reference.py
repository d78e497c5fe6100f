"""The op's definition and its PyTorch reference.

`r1c::AllGather` has no ONNX function body: it is a collective, bound by the runtime to a torch.distributed
process group (gloo on CPUs, NCCL on GPUs) and by TensorRT to a plugin that takes the NCCL communicator.

Input `input` [d0, ..., d_axis, ..., dn] float32/float16/bfloat16 (every rank of the group: the same shape and
dtype). Output `output`: the ranks' inputs concatenated along `axis` in rank order within the group, so
output.shape[axis] = G * d_axis (G = ranks in the group); every rank receives the same tensor.
Attributes: `group` (string): `tp` or `world`, as for `r1c::AllReduce`; `axis` (int, negative counts from the
end); `group_size` (int): G, written by the sharding pass (a compiler that fixes the output's shape before any
process group exists, TensorRT, needs it; every binding checks it against the group it runs on; the default 0 is
no value and is refused). The sharding uses it for the vocabulary-split LM head: logits [B, S, V/T] -> [B, S, V].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1c.plugins.all_gather.spec import SPEC  # noqa: F401 (the definition lives in spec.py)


def all_gather_reference(inputs: Sequence[torch.Tensor], *, axis: int = -1) -> torch.Tensor:
    """The output every rank receives, from each rank's `input` (one tensor per rank, in rank order)."""
    if not inputs:
        raise ValueError("AllGather: needs at least one rank's input")
    if any(t.shape != inputs[0].shape or t.dtype != inputs[0].dtype for t in inputs):
        raise ValueError("AllGather: every rank must give the same shape and dtype")
    return torch.cat(list(inputs), dim=axis)
