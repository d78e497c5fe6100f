"""Dead-code elimination: nodes whose outputs nobody reads, unused initializers, functions and opset imports.

A composition of onnx_ir's common passes (they already exist; this names the step in a pipeline).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass


class RemoveDeadCodePass(ir.passes.Sequential):
    """Removes unused nodes and initializers, then unused model-local functions and opset imports."""

    def __init__(self) -> None:
        super().__init__(RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass())
