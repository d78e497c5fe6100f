"""RMSNorm fusion: `w * (x / sqrt(mean(x^2, -1) + eps))` in its exported spellings -> one normalization op.

Matched spellings: x^2 as `Pow(x, 2)` or `Mul(x, x)`; 1/rms as `Reciprocal(Sqrt(.))` times x, or as
`Div(x, Sqrt(.))`; the weight on either side of the last Mul. The fused op is ONNX Runtime's
`SimplifiedLayerNormalization` (domain "", an ORT contrib op with a CPU and CUDA kernel; ONNX's own
`RMSNormalization` needs opset 23), so this pass belongs to the `onnxruntime` pipeline. float32 only:
a bf16 graph casts around the norm, which this rule reports instead of matching.
"""

from __future__ import annotations

import itertools

import onnx_ir as ir
from onnxscript.rewriter import RewriteRule
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase

from r1c.passes._rewrite import RulesPass
from r1c.passes._util import const_ints, const_scalar

FUSED_OP = "SimplifiedLayerNormalization"


class _RMSNormRule(RewriteRuleClassBase):
    def __init__(self, square: str, inverse: str, weight_first: bool) -> None:
        super().__init__(f"RMSNorm[{square},{inverse},{'w*x' if weight_first else 'x*w'}]")
        self.square, self.inverse, self.weight_first = square, inverse, weight_first

    def pattern(self, op, x, two, axes, eps, weight):
        sq = op.Pow(x, two) if self.square == "Pow" else op.Mul(x, x)
        rms = op.Sqrt(op.Add(op.ReduceMean(sq, axes, keepdims=1), eps))
        normed = op.Mul(x, op.Reciprocal(rms)) if self.inverse == "Reciprocal" else op.Div(x, rms)
        return op.Mul(weight, normed) if self.weight_first else op.Mul(normed, weight)

    def check(self, context, x, two, axes, eps, weight, **_) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        if self.square == "Pow" and const_scalar(two) != 2.0:
            return result.fail("the exponent is not the constant 2", two)
        if x.dtype != ir.DataType.FLOAT or weight.dtype != ir.DataType.FLOAT:
            return result.fail(f"input/weight are {x.dtype}/{weight.dtype}, not float32", x)
        rank = None if x.shape is None else x.shape.rank()
        if const_ints(axes) not in ([-1], None if rank is None else [rank - 1]):
            return result.fail(f"reduces over axes {const_ints(axes)}, not the last one", axes)
        if const_scalar(eps) is None:
            return result.fail("epsilon is not a constant scalar", eps)
        w_shape = weight.shape
        if w_shape is None or w_shape.rank() != 1:
            return result.fail("the weight is not a 1-D tensor", weight)
        if x.shape is not None and isinstance(x.shape[-1], int) and x.shape[-1] != w_shape[0]:
            return result.fail(f"weight length {w_shape[0]} != hidden size {x.shape[-1]}", weight)
        return result

    def rewrite(self, op, x, eps, weight, **_):
        return op.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=const_scalar(eps), stash_type=1)


class FuseRMSNormPass(RulesPass):
    """Fuses RMSNorm subgraphs into `SimplifiedLayerNormalization` (ONNX Runtime)."""

    def rules(self) -> list[RewriteRule]:
        return [_RMSNormRule.rule(sq, inv, wf)
                for sq, inv, wf in itertools.product(("Pow", "Mul"), ("Reciprocal", "Div"), (True, False))]
