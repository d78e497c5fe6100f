"""`r1c::AllGather` as a TensorRT plugin (IPluginV3) on the rank's NCCL communicator; registered with the other r1c
plugins by `r1c.plugins.tensorrt_common.register_plugins`.

Input [d0, ..., d_axis, ..., dn] float/half/bf16; output the same with d_axis * G (G = the node's `group_size`,
which TensorRT needs for the output's shape when it builds; checked against the process group when the engine runs).
`torch.distributed.all_gather_single` writes the ranks' inputs one after the other, [G, d0, ..., dn]: along
axis 0 that is the output itself; along another axis it goes to the workspace (G x the input, declared to TensorRT
at the profile's largest shape) and is copied into the output as [d0, .., G, d_axis, ..]. No kernels of r1c's (see
`r1c.plugins.tensorrt_collective`). Not verified on a GPU here (see the issue-13 notes).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from r1c.errors import BundleError
from r1c.plugins.all_gather.reference import SPEC
from r1c.plugins.tensorrt_collective import CollectiveOp, Prepared


class AllGatherOp(CollectiveOp):
    spec = SPEC

    def validate(self, attrs: dict[str, Any]) -> None:
        super().validate(attrs)
        if attrs["group_size"] < 1:
            raise ValueError(f"{SPEC.plugin_id}: group_size must be the number of ranks in the group, got "
                             f"{attrs['group_size']} (the sharding pass sets it)")

    def check_shapes(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]]) -> None:
        rank = len(shapes[0])
        if not -rank <= attrs["axis"] < rank:
            raise ValueError(f"{SPEC.plugin_id}: axis {attrs['axis']} is outside a rank-{rank} input")

    def output_shapes(self, trt: types.ModuleType, attrs: dict[str, Any], inputs: Sequence[Any], exprs: Any
                      ) -> list[Any]:
        dims = list(inputs[0])
        axis = attrs["axis"] % len(dims)
        dims[axis] = exprs.operation(trt.DimensionOperation.PROD, dims[axis], exprs.constant(attrs["group_size"]))
        return [trt.DimsExprs(dims)]

    def output_shape(self, attrs: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
        axis = attrs["axis"] % len(shape)
        return (*shape[:axis], shape[axis] * attrs["group_size"], *shape[axis + 1:])

    def workspace_shape(self, attrs: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return None if attrs["axis"] % len(shape) == 0 else (attrs["group_size"], *shape)

    def check_group(self, attrs: dict[str, Any], group_size: int) -> None:
        if group_size != attrs["group_size"]:
            raise BundleError(f"{SPEC.plugin_id}: the engine gathers over {attrs['group_size']} ranks, but this "
                             f"process's {attrs['group']!r} group has {group_size}")

    def communicate(self, prepared: Prepared, x: Any, y: Any, workspace: Any) -> None:
        import torch.distributed as dist

        # torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there); the output in
        # "concatenation" form [G * d0, ...], the one every backend takes (gloo takes no other)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        g, size = prepared.group, prepared.group_size
        if workspace is None:  # axis 0: the ranks' inputs one after the other are the output
            gather(y, x, group=g)
            return
        gather(workspace.view(size * x.shape[0], *x.shape[1:]), x, group=g)
        axis = prepared.attrs["axis"] % x.dim()
        # [G, d0, .., d_axis, ..] -> [d0, .., G, d_axis, ..] = the output [d0, .., G * d_axis, ..]
        y.view(*x.shape[:axis], size, *x.shape[axis:]).copy_(workspace.movedim(0, axis))
