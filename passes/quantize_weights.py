"""Weight-only 8- and 4-bit block quantization for ONNX Runtime's CPU kernels (`r1c build --precision`).

    MatMul(x, W [K, N] float32 constant)            -> com.microsoft.MatMulNBits(x, q, scales; K, N, bits, block)
    MatMul(x, DequantizeLinear(W fp8, block scale)) -> the same, from the FP8 weight's float values
    com.microsoft.MoE(x, probs, fc1, -, fc2)        -> com.microsoft.QMoE(x, probs, q1, s1, -, q2, s2; bits, block)

Weights are quantized per block of `block` values along K (the input features) by `r1c.plugins.int_block`
(scale = the block's largest-magnitude value / -2^(bits-1)); the kernels dequantize per block on the fly, so a
decode step reads bits/8 + 4/block bytes per weight. `accuracy_level` 4 lets both kernels quantize the
activations to int8 per block and use integer dot products (what llama.cpp's Q8_0/Q4_0 dot products do too);
8-bit weights have no float-activation CPU kernel in ORT 1.32 (measured ~60x slower), and the int8 path of
4-bit weights was measured 2-3x faster than the float one on this project's CPU.

Precisions: "int8" (block 128: an FP8 checkpoint's 128-blocks along K map onto it), "int4" (block 128: 4.25 bits
a weight; measured on the issue-11 benchmark model, 1 thread: 13% faster decode than block 32 (MLAS's 4-bit
kernels are compute-bound at block 32) for a mean relative logit error of 0.45 vs 0.41 — llama.cpp's Q4_0,
block 32, measured 0.48 there), "fp32" (nothing changes), "auto" (only the weights the checkpoint stored in
FP8 become int8: dense ones read through an FP8 DequantizeLinear, experts that `widen_experts` widened; every
other weight keeps the export's dtype). A block that does not divide K (or, for QMoE, both H and I) is
halved down to 16; a weight that fits none stays float32 and is logged. Not quantized: the router (ARCHITECTURE:
routing is float32), the embedding (a gather of B rows). MLA's per-head absorbed matrices are 3-D batched
MatMuls, which MatMulNBits cannot take: they become `DynamicQuantizeMatMul`, int8 per head and output column
with int8 activations, at both int8 and int4. Each quantized tensor's relative error ||W_q - W|| / ||W||
goes to `report`.

MoE routing is kept exactly: ORT's float MoE normalizes over the chosen experts' softmax or, with
normalize_routing_weights=0, takes the softmax over all E; QMoE always normalizes over the chosen ones, so the
second case passes that full softmax as QMoE's `router_weights` (the aggregation weights) instead.
Legend: K = input features, N = output features, E = experts, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from r1c.errors import PassError
from r1c.passes._util import ORT_DOMAIN, attr_int
from r1c.passes.widen_experts import FROM_FP8
from r1c.plugins import int_block

logger = logging.getLogger(__name__)

PRECISIONS: dict[str, tuple[int, int] | None] = {"fp32": None, "int8": (8, 128), "int4": (4, 128)}
ACCURACY_LEVEL = 4  # int8 activations (MatMulNBits / QMoE `accuracy_level`)
FP8_TYPES = (ir.DataType.FLOAT8E4M3FN,)
QMOE_PASSED_ATTRS = ("k", "activation_type", "swiglu_fusion", "activation_alpha", "activation_beta", "swiglu_limit")


def _fp8_dequantize_linear(node: ir.Node) -> np.ndarray | None:
    """float32 values of DequantizeLinear(FP8 constant [K, N], constant scale [K/b, N]; axis 0, block_size b)."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w, s = node.inputs[0], node.inputs[1]
    if w is None or s is None or w.const_value is None or s.const_value is None:
        return None
    if w.const_value.dtype not in FP8_TYPES or len(w.const_value.shape) != 2 or attr_int(node, "axis", 1) != 0:
        return None
    block = attr_int(node, "block_size", 0)
    import ml_dtypes

    q = np.ascontiguousarray(w.const_value.numpy()).view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    scale = np.asarray(s.const_value.numpy(), np.float32)
    if block <= 0 or scale.shape[0] * block < q.shape[0] or scale.shape[1] != q.shape[1]:
        return None
    return q * np.repeat(scale, block, axis=0)[: q.shape[0]]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """MatMul / MoE weights -> MatMulNBits / QMoE at the build's precision (fp32: no change)."""

    uses_build_options = True

    def __init__(self, precision: str = "auto", report: dict[str, Any] | None = None,
                 accuracy_level: int = ACCURACY_LEVEL) -> None:
        super().__init__()
        if precision != "auto" and precision not in PRECISIONS:
            raise PassError(f"quantize_weights: unknown precision {precision!r} (choose from auto, "
                            f"{', '.join(PRECISIONS)})")
        self.precision = precision
        self.report = report if report is not None else {}
        self.accuracy_level = accuracy_level
        self.errors: dict[str, float] = {}
        self.fp8_only = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fp8_only = self.precision == "auto"
        spec = PRECISIONS["int8" if self.fp8_only else self.precision]
        if spec is None:
            self.report["precision"] = "fp32"
            return ir.passes.PassResult(model, False)
        bits, block = spec
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                count += self._matmul(graph, node, bits, block)
            elif node.op_type == "MoE" and node.domain == ORT_DOMAIN:
                count += self._moe(graph, node, bits, block)
        for value in list(graph.initializers.values()):  # the float weights nothing reads any more
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)  # type: ignore[arg-type]
        errs = list(self.errors.values())
        self.report["precision"] = f"int{bits}" if count else "fp32"
        self.report.update({
            "format": f"int{bits}, blocks of {block} along K (fewer where K needs it), float32 scales, "
                      f"zero point {1 << (bits - 1)}; ONNX Runtime MatMulNBits / QMoE, accuracy_level "
                      f"{self.accuracy_level}",
            "bits": bits, "block_size": block, "tensors": len(errs),
            "mean_relative_error": float(np.mean(errs)) if errs else 0.0,
            "max_relative_error": float(np.max(errs)) if errs else 0.0,
            "per_tensor": dict(sorted(self.errors.items())),
        })
        logger.info("quantize_weights: %d node(s) to int%d", count, bits)
        return ir.passes.PassResult(model, count > 0)

    # ---- dense layers --------------------------------------------------------------------------------
    def _matmul(self, graph: ir.Graph, node: ir.Node, bits: int, block: int) -> int:
        x, b = node.inputs[0], node.inputs[1]
        if x is None or b is None or x.dtype != ir.DataType.FLOAT:
            return 0
        producer = b.producer()
        if (b.const_value is not None and b.const_value.dtype == ir.DataType.FLOAT and len(b.const_value.shape) == 3
                and not self.fp8_only):
            return self._batched(graph, node, x, b)
        if (b.const_value is not None and b.const_value.dtype == ir.DataType.FLOAT and len(b.const_value.shape) == 2
                and not self.fp8_only):
            w, name = b.const_value.numpy(), b.name or "weight"
        elif producer is not None and (fp8 := _fp8_dequantize_linear(producer)) is not None:
            source = producer.inputs[0]
            w, name = fp8, (source.name if source is not None and source.name else "weight")
        else:
            return 0
        k, n = w.shape
        blk = int_block.block_for(k, block)
        if blk is None:
            logger.info("quantize_weights: %s stays float32: K=%d has no block size >= 16", name, k)
            return 0
        packed = int_block.quantize(np.ascontiguousarray(w.T), bits, blk)  # [N, K]
        self.errors[name] = int_block.relative_error(w.T, packed)
        q = _initializer(graph, f"{name}.q{bits}", packed.q.reshape(n, k // blk, blk * bits // 8))
        s = _initializer(graph, f"{name}.q{bits}_scales", packed.scales)
        new = ir.node("MatMulNBits", [x, q, s], {"K": k, "N": n, "bits": bits, "block_size": blk,
                                                 "accuracy_level": self.accuracy_level},
                      domain=ORT_DOMAIN, name=f"{node.name or name}.q{bits}", version=1)
        self._replace(graph, node, new)
        return 1

    def _batched(self, graph: ir.Graph, node: ir.Node, x: ir.Value, b: ir.Value) -> int:
        """A batched weight [N, K, C] (MLA's per-head absorbed matrices) -> DynamicQuantizeMatMul, int8 per head
        and output column whatever the precision (MatMulNBits takes only 2-D weights)."""
        assert b.const_value is not None
        w = b.const_value.numpy()
        q, scales = int_block.quantize_columns(w)
        name = b.name or "weight"
        deq = q.astype(np.float32) * scales
        norm = float(np.linalg.norm(w))
        self.errors[name] = float(np.linalg.norm((deq - w).astype(np.float64))) / norm if norm else 0.0
        new = ir.node("DynamicQuantizeMatMul", [x, _initializer(graph, f"{name}.i8", q),
                                                _initializer(graph, f"{name}.i8_scales", scales)],
                      domain=ORT_DOMAIN, name=f"{node.name or name}.i8", version=1)
        self._replace(graph, node, new)
        return 1

    # ---- routed experts ------------------------------------------------------------------------------
    def _moe(self, graph: ir.Graph, node: ir.Node, bits: int, block: int) -> int:
        ins = list(node.inputs)
        if len(ins) != 5 or ins[3] is not None or ins[2] is None or ins[4] is None:
            logger.info("quantize_weights: %s stays float: MoE with biases or fc3", node.name)
            return 0
        x, probs, fc1, _, fc2 = ins
        if fc1 is None or fc2 is None or probs is None:
            return 0
        if fc1.const_value is None or fc2.const_value is None or fc1.const_value.dtype != ir.DataType.FLOAT:
            logger.info("quantize_weights: %s stays float: expert weights are not float32 constants", node.name)
            return 0
        if self.fp8_only and FROM_FP8 not in (fc1.name or ""):
            return 0
        w1, w2 = fc1.const_value.numpy(), fc2.const_value.numpy()  # [E, 2I, H], [E, H, I]
        hidden, inter = w1.shape[2], w2.shape[2]
        blk = int_block.block_for(hidden, block)
        while blk is not None and inter % blk:
            blk = int_block.block_for(hidden, blk // 2)
        if blk is None:
            logger.info("quantize_weights: %s stays float: H=%d, I=%d share no block size >= 16", node.name, hidden,
                        inter)
            return 0
        tensors = []
        for value, w in ((fc1, w1), (fc2, w2)):
            per_expert = [int_block.quantize(w[e], bits, blk) for e in range(w.shape[0])]  # bounded temporaries
            q = np.stack([p.q for p in per_expert])
            scales = np.stack([p.scales for p in per_expert])
            name = value.name or "experts"
            err, norm = np.sum([int_block.squared_errors(w[e], p) for e, p in enumerate(per_expert)], axis=0)
            self.errors[name] = float(np.sqrt(err / norm)) if norm else 0.0
            tensors += [_initializer(graph, f"{name}.q{bits}", q), _initializer(graph, f"{name}.q{bits}_scales",
                                                                                 scales)]
        label = node.name or node.outputs[0].name or "moe"
        attrs: dict[str, Any] = {a: node.attributes[a].value for a in QMOE_PASSED_ATTRS if a in node.attributes}
        attrs.update(expert_weight_bits=bits, block_size=blk, accuracy_level=self.accuracy_level)
        normalize = attr_int(node, "normalize_routing_weights", 0)
        inputs: list[ir.Value | None] = [x, probs, tensors[0], tensors[1], None, tensors[2], tensors[3]]
        if normalize:
            attrs["normalize_routing_weights"] = 1
        else:  # MoE's full softmax over E as QMoE's aggregation weights (QMoE normalizes over the top k otherwise)
            softmax = ir.node("Softmax", [probs], {"axis": -1}, name=f"{label}.router_weights")
            softmax.outputs[0].name = f"{label}.router_weights"
            if probs.dtype is not None:
                softmax.outputs[0].dtype = probs.dtype
            graph.insert_before(node, softmax)
            inputs += [None] * 7 + [softmax.outputs[0]]
            attrs["normalize_routing_weights"] = 0
        new = ir.node("QMoE", inputs, attrs, domain=ORT_DOMAIN, name=f"{label}.q{bits}", version=1)
        self._replace(graph, node, new)
        return 1

    @staticmethod
    def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
        graph.insert_before(old, new)
        before, after = old.outputs[0], new.outputs[0]
        if before.dtype is not None:
            after.dtype = before.dtype
        after.shape = before.shape
        ir.convenience.replace_all_uses_with(before, after, replace_graph_outputs=True)
        name = before.name
        graph.remove(old, safe=True)
        after.name = name
