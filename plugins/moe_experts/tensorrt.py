"""`r1c::MoEExperts` as a TensorRT plugin (IPluginV3); registered by `r1c.plugins.tensorrt_common.register_plugins`.

Inputs: hidden [T, H] float/half/bf16; topk_weights [T, K] float32; topk_ids [T, K] int32; w13 [E, 2I, H];
w2 [E, H, I] (float/half/bf16 for quant=none, FP8 e4m3 for quant=fp8_block128, then also the float32 block
scales w13_scale, w2_scale). Output: [T, H] in hidden's dtype.
Kernels: the launch plans of `plan.py` (decode GEMVs, or align + FP8 grouped GEMMs + combine), launched from the
bundle's kernel library; scratch in TensorRT's workspace.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from r1c.plugins.fp8 import block_shape
from r1c.plugins.launch import Plan
from r1c.plugins.moe_experts.plan import ExpertsProblem, config_boundaries, experts_plan
from r1c.plugins.moe_experts.reference import QUANT_MODES, SPEC
from r1c.plugins.tensorrt_common import KernelOp

ACTIVATIONS = ("swiglu",)
_FLOAT_TYPES = ("FLOAT", "HALF", "BF16")


class MoEExpertsOp(KernelOp):
    spec = SPEC

    def validate(self, attrs: dict[str, Any]) -> None:
        if attrs["quant"] not in QUANT_MODES:
            raise ValueError(f"{SPEC.plugin_id}: unknown quant {attrs['quant']!r} (expected one of {QUANT_MODES})")
        if attrs["activation"] not in ACTIVATIONS:
            raise ValueError(
                f"{SPEC.plugin_id}: unknown activation {attrs['activation']!r} (expected one of {ACTIVATIONS})"
            )

    def num_inputs(self, attrs: dict[str, Any]) -> tuple[int, ...]:
        n = len(SPEC.inputs)
        return (n + len(SPEC.optional_inputs),) if attrs["quant"] == "fp8_block128" else (n,)

    def output_dtypes(self, trt: types.ModuleType, attrs: dict[str, Any], input_types: Sequence[Any]) -> list[Any]:
        return [input_types[0]]

    def output_shapes(
        self, trt: types.ModuleType, attrs: dict[str, Any], inputs: Sequence[Any], exprs: Any
    ) -> list[Any]:
        return [trt.DimsExprs([inputs[0][0], inputs[0][1]])]

    def supports(
        self, trt: types.ModuleType, attrs: dict[str, Any], pos: int, types_: Sequence[Any], num_inputs: int
    ) -> bool:
        t = types_[pos].name
        if pos == num_inputs:  # output: hidden's dtype
            return t == types_[0].name
        if pos == 0:
            return t in _FLOAT_TYPES
        if pos == 1:  # topk_weights
            return t == "FLOAT"
        if pos == 2:  # topk_ids
            return t == "INT32"
        if pos in (3, 4):  # w13, w2
            return t == "FP8" if attrs["quant"] == "fp8_block128" else t in _FLOAT_TYPES
        return t == "FLOAT"  # w13_scale, w2_scale

    def check_shapes(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]]) -> None:
        hidden, weights, ids, w13, w2 = shapes[:5]
        ranks = [len(s) for s in (hidden, weights, ids, w13, w2)]
        if ranks != [2, 2, 2, 3, 3]:
            raise ValueError(
                f"{SPEC.plugin_id}: expected hidden [T, H], topk_weights [T, K], topk_ids [T, K], "
                f"w13 [E, 2I, H], w2 [E, H, I]; got ranks {ranks}"
            )
        if -1 in w13 or -1 in w2:
            return
        e, two_i, h = w13
        if two_i % 2 or w2 != (e, h, two_i // 2) or hidden[1] not in (-1, h):
            raise ValueError(
                f"{SPEC.plugin_id}: inconsistent shapes hidden {list(hidden)}, w13 {list(w13)}, w2 {list(w2)}"
            )
        if attrs["quant"] == "fp8_block128":
            want = [(e, *block_shape(two_i, h)), (e, *block_shape(h, two_i // 2))]
            if list(shapes[5:7]) != want:
                raise ValueError(
                    f"{SPEC.plugin_id}: block scales {[list(s) for s in shapes[5:7]]}, "
                    f"expected {[list(s) for s in want]}"
                )

    def problem(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str]) -> ExpertsProblem:
        (t, h), (_, k), (e, two_i, _) = shapes[0], shapes[1], shapes[3]
        return ExpertsProblem(t, k, e, h, two_i // 2, dtypes[0], dtypes[3])

    def plan(self, attrs: dict[str, Any], problem: ExpertsProblem) -> Plan:
        return experts_plan(problem)

    def config_boundaries(self, problem: ExpertsProblem) -> list[int]:
        return config_boundaries(problem.top_k, problem.experts)
