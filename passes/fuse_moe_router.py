"""DeepSeek-V3 noaux_tc routing, as transformers' `DeepseekV3TopkRouter` exports, -> `r1c::MoERouter`.

Matched subgraph (T = tokens, E = experts, G = n_group):
    s = Sigmoid(Gemm(h, W, transB=1))                  [T, E]  (or MatMul(h, W^T))
    c = s + bias;  group score = ReduceSum(TopK(Reshape(c, [-1, G, E/G]), 2))
    keep the topk_group best groups (TopK, ScatterElements into zeros, broadcast back to [T, E])
    ids = TopK(Where(Not(mask), -inf, c), top_k);  w = GatherElements(s, ids)
    [w = w / (ReduceSum(w) (+ eps))]  [w = w * routed_scaling_factor]
The rewrite emits `r1c::MoERouter` (plugin node attribute included) and a Cast of its int32 ids back
to the int64 the rest of the graph reads; the model gets the op's function body (the exporter's).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRule
from onnxscript.rewriter.pattern import MatchResult, OrValue, RewriteRuleClassBase

from r1c.exporter.onnx_functions import router_function
from r1c.passes._rewrite import RulesPass
from r1c.passes._util import attr_int, check_r1c_bodies, const_ints, const_scalar, ensure_function, r1c_attrs
from r1c.plugins.moe_router import SPEC


class _RouterRule(RewriteRuleClassBase):
    def __init__(self, gemm: bool, norm: str, scaled: bool) -> None:
        super().__init__(f"MoERouter[{'gemm' if gemm else 'matmul'},norm={norm},scaled={int(scaled)}]")
        self.gemm, self.norm, self.scaled = gemm, norm, scaled
        self._attrs: dict[str, object] = {}

    def pattern(self, op, hidden, gate_w, bias, grouped_shape, two, sum_axes, group_k, zero, one,
                expand_shape, flat_shape, unsq_axes, neg_inf, k, norm_axes, eps, scale):
        logits = op.Gemm(hidden, gate_w, _outputs=["logits"]) if self.gemm else op.MatMul(hidden, gate_w)
        s = op.Sigmoid(logits)
        c = op.Add(s, bias)
        top2, _ = op.TopK(op.Reshape(c, grouped_shape), two, _outputs=2)
        group_score = op.ReduceSum(top2, sum_axes, keepdims=0)
        _, kept = op.TopK(group_score, group_k, _outputs=2)
        zeros = OrValue([op.Expand(zero, op.Shape(group_score)),
                         op.ConstantOfShape(op.Shape(group_score), _outputs=["zeros_cos"])])
        ones = OrValue([op.ConstantOfShape(op.Shape(kept), _outputs=["ones_cos"]), op.Expand(one, op.Shape(kept))])
        group_mask = op.ScatterElements(zeros, kept, ones, _outputs=["scatter"])
        expert_mask = op.Reshape(op.Expand(op.Unsqueeze(group_mask, unsq_axes), expand_shape), flat_shape)
        masked = op.Where(op.Not(op.Cast(expert_mask)), neg_inf, c)
        _, ids = op.TopK(masked, k, _outputs=[None, "ids"])
        w = op.GatherElements(s, ids, _outputs=["gathered"])
        if self.norm != "none":
            denom = op.ReduceSum(w, norm_axes, keepdims=1)
            w = op.Div(w, op.Add(denom, eps) if self.norm == "eps" else denom)
        if self.scaled:
            w = op.Mul(w, scale)
        return w, ids

    def check(self, context, hidden, gate_w, bias, grouped_shape, two, sum_axes, group_k, zero, one,  # type: ignore[override]
              expand_shape, flat_shape, unsq_axes, neg_inf, k, norm_axes, eps, scale, ids, gathered, scatter,
              logits=None, zeros_cos=None, ones_cos=None, **_) -> MatchResult:
        r = MatchResult()
        out = context.output_values[0]
        if self.norm == "none" and any(use.node.op_type == "ReduceSum" for use in gathered.uses()):
            return r.fail("a normalization of the weights follows: left to the rule that includes it", gathered)
        if not self.scaled and any(use.node.op_type == "Mul" and any(const_scalar(v) is not None for v in
                                                                    use.node.inputs) for use in out.uses()):
            return r.fail("a scaling of the weights follows: left to the rule that includes it", out)
        fill = {0.0: _fill_value(zero, zeros_cos), 1.0: _fill_value(one, ones_cos)}
        if any(v != want for want, v in fill.items()):
            return r.fail(f"group mask is not scattered ones into zeros ({fill})", scatter)
        axes = {"group sum": (sum_axes, (-1, 2)), "mask unsqueeze": (unsq_axes, (-1, 2))}
        if self.norm != "none":
            axes["normalization"] = (norm_axes, (-1, 1))
        for what, (value, allowed) in axes.items():
            if const_ints(value) not in [[a] for a in allowed]:
                return r.fail(f"{what} axes {const_ints(value)} are not the last axis", value)
        if gate_w.shape is None or gate_w.shape.rank() != 2 or not all(isinstance(d, int) for d in gate_w.shape):
            return r.fail("router weight has no static 2-D shape", gate_w)
        n_experts = gate_w.shape[0] if self.gemm else gate_w.shape[1]
        if self.gemm and logits is not None:
            gemm = logits.producer()
            if attr_int(gemm, "transB", 0) != 1 or attr_int(gemm, "transA", 0) != 0 or len(gemm.inputs) > 2:
                return r.fail("the router Gemm is not h @ W^T without bias", gemm)
        shape = const_ints(grouped_shape)
        if shape is None or len(shape) != 3 or shape[0] not in (-1, 0) or shape[1] * shape[2] != n_experts:
            return r.fail(f"group reshape {shape} does not split {n_experts} experts into groups", grouped_shape)
        n_group = shape[1]
        if const_ints(two) != [2]:
            return r.fail("group score is not the sum of the top-2 scores", two)
        if const_ints(expand_shape) not in ([1, n_group, shape[2]], [-1, n_group, shape[2]]):
            return r.fail(f"group mask broadcast {const_ints(expand_shape)} is not [1, G, E/G]", expand_shape)
        if const_ints(flat_shape) not in ([-1, n_experts], [0, n_experts]):
            return r.fail(f"expert mask reshape {const_ints(flat_shape)} is not [-1, E]", flat_shape)
        inf = const_scalar(neg_inf)
        if inf is None or not (inf == -math.inf or inf <= -1e30):
            return r.fail(f"masked experts are set to {inf}, not -inf", neg_inf)
        topk_group, top_k = const_ints(group_k), const_ints(k)
        if topk_group is None or top_k is None:
            return r.fail("top-k counts are not constants", k)
        if attr_int(gathered.producer(), "axis", 0) not in (1, -1) or attr_int(scatter.producer(), "axis", 0) != 1:
            return r.fail("gather/scatter axis is not the expert axis", gathered)
        topk = ids.producer()
        if attr_int(topk, "largest", 1) != 1 or attr_int(topk, "axis", -1) not in (-1, 1):
            return r.fail("expert selection is not a largest-k over the expert axis", topk)
        epsilon = const_scalar(eps)
        if self.norm == "eps" and (epsilon is None or epsilon > 1e-6):
            return r.fail(f"normalization epsilon {epsilon} is not a tiny constant", eps)
        factor = const_scalar(scale) if self.scaled else 1.0
        if factor is None:
            return r.fail("routed scaling factor is not a constant", scale)
        if hidden.dtype != ir.DataType.FLOAT or bias.dtype != ir.DataType.FLOAT:
            return r.fail(f"hidden/bias are {hidden.dtype}/{bias.dtype}, not float32", hidden)
        self._attrs = r1c_attrs(SPEC, top_k=top_k[0], n_group=n_group, topk_group=topk_group[0],
                                routed_scaling_factor=factor, norm_topk_prob=int(self.norm != "none"),
                                scoring="sigmoid", topk_method="noaux_tc")
        return r

    def rewrite(self, op, hidden, gate_w, bias, ids, **_):
        weight = gate_w if self.gemm else _transposed(op, gate_w)
        w, ids32 = op.MoERouter(hidden, weight, bias, _domain=SPEC.domain, _version=SPEC.version, _outputs=2,
                                **self._attrs)
        w.dtype, ids32.dtype = ir.DataType.FLOAT, ir.DataType.INT32
        w.shape = ids32.shape = ids.shape
        ids64 = op.Cast(ids32, to=ir.DataType.INT64)
        ids64.dtype, ids64.shape = ir.DataType.INT64, ids.shape
        return w, ids64


def _transposed(op, weight_t: ir.Value) -> ir.Value:
    """The router weight [E, H] from the [H, E] one a MatMul reads: a lazily written initializer when it is
    one (the op's plugin reads it as a constant), else a Transpose node."""
    tensor = weight_t.const_value
    if not weight_t.is_initializer() or tensor is None or weight_t.shape is None:
        return op.Transpose(weight_t, perm=[1, 0])
    h, e = weight_t.shape
    lazy = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(tensor.numpy().T)), dtype=tensor.dtype,
                         shape=ir.Shape([e, h]), name=f"{weight_t.name}.transposed")
    return op.initializer(lazy, lazy.name)


def _fill_value(scalar: ir.Value | None, constant_of_shape: ir.Value | None) -> float | None:
    """The number an Expand(scalar, shape) or ConstantOfShape(shape) fills with."""
    if constant_of_shape is not None:
        node = constant_of_shape.producer()
        attr = None if node is None else node.attributes.get("value")
        return 0.0 if attr is None else float(attr.as_tensor().numpy().reshape(-1)[0])
    return const_scalar(scalar)


class FuseMoERouterPass(RulesPass):
    """Fuses each exported DeepSeek routing subgraph into one `r1c::MoERouter` node."""

    def rules(self) -> list[RewriteRule]:
        variants = itertools.product((True, False), ("plain", "eps", "none"), (True, False))
        return [_RouterRule.rule(gemm, norm, scaled) for gemm, norm, scaled in variants]

    def after_rewrites(self, model: ir.Model) -> None:
        ensure_function(model, router_function())

    def ensures(self, model: ir.Model) -> None:
        check_r1c_bodies("fuse_moe_router", model)
