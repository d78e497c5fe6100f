"""Deterministic names and order, so that the same input gives byte-identical files.

Names that a rewrite left generic (`node_12`, `v_3`, unnamed) become `<OpType>_<n>` / `<OpType>_<n>_out<k>`,
numbered in graph order; names from the source model are kept. onnx_ir's NameFixPass then guarantees
uniqueness. Model-local functions and opset imports are sorted, and the producer is set to r1c.
"""

from __future__ import annotations

import re

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass

import r1c

_GENERIC = re.compile(r"^(node|v|val)(_\d+)?$")


class _OpTypeNames:
    """NameFixPass's name generator: op-type based names for nodes and values that have none."""

    def generate_node_name(self, node: ir.Node) -> str:
        return node.name or node.op_type

    def generate_value_name(self, value: ir.Value) -> str:
        producer = value.producer()
        if value.name:
            return value.name
        if producer is None:
            return "value"
        return f"{producer.name or producer.op_type}_out{value.index()}"


class NameDeterministicallyPass(ir.passes.InPlacePass):
    """Gives every generic or missing name a graph-order name; sorts functions and opset imports."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph_like: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
        for graph in graph_like:
            counters: dict[str, int] = {}
            for node in ir.traversal.RecursiveGraphIterator(graph):
                if node.name and not _GENERIC.match(node.name):
                    continue
                n = counters[node.op_type] = counters.get(node.op_type, -1) + 1
                node.name = f"{node.op_type}_{n}"
                for i, out in enumerate(node.outputs):
                    if not out.name or _GENERIC.match(out.name):
                        out.name = f"{node.name}_out{i}"
                modified = True
        modified = NameFixPass(_OpTypeNames()).call(model).modified or modified
        functions = sorted(model.functions.items())
        model.functions.clear()
        model.functions.update(functions)
        imports = sorted(model.opset_imports.items())
        model.opset_imports.clear()
        model.opset_imports.update(imports)
        model.graph.opset_imports.clear()
        model.graph.opset_imports.update(imports)
        model.producer_name, model.producer_version = "r1c", r1c.__version__
        return ir.passes.PassResult(model, modified)
