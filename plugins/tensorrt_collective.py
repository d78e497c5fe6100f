"""What the collective plugins share (`r1c::AllReduce`, `r1c::AllGather`): a `PluginOp` with no kernels of r1c's.

The communication is NCCL's, through torch.distributed's process group of this rank: the group the node's `group`
attribute names in `r1c.runtime.distributed.groups.GROUPS` (no communication code of r1c's own).
  * `require_runtime` (the engine loads): this process has that group;
  * `prepare` (shapes change): the group looked up, its size checked against the node, the buffers' shapes;
  * `enqueue`: torch views over TensorRT's device buffers (`__cuda_array_interface__`: no copy, no device memory
    allocated) and the op's `communicate` under `torch.cuda.stream(ExternalStream(stream))`. torch.distributed's
    NCCL group makes its stream wait for the work already queued on the current stream and the current stream wait
    for the collective, without blocking the host, so the collective sits between the layers that produce its input
    and read its output.
Nothing of theirs is in the kernel library, and `r1c build` compiles nothing for them. While an engine is built (one
process, no peers) a collective does not run (`runs_while_building = False`): TensorRT's timing runs on made-up data
leave its output unwritten. `execute` runs the same `communicate` on torch tensors (gloo on CPUs in the tests).
Inputs and outputs: float32 / float16 / bfloat16, linear, the output's dtype the input's.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import types
from collections.abc import Sequence
from typing import Any

from r1c.plugins.tensorrt_common import PluginOp

FLOAT_TYPES = ("FLOAT", "HALF", "BF16")  # TensorRT DataType names
ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# `__cuda_array_interface__` type strings; bfloat16 has none: its buffer is viewed as int16, then reinterpreted
_TYPESTRS = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2"}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What one collective's enqueue needs for the current shapes."""

    attrs: dict[str, Any]
    group: Any  # the torch.distributed process group
    group_size: int
    dtype: str  # torch dtype name
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    workspace_shape: tuple[int, ...] | None  # in elements of `dtype`; None: no workspace


class _CudaBuffer:
    """A raw device pointer dressed as `__cuda_array_interface__` v3 (stream None: no synchronization)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {"data": (int(ptr), False), "shape": shape, "typestr": typestr,
                                         "strides": None, "version": 3, "stream": None}


def device_view(ptr: int, shape: tuple[int, ...], dtype: str) -> Any:
    """A torch CUDA tensor over TensorRT's linear buffer of `shape` and `dtype` at `ptr` (no copy)."""
    import torch

    if math.prod(shape) == 0:  # TensorRT may pass NULL for an empty tensor; an empty tensor holds no memory
        return torch.empty(shape, dtype=getattr(torch, dtype), device="cuda")
    t = torch.as_tensor(_CudaBuffer(ptr, shape, _TYPESTRS[dtype]), device="cuda")
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class CollectiveOp(PluginOp):
    """A collective over one of the layout's process groups; subclasses define shapes and `communicate`."""

    runs_while_building = False

    def validate(self, attrs: dict[str, Any]) -> None:
        from r1c.passes.shard_layout import GROUP_NAMES

        if attrs["group"] not in GROUP_NAMES:
            raise ValueError(f"{self.spec.plugin_id}: group {attrs['group']!r} is not one of {list(GROUP_NAMES)}")

    def output_dtypes(self, trt: types.ModuleType, attrs: dict[str, Any], input_types: Sequence[Any]) -> list[Any]:
        return [input_types[0]]

    def supports(self, trt: types.ModuleType, attrs: dict[str, Any], pos: int, types_: Sequence[Any],
                 num_inputs: int) -> bool:
        return types_[pos].name in FLOAT_TYPES and (pos == 0 or types_[pos] == types_[0])

    # ---- shapes of the buffers, from the input's --------------------------------------------------------------
    @abc.abstractmethod
    def output_shape(self, attrs: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output's shape for an input of `shape`."""

    def workspace_shape(self, attrs: dict[str, Any], shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The scratch buffer `communicate` needs, in elements of the input's dtype; None: none."""
        return None

    def check_group(self, attrs: dict[str, Any], group_size: int) -> None:
        """Raise BundleError when the process group does not fit the node (another size than it was built for)."""

    @abc.abstractmethod
    def communicate(self, prepared: Prepared, x: Any, y: Any, workspace: Any) -> None:
        """Write the collective's result of this rank's `x` into `y` (torch tensors, on the current stream)."""

    # ---- PluginOp: how it runs ---------------------------------------------------------------------------------
    def workspace_bytes(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> int:
        ws = self.workspace_shape(attrs, tuple(shapes[0]))
        return 0 if ws is None else math.prod(ws) * ITEM_BYTES[dtypes[0]]

    def _group(self, attrs: dict[str, Any]) -> tuple[Any, int]:
        """This rank's process group named by the node, and its size; BundleError when there is none (the process
        is not a rank of a sharded bundle) or it does not fit the node."""
        import torch.distributed as dist

        from r1c.runtime.distributed.groups import group

        g = group(attrs["group"])
        size = int(dist.get_world_size(g))
        self.check_group(attrs, size)
        return g, size

    def require_runtime(self, attrs: dict[str, Any]) -> None:
        self._group(attrs)

    def prepare(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> Prepared:
        g, size = self._group(attrs)
        shape = tuple(int(d) for d in shapes[0])
        if dtypes[0] not in ITEM_BYTES:
            raise ValueError(f"{self.spec.plugin_id}: dtype {dtypes[0]} is not one of {sorted(ITEM_BYTES)}")
        return Prepared(dict(attrs), g, size, dtypes[0], shape, self.output_shape(attrs, shape),
                        self.workspace_shape(attrs, shape))

    def enqueue(self, prepared: Prepared, inputs: Sequence[int], outputs: Sequence[int], workspace: int,
                stream: int) -> None:
        import torch

        p = prepared
        with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
            ws = None if p.workspace_shape is None else device_view(workspace, p.workspace_shape, p.dtype)
            self.communicate(p, device_view(inputs[0], p.input_shape, p.dtype),
                             device_view(outputs[0], p.output_shape, p.dtype), ws)

    def execute(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        """`communicate` on torch tensors (any device; the workspace allocated here): for tests, not the plugin."""
        import torch

        x = inputs[0]
        p = self.prepare(attrs, [tuple(x.shape)], [str(x.dtype).removeprefix("torch.")])
        ws = None if p.workspace_shape is None else torch.empty(p.workspace_shape, dtype=x.dtype, device=x.device)
        self.communicate(p, x, outputs[0], ws)
