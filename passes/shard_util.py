"""Graph surgery the sharding passes share: find a weight's MatMul, slice initializers lazily, insert collectives.

Slices are `onnx_ir.LazyTensor`s over the source tensor (an external tensor when the model was loaded from a
file): nothing is read until the model is saved, and then only the rank's slice of each tensor, one tensor at a
time, so a rank's file is written by streaming and the whole model is never in memory.

FP8 weights are a DequantizeLinear of an e4m3fn matrix `w_t` [in, out] with 128-row block scales `scale`
[ceil(in/128), out] (axis 0, block_size 128; see exporter/onnx_export.py `fp8_dequant`): a column slice cuts
both the same way; a row slice must start and end on a 128-row block (or at the end) and cuts `scale` by blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from r1c.config import ModelConfig
from r1c.errors import PassError
from r1c.passes._util import const_ints, r1c_attrs
from r1c.passes.shard_layout import ShardLayout
from r1c.plugins import R1C_DOMAIN, R1C_OPSET_VERSION, OpSpec
from r1c.plugins.fp8 import BLOCK


def initializer(model: ir.Model, name: str, pass_name: str) -> ir.Value:
    value = model.graph.initializers.get(name)
    if value is None or value.const_value is None:
        raise PassError(f"{pass_name}: the model has no initializer {name} (is it an `r1c export` model?)")
    return value


def has_initializer(model: ir.Model, name: str) -> bool:
    return name in model.graph.initializers


def consumer(value: ir.Value, op_type: str, pass_name: str, *, index: int | None = None) -> ir.Node:
    """The one node of type `op_type` reading `value` (at input `index` when given)."""
    found = [n for n, i in ((u.node, u.idx) for u in value.uses())
             if n.op_type == op_type and (index is None or i == index)]
    if len(found) != 1:
        raise PassError(f"{pass_name}: expected one {op_type} reading {value.name}, found {len(found)}")
    return found[0]


def producer(value: ir.Value | None, op_type: str, pass_name: str) -> ir.Node:
    node = None if value is None else value.producer()
    if node is None or node.op_type != op_type:
        got = "nothing" if node is None else node.op_type
        raise PassError(f"{pass_name}: expected {value.name if value else '?'} to come from {op_type}, not {got}")
    return node


def transform(value: ir.Value, shape: Sequence[int], fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace an initializer's tensor by `fn(tensor)` of `shape`, computed lazily when the model is saved."""
    source = value.const_value
    assert source is not None
    dtype = source.dtype

    def compute() -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(fn(source.numpy())), dtype=dtype, name=value.name)

    value.const_value = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(list(shape)), name=value.name)
    value.shape = ir.Shape(list(shape))


def static_shape(value: ir.Value) -> list[int]:
    """The value's shape as ints (initializers always have one)."""
    dims = [] if value.shape is None else list(value.shape)
    if value.shape is None or not all(isinstance(d, int) for d in dims):
        raise PassError(f"shard: {value.name} has no static shape ({value.shape})")
    return [int(d) for d in dims]  # type: ignore[arg-type]


def set_type(value: ir.Value, like: ir.Value, shape: ir.Shape | None = None) -> None:
    """Give `value` the dtype of `like` and `shape` (default: `like`'s)."""
    if like.dtype is not None:
        value.dtype = like.dtype
    value.shape = shape if shape is not None else like.shape


def slice_initializer(value: ir.Value, axis: int, start: int, stop: int) -> None:
    shape = static_shape(value)
    index = tuple(slice(start, stop) if a == axis else slice(None) for a in range(len(shape)))
    shape[axis] = stop - start
    transform(value, shape, lambda a: a[index])


@dataclasses.dataclass
class Linear:
    """`x @ W^T` as exported: a MatMul whose weight is an initializer, or a DequantizeLinear of an FP8 one."""

    matmul: ir.Node
    weight: ir.Value  # [in, out] (float32, or e4m3fn when `scale` is set)
    scale: ir.Value | None  # [ceil(in/128), out]
    name: str

    @classmethod
    def find(cls, model: ir.Model, weight_name: str, pass_name: str) -> Linear:
        w = initializer(model, weight_name, pass_name)
        users = [u.node for u in w.uses()]
        if len(users) != 1:
            raise PassError(f"{pass_name}: {weight_name} has {len(users)} readers, expected one MatMul")
        node = users[0]
        if node.op_type == "MatMul":
            return cls(node, w, None, weight_name)
        if node.op_type == "DequantizeLinear":
            scale = node.inputs[1]
            if scale is None or scale.const_value is None:
                raise PassError(f"{pass_name}: the FP8 scale of {weight_name} is not an initializer")
            block, axis = node.attributes.get("block_size"), node.attributes.get("axis")
            if block is None or block.as_int() != BLOCK or axis is None or axis.as_int() != 0:
                raise PassError(f"{pass_name}: {weight_name} is not dequantized by 128-row blocks (axis 0)")
            return cls(consumer(node.outputs[0], "MatMul", pass_name, index=1), w, scale, weight_name)
        raise PassError(f"{pass_name}: {weight_name} is read by {node.op_type}, expected MatMul or DequantizeLinear")

    @property
    def output(self) -> ir.Value:
        return self.matmul.outputs[0]

    def slice(self, axis: int, start: int, stop: int, pass_name: str) -> None:
        """Keep rows (axis 0, the input features) or columns (axis 1, the outputs) [start, stop) of W^T."""
        rows = static_shape(self.weight)[0]
        if self.scale is not None and axis == 0:
            if start % BLOCK or (stop % BLOCK and stop != rows):
                raise PassError(f"{pass_name}: {self.name}: FP8 rows [{start}, {stop}) do not fall on "
                                f"{BLOCK}-row scale blocks; choose a tensor-parallel size that keeps them aligned")
            slice_initializer(self.scale, 0, start // BLOCK, -(-stop // BLOCK))
        elif self.scale is not None:
            slice_initializer(self.scale, 1, start, stop)
        slice_initializer(self.weight, axis, start, stop)


class ShardPass(ir.passes.InPlacePass):
    """The base of the per-part sharding passes (vocab, attention, MLP, MoE) that `ShardModelPass` composes.

    Holds the model's config, the layout and the rank whose share the pass keeps; `tp_rank` is the rank's index
    t in its tensor-parallel group (0 <= t < layout.tensor_parallel).
    """

    def __init__(self, config: ModelConfig, layout: ShardLayout, rank: int) -> None:
        super().__init__()
        self.config, self.layout, self.rank = config, layout, rank

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]


