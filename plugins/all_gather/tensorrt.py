"""`r1c::AllGather` as a TensorRT plugin (IPluginV3) that runs on the rank's NCCL communicator.

As `all_reduce/tensorrt.py`: registered with the layout's group sizes (the output's `axis` dim is the input's
times the group size, which TensorRT needs when it builds), executed as `torch.distributed.all_gather_into_tensor`
on TensorRT's stream over `GROUPS[group]`, then laid out along `axis`.
Input [d0, ..., dn] float/half/bf16; output with d_axis * G. NOT verified on a GPU here (see the issue-13 note).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any, ClassVar

from r1c.plugins.all_gather.reference import SPEC
from r1c.plugins.tensorrt_common import PluginOp

FLOAT_TYPES = ("FLOAT", "HALF", "BF16")
_STAGING: dict[tuple[Any, ...], Any] = {}  # (shape, dtype, device) -> the gather buffer, allocated once per shape


class AllGatherOp(PluginOp):
    spec = SPEC
    group_sizes: ClassVar[dict[str, int]] = {}

    def validate(self, attrs: dict[str, Any]) -> None:
        if attrs["group"] not in self.group_sizes:
            raise ValueError(f"{SPEC.plugin_id}: group {attrs['group']!r} is not one of {sorted(self.group_sizes)}")

    def output_dtypes(self, trt: types.ModuleType, attrs: dict[str, Any], input_types: Sequence[Any]) -> list[Any]:
        return [input_types[0]]

    def output_shapes(self, trt: types.ModuleType, attrs: dict[str, Any], inputs: Sequence[Any], exprs: Any
                      ) -> list[Any]:
        dims = list(inputs[0])
        axis = attrs["axis"] % len(dims)
        dims[axis] = exprs.operation(trt.DimensionOperation.PROD, dims[axis],
                                     exprs.constant(self.group_sizes[attrs["group"]]))
        return [trt.DimsExprs(dims)]

    def supports(self, trt: types.ModuleType, attrs: dict[str, Any], pos: int, types_: Sequence[Any],
                 num_inputs: int) -> bool:
        return types_[pos].name in FLOAT_TYPES and (pos == 0 or types_[pos] == types_[0])

    def execute(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        import torch
        import torch.distributed as dist

        from r1c.runtime.distributed.groups import group

        x = inputs[0]
        g = group(attrs["group"])
        size = self.group_sizes[attrs["group"]]
        key = (size, *x.shape, x.dtype, x.device)
        stacked = _STAGING.get(key)
        if stacked is None:  # the first call at this shape; later calls reuse it (no allocation per enqueue)
            stacked = _STAGING[key] = torch.empty((size, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(stacked, x.contiguous(), group=g)
        axis = attrs["axis"] % x.dim()
        # [G, d0, .., d_axis, ..] -> [d0, .., G, d_axis, ..] -> [d0, .., G * d_axis, ..], written into the output
        outputs[0].view(*x.shape[:axis], size, *x.shape[axis:]).copy_(stacked.movedim(0, axis))
