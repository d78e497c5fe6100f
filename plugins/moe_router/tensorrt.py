"""`r1c::MoERouter` as a TensorRT plugin (IPluginV3); registered by `r1c.plugins.tensorrt_common.register_plugins`.

Inputs: hidden [T, H] float/half/bf16; gate_weight [E, H] float32; correction_bias [E] float32.
Outputs: topk_weights [T, K] float32; topk_ids [T, K] int32 (K = top_k; T stays symbolic).
Kernels: the launch plan of `plan.py` (gate GEMM, routing), launched from the bundle's kernel library; the logits
live in TensorRT's workspace.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from r1c.plugins.launch import Plan
from r1c.plugins.moe_router.plan import RouterProblem, config_boundaries, router_plan
from r1c.plugins.moe_router.reference import SPEC, check_attributes, effective_groups
from r1c.plugins.tensorrt_common import KernelOp

_HIDDEN_TYPES = ("FLOAT", "HALF", "BF16")


class MoERouterOp(KernelOp):
    spec = SPEC

    def validate(self, attrs: dict[str, Any]) -> None:
        """Every mode of the op (scoring sigmoid | softmax, topk_method noaux_tc | greedy | group_limited_greedy);
        a combination the op does not define is refused by name (`check_attributes`)."""
        if attrs["top_k"] < 1:
            raise ValueError(f"{SPEC.plugin_id}: need top_k >= 1, got top_k={attrs['top_k']}")
        if attrs["norm_topk_prob"] not in (0, 1):
            raise ValueError(f"{SPEC.plugin_id}: norm_topk_prob must be 0 or 1, got {attrs['norm_topk_prob']}")
        try:
            check_attributes(**attrs)
        except ValueError as e:
            raise ValueError(f"{SPEC.plugin_id}: {str(e).removeprefix('MoERouter: ')}") from None

    def output_dtypes(self, trt: types.ModuleType, attrs: dict[str, Any], input_types: Sequence[Any]) -> list[Any]:
        return [trt.DataType.FLOAT, trt.DataType.INT32]

    def output_shapes(
        self, trt: types.ModuleType, attrs: dict[str, Any], inputs: Sequence[Any], exprs: Any
    ) -> list[Any]:
        tokens, k = inputs[0][0], exprs.constant(attrs["top_k"])
        return [trt.DimsExprs([tokens, k]), trt.DimsExprs([tokens, k])]

    def supports(
        self, trt: types.ModuleType, attrs: dict[str, Any], pos: int, types_: Sequence[Any], num_inputs: int
    ) -> bool:
        t = types_[pos].name
        if pos == 0:  # hidden
            return t in _HIDDEN_TYPES
        if pos in (1, 2):  # gate_weight, correction_bias
            return t == "FLOAT"
        return t == ("FLOAT" if pos == num_inputs else "INT32")  # topk_weights, topk_ids

    def check_shapes(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]]) -> None:
        hidden, gate, bias = shapes
        if len(hidden) != 2 or len(gate) != 2 or len(bias) != 1:
            raise ValueError(
                f"{SPEC.plugin_id}: expected hidden [T, H], gate_weight [E, H], correction_bias [E]; "
                f"got {list(hidden)}, {list(gate)}, {list(bias)}"
            )
        experts, h = gate
        if -1 not in (hidden[1], h) and hidden[1] != h:
            raise ValueError(f"{SPEC.plugin_id}: hidden has {hidden[1]} channels, gate_weight {h}")
        if experts == -1:
            return
        if bias[0] not in (-1, experts):
            raise ValueError(f"{SPEC.plugin_id}: correction_bias has {bias[0]} entries for {experts} experts")
        n_group, topk_group = effective_groups(attrs["topk_method"], attrs["n_group"], attrs["topk_group"])
        top_k = attrs["top_k"]
        if experts % n_group:
            raise ValueError(f"{SPEC.plugin_id}: {experts} experts do not split into n_group={n_group} groups")
        if top_k > experts // n_group * topk_group:
            raise ValueError(
                f"{SPEC.plugin_id}: top_k={top_k} exceeds the {experts // n_group * topk_group} experts "
                f"in topk_group={topk_group} groups"
            )

    def problem(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> RouterProblem:
        (t, h), (e, _) = shapes[0], shapes[1]
        return RouterProblem(t, h, e, dtypes[0], tuple(sorted(attrs.items())))

    def plan(self, attrs: dict[str, Any], problem: RouterProblem) -> Plan:
        return router_plan(problem)

    def config_boundaries(self, problem: RouterProblem) -> list[int]:
        return config_boundaries()
