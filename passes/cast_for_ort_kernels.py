"""Float32 casts around the nodes that ONNX Runtime's CPU provider has no kernel for, at their dtypes.

A bfloat16 export runs on ONNX Runtime's CPU provider, which implements few ops for bfloat16 (Cast, Gather,
shape ops; not Mul, MatMul, Softmax in ORT 1.32). Which ones is measured, not listed: for every distinct
(domain, op, input dtypes, output dtypes) of a bfloat16/float16 node the pass asks ONNX Runtime to create a
session for that one node, and a `NOT_IMPLEMENTED` answer marks it unsupported. Such a node gets its 16-bit
float inputs cast to float32 and its outputs cast back, so the values between nodes keep the export's dtype
(and rounding). Casts of initializers are constant work that ONNX Runtime folds once at load.
"""

from __future__ import annotations

import functools
import logging

import onnx
import onnx_ir as ir

logger = logging.getLogger(__name__)

HALF_TYPES = frozenset({ir.DataType.BFLOAT16, ir.DataType.FLOAT16})


@functools.cache
def ort_cpu_has_kernel(domain: str, op_type: str, opset: int, inputs: tuple[int | None, ...],
                       outputs: tuple[int, ...], attributes: bytes) -> bool:
    """Whether ONNX Runtime's CPU provider can create a session for this one node (types as ONNX enums)."""
    import onnxruntime as ort

    node = onnx.NodeProto()
    node.ParseFromString(attributes)
    del node.input[:], node.output[:]
    names = [f"i{k}" if t is not None else "" for k, t in enumerate(inputs)]
    node.input.extend(names)
    node.output.extend(f"o{k}" for k in range(len(outputs)))
    graph = onnx.helper.make_graph(
        [node], "probe", [onnx.helper.make_tensor_value_info(n, t, None) for n, t in zip(names, inputs) if t],
        [onnx.helper.make_tensor_value_info(f"o{k}", t, None) for k, t in enumerate(outputs)])
    imports = [onnx.helper.make_opsetid("", 21)]
    if domain not in ("", "ai.onnx"):
        imports.append(onnx.helper.make_opsetid(domain, opset))
    model = onnx.helper.make_model(graph, opset_imports=imports, ir_version=10)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own exception types
        if "NOT_IMPLEMENTED" in str(e) or "Could not find an implementation" in str(e):
            return False
        logger.debug("kernel probe for %s inconclusive (%s); assumed present", op_type, str(e).splitlines()[0])
    return True


def _type_contrib_outputs(node: ir.Node) -> None:
    """ONNX's inference leaves contrib ops (com.microsoft QuickGelu, ...) untyped; r1c's fusions emit only
    elementwise ones there, whose outputs have their first input's type."""
    if node.domain in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return
    first = node.inputs[0].dtype
    for out in node.outputs:
        if out.dtype is None and first is not None:
            out.dtype = first


def _needs_casts(node: ir.Node, opset: int) -> bool:
    _type_contrib_outputs(node)
    types = [v.dtype for v in (*node.inputs, *node.outputs) if v is not None]
    if not any(t in HALF_TYPES for t in types) or any(t is None for t in types):
        return False
    proto = onnx.NodeProto(op_type=node.op_type, domain=node.domain)
    proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
    ins = tuple(int(v.dtype) if v is not None and v.dtype is not None else None for v in node.inputs)
    outs = tuple(int(v.dtype) for v in node.outputs if v.dtype is not None)
    return not ort_cpu_has_kernel(node.domain, node.op_type, opset, ins, outs, proto.SerializeToString())


class CastForOrtKernelsPass(ir.passes.InPlacePass):
    """Wraps each 16-bit-float node that ONNX Runtime's CPU provider cannot run in float32 casts."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        counts: dict[str, int] = {}
        for node in list(graph):
            if not _needs_casts(node, model.opset_imports.get(node.domain, 1)):
                continue
            for i, value in enumerate(node.inputs):
                if value is not None and value.dtype in HALF_TYPES:
                    cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT})
                    cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, value.shape
                    graph.insert_before(node, cast)
                    node.replace_input_with(i, cast.outputs[0])
            for out in node.outputs:
                if out.dtype not in HALF_TYPES:
                    continue
                back = ir.node("Cast", [out], {"to": out.dtype})
                back.outputs[0].dtype, back.outputs[0].shape = out.dtype, out.shape
                uses = [(user, idx) for user, idx in out.uses() if user is not back]
                for user, idx in uses:
                    user.replace_input_with(idx, back.outputs[0])
                if out.is_graph_output():
                    pos = list(graph.outputs).index(out)
                    name = out.name
                    out.name = f"{name}_f32"
                    back.outputs[0].name = name
                    graph.outputs[pos] = back.outputs[0]
                out.dtype = ir.DataType.FLOAT
                graph.insert_after(node, back)
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            modified = True
        if counts:
            logger.info("float32 casts for ONNX Runtime CPU kernels: %s", ", ".join(f"{k} x{v}" for k, v in
                                                                                  sorted(counts.items())))
        return ir.passes.PassResult(model, modified)
