"""The kernel library of a TensorRT bundle: every kernel its r1c plugin layers may launch, compiled ahead of time.

`model_kernel_specs(model_path, max_tokens)` reads the lowered model (no weight bytes: shapes and dtypes only) and
asks each r1c node's plugin op for the kernels of every token count up to `max_tokens` (the profile's batch x
sequence); `build_kernel_library` compiles them with Triton for the bundle's compute capability into
`<bundle>/kernels/` (`r1c.plugins.kernel_library`). At run time the plugins launch those cubins through the CUDA
driver; nothing is compiled on the serving machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from r1c.errors import BuildError

logger = logging.getLogger(__name__)

# ONNX TensorProto data type -> torch dtype name
_ONNX_DTYPES = {1: "float32", 16: "bfloat16", 10: "float16", 17: "float8_e4m3fn", 6: "int32", 7: "int64"}


def _value_types(model: Any) -> dict[str, tuple[str | None, tuple[int, ...] | None]]:
    """name -> (dtype name, static shape or None) for initializers, graph inputs and inferred values."""
    out: dict[str, tuple[str | None, tuple[int, ...] | None]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        out[vi.name] = (_ONNX_DTYPES.get(tt.elem_type), None)
    for init in model.graph.initializer:
        out[init.name] = (_ONNX_DTYPES.get(init.data_type), tuple(int(d) for d in init.dims))
    return out


def model_problems(model_path: str | Path, max_tokens: int) -> list[tuple[Any, dict[str, Any], Any]]:
    """(plugin op, attributes, problem at max_tokens) for every r1c node of the model that launches r1c kernels
    (every `KernelOp`; the collectives launch none)."""
    import onnx

    from r1c.plugins import R1C_DOMAIN
    from r1c.plugins.tensorrt_common import KernelOp, plugin_ops

    model = onnx.load(str(model_path), load_external_data=False)
    ops = {op.spec.name: op for op in plugin_ops()}
    types = _value_types(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    found = []
    for node in model.graph.node:
        if node.domain != R1C_DOMAIN:
            continue
        op = ops.get(node.op_type)
        if op is None:
            raise BuildError(f"build: r1c node {node.name} ({node.op_type}) has no TensorRT plugin")
        if not isinstance(op, KernelOp):  # a collective: NCCL's kernels, none of r1c's to compile
            continue
        given = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs = op.spec.attrs(**{k: v.decode() if isinstance(v, bytes) else v for k, v in given.items()
                                 if k in op.spec.attributes})
        dtypes, shapes = [], []
        for name in node.input:
            dtype, shape = types.get(name, (None, None))
            dtypes.append(dtype or "float32")
            shapes.append(shape)
        hidden_dim = _channels(node, shapes)
        shapes[0] = (max_tokens, hidden_dim)
        if node.op_type == "MoEExperts":
            router = _router_of(node.input[2], producers)
            top_k = next((int(a.i) for a in router.attribute if a.name == "top_k"), None) if router else None
            if top_k is None:
                raise BuildError(f"build: cannot tell top_k of {node.name} (its topk_ids do not come from a router)")
            shapes[1] = shapes[2] = (max_tokens, top_k)
        if any(s is None for s in shapes):
            missing = [n for n, s in zip(node.input, shapes) if s is None]
            raise BuildError(f"build: r1c node {node.name}: inputs {missing} are not initializers with static shapes")
        static = [s for s in shapes if s is not None]
        try:  # a mode or shape the op does not define is refused by name (the plugin would refuse it too)
            op.validate(attrs)
            op.check_shapes(attrs, static)
        except ValueError as e:
            raise BuildError(f"build: r1c node {node.name}: {e}") from None
        found.append((op, attrs, op.problem(attrs, static, dtypes)))
    return found


def _router_of(ids: str, producers: dict[str, Any]) -> Any:
    """The MoERouter node whose topk_ids `ids` derives from through standard ops (a sharded model remaps its experts'
    ids with Sub / Where, `passes/shard_moe.py`); None when there is none. Never looks past another r1c node."""
    from r1c.plugins import R1C_DOMAIN

    todo, seen = [ids], set()
    while todo:
        node = producers.get(todo.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.domain == R1C_DOMAIN:
            if node.op_type == "MoERouter":
                return node
            continue
        todo.extend(node.input)
    return None


def _channels(node: Any, shapes: list[Any]) -> int:
    """The channel count of an r1c node's first input (hidden / x), from its weights."""
    if node.op_type == "MoERouter":
        return int(shapes[1][1])  # gate_weight [E, H]
    if node.op_type == "MoEExperts":
        return int(shapes[3][2])  # w13 [E, 2I, H]
    return int(shapes[1][1])  # FP8Linear weight [N, K]


def model_kernel_specs(model_path: str | Path, max_tokens: int) -> list[Any]:
    """Every distinct kernel the model's r1c plugin layers may launch for up to `max_tokens` tokens."""
    specs: dict[str, Any] = {}
    for op, attrs, problem in model_problems(model_path, max_tokens):
        for s in op.kernel_specs(attrs, problem):
            specs.setdefault(s.key, s)
    return list(specs.values())


def build_kernel_library(model_path: str | Path, out_dir: str | Path, compute_capability: str | tuple[int, int],
                         max_tokens: int) -> dict[str, Any]:
    """Compile the model's kernels for `compute_capability` into `out_dir`; returns the library index."""
    from r1c.plugins.kernel_library import build_library

    specs = model_kernel_specs(model_path, max_tokens)
    return build_library(specs, out_dir, compute_capability)
