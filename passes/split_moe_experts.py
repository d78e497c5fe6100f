"""Balance ONNX Runtime's float MoE kernel across threads: each expert becomes P sub-experts, one per share of
its intermediate dimension, so every thread gets an equal share of every selected expert.

ORT's CPU `com.microsoft.MoE` hands each of its n threads a contiguous range of expert indices
(`onnxruntime/contrib_ops/cpu/moe/moe_cpu.cc`: `PartitionWork(thread, n, num_experts)`), so at decode the k
experts a token picks rarely split evenly (8 random experts of 64 on 2 threads: the busier thread has ~5 of
them). Splitting is exact because SwiGLU is elementwise over the intermediate dimension I and the down
projection sums over it:

    W2_e · act(W13_e x) = sum_p W2_e[:, Ip] · act(W13_e[Ip] x),   Ip = the p-th of P equal slices of I.

Sub-expert p*E + e holds slice p of expert e (fc1: its interleaved gate/up row pairs, fc2: its columns), so
with n threads and P a multiple of n, thread t runs exactly the slices P/n * t ... of *every* selected expert.
The router's probabilities are tiled P times and k becomes P*k: the P copies of a selected expert all enter
the top P*k (the lowered router gives exactly k finite scores, the rest a sentinel, so no tie splits the copies)
and, normalized or not, each gets 1/P of the expert's softmax weight (the softmax runs over P copies of every
score), which the pass returns by scaling fc2 by P (a power of two: exact). Smaller per-expert GEMMs also
suit MLAS better (its packed-B panels stay in L2): measured on this project's 2-core CPU, P = 4 decodes a
64-expert layer faster than P = 1 even on one thread. Prefill keeps the kernel's grouped path (tokens sorted
by sub-expert, one GEMM each).

Legend: E = experts, P = parts, I = expert intermediate size, H = hidden, k = experts per token.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import onnx_ir as ir

from r1c.passes._util import attr_int, ort_moe_nodes, swiglu_moe_problem

logger = logging.getLogger(__name__)

MIN_PARTS = 4  # measured: below this the per-expert GEMMs leave MLAS's packed panels outside L2
MIN_SLICE = 16  # rows of a sub-expert's slice of I; narrower slices cost more in per-expert overhead


def parts_for(threads: int, inter: int) -> int:
    """P for a build of `threads` intra-op threads (0: one per core): the smallest power of two >= max(threads,
    MIN_PARTS) that divides I into slices of at least MIN_SLICE rows (1 if none does)."""
    n = threads if threads > 0 else (os.cpu_count() or 1)
    parts = 1
    while parts < max(n, MIN_PARTS):
        parts *= 2
    while parts > 1 and (inter % parts or inter // parts < MIN_SLICE):
        parts //= 2
    return parts


def _split_fc1(fc1: ir.TensorProtocol, parts: int) -> ir.TensorProtocol:
    """[E, 2I, H] (rows g0, u0, g1, u1, ...) -> [P*E, 2I/P, H]: sub-expert p*E + e = rows of slice p of e."""
    w = fc1.numpy()
    e, two_i, h = w.shape
    return ir.tensor(np.ascontiguousarray(w.reshape(e, parts, two_i // parts, h).transpose(1, 0, 2, 3))
                     .reshape(parts * e, two_i // parts, h))


def _split_fc2(fc2: ir.TensorProtocol, parts: int) -> ir.TensorProtocol:
    """[E, H, I] -> [P*E, H, I/P] times P: sub-expert p*E + e = columns of slice p of e."""
    w = fc2.numpy()
    e, h, inter = w.shape
    split = w.reshape(e, h, parts, inter // parts).transpose(2, 0, 1, 3) * np.asarray(parts, w.dtype)
    return ir.tensor(np.ascontiguousarray(split).reshape(parts * e, h, inter // parts))


class SplitMoEExpertsPass(ir.passes.InPlacePass):
    """Splits every float `com.microsoft.MoE` with constant weights into P sub-experts per expert."""

    uses_build_options = True

    def __init__(self, threads: int = 0, parts: int | None = None, cpu_moe: str = "ort") -> None:
        super().__init__()
        self.threads = threads
        self.parts = parts  # None: parts_for(threads, I) per node
        self.cpu_moe = cpu_moe  # "r1c": the experts go to r1c's CPU kernel, which balances them itself

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.cpu_moe == "r1c":
            return ir.passes.PassResult(model, False)
        graph = model.graph
        count = 0
        for node in ort_moe_nodes(graph, self._why_not, "split_moe_experts", "left as it is"):
            _, probs, fc1, _, fc2 = node.inputs[:5]
            assert fc1 is not None and fc2 is not None and probs is not None and fc1.const_value is not None
            assert fc2.const_value is not None
            inter = fc2.const_value.shape.numpy()[2]
            parts = self.parts or parts_for(self.threads, inter)
            if parts <= 1 or inter % parts:
                logger.info("split_moe_experts: %s left as it is: I=%d does not split into %d", node.name, inter, parts)
                continue
            label = node.name or node.outputs[0].name or f"moe{count}"
            src1, src2 = fc1.const_value, fc2.const_value
            e, two_i, h = src1.shape.numpy()
            new1 = ir.LazyTensor(functools.partial(_split_fc1, src1, parts), dtype=src1.dtype,
                                 shape=ir.Shape([parts * e, two_i // parts, h]), name=f"{fc1.name}.split{parts}")
            new2 = ir.LazyTensor(functools.partial(_split_fc2, src2, parts), dtype=src2.dtype,
                                 shape=ir.Shape([parts * e, h, inter // parts]), name=f"{fc2.name}.split{parts}")
            v1 = ir.Value(name=new1.name, shape=new1.shape, type=ir.TensorType(new1.dtype), const_value=new1)
            v2 = ir.Value(name=new2.name, shape=new2.shape, type=ir.TensorType(new2.dtype), const_value=new2)
            graph.register_initializer(v1)
            graph.register_initializer(v2)
            reps = ir.Value(name=f"{label}.split_reps", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64),
                            const_value=ir.tensor(np.array([1, parts], np.int64), name=f"{label}.split_reps"))
            graph.register_initializer(reps)
            tile = ir.node("Tile", [probs, reps], name=f"{label}.split_probs")
            tiled = tile.outputs[0]
            tiled.name = f"{label}.probs_x{parts}"
            if probs.dtype is not None:
                tiled.dtype = probs.dtype
            graph.insert_before(node, tile)
            node.replace_input_with(1, tiled)
            node.replace_input_with(2, v1)
            node.replace_input_with(4, v2)
            node.attributes["k"] = ir.AttrInt64("k", attr_int(node, "k", 1) * parts)
            count += 1
            logger.info("split_moe_experts: %s: %d experts -> %d sub-experts of I/%d", node.name, e, parts * e, parts)
        for value in list(graph.initializers.values()):  # the unsplit weights, if nothing else reads them
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)  # type: ignore[arg-type]
        return ir.passes.PassResult(model, count > 0)

    @staticmethod
    def _why_not(node: ir.Node) -> str | None:
        form = swiglu_moe_problem(node)
        if form:
            return form
        fc1, fc2 = node.inputs[2], node.inputs[4]
        if fc1 is None or fc2 is None or fc1.const_value is None or fc2.const_value is None:
            return "expert weights are not initializers"
        if fc1.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return f"weights are {fc1.const_value.dtype}"
        if len(fc1.const_value.shape) != 3 or len(fc2.const_value.shape) != 3:
            return "weights are not [E, rows, cols]"
        return None
