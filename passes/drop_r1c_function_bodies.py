"""TensorRT lowering: r1c nodes stay plugin nodes, and their model-local function bodies are dropped.

TensorRT's parser (>= 10.15) imports a node carrying `plugin_namespace="r1c"` as the registered plugin, but
older parsers inline a local function of the same name instead of looking for a plugin; without the
body every parser version binds the plugin. Every r1c node must carry the plugin namespace and every
attribute of its op spec (the plugin creator reads them); a node that does not is an error naming it.
"""

from __future__ import annotations

import onnx_ir as ir

from r1c.passes._util import R1C_SPECS, node_error, r1c_nodes
from r1c.plugins import PLUGIN_NAMESPACE, R1C_DOMAIN

PASS_NAME = "drop_r1c_function_bodies"


class DropR1CFunctionBodiesPass(ir.passes.InPlacePass):
    """Removes r1c function bodies; checks each r1c node is a complete plugin node."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in r1c_nodes(model):
            spec = R1C_SPECS.get(node.op_type)
            if spec is None:
                raise node_error(PASS_NAME, node, f"no r1c op spec (and so no TensorRT plugin) for {node.op_type}")
            namespace = node.attributes.get("plugin_namespace")
            if namespace is None:
                node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", PLUGIN_NAMESPACE)
                modified = True
            elif namespace.as_string() != PLUGIN_NAMESPACE:
                raise node_error(PASS_NAME, node, f"plugin_namespace is {namespace.as_string()!r}")
            missing = [name for name in spec.attributes if name not in node.attributes]
            if missing:
                raise node_error(PASS_NAME, node, f"missing attributes {missing} that the plugin reads")
        dropped = [key for key in model.functions if key[0] == R1C_DOMAIN]
        for key in dropped:
            del model.functions[key]
        return ir.passes.PassResult(model, modified or bool(dropped))
