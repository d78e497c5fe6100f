"""`r1c::AllReduce` as a TensorRT plugin (IPluginV3) that runs on the rank's NCCL communicator.

Registered by `r1c.runtime.distributed.trt.register_collective_plugins` (with the layout's group sizes) on ranks
of a sharded bundle; the communicator is the one torch.distributed's NCCL process group holds
(`r1c.runtime.distributed.groups.GROUPS[group]`): `torch.distributed.all_reduce` on TensorRT's stream, which
`PluginOp` enqueues under (`torch.cuda.stream(ExternalStream)`), so NCCL's kernel is ordered after the layer that
produced the input and before the one that reads the output. No communication code of r1c's own.
Input [*] float/half/bf16; output the same shape and dtype. NOT verified on a GPU here (see the issue-13 note).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any, ClassVar

from r1c.plugins.all_reduce.reference import REDUCTIONS, SPEC
from r1c.plugins.tensorrt_common import PluginOp

FLOAT_TYPES = ("FLOAT", "HALF", "BF16")


class AllReduceOp(PluginOp):
    spec = SPEC
    group_sizes: ClassVar[dict[str, int]] = {}

    def validate(self, attrs: dict[str, Any]) -> None:
        if attrs["reduction"] not in REDUCTIONS:
            raise ValueError(f"{SPEC.plugin_id}: unknown reduction {attrs['reduction']!r} (expected {REDUCTIONS})")
        if attrs["group"] not in self.group_sizes:
            raise ValueError(f"{SPEC.plugin_id}: group {attrs['group']!r} is not one of {sorted(self.group_sizes)}")

    def output_dtypes(self, trt: types.ModuleType, attrs: dict[str, Any], input_types: Sequence[Any]) -> list[Any]:
        return [input_types[0]]

    def output_shapes(self, trt: types.ModuleType, attrs: dict[str, Any], inputs: Sequence[Any], exprs: Any
                      ) -> list[Any]:
        return [trt.DimsExprs(list(inputs[0]))]

    def supports(self, trt: types.ModuleType, attrs: dict[str, Any], pos: int, types_: Sequence[Any],
                 num_inputs: int) -> bool:
        return types_[pos].name in FLOAT_TYPES and (pos == 0 or types_[pos] == types_[0])

    def execute(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        import torch.distributed as dist

        from r1c.runtime.distributed.groups import group

        outputs[0].copy_(inputs[0])
        dist.all_reduce(outputs[0], group=group(attrs["group"]))
