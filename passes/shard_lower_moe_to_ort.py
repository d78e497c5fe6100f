"""ONNX Runtime lowering of an expert-parallel MoE block (see `shard_moe`): only the chosen local experts run.

`shard_moe` leaves, on a rank holding experts [first, first + E_l) of E:
    w, ids = MoERouter(h);  local = ids - first;  mine = 0 <= local < E_l
    y = MoEExperts(h, Where(mine, w, 0), Where(mine, local, 0), w13_l, w2_l)
whose function body computes every local expert on every token. This pass lowers it to ORT's MoE kernel, which
computes only the chosen experts, by giving it E_l + 1 experts — the local ones and an all-zero "remainder"
expert that stands for every expert held elsewhere:
    probs  = MoEGroupRouter(Gemm(h, gate_w^T), bias)      [T, E]   log s at the chosen experts, SENTINEL elsewhere
    total  = sum_E exp(probs)                             [T, 1]   sum of s over the k chosen (all ranks)
    local  = sum_{E_l} exp(probs[:, first:first+E_l])     [T, 1]
    router = Concat(probs[:, first:first+E_l], log(max(total - local, 1e-30)))          [T, E_l + 1]
    y      = MoE(h, router, w13_l + zero expert, w2_l + zero expert; k = top_k, softmax over the k chosen)
ORT's MoE weights slot i by exp(v_i) / sum over the k chosen slots: the chosen local experts, the remainder (its
exp is the other ranks' share of the mass) and sentinel slots (exp = 0); so expert e gets s_e / total, as the
single-rank lowering (`lower_moe_to_ort`), and y is scaled the same way (routed_scaling_factor, times total
without norm_topk_prob). Needs top_k <= E_l + 1 (enough columns); float32 `quant=none` only; anything else
keeps the function body, with the reason logged. Costs one zero expert per layer in memory and, for a token
with fewer than k local experts, one zero-weight expert GEMM.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRule
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase

from r1c.passes._rewrite import RulesPass
from r1c.passes._util import ORT_DOMAIN, const_scalar
from r1c.passes.lower_moe_to_ort import SENTINEL, _interleave_rows
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC

logger = logging.getLogger(__name__)
MIN_REST = 1e-30  # the remainder's mass is clamped here before its log (rounding can make it <= 0)


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {name: attr.value for name, attr in node.attributes.items()}


def _padded(tensor: ir.TensorProtocol, interleave: bool, name: str) -> ir.LazyTensor:
    """[E_l, A, B] -> [E_l + 1, A, B] with an all-zero last expert (rows interleaved for ORT's swiglu_fusion=1)."""
    e, a, b = (int(d) for d in tensor.shape)  # type: ignore[arg-type]

    def compute() -> ir.TensorProtocol:
        w = (_interleave_rows(tensor) if interleave else tensor).numpy()
        return ir.tensor(np.concatenate([w, np.zeros((1, a, b), dtype=w.dtype)], axis=0), name=name)

    return ir.LazyTensor(compute, dtype=tensor.dtype, shape=ir.Shape([e + 1, a, b]), name=name)


class _LocalExpertsToOrtMoE(RewriteRuleClassBase):
    def __init__(self) -> None:
        super().__init__("sharded MoERouter+MoEExperts->ORT MoE")
        self._router: dict[str, Any] = {}
        self._first = self._count = 0

    def pattern(self, op, hidden, gate_w, bias, first, zero, count, fzero, izero, w13, w2):
        w, ids = op.MoERouter(hidden, gate_w, bias, _domain=ROUTER_SPEC.domain, _outputs=["w", "ids"])
        local = op.Sub(ids, first)
        mine = op.And(op.GreaterOrEqual(local, zero), op.Less(local, count))
        return op.MoEExperts(hidden, op.Where(mine, w, fzero), op.Where(mine, local, izero), w13, w2,
                             _domain=EXPERTS_SPEC.domain, _outputs=["out"], _allow_other_inputs=True)

    def check(self, context, hidden, first, zero, count, fzero, izero, w13, w2, w, out, **_) -> MatchResult:  # type: ignore[override]
        r = MatchResult()
        router = {**ROUTER_SPEC.attributes, **_attrs(w.producer())}
        experts = {**EXPERTS_SPEC.attributes, **_attrs(out.producer())}
        consts = [const_scalar(v) for v in (first, zero, count, fzero, izero)]
        if any(v is None for v in consts) or consts[1] != 0 or consts[3] != 0 or consts[4] != 0:
            return r.fail("the local-expert remap is not by constants", first)
        if router["scoring"] != "sigmoid":
            return r.fail(f"scoring {router['scoring']!r}: MoEGroupRouter implements sigmoid only", w.producer())
        if experts["quant"] != "none" or experts["activation"] != "swiglu" or len(out.producer().inputs) > 5:
            return r.fail(f"experts quant={experts['quant']!r}: ORT has no CPU FP8 MoE", out.producer())
        if hidden.dtype != ir.DataType.FLOAT or w13.dtype != ir.DataType.FLOAT or w2.dtype != ir.DataType.FLOAT:
            return r.fail("hidden/w13/w2 are not float32", hidden)
        for v in (w13, w2):
            if not v.is_initializer() or v.const_value is None:
                return r.fail(f"{v.name} is not an initializer", v)
        first_i, count_i = int(consts[0]), int(consts[2])  # type: ignore[arg-type]
        if int(w13.shape[0]) != count_i:
            return r.fail(f"w13 holds {w13.shape[0]} experts, the remap {count_i}", w13)
        if int(router["top_k"]) > count_i + 1:
            return r.fail(f"top_k {router['top_k']} > {count_i} local experts + 1", w.producer())
        if float(router["routed_scaling_factor"]) <= 0:
            return r.fail("routed_scaling_factor must be positive", w.producer())
        self._router, self._first, self._count = router, first_i, count_i
        return r

    def rewrite(self, op, hidden, gate_w, bias, w13, w2, **_):
        a = self._router
        top_k, first, count = int(a["top_k"]), self._first, self._count
        probs = op.MoEGroupRouter(op.Gemm(hidden, gate_w, transB=1), bias, _domain=ORT_DOMAIN, _version=1,
                                  top_k=top_k, n_group=int(a["n_group"]), topk_group=int(a["topk_group"]),
                                  group_topk=2, router_sentinel=SENTINEL)
        last = op.Constant(value_ints=[-1])
        mass = op.Exp(probs)
        total = op.ReduceSum(mass, last, keepdims=1)
        start, stop = op.Constant(value_ints=[first]), op.Constant(value_ints=[first + count])
        local = op.ReduceSum(op.Slice(mass, start, stop, last), last, keepdims=1)
        floor = op.Constant(value=ir.tensor(np.array(MIN_REST, np.float32)))
        rest = op.Log(op.Max(op.Sub(total, local), floor))
        router = op.Concat(op.Slice(probs, start, stop, last), rest, axis=-1)
        w13p = _padded(w13.const_value, True, f"{w13.name}.interleaved_padded")
        w2p = _padded(w2.const_value, False, f"{w2.name}.padded")
        y = op.MoE(hidden, router, op.initializer(w13p, w13p.name), None, op.initializer(w2p, w2p.name),
                   _domain=ORT_DOMAIN, _version=1, k=top_k, activation_type="swiglu", swiglu_fusion=1,
                   normalize_routing_weights=1, activation_alpha=1.0, activation_beta=0.0)
        scale = op.Constant(value=ir.tensor(np.array(float(a["routed_scaling_factor"]), np.float32)))
        if not a["norm_topk_prob"]:
            scale = op.Mul(total, scale)
        out = op.Mul(y, scale)
        out.dtype, out.shape = hidden.dtype, hidden.shape
        return out


class LowerShardedMoEToOrtPass(RulesPass):
    """Each expert-parallel float32 MoE block -> ORT MoE over the local experts plus a zero remainder expert."""

    def rules(self) -> list[RewriteRule]:
        return [_LocalExpertsToOrtMoE.rule()]
