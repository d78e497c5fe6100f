"""Small helpers shared by the passes: node labels for errors, constant values, r1c op identity."""

from __future__ import annotations

import abc
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from r1c.errors import PassError
from r1c.passes.upgrade_opset import ONNX_DOMAINS, onnx_opset, upgrade_opset
from r1c.plugins import PLUGIN_NAMESPACE, R1C_DOMAIN, R1C_OPSET_VERSION, OpSpec
from r1c.plugins.all_gather import SPEC as ALL_GATHER_SPEC
from r1c.plugins.all_reduce import SPEC as ALL_REDUCE_SPEC
from r1c.plugins.fp8_linear import SPEC as FP8_LINEAR_SPEC
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC

# every r1c op (each has a TensorRT plugin); the collectives have no function body (sharded models only)
R1C_SPECS: dict[str, OpSpec] = {spec.name: spec for spec in (ROUTER_SPEC, EXPERTS_SPEC, FP8_LINEAR_SPEC,
                                                             ALL_REDUCE_SPEC, ALL_GATHER_SPEC)}
ORT_DOMAIN = "com.microsoft"
logger = logging.getLogger(__name__)


def node_label(node: ir.Node) -> str:
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    return f"{node.name or '<unnamed>'} ({op})"


def node_error(pass_name: str, node: ir.Node, reason: str) -> PassError:
    """The error a pass raises when it cannot handle `node`: names the pass and the node."""
    return PassError(f"{pass_name}: node {node_label(node)}: {reason}")


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or Constant node), or None when it is computed."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_ints(value: ir.Value | None) -> list[int] | None:
    arr = const_array(value)
    if arr is None or arr.dtype.kind not in "iu":
        return None
    return [int(v) for v in arr.reshape(-1)]


def const_scalar(value: ir.Value | None) -> float | None:
    """A constant holding exactly one number (any rank), as a Python float."""
    arr = const_array(value)
    if arr is None or arr.size != 1 or arr.dtype.kind not in "fiu":
        return None
    return float(arr.reshape(-1)[0])


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def is_r1c(node: ir.Node, spec: OpSpec | None = None) -> bool:
    if node.domain != R1C_DOMAIN:
        return False
    return spec is None or node.op_type == spec.name


def r1c_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """The r1c-domain nodes of the main graph (and its subgraphs)."""
    return (n for n in model.graph.all_nodes() if n.domain == R1C_DOMAIN)


def r1c_attrs(spec: OpSpec, **given: object) -> dict[str, object]:
    """The node attributes of an r1c op: the spec's defaults, `given`, and the plugin namespace."""
    return {**spec.attrs(**given), "plugin_namespace": PLUGIN_NAMESPACE}


def ensure_function(model: ir.Model, body: onnx.FunctionProto | ir.Function) -> ir.Function:
    """Adds the model-local function body of an r1c op (and the opset imports it needs) if it is missing.

    A model below the body's ONNX opset is converted up first (upgrade_opset); one above it is refused.
    """
    function = body if isinstance(body, ir.Function) else ir.serde.deserialize_function(body)
    existing = model.functions.get(function.identifier())
    if existing is not None:
        return existing
    for domain, version in function.opset_imports.items():
        if domain in ONNX_DOMAINS and (onnx_opset(model) or version) < version:  # a foreign model at, e.g., 18
            upgrade_opset(model, version, f"{function.domain}::{function.name}'s body")
        have = model.opset_imports.setdefault(domain, version)
        if have != version:
            raise PassError(f"{function.domain}::{function.name}: its body needs opset {domain or 'ai.onnx'} "
                            f"{version}, the model imports {have}")
    model.opset_imports.setdefault(function.domain, R1C_OPSET_VERSION)
    model.functions[function.identifier()] = function
    return function


def check_r1c_bodies(pass_name: str, model: ir.Model) -> None:
    """The r1c contract: every r1c node has the model-local function body of its op."""
    for node in r1c_nodes(model):
        if (node.domain, node.op_type, node.overload) not in model.functions:
            raise node_error(pass_name, node, f"no model-local function body for {node.domain}::{node.op_type}")


