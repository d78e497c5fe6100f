"""ONNX Runtime lowering of a routed MoE block: `r1c::MoERouter` -> `r1c::MoEExperts` becomes ORT's kernels.

    logits = Gemm(h, gate_weight, transB=1)                                           [T, E]
    probs  = com.microsoft.MoEGroupRouter(logits, bias; top_k, n_group, topk_group)   [T, E]
             log(sigmoid) at the chosen experts, SENTINEL elsewhere (noaux_tc selection, bias for choice only)
    y      = com.microsoft.MoE(h, probs, w13 interleaved, w2; k=top_k, swiglu, normalize_routing_weights=1)
ORT's MoE takes the softmax over the k chosen log-scores, i.e. s / sum(s): the DeepSeek weights when
`norm_topk_prob`; then y *= routed_scaling_factor. Without `norm_topk_prob`, y is also multiplied by
sum(s) = ReduceSum(Exp(probs)) (exp(SENTINEL) = 0). ORT's CPU MoE reads the gate/up rows interleaved
(swiglu_fusion=1), so w13 is re-laid out once, lazily at save time; SwiGLU uses alpha=1, beta=0 (silu).
Only float32 `quant=none` experts are lowered: ORT 1.32 has no CPU kernel for FP8 QMoE, so FP8 experts
keep their function body. The numerical equality is tests/test_lowering_ort.py.
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
        if router["scoring"] != "sigmoid":
            return r.fail(f"scoring {router['scoring']!r}: MoEGroupRouter implements sigmoid only", w.producer())
        if experts["quant"] != "none" or experts["activation"] != "swiglu" or len(out.producer().inputs) > 5:
            return r.fail(f"experts quant={experts['quant']!r}: ORT 1.32 has no CPU FP8 MoE", out.producer())
        if hidden.dtype != ir.DataType.FLOAT or w13.dtype != ir.DataType.FLOAT or w2.dtype != ir.DataType.FLOAT:
            return r.fail(f"hidden/w13/w2 are {hidden.dtype}/{w13.dtype}/{w2.dtype}, not float32", hidden)
        if not w13.is_initializer() or w13.const_value is None:
            return r.fail("w13 is not an initializer (its rows must be re-laid out)", w13)
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
        probs = op.MoEGroupRouter(logits, bias, _domain=ORT_DOMAIN, _version=1, top_k=top_k,
                                  n_group=int(a["n_group"]), topk_group=int(a["topk_group"]),
                                  group_topk=2, router_sentinel=SENTINEL)
        w13i = self._w13i
        if w13i is None:
            source = w13.const_value
            lazy = ir.LazyTensor(lambda: _interleave_rows(source), dtype=w13.dtype, shape=w13.shape,
                                 name=f"{w13.name}.interleaved")
            w13i = op.initializer(lazy, lazy.name)
        y = op.MoE(hidden, probs, w13i, None, w2, _domain=ORT_DOMAIN, _version=1, k=top_k,
                   activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                   activation_alpha=1.0, activation_beta=0.0)
        scale = op.Constant(value=ir.tensor(np.array(float(a["routed_scaling_factor"]), np.float32)))
        if not a["norm_topk_prob"]:
            row_sum = op.ReduceSum(op.Exp(probs), op.Constant(value_ints=[-1]), keepdims=1)
            scale = op.Mul(row_sum, scale)
        out = op.Mul(y, scale)
        out.dtype, out.shape = hidden.dtype, hidden.shape
        return out


class LowerMoEToOrtPass(RulesPass):
    """Replaces each float32 r1c MoE block (router feeding experts) by ORT's MoEGroupRouter + MoE."""

    def rules(self) -> list[RewriteRule]:
        return [_RouterExpertsToOrtMoE.rule()]
