"""`r1c::AllReduce` as a TensorRT plugin (IPluginV3) on the rank's NCCL communicator; registered with the other r1c
plugins by `r1c.plugins.tensorrt_common.register_plugins`.

Input [*] float/half/bf16; output the same shape and dtype: the sum over the node's group, computed by
`torch.distributed.all_reduce` in place on the output after a copy of the input (torch.distributed's all-reduce is
in place; TensorRT's input buffer belongs to the producing layer). No workspace, no kernels of r1c's (see
`r1c.plugins.tensorrt_collective`). Not verified on a GPU here (see the issue-13 notes).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from r1c.plugins.all_reduce.reference import REDUCTIONS, SPEC
from r1c.plugins.tensorrt_collective import CollectiveOp, Prepared


class AllReduceOp(CollectiveOp):
    spec = SPEC

    def validate(self, attrs: dict[str, Any]) -> None:
        super().validate(attrs)
        if attrs["reduction"] not in REDUCTIONS:
            raise ValueError(f"{SPEC.plugin_id}: unknown reduction {attrs['reduction']!r} (expected {REDUCTIONS})")

    def output_shapes(self, trt: types.ModuleType, attrs: dict[str, Any], inputs: Sequence[Any], exprs: Any
                      ) -> list[Any]:
        return [trt.DimsExprs(list(inputs[0]))]

    def output_shape(self, attrs: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def communicate(self, prepared: Prepared, x: Any, y: Any, workspace: Any) -> None:
        import torch.distributed as dist

        y.copy_(x)
        dist.all_reduce(y, group=prepared.group)  # reduction "sum" (validated): ReduceOp.SUM, the default
