"""Routed experts, as transformers' `batched_mm` experts export, -> `r1c::MoEExperts`.

Matched subgraph (T = tokens, K = top_k, S = T*K token-expert pairs, H = hidden, I = expert width):
    x_rep = Reshape(Expand(Unsqueeze(x, 1), [1, K, 1]), [-1, H])         repeat each token K times  [S, H]
    pick  = Unsqueeze(Reshape(ids, [-1]), -1)                                                        [S, 1]
    gu    = Squeeze(MatMul(GatherND(w13, pick), Unsqueeze(x_rep, -1)), -1)                          [S, 2I]
    act   = silu(gate) * up  with  gate, up = Split(gu, 2, axis=1)                                   [S, I]
    y     = Squeeze(MatMul(GatherND(w2, pick), Unsqueeze(act, -1)), -1) * Unsqueeze(Reshape(w, [-1]), -1)
    out   = ReduceSum(Reshape(y, [-1, K, H]), axis=1)                                                [T, H]
`w13` [E, 2I, H] (gate rows, then up rows) and `w2` [E, H, I] are exactly the op's layout, so the weights
are used as they are. The ids reach the op as int32: the router fusion's int32 ids directly when the
graph only widened them, otherwise through a Cast. The model gets the op's function body.
"""

from __future__ import annotations

import itertools

import onnx_ir as ir
from onnxscript.rewriter import RewriteRule
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase

from r1c.exporter.onnx_functions import experts_function
from r1c.passes._rewrite import RulesPass
from r1c.passes._util import attr_int, check_r1c_bodies, const_ints, ensure_function, r1c_attrs
from r1c.plugins.moe_experts import SPEC


class _ExpertsRule(RewriteRuleClassBase):
    def __init__(self, sig_first: bool, weight_first: bool) -> None:
        super().__init__(f"MoEExperts[batched_mm,{int(sig_first)}{int(weight_first)}]")
        self.sig_first, self.weight_first = sig_first, weight_first

    def pattern(self, op, x, w, ids, w13, w2, ax_rep, rep_shape, flat_shape, ax_pick, ids_flat, ax_x,
                ax_gu, ax_act, ax_y, w_flat, ax_w, out_shape, ax_sum):
        x_rep = op.Reshape(op.Expand(op.Unsqueeze(x, ax_rep), rep_shape), flat_shape)
        pick = op.Unsqueeze(op.Reshape(ids, ids_flat), ax_pick)
        gu = op.Squeeze(op.MatMul(op.GatherND(w13, pick, _outputs=["g13"]), op.Unsqueeze(x_rep, ax_x)), ax_gu)
        gate, up = op.Split(gu, _allow_other_inputs=True, _outputs=["gate", "up"])
        silu = op.Mul(op.Sigmoid(gate), gate) if self.sig_first else op.Mul(gate, op.Sigmoid(gate))
        act = op.Mul(silu, up)
        y = op.Squeeze(op.MatMul(op.GatherND(w2, pick, _outputs=["g2"]), op.Unsqueeze(act, ax_act)), ax_y)
        weights = op.Unsqueeze(op.Reshape(w, w_flat), ax_w)
        y = op.Mul(weights, y) if self.weight_first else op.Mul(y, weights)
        return op.ReduceSum(op.Reshape(y, out_shape), ax_sum, keepdims=0)

    def check(self, context, x, w, ids, w13, w2, ax_rep, rep_shape, flat_shape, ax_pick, ids_flat, ax_x,  # type: ignore[override]
              ax_gu, ax_act, ax_y, w_flat, ax_w, out_shape, ax_sum, gate, up, g13, g2, **_) -> MatchResult:
        r = MatchResult()
        for weight in (w13, w2):
            shape = weight.shape
            if shape is None or shape.rank() != 3 or not all(isinstance(d, int) for d in shape):
                return r.fail(f"expert weight {weight.name} has no static 3-D shape", weight)
            if weight.dtype != ir.DataType.FLOAT:
                return r.fail(f"expert weight {weight.name} is {weight.dtype}; quant=none needs float32", weight)
        e, two_i, h = w13.shape
        if tuple(w2.shape) != (e, h, two_i // 2) or two_i % 2:
            return r.fail(f"w13 {w13.shape} and w2 {w2.shape} are not [E, 2I, H] and [E, H, I]", w2)
        if w.shape is None or w.shape.rank() != 2 or not isinstance(w.shape[1], int):
            return r.fail("routing weights have no static top_k", w)
        k = w.shape[1]
        expected = {
            "token repeat": (rep_shape, [[1, k, 1]]), "repeat reshape": (flat_shape, [[-1, h]]),
            "ids flatten": (ids_flat, [[-1]]), "weights flatten": (w_flat, [[-1]]),
            "pair reshape": (out_shape, [[-1, k, h]]), "sum over k": (ax_sum, [[1]]),
            "repeat axis": (ax_rep, [[1]]), "gather index axis": (ax_pick, [[-1], [1]]),
            "bmm axes": (ax_x, [[-1], [2]]), "gate/up squeeze": (ax_gu, [[-1], [2]]),
            "act axis": (ax_act, [[-1], [2]]), "down squeeze": (ax_y, [[-1], [2]]), "weight axis": (ax_w, [[-1], [1]]),
        }
        for what, (value, allowed) in expected.items():
            if const_ints(value) not in allowed:
                return r.fail(f"{what} is {const_ints(value)}, expected one of {allowed}", value)
        split = gate.producer()
        if attr_int(split, "axis", 0) not in (1, -1):
            return r.fail("gate/up split is not along the feature axis", split)
        sizes = const_ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is not None and sizes != [two_i // 2] * 2:
            return r.fail(f"gate/up split sizes {sizes} are not two halves", split)
        if any(attr_int(g.producer(), "batch_dims", 0) != 0 for g in (g13, g2)):
            return r.fail("expert gather has batch_dims", g13)
        if x.dtype != ir.DataType.FLOAT or w.dtype != ir.DataType.FLOAT:
            return r.fail(f"hidden/weights are {x.dtype}/{w.dtype}, not float32", x)
        if ids.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            return r.fail(f"expert ids are {ids.dtype}", ids)
        return r

    def rewrite(self, op, x, w, ids, w13, w2, **_):
        widened = ids.producer()
        if (ids.dtype == ir.DataType.INT64 and widened is not None and widened.op_type == "Cast"
                and widened.domain == "" and widened.inputs[0].dtype == ir.DataType.INT32):
            ids32 = widened.inputs[0]
        elif ids.dtype == ir.DataType.INT32:
            ids32 = ids
        else:
            ids32 = op.Cast(ids, to=ir.DataType.INT32)
        out = op.MoEExperts(x, w, ids32, w13, w2, _domain=SPEC.domain, _version=SPEC.version,
                            **r1c_attrs(SPEC, quant="none", activation="swiglu"))
        out.dtype, out.shape = x.dtype, x.shape
        return out


class FuseMoEExpertsPass(RulesPass):
    """Fuses each exported batched-mm expert computation into one `r1c::MoEExperts` node."""

    def rules(self) -> list[RewriteRule]:
        return [_ExpertsRule.rule(s, wf) for s, wf in itertools.product((False, True), (False, True))]

    def after_rewrites(self, model: ir.Model) -> None:
        ensure_function(model, experts_function("none"))

    def ensures(self, model: ir.Model) -> None:
        check_r1c_bodies("fuse_moe_experts", model)
