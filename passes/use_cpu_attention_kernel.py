"""Run each layer's absorbed MLA attention on r1c's CPU kernel: the ~35 nodes the export writes for it
(r1c/exporter/onnx_export.py `_Lowering.attention`, from the W_UK absorption to the [B, S, N*Vd] reshape before
o_proj) become one `r1c.cpu::MLAAttention` (r1c/plugins/cpu_moe/spec.py `ATTENTION_SPEC`, attention_cpu.cc).

The form matched, float32 (B rows, S new tokens, N heads, C kv_lora_rank, R rope dim; every transpose's perm, the
reshapes' shapes and q_pe's [B, S, N*R] or [B, S, N, R] checked):

    qa = Mul(Reshape(Transpose(MatMul(Transpose(q_nope), w_uk)), [0, -1, C]), scale)
    qp = Mul(Reshape(q_pe, [0, -1, R]), scale)
    z  = Concat(Where(past_valid, qa @ past_c + qp @ past_pe, -inf),
                Where(new_valid, qa @ c_new^T + qp @ pe_new^T, -inf))
    pp, pn = Split(Softmax(z))
    o  = Reshape(Transpose(MatMul(Transpose(Reshape(Transpose(past_c @ pp^T + c_new^T @ pn^T), [0, -1, N, C])),
                                  w_uv_t)), [0, 0, N*Vd])

Every value inside must be read only inside (the two scale constants equal, both fills -inf); anything else is
left to ONNX Runtime and the reason logged. On the issue-11 benchmark model (4 layers) a decode step runs 158
nodes instead of 266 (scripts/profile_step.py). Only with `r1c build --cpu-kernels r1c` (the build option that
selects r1c's CPU kernels; `auto` resolves to it where the library builds).

In int8/int4 bundles of a float32 export, passes/quantize_weights.py has made both per-head products
`com.microsoft.DynamicQuantizeMatMul(x, w_q int8 [N, K, M], scale [N, 1, M])` (int8 per head and output column):
that form becomes `r1c.cpu::MLAAttentionInt8` (ATTENTION_INT8_SPEC), which reads the same int8 weights with float
activations. An FP8 export's W_UK is computed from the dequantized kv_b_proj and stays float32 at every precision.
"""

from __future__ import annotations

import logging
import math

import onnx_ir as ir

from r1c.passes._util import ORT_DOMAIN, CpuKernelPass, attr_int, const_ints, const_scalar, take_over
from r1c.plugins import OpSpec
from r1c.plugins.cpu_moe import ATTENTION_INT8_SPEC, ATTENTION_SPEC

logger = logging.getLogger(__name__)


