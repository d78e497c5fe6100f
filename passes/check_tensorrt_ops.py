"""TensorRT lowering check: every node is a plugin node (r1c) or an op TensorRT's ONNX parser supports.

Reads `tensorrt_ops` (the ops the targeted parser supports, inputs that must be constant, attribute values the
parser requires). It changes nothing; on the first unsupported node it raises a PassError that names the
node, and lists how many others fail, so `r1c build --target tensorrt` stops before TensorRT does.
"""

from __future__ import annotations

import onnx_ir as ir

from r1c.passes import tensorrt_ops
from r1c.passes._util import const_ints, node_error, node_label
from r1c.plugins import PLUGIN_NAMESPACE, R1C_DOMAIN

PASS_NAME = "check_tensorrt_ops"


def tensorrt_problem(node: ir.Node) -> str | None:
    """Why TensorRT's parser would reject `node`, or None when it accepts it."""
    if node.domain == R1C_DOMAIN:
        namespace = node.attributes.get("plugin_namespace")
        ok = namespace is not None and namespace.as_string() == PLUGIN_NAMESPACE
        return None if ok else f"r1c op without plugin_namespace={PLUGIN_NAMESPACE!r}"
    if node.domain not in ("", "ai.onnx"):
        return f"domain {node.domain!r} has no TensorRT importer"
    if node.op_type not in tensorrt_ops.SUPPORTED_OPS:
        return f"{node.op_type} is not supported by TensorRT's ONNX parser ({tensorrt_ops.PARSER})"
    for index in tensorrt_ops.CONSTANT_INPUTS.get(node.op_type, ()):
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is not None and ir.convenience.get_const_tensor(value) is None:
            return f"input {index} ({value.name}) must be a constant for TensorRT"
    for name, default, required in tensorrt_ops.REQUIRED_ATTRIBUTES.get(node.op_type, ()):
        attr = node.attributes.get(name)
        actual = default if attr is None else attr.value
        if actual != required:
            return f"attribute {name}={actual!r}; TensorRT accepts only {required!r}"
    if node.op_type == "TopK":
        k = const_ints(node.inputs[1])
        if k is not None and k[0] >= tensorrt_ops.TOPK_MAX_K:
            return f"TopK k={k[0]} >= {tensorrt_ops.TOPK_MAX_K}"
    return None


class CheckTensorRTOpsPass(ir.passes.InPlacePass):
    """Raises a PassError naming the first node TensorRT's ONNX parser would reject."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        problems = [(node, why) for node in model.graph.all_nodes() if (why := tensorrt_problem(node))]
        if problems:
            node, why = problems[0]
            more = f" (and {len(problems) - 1} more: {', '.join(node_label(n) for n, _ in problems[1:4])})" \
                if len(problems) > 1 else ""
            raise node_error(PASS_NAME, node, why + more)
        return ir.passes.PassResult(model, False)
