"""`r1c::FP8Linear` as a TensorRT plugin (IPluginV3); registered by `r1c.plugins.tensorrt_common.register_plugins`.

Inputs: x [..., K] float/half/bf16 (any rank >= 2; the leading dims are the tokens M); weight [N, K] FP8 e4m3;
weight_scale [ceil(N/128), ceil(K/128)] float32. Output: [..., N] in x's dtype.
Kernels: the launch plan of `plan.py` (activation quantization 1x128, FP8 GEMM, split-K reduce at small M),
launched from the bundle's kernel library; scratch in TensorRT's workspace.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

from r1c.plugins.fp8 import BLOCK, block_shape
from r1c.plugins.fp8_linear.plan import LinearProblem, config_boundaries, linear_plan
from r1c.plugins.fp8_linear.reference import SPEC
from r1c.plugins.launch import Plan
from r1c.plugins.tensorrt_common import KernelOp

_FLOAT_TYPES = ("FLOAT", "HALF", "BF16")


class FP8LinearOp(KernelOp):
    spec = SPEC

    def validate(self, attrs: dict[str, Any]) -> None:
        if attrs["block_size"] != BLOCK:
            raise ValueError(f"{SPEC.plugin_id}: block_size must be {BLOCK}, got {attrs['block_size']}")

    def output_dtypes(self, trt: types.ModuleType, attrs: dict[str, Any], input_types: Sequence[Any]) -> list[Any]:
        return [input_types[0]]

    def output_shapes(
        self, trt: types.ModuleType, attrs: dict[str, Any], inputs: Sequence[Any], exprs: Any
    ) -> list[Any]:
        x, weight = inputs[0], inputs[1]
        return [trt.DimsExprs([*(x[i] for i in range(len(x) - 1)), weight[0]])]

    def supports(
        self, trt: types.ModuleType, attrs: dict[str, Any], pos: int, types_: Sequence[Any], num_inputs: int
    ) -> bool:
        t = types_[pos].name
        if pos == 0:
            return t in _FLOAT_TYPES
        if pos == 1:
            return t == "FP8"
        if pos == 2:
            return t == "FLOAT"
        return t == types_[0].name  # the output: x's dtype

    def check_shapes(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]]) -> None:
        x, weight, scale = shapes
        if len(x) < 2 or len(weight) != 2 or len(scale) != 2:
            raise ValueError(f"{SPEC.plugin_id}: expected x [..., K], weight [N, K], weight_scale [N/128, K/128]; "
                             f"got {list(x)}, {list(weight)}, {list(scale)}")
        if -1 in weight:
            return
        n, k = weight
        if x[-1] not in (-1, k) or (-1 not in scale and tuple(scale) != block_shape(n, k)):
            raise ValueError(f"{SPEC.plugin_id}: x {list(x)}, weight {list(weight)}, weight_scale {list(scale)} "
                             "do not fit [..., K], [N, K], [ceil(N/128), ceil(K/128)]")

    def problem(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> LinearProblem:
        x, (n, k) = shapes[0], shapes[1]
        return LinearProblem(math.prod(x[:-1]), k, n, dtypes[0])

    def plan(self, attrs: dict[str, Any], problem: LinearProblem) -> Plan:
        return linear_plan(problem)

    def config_boundaries(self, problem: LinearProblem) -> list[int]:
        return config_boundaries()