class _Match:
    """Walks the export's attention form back from its Softmax; `nodes` collects what the kernel replaces."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []

    def node(self, value: ir.Value | None, op_type: str, n_inputs: int | None = None) -> ir.Node:
        node = None if value is None else value.producer()
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            raise _Miss(f"expected {op_type} producing {value.name if value is not None else None}")
        if n_inputs is not None and len(node.inputs) != n_inputs:
            raise _Miss(f"{node.name}: {len(node.inputs)} inputs")
        if node not in self.nodes:
            self.nodes.append(node)
        return node

    def transpose(self, value: ir.Value | None, perm: list[int]) -> ir.Value:
        node = self.node(value, "Transpose", 1)
        _check_perm(node, perm)
        return _input(node, 0)

    def only_reader(self, value: ir.Value, op_type: str) -> ir.Node:
        readers = [use.node for use in value.uses()]
        if len(readers) != 1 or readers[0].op_type != op_type or value.is_graph_output():
            raise _Miss(f"{value.name} is not read by one {op_type}")
        if readers[0] not in self.nodes:
            self.nodes.append(readers[0])
        return readers[0]


class _Miss(Exception):
    """The form did not match (the message says where)."""


def _check_perm(transpose: ir.Node, perm: list[int]) -> None:
    attr = transpose.attributes.get("perm")
    if attr is None or list(attr.as_ints()) != perm:
        raise _Miss(f"{transpose.name}: perm is not {perm}")


def _input(node: ir.Node, i: int) -> ir.Value:
    value = node.inputs[i] if i < len(node.inputs) else None
    if value is None:
        raise _Miss(f"{node.name}: input {i} missing")
    return value


WEIGHT_PRODUCTS = ("MatMul", "DynamicQuantizeMatMul")


def _weights(node: ir.Node) -> list[ir.Value]:
    """A per-head product's weight inputs: [w] (float32 MatMul) or [w_q, scale] (DynamicQuantizeMatMul, int8 per
    head and output column, no zero point or bias); raises _Miss for any other form."""
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
        return [_input(node, 1)]
    ins = list(node.inputs)
    if (node.op_type != "DynamicQuantizeMatMul" or node.domain != ORT_DOMAIN or len(ins) < 3
            or any(v is not None for v in ins[3:])):
        raise _Miss(f"{node.name}: not a MatMul or a DynamicQuantizeMatMul without zero point and bias")
    w, scale = _input(node, 1), _input(node, 2)
    wv, sv = w.const_value, scale.const_value
    if wv is None or sv is None or wv.dtype != ir.DataType.INT8 or sv.dtype != ir.DataType.FLOAT:
        raise _Miss(f"{node.name}: the weight is not an int8 constant with a float32 scale constant")
    w_shape = tuple(wv.shape)
    if len(w_shape) != 3 or tuple(sv.shape) != (w_shape[0], 1, w_shape[2]):
        raise _Miss(f"{node.name}: the int8 weight is not [N, K, M] with a scale [N, 1, M]")
    return [w, scale]


def _reshape_to(m: _Match, value: ir.Value, n_dims: int) -> tuple[ir.Value, list[int]]:
    node = m.node(value, "Reshape", 2)
    shape = const_ints(node.inputs[1])
    if shape is None or len(shape) != n_dims:
        raise _Miss(f"{node.name}: shape is not a constant of {n_dims} values")
    return _input(node, 0), shape


def _last_dim(value: ir.Value) -> int | None:
    dims = None if value.shape is None else list(value.shape.dims)
    return dims[-1] if dims and isinstance(dims[-1], int) else None


def match(softmax: ir.Node) -> tuple[list[ir.Value], float, ir.Value, list[ir.Node]]:
    """(the kernel's inputs in ATTENTION_SPEC or ATTENTION_INT8_SPEC order (`spec_for`), scale, the output it
    replaces, the nodes it replaces) for the attention form around `softmax`; raises _Miss naming the first
    difference."""
    m = _Match()
    m.nodes.append(softmax)
    if attr_int(softmax, "axis", -1) not in (-1, 2):
        raise _Miss("softmax not over the last axis")
    concat = m.node(softmax.inputs[0], "Concat", 2)
    if attr_int(concat, "axis", 0) not in (-1, 2):
        raise _Miss("concat not along the last axis")
    where_p, where_n = m.node(concat.inputs[0], "Where", 3), m.node(concat.inputs[1], "Where", 3)
    for where in (where_p, where_n):
        if const_scalar(where.inputs[2]) != -math.inf:
            raise _Miss(f"{where.name}: the fill is not -inf")
    scores = []
    for where in (where_p, where_n):
        add = m.node(where.inputs[1], "Add", 2)
        lat, rope = m.node(add.inputs[0], "MatMul", 2), m.node(add.inputs[1], "MatMul", 2)
        scores.append((_input(lat, 0), _input(lat, 1), _input(rope, 0), _input(rope, 1)))
    (qa, past_c, qp, past_pe), (qa2, c_new_t, qp2, pe_new_t) = scores
    if qa is not qa2 or qp is not qp2:
        raise _Miss("the past and new scores use different queries")
    mul_a, mul_p = m.node(qa, "Mul", 2), m.node(qp, "Mul", 2)
    scale = const_scalar(mul_a.inputs[1])
    if scale is None or scale != const_scalar(mul_p.inputs[1]):
        raise _Miss("the query scales are not one constant")
    absorbed, shape_a = _reshape_to(m, _input(mul_a, 0), 3)
    w_uk_value = m.transpose(absorbed, [0, 2, 1, 3])
    w_uk_mm = w_uk_value.producer() if w_uk_value is not None else None
    if w_uk_mm is None or w_uk_mm.op_type not in WEIGHT_PRODUCTS:
        raise _Miss("the absorbed query is not a per-head product with W_UK")
    w_uk_ins = _weights(w_uk_mm)
    m.nodes.append(w_uk_mm)
    q_nope, w_uk = m.transpose(w_uk_mm.inputs[0], [0, 2, 1, 3]), w_uk_ins[0]
    q_pe, shape_p = _reshape_to(m, _input(mul_p, 0), 3)
    if shape_a[:2] != [0, -1] or shape_p[:2] != [0, -1]:
        raise _Miss("the query reshapes are not [0, -1, ..]")
    c_new, pe_new = m.transpose(c_new_t, [0, 2, 1]), m.transpose(pe_new_t, [0, 2, 1])
    # after the softmax: Split -> each part transposed -> past_c @ pp^T + c_new^T @ pn^T -> back to heads -> W_UV
    split = m.only_reader(softmax.outputs[0], "Split")
    if len(split.outputs) != 2 or attr_int(split, "axis", 0) not in (-1, 2):
        raise _Miss("the probabilities are not split in two along the last axis")
    # the split sizes [P, S]: P read off the past scores' shape (Shape -> Slice -> Concat), replaced too
    sizes = m.node(split.inputs[1] if len(split.inputs) > 1 else None, "Concat")
    first = sizes.inputs[0].producer() if sizes.inputs and sizes.inputs[0] is not None else None
    shape = None if first is None or first.op_type != "Slice" or first.inputs[0] is None else first.inputs[0].producer()
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not where_p.outputs[0]:
        raise _Miss("the split sizes are not [the past scores' length, S]")
    m.nodes += [first, shape]  # type: ignore[list-item]  # both checked above
    parts = []
    for out in split.outputs:
        tr = m.only_reader(out, "Transpose")
        parts.append(m.only_reader(tr.outputs[0], "MatMul"))
    o_past, o_new = parts
    if o_past.inputs[0] is not past_c or o_new.inputs[0] is not c_new_t:
        raise _Miss("the output does not read the cache and the new latents")
    for part, k in zip(parts, split.outputs, strict=True):
        m.transpose(part.inputs[1], [0, 2, 1])
        if part.inputs[1].producer().inputs[0] is not k:  # type: ignore[union-attr]
            raise _Miss("the output's probabilities are not the split's")
    add = m.only_reader(o_past.outputs[0], "Add")
    if {id(v) for v in add.inputs} != {id(o_past.outputs[0]), id(o_new.outputs[0])}:
        raise _Miss("the output's two halves are not summed")
    # o^T [B, C, S*N] -> [B, S*N, C] -> [B, S, N, C] -> [B, N, S, C] @ W_UV -> [B, S, N, Vd] -> [B, S, N*Vd]
    value = add.outputs[0]
    chain: list[ir.Node] = []
    for op_type, perm in (("Transpose", [0, 2, 1]), ("Reshape", None), ("Transpose", [0, 2, 1, 3]),
                          (w_uk_mm.op_type, None), ("Transpose", [0, 2, 1, 3]), ("Reshape", None)):
        node = m.only_reader(value, op_type)  # W_UV's product: the same kind as W_UK's
        if node.inputs[0] is not value:
            raise _Miss(f"{node.name}: reads the attention output as its second input")
        if perm is not None:
            _check_perm(node, perm)
        chain.append(node)
        value = node.outputs[0]
    heads_shape, out_shape = const_ints(chain[1].inputs[1]), const_ints(chain[5].inputs[1])
    if heads_shape is None or len(heads_shape) != 4 or heads_shape[:2] != [0, -1]:
        raise _Miss("the output is not reshaped to [0, -1, N, C]")
    n_heads, kv_rank = heads_shape[2:]
    w_uv_ins = _weights(chain[3])
    w_uv_t = w_uv_ins[0]  # the product's weight [N, C, Vd]
    v_dim = _last_dim(w_uv_t)
    if out_shape is None or v_dim is None or out_shape != [0, 0, n_heads * v_dim]:
        raise _Miss("the output is not reshaped to [0, 0, N*Vd]")
    if shape_a[2] != kv_rank or _last_dim(w_uk) not in (None, kv_rank):
        raise _Miss("the absorbed query's width is not the latent rank")
    rope_dim = shape_p[2]
    rotary = q_pe.producer()
    q_pe_shape = q_pe.shape
    if q_pe_shape is None and rotary is not None and rotary.op_type == "RotaryEmbedding" and rotary.inputs[0]:
        q_pe_shape = rotary.inputs[0].shape  # ORT's RotaryEmbedding keeps its input's shape (not inferred here)
    q_pe_dims = None if q_pe_shape is None else list(q_pe_shape.dims)
    if q_pe_dims is None or q_pe_dims[2:] not in ([n_heads * rope_dim], [n_heads, rope_dim]):
        raise _Miss("q_pe is not [B, S, N*R] or [B, S, N, R]")
    out = value
    inside = set(map(id, m.nodes))
    for node in m.nodes:
        for v in node.outputs:
            if v is out:
                continue
            if v.is_graph_output() or any(id(use.node) not in inside for use in v.uses()):
                raise _Miss(f"{v.name} is read outside the attention")
    inputs = [q_nope, q_pe, c_new, pe_new, past_c, past_pe, _input(where_p, 0), _input(where_n, 0)]
    float_weights = [w_uk_ins[0], w_uv_ins[0]] if len(w_uk_ins) == 1 else []  # int8 ones: checked by _weights
    for v in inputs + float_weights:
        if v.dtype is not None and v.dtype not in (ir.DataType.FLOAT, ir.DataType.BOOL):
            raise _Miss(f"{v.name} is {v.dtype}, not float32")
    return inputs + w_uk_ins + w_uv_ins, scale, out, m.nodes


def spec_for(inputs: list[ir.Value]) -> OpSpec:
    """The kernel op for `match`'s inputs: MLAAttention (10 inputs, float32 weights) or MLAAttentionInt8 (12)."""
    return ATTENTION_INT8_SPEC if len(inputs) == len(ATTENTION_INT8_SPEC.inputs) else ATTENTION_SPEC


class UseCpuAttentionKernelPass(CpuKernelPass):
    """The export's absorbed MLA attention -> r1c.cpu::MLAAttention where the build asked for r1c's CPU kernels."""

    spec = ATTENTION_SPEC
    counted = "attention subgraphs"

    def swap(self, graph: ir.Graph) -> int:
        count = 0
        for softmax in list(graph):
            if softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
                continue
            try:
                inputs, scale, out, nodes = match(softmax)
            except _Miss as miss:
                logger.info("use_cpu_attention_kernel: %s left to ONNX Runtime: %s", softmax.name, miss)
                continue
            last = out.producer()
            assert last is not None
            spec = spec_for(inputs)
            new = ir.node(spec.name, inputs, attributes=spec.attrs(scale=scale), domain=spec.domain,
                          version=spec.version, name=f"{last.name}.mla")
            take_over(graph, new, last, out, ".onnx")
            graph.remove(nodes, safe=True)
            count += 1
        return count
