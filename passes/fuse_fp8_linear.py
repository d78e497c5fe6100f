"""FP8 linear layers as the exporter writes them -> `r1c::FP8Linear` (the `tensorrt` pipeline).

Matched: `MatMul(x, DequantizeLinear(Wt, scale, axis=0, block_size=128))` (bf16/fp16 exports: with a Cast of the
dequantized weight to x's dtype between them) with constant Wt [K, N] float8_e4m3fn and
scale [ceil(K/128), N] float32 constant over each 128 columns (the exporter's blocked DequantizeLinear: the
128x128 block scale repeated along N), the dequantized weight read by that MatMul only. Rewritten to
`r1c::FP8Linear(x, W [N, K], S [ceil(N/128), ceil(K/128)])`: the weight transposed once here (K contiguous, the
operand layout FP8 tensor cores need) and DeepSeek's block scales, both as lazily written initializers, so the
dense, attention and shared-expert projections run as FP8 GEMMs (`r1c.plugins.fp8_linear`) instead of a
dequantization to float32 followed by a float32 GEMM. The model gets the op's function body (the same
DequantizeLinear + MatMul), so it still runs anywhere functions inline. A DequantizeLinear the rule cannot take
(another block size, a zero point, per-column scales that are not block-constant) stays as it is, with the reason
at -v.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriteRule
from onnxscript.rewriter.pattern import MatchResult, RewriteRuleClassBase

from r1c.passes._rewrite import RulesPass
from r1c.passes._util import check_r1c_bodies, ensure_function, r1c_attrs
from r1c.plugins.fp8 import BLOCK
from r1c.plugins.fp8_linear import SPEC
from r1c.plugins.fp8_linear.onnx_function import fp8_linear_function


def _block_scale(scale: np.ndarray, n: int) -> np.ndarray | None:
    """[kb, N] scales constant over each 128 columns -> DeepSeek's [ceil(N/128), kb] block scales (else None)."""
    nb = -(-n // BLOCK)
    padded = np.concatenate([scale, np.repeat(scale[:, -1:], nb * BLOCK - n, axis=1)], axis=1)
    blocks = padded.reshape(scale.shape[0], nb, BLOCK)
    if not np.array_equal(blocks, np.repeat(blocks[:, :, :1], BLOCK, axis=2)):
        return None
    return np.ascontiguousarray(blocks[:, :, 0].T)


class _FP8LinearRule(RewriteRuleClassBase):
    """`cast`: the bf16/fp16 export's form, MatMul(x, Cast(DequantizeLinear(...), to=x's dtype))."""

    def __init__(self, cast: bool) -> None:
        super().__init__(f"FP8Linear[DequantizeLinear+{'Cast+' if cast else ''}MatMul]")
        self.cast = cast

    def pattern(self, op, x, wq, scale):
        w = op.DequantizeLinear(wq, scale, _outputs=["w"])
        return op.MatMul(x, op.Cast(w, _outputs=["wc"]) if self.cast else w)

    def check(self, context, x, wq, scale, w, wc=None, **_) -> MatchResult:  # type: ignore[override]
        r = MatchResult()
        dq = w.producer()
        if wc is not None:
            to = wc.producer().attributes.get_int("to", 0)
            if x.dtype is None or to != x.dtype.value:
                return r.fail(f"the weight is cast to {to}, not to x's dtype {x.dtype}", wc)
            if len(wc.uses()) != 1:
                return r.fail("the cast weight has other readers", wc)
        if wq.const_value is None or not wq.is_initializer() or wq.dtype != ir.DataType.FLOAT8E4M3FN:
            return r.fail("the weight is not a float8_e4m3fn initializer", wq)
        if scale.const_value is None or scale.dtype != ir.DataType.FLOAT:
            return r.fail("the scale is not a float32 constant", scale)
        if wq.shape is None or wq.shape.rank() != 2 or scale.shape is None or scale.shape.rank() != 2:
            return r.fail("weight and scale are not 2-D", wq)
        axis = dq.attributes.get_int("axis", 1)
        block = dq.attributes.get_int("block_size", 0)
        if axis not in (0, -2) or block != BLOCK:
            return r.fail(f"DequantizeLinear axis={axis}, block_size={block}; FP8Linear takes axis 0, block 128", dq)
        k, n = wq.shape
        if tuple(scale.shape) != (-(-k // BLOCK), n):
            return r.fail(f"scale {scale.shape} is not [ceil(K/128), N] for weight {wq.shape}", scale)
        if len(w.uses()) != 1:
            return r.fail("the dequantized weight has other readers", w)
        if _block_scale(scale.const_value.numpy(), n) is None:
            return r.fail("the scale is not constant over 128 output columns (not a 128x128 block scale)", scale)
        return r

    def rewrite(self, op, x, wq, scale, **_):
        wt, st = wq.const_value, scale.const_value
        k, n = wq.shape
        weight = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(wt.numpy().T)), dtype=wt.dtype,
                               shape=ir.Shape([n, k]), name=f"{wq.name}.nk")
        block_scale = _block_scale(st.numpy(), n)
        assert block_scale is not None  # (check)
        block = ir.tensor(block_scale, name=f"{scale.name}.block")
        y = op.FP8Linear(x, op.initializer(weight, weight.name), op.initializer(block, block.name),
                         _domain=SPEC.domain, _version=SPEC.version, **r1c_attrs(SPEC))
        return y


class FuseFP8LinearPass(RulesPass):
    """Rewrites each exported FP8 linear layer (blocked DequantizeLinear + MatMul) into `r1c::FP8Linear`."""

    def rules(self) -> list[RewriteRule]:
        return [_FP8LinearRule.rule(cast) for cast in (True, False)]

    def after_rewrites(self, model: ir.Model) -> None:
        ensure_function(model, fp8_linear_function())

    def ensures(self, model: ir.Model) -> None:
        check_r1c_bodies("fuse_fp8_linear", model)
