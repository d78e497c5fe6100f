"""Inline the function bodies of the r1c ops that no target lowering replaced (for ONNX Runtime).

ONNX Runtime would inline them itself at session creation; doing it here makes the written model plain
ONNX (+ ORT contrib ops) that any tool can read, and lets the later cleanup and folding see through it.
onnx_ir's InlinePass does the work (attribute references resolved per call site); unused bodies go.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass

from r1c.passes._util import node_error, r1c_nodes
from r1c.plugins import R1C_DOMAIN


class InlineR1CFunctionsPass(ir.passes.Sequential):
    """Inlines every call of an r1c-domain model-local function, then drops the unused bodies."""

    def __init__(self) -> None:
        super().__init__(InlinePass(criteria=lambda function: function.domain == R1C_DOMAIN),
                         RemoveUnusedFunctionsPass())

    def ensures(self, model: ir.Model) -> None:
        for node in r1c_nodes(model):  # a node whose body was missing cannot run anywhere but on a plugin
            raise node_error("inline_r1c_functions", node, "no function body to inline (and no lowering replaced it)")
