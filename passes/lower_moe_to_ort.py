"""ONNX Runtime lowering of a routed MoE block: `r1c::MoERouter` -> `r1c::MoEExperts` becomes ORT's kernels.

sigmoid scoring (V3 noaux_tc; also greedy / group_limited_greedy):
    logits = Gemm(h, gate_weight, transB=1)                                           [T, E]
    probs  = com.microsoft.MoEGroupRouter(logits, bias; top_k, n_group, topk_group, group_topk)   [T, E]
             log(sigmoid) at the chosen experts, SENTINEL elsewhere (bias for choice only); noaux_tc: bias and
             group_topk 2; the V2 methods: zero bias, group_topk 1 (group score = max), greedy: one group
    y      = com.microsoft.MoE(h, probs, w13 interleaved, w2; k=top_k, swiglu, normalize_routing_weights=1)
  ORT's MoE takes the softmax over the k chosen log-scores, i.e. s / sum(s): the DeepSeek weights when
  `norm_topk_prob`; then y *= routed_scaling_factor. Without `norm_topk_prob`, y is also multiplied by
  sum(s) = ReduceSum(Exp(probs)) (exp(SENTINEL) = 0).
softmax scoring (DeepSeek-V2 greedy / group_limited_greedy; weights = softmax(logits) at the ids, unnormalised):
    probs  = logits (greedy) | Where(kept group, logits, SENTINEL) (group_limited_greedy: the groups whose max
             logit is among the topk_group best, the same groups as the max of softmax)
    y      = com.microsoft.MoE(h, probs, ...; normalize_routing_weights=0)   softmax over all E of probs, at top_k
  group_limited_greedy: that softmax is over the kept experts only; y *= sum of softmax(logits) over the kept
  experts (= Z_kept / Z_all) makes it softmax(logits). Then y *= routed_scaling_factor.
softmax with noaux_tc has no ORT kernel (MoEGroupRouter scores with sigmoid): that block keeps its function body,
and the reason is logged.
ORT's CPU MoE reads the gate/up rows interleaved (swiglu_fusion=1), so w13 is re-laid out once, lazily at save
time; SwiGLU uses alpha=1, beta=0 (silu). Only float32 `quant=none` experts are lowered: ORT 1.32 has no CPU
kernel for FP8 QMoE, so FP8 experts keep their function body. The numerical equality is tests/test_lowering_ort.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRule
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase

from r1c.passes._rewrite import RulesPass
from r1c.passes._util import ORT_DOMAIN
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC
from r1c.plugins.moe_router.spec import check_attributes, effective_groups

SENTINEL = -1e30  # router_probs of experts a token did not choose; exp() of it is 0


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _interleave_rows(w13: ir.TensorProtocol) -> ir.TensorProtocol:
    """[E, 2I, H] gate rows then up rows -> rows g0, u0, g1, u1, ... (ORT's swiglu_fusion=1)."""
    w = w13.numpy()
    e, two_i, h = w.shape
    return ir.tensor(np.ascontiguousarray(np.stack([w[:, : two_i // 2], w[:, two_i // 2 :]], axis=2))
                     .reshape(e, two_i, h))


class _RouterExpertsToOrtMoE(RewriteRuleClassBase):
    def __init__(self) -> None:
        super().__init__("MoERouter+MoEExperts->ORT MoE")
        self._router: dict[str, Any] = {}
        self._w13i: ir.Value | None = None

    def pattern(self, op, hidden, gate_w, bias, w13, w2):
        w, ids = op.MoERouter(hidden, gate_w, bias, _domain=ROUTER_SPEC.domain, _outputs=["w", "ids"])
        return op.MoEExperts(hidden, w, ids, w13, w2, _domain=EXPERTS_SPEC.domain, _outputs=["out"],
                             _allow_other_inputs=True)  # FP8 scales: matched, then refused with the reason

    def check(self, context, hidden, gate_w, bias, w13, w2, w, out, **_) -> MatchResult:  # type: ignore[override]
        r = MatchResult()
        router = {**ROUTER_SPEC.attributes, **_attrs(w.producer())}
        experts = {**EXPERTS_SPEC.attributes, **_attrs(out.producer())}
        try:
            check_attributes(**router)
        except ValueError as e:
            return r.fail(str(e), w.producer())
        if router["scoring"] == "softmax" and router["topk_method"] == "noaux_tc":
            return r.fail("scoring 'softmax' with topk_method 'noaux_tc': MoEGroupRouter scores with sigmoid only",
                          w.producer())
        if experts["quant"] != "none" or experts["activation"] != "swiglu" or len(out.producer().inputs) > 5:
            return r.fail(f"experts quant={experts['quant']!r}: ORT 1.32 has no CPU FP8 MoE", out.producer())
        if hidden.dtype != ir.DataType.FLOAT or w13.dtype != ir.DataType.FLOAT or w2.dtype != ir.DataType.FLOAT:
            return r.fail(f"hidden/w13/w2 are {hidden.dtype}/{w13.dtype}/{w2.dtype}, not float32", hidden)
        if not w13.is_initializer() or w13.const_value is None:
            return r.fail("w13 is not an initializer (its rows must be re-laid out)", w13)
        if gate_w.shape is None or not isinstance(gate_w.shape[0], int):
            return r.fail("gate_weight has no static expert count", gate_w)
        if float(router["routed_scaling_factor"]) <= 0:
            return r.fail("routed_scaling_factor must be positive", w.producer())
        self._router = router
        name = f"{w13.name}.interleaved"
        self._w13i = context.graph_or_function.initializers.get(name)
        return r

    def rewrite(self, op, hidden, gate_w, bias, w13, w2, **_):
        a = self._router
        top_k = int(a["top_k"])
        logits = op.Gemm(hidden, gate_w, transB=1)
        if a["scoring"] == "sigmoid":
            probs, scale = self._sigmoid_probs(op, logits, bias, gate_w.shape[0])
        else:
            probs, scale = self._softmax_probs(op, logits, gate_w.shape[0])
        w13i = self._w13i
        if w13i is None:
            source = w13.const_value
            lazy = ir.LazyTensor(lambda: _interleave_rows(source), dtype=w13.dtype, shape=w13.shape,
                                 name=f"{w13.name}.interleaved")
            w13i = op.initializer(lazy, lazy.name)
        normalize = int(a["scoring"] == "sigmoid")  # softmax: MoE's own softmax over all E is the V2 weight
        y = op.MoE(hidden, probs, w13i, None, w2, _domain=ORT_DOMAIN, _version=1, k=top_k,
                   activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=normalize,
                   activation_alpha=1.0, activation_beta=0.0)
        out = op.Mul(y, scale)
        out.dtype, out.shape = hidden.dtype, hidden.shape
        return out

    def _sigmoid_probs(self, op, logits, bias, experts: int):
        """MoEGroupRouter's log-scores and the factor that turns MoE's normalized weights into the op's."""
        a = self._router
        v3 = a["topk_method"] == "noaux_tc"
        groups, kept = effective_groups(a["topk_method"], int(a["n_group"]), int(a["topk_group"]))
        if not v3:  # the V2 methods select on s alone
            bias = op.Constant(value=ir.tensor(np.zeros(experts, np.float32)))
        probs = op.MoEGroupRouter(logits, bias, _domain=ORT_DOMAIN, _version=1, top_k=int(a["top_k"]),
                                  n_group=groups, topk_group=kept, group_topk=2 if v3 else 1,
                                  router_sentinel=SENTINEL)
        scale = op.Constant(value=ir.tensor(np.array(float(a["routed_scaling_factor"]), np.float32)))
        if not a["norm_topk_prob"]:
            row_sum = op.ReduceSum(op.Exp(probs), op.Constant(value_ints=[-1]), keepdims=1)
            scale = op.Mul(row_sum, scale)
        return probs, scale

    def _softmax_probs(self, op, logits, experts: int):
        """MoE router_probs (normalize_routing_weights=0) and the factor for DeepSeek-V2's softmax routing."""
        a = self._router
        scale = op.Constant(value=ir.tensor(np.array(float(a["routed_scaling_factor"]), np.float32)))
        groups, kept = effective_groups(a["topk_method"], int(a["n_group"]), int(a["topk_group"]))
        if groups == 1:
            return logits, scale
        last = op.Constant(value_ints=[-1])
        group_max = op.ReduceMax(op.Reshape(logits, op.Constant(value_ints=[0, groups, experts // groups])), last,
                                 keepdims=0)  # [T, G]
        _, kept_ids = op.TopK(group_max, op.Constant(value_ints=[kept]), axis=-1, _outputs=2)
        zeros = op.ConstantOfShape(op.Shape(group_max), value=ir.tensor(np.array([0.0], np.float32)))
        ones = op.ConstantOfShape(op.Shape(kept_ids), value=ir.tensor(np.array([1.0], np.float32)))
        group_mask = op.ScatterElements(zeros, kept_ids, ones, axis=1)  # [T, G] 1.0 for kept groups
        expert_mask = op.Reshape(op.Expand(op.Unsqueeze(group_mask, last),
                                           op.Constant(value_ints=[1, groups, experts // groups])),
                                 op.Constant(value_ints=[0, experts]))  # [T, E]
        keep = op.Cast(expert_mask, to=ir.DataType.BOOL)
        probs = op.Where(keep, logits, op.Constant(value=ir.tensor(np.array(SENTINEL, np.float32))))
        kept_mass = op.ReduceSum(op.Mul(op.Softmax(logits, axis=-1), expert_mask), last, keepdims=1)  # Z_kept/Z_all
        return probs, op.Mul(kept_mass, scale)


class LowerMoEToOrtPass(RulesPass):
    """Replaces each float32 r1c MoE block (router feeding experts) by ORT's MoE (+ MoEGroupRouter for sigmoid)."""

    def rules(self) -> list[RewriteRule]:
        return [_RouterExpertsToOrtMoE.rule()]