def swiglu_moe_problem(node: ir.Node) -> str | None:
    """None when a com.microsoft.MoE node has the form r1c's lowering emits (passes/lower_moe_to_ort.py): inputs
    (input, router_probs, fc1, -, fc2), SwiGLU with gate/up rows interleaved (swiglu_fusion=1); else what differs."""
    ins = list(node.inputs)
    if len(ins) != 5 or ins[3] is not None or any(v is None for v in (ins[0], ins[1], ins[2], ins[4])):
        return "not (input, router_probs, fc1, -, fc2): has fc1 bias, fc2 bias or fc3 inputs"
    act = node.attributes.get("activation_type")
    if act is None or act.as_string() != "swiglu" or attr_int(node, "swiglu_fusion", 0) != 1:
        return "not interleaved SwiGLU (swiglu_fusion=1)"
    return None


def ort_moe_nodes(graph: ir.Graph, why_not: Callable[[ir.Node], str | None], pass_name: str,
                  left: str) -> Iterator[ir.Node]:
    """The graph's com.microsoft.MoE nodes for which `why_not` is None (a snapshot: the caller may edit the
    graph); each other one is logged as "<pass_name>: <node> <left>: <reason>"."""
    for node in list(graph):
        if node.domain != ORT_DOMAIN or node.op_type != "MoE":
            continue
        reason = why_not(node)
        if reason:
            logger.info("%s: %s %s: %s", pass_name, node.name, left, reason)
            continue
        yield node


def packed_initializer(graph: ir.Graph, weight: ir.Value, pack: Callable[[np.ndarray], np.ndarray],
                       shape: Sequence[int]) -> ir.Value:
    """A new float32 initializer `<weight>.packed` = pack(weight's constant) of `shape`, computed when the model is
    saved (one tensor at a time: no whole-model copy in memory). The caller removes the old one."""
    source = weight.const_value
    if source is None:
        raise PassError(f"packed_initializer: {weight.name} is not a constant")
    lazy = ir.LazyTensor(functools.partial(_pack_now, source, pack), dtype=ir.DataType.FLOAT, shape=ir.Shape(shape),
                         name=f"{weight.name}.packed")
    value = ir.Value(name=lazy.name, shape=lazy.shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=lazy)
    graph.register_initializer(value)
    return value


def _pack_now(source: ir.TensorProtocol, pack: Callable[[np.ndarray], np.ndarray]) -> ir.TensorProtocol:
    return ir.tensor(pack(np.asarray(source.numpy(), dtype=np.float32)))


class CpuKernelPass(ir.passes.InPlacePass):
    """A pass that swaps nodes for one of r1c's CPU kernels (r1c/plugins/cpu_moe) where the build asked for them
    (`BuildOptions.cpu_moe == "r1c"`; any other value leaves the model as it is). `swap` does the work and returns
    how many kernel nodes it inserted; the build's report records that under the pass's name (`nodes`), and the
    kernel's domain is imported when there is one."""

    uses_build_options = True
    spec: OpSpec  # the kernel's op
    counted = "nodes"  # what the log line counts

    def __init__(self, cpu_moe: str = "ort", report: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cpu_moe = cpu_moe
        self.report = report if report is not None else {}

    @abc.abstractmethod
    def swap(self, graph: ir.Graph) -> int:
        """Replace what the kernel computes in `graph`; the number of kernel nodes inserted."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.cpu_moe != "r1c":
            return ir.passes.PassResult(model, False)
        count = self.swap(model.graph)
        self.report["nodes"] = count
        if count:
            model.opset_imports[self.spec.domain] = self.spec.version
            logger.info("%s: %d %s run on r1c's CPU kernel", type(self).__name__, count, self.counted)
        return ir.passes.PassResult(model, count > 0)


def take_over(graph: ir.Graph, new: ir.Node, before: ir.Node, old: ir.Value, suffix: str) -> None:
    """Insert `new` before `before`; its (float32) output takes `old`'s place (`replace_value`)."""
    graph.insert_before(before, new)
    replace_value(new.outputs[0], old, suffix)


def replace_value(out: ir.Value, old: ir.Value, suffix: str) -> None:
    """The float32 value `out` takes `old`'s name, shape and readers (graph outputs included); `old` is renamed
    `<name><suffix>` for the nodes the caller then removes."""
    name, old.name = old.name, f"{old.name}{suffix}"
    out.name, out.dtype, out.shape = name, ir.DataType.FLOAT, old.shape
    old.replace_all_uses_with(out, replace_graph_outputs=True)