class GraphEditor:
    """New constants (deduplicated by value) and r1c collective nodes for one model."""

    def __init__(self, model: ir.Model, prefix: str) -> None:
        self.model = model
        self.graph = model.graph
        self.prefix = prefix
        self._consts: dict[tuple[Any, ...], ir.Value] = {}
        self._used: set[str] = set()

    def unique(self, name: str) -> str:
        candidate, i = name, 0
        while candidate in self._used:
            i += 1
            candidate = f"{name}_{i}"
        self._used.add(candidate)
        return candidate

    def const(self, values: Sequence[int] | Sequence[float] | int | float, dtype: np.dtype | type,
              scalar: bool = False) -> ir.Value:
        arr = np.array(values, dtype=dtype)
        if scalar:
            arr = arr.reshape(())
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name, i = f"{self.prefix}.const", 0
            while name in self.graph.initializers:
                i += 1
                name = f"{self.prefix}.const_{i}"
            value = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                             type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))
            self.graph.register_initializer(value)
            self._consts[key] = value
        return self._consts[key]

    def node(self, op_type: str, inputs: Sequence[ir.Value | None], name: str, *, domain: str = "",
             num_outputs: int = 1, **attrs: Any) -> ir.Node:
        node_name = self.unique(f"{self.prefix}/{name}/{op_type}")
        node = ir.Node(domain, op_type, inputs, ir.convenience.convert_attributes(attrs),  # type: ignore[arg-type]
                       num_outputs=num_outputs,
                       name=node_name)
        for i, out in enumerate(node.outputs):
            out.name = node_name if num_outputs == 1 else f"{node_name}_out{i}"
        return node

    def collective(self, spec: OpSpec, value: ir.Value, name: str, shape: ir.Shape | None = None,
                   **attrs: Any) -> ir.Node:
        """An r1c collective reading `value`, inserted after its producer; every other reader now reads its output.

        The output keeps `value`'s dtype and takes `shape` (default: `value`'s, right for an all-reduce). A graph
        output moves to the collective (it takes the output's name; `value` becomes `<name>_local`).
        """
        self.model.opset_imports.setdefault(R1C_DOMAIN, R1C_OPSET_VERSION)
        uses = list(value.uses())
        node_name = self.unique(f"{self.prefix}/{name}/{spec.name}")
        node = ir.Node(R1C_DOMAIN, spec.name, [value], ir.convenience.convert_attributes(r1c_attrs(spec, **attrs)),  # type: ignore[arg-type]
                       name=node_name)
        out = node.outputs[0]
        set_type(out, value, shape)
        out.name = node_name
        for use in uses:
            use.node.replace_input_with(use.idx, out)
        outputs = self.graph.outputs
        for i, v in enumerate(outputs):
            if v is value:
                graph_name = value.name
                value.name = f"{graph_name}_local"
                out.name = graph_name
                outputs[i] = out
        anchor = value.producer()
        if anchor is None:
            raise PassError(f"shard: {value.name} has no producer to insert {spec.name} after")
        self.graph.insert_after(anchor, node)
        return node


def reshape_const(node: ir.Node, pass_name: str) -> list[int]:
    """The constant target shape of a Reshape node."""
    shape = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op_type != "Reshape" or shape is None:
        raise PassError(f"{pass_name}: {node.name} is not a Reshape to a constant shape")
    return shape


def set_reshape(node: ir.Node, editor: GraphEditor, old: list[int], new: list[int], pass_name: str) -> None:
    """Point a Reshape at a new constant shape after checking that it had the expected one."""
    have = reshape_const(node, pass_name)
    if have != old:
        raise PassError(f"{pass_name}: {node.name} reshapes to {have}, expected {old}")
    node.replace_input_with(1, editor.const(new, np.int64))
