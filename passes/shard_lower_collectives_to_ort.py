"""ONNX Runtime lowering of the collectives: `r1c::AllReduce` / `r1c::AllGather` -> Python custom ops.

ONNX Runtime has no CPU collective, so the rank's runtime registers two Python custom ops of
onnxruntime-extensions (domain `ai.onnx.contrib`, the only domain its Python ops live in) that call the rank's
torch.distributed process group (`r1c.runtime.distributed.ort_collectives`). This pass renames the nodes to
those ops and keeps the op's attributes (`group`, and `reduction` / `axis`); a runtime that splits the graph at
the collectives instead (`r1c.runtime.distributed.segments`) recognises the same nodes. Runs before
`inline_r1c_functions`, whose postcondition is that no r1c node is left.
"""

from __future__ import annotations

import onnx_ir as ir

from r1c.errors import PassError
from r1c.passes.shard_util import set_type
from r1c.plugins import OpSpec
from r1c.plugins.all_gather import SPEC as ALL_GATHER
from r1c.plugins.all_reduce import SPEC as ALL_REDUCE

ORT_CUSTOM_DOMAIN = "ai.onnx.contrib"
ORT_CUSTOM_OPSET = 1
# r1c op -> the onnxruntime-extensions Python op that implements it (prefixed: that domain is shared)
ORT_OPS: dict[str, str] = {ALL_REDUCE.name: "R1cAllReduce", ALL_GATHER.name: "R1cAllGather"}
COLLECTIVE_SPECS: dict[str, OpSpec] = {ALL_REDUCE.name: ALL_REDUCE, ALL_GATHER.name: ALL_GATHER}


def collective_spec(node: ir.Node) -> OpSpec | None:
    """The spec of a collective node, in its r1c form or its ONNX Runtime form; None for any other node."""
    if node.domain == ALL_REDUCE.domain:
        return COLLECTIVE_SPECS.get(node.op_type)
    if node.domain == ORT_CUSTOM_DOMAIN:
        return next((COLLECTIVE_SPECS[k] for k, v in ORT_OPS.items() if v == node.op_type), None)
    return None


class LowerCollectivesToOrtPass(ir.passes.InPlacePass):
    """r1c collectives -> `ai.onnx.contrib` Python custom ops with the same attributes."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.domain != ALL_REDUCE.domain or node.op_type not in ORT_OPS:
                continue
            spec = COLLECTIVE_SPECS[node.op_type]
            attrs = {name: node.attributes[name] for name in spec.attributes if name in node.attributes}
            missing = sorted(set(spec.attributes) - set(attrs))
            if missing:
                raise PassError(f"lower_collectives_to_ort: {node.name}: missing attributes {missing}")
            lowered = ir.Node(ORT_CUSTOM_DOMAIN, ORT_OPS[node.op_type], list(node.inputs), attrs.values(),
                              num_outputs=1, name=node.name)
            out, new = node.outputs[0], lowered.outputs[0]
            name, out.name = out.name, f"{out.name}.r1c"
            new.name = name
            set_type(new, out)
            model.graph.insert_after(node, lowered)
            out.replace_all_uses_with(new, replace_graph_outputs=True)
            model.graph.remove(node, safe=True)
            model.opset_imports.setdefault(ORT_CUSTOM_DOMAIN, ORT_CUSTOM_OPSET)
            modified = True
        return ir.passes.PassResult(model, modified)
