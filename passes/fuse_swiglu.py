"""SwiGLU fusion: `silu(x @ Wg) * (x @ Wu)` (dense MLPs and shared experts) for ONNX Runtime.

Two rules, the first preferred:
- gate and up projections of the same input with constant [H, I] weights become ONE MatMul with the
  weights concatenated [H, 2I] (written lazily when the model is saved: never held twice in memory), a
  Split and `com.microsoft.QuickGelu(alpha=1)` * up: one GEMM instead of two;
- otherwise `silu(g) * u` becomes `QuickGelu(g) * u` (QuickGelu(x, alpha) = x * sigmoid(alpha x)).
ORT's `com.microsoft.SwiGLU` would be one op, but ONNX Runtime 1.32 has no CPU kernel for it.
silu is matched as `Mul(g, Sigmoid(g))` in either operand order, and the final Mul in either order.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRule
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase

from r1c.passes._rewrite import RulesPass
from r1c.passes._util import ORT_DOMAIN


def _silu_times_up(op, g, u, sig_first: bool, up_first: bool):
    silu = op.Mul(op.Sigmoid(g), g) if sig_first else op.Mul(g, op.Sigmoid(g))
    return op.Mul(u, silu) if up_first else op.Mul(silu, u)


def _quick_gelu_times_up(op, g, u):
    return op.Mul(op.QuickGelu(g, alpha=1.0, _domain=ORT_DOMAIN, _version=1), u)


class _MergedGateUpRule(RewriteRuleClassBase):
    def __init__(self, sig_first: bool, up_first: bool) -> None:
        super().__init__(f"SwiGLU[merged-gemm,{int(sig_first)}{int(up_first)}]")
        self.sig_first, self.up_first = sig_first, up_first
        self._merged_name = ""

    def pattern(self, op, x, wg, wu):
        return _silu_times_up(op, op.MatMul(x, wg), op.MatMul(x, wu), self.sig_first, self.up_first)

    def check(self, context, x, wg, wu, **_) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        for w in (wg, wu):
            if not w.is_initializer() or w.const_value is None:
                return result.fail(f"projection weight {w.name} is not an initializer", w)
        if wg.shape != wu.shape or wg.shape is None or wg.shape.rank() != 2 or wg.dtype != wu.dtype:
            return result.fail(f"gate/up weights differ: {wg.shape} {wg.dtype} vs {wu.shape} {wu.dtype}", wg)
        if wg.dtype != ir.DataType.FLOAT or x.dtype != ir.DataType.FLOAT:
            return result.fail(f"not float32 ({x.dtype}, {wg.dtype})", x)
        self._merged_name = f"{wg.name}.gate_up"
        if self._merged_name in context.graph_or_function.initializers:
            return result.fail(f"{self._merged_name} already exists", wg)
        return result

    def rewrite(self, op, x, wg, wu, **_):
        g_t, u_t = wg.const_value, wu.const_value
        h, i = wg.shape[0], wg.shape[1]
        merged = ir.LazyTensor(lambda: ir.tensor(np.concatenate([g_t.numpy(), u_t.numpy()], axis=1)),
                               dtype=wg.dtype, shape=ir.Shape([h, 2 * i]), name=self._merged_name)
        gate, up = op.Split(op.MatMul(x, op.initializer(merged, self._merged_name)), axis=-1, num_outputs=2,
                            _outputs=2)
        return _quick_gelu_times_up(op, gate, up)


class _ActivationRule(RewriteRuleClassBase):
    def __init__(self, sig_first: bool, up_first: bool) -> None:
        super().__init__(f"SwiGLU[activation,{int(sig_first)}{int(up_first)}]")
        self.sig_first, self.up_first = sig_first, up_first

    def pattern(self, op, g, u):
        return _silu_times_up(op, g, u, self.sig_first, self.up_first)

    def check(self, context, g, u, **_) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        if g.dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):  # Sigmoid: float
            return result.fail(f"gate is {g.dtype}, not a float type", g)
        return result

    def rewrite(self, op, g, u, **_):
        return _quick_gelu_times_up(op, g, u)


class FuseSwiGLUPass(RulesPass):
    """silu(gate) * up -> QuickGelu(gate) * up, with gate/up GEMMs merged when their weights are constant."""

    def rules(self) -> list[RewriteRule]:
        orders = list(itertools.product((False, True), (False, True)))
        return [*(_MergedGateUpRule.rule(s, u) for s, u in orders), *(_ActivationRule.rule(s, u) for s, u in orders)]
