"""Run each layer's whole MLA attention block as one node: `r1c.cpu::MLABlock` (r1c/plugins/cpu_moe/spec.py
`MLA_BLOCK_SPEC`, mla_block_cpu.cc) replaces the 15 nodes from the normalized layer input to o_proj's output that
the earlier passes leave (fuse_rmsnorm, fuse_rotary_embedding, use_cpu_attention_kernel, use_cpu_linear_kernel):
4 Linear, 4 Slice, 2 Reshape, 2 RMSNorm, 2 RotaryEmbedding and the MLAAttention.

Why: after a decode step's weights have streamed through the caches, every node starts cold; on this project's VM
one more node between two weight-streaming nodes cost ~1-3.5 us (scripts/step_parts.py, "+1 identity"), so the 10
small nodes per layer cost more than their arithmetic. On the issue-11 benchmark model (4 layers) a decode step
runs 110 nodes instead of 166.

The form matched (H hidden, QL q_lora_rank, N heads, D nope head dim, R rope dim, C kv_lora_rank; every slice's
bounds, every reshape's shape and the rotary attributes checked):

    xa   = Linear(hidden, q_a)                    kv   = Linear(hidden, kv_a)
    q    = Linear(SimplifiedLayerNormalization(xa, q_norm), q_b)
    qr   = Reshape(q, [0, 0, N, D + R])
    c    = SimplifiedLayerNormalization(Slice(kv, [0], [C], [-1]), kv_norm)          -> output c_new
    pe   = RotaryEmbedding(Slice(kv, [C], [C + R], [-1]), pos, cos, sin)              -> output pe_new
    qpe  = RotaryEmbedding(Reshape(Slice(qr, [D], [D + R], [-1]), [0, 0, -1]), pos, cos, sin)
    out  = Linear(MLAAttention(Slice(qr, [0], [D], [-1]), qpe, c, pe, ...), o)        -> output

Every value inside is read only inside (c and pe may also be read outside: they are the block's outputs); both
rotary nodes share their position_ids / caches, non-interleaved over the whole rope dim. A layer in any other form
(no q_lora, int8 attention weights, another MatMul form) keeps its nodes, and the reason is logged. Only with
`r1c build --cpu-kernels r1c`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from r1c.passes._util import ORT_DOMAIN, CpuKernelPass, const_ints, replace_value
from r1c.plugins.cpu_moe import ATTENTION_SPEC, CPU_DOMAIN, LINEAR_SPEC, MLA_BLOCK_SPEC, PANEL

logger = logging.getLogger(__name__)


class _Miss(Exception):
    """The form did not match (the message says where)."""


class _Match:
    """Walks the block back from its MLAAttention node; `nodes` collects what the block replaces."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []

    def node(self, value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node:
        node = None if value is None else value.producer()
        domains = ("", "ai.onnx") if domain == "" else (domain,)
        if node is None or node.op_type != op_type or node.domain not in domains:
            raise _Miss(f"expected {op_type} producing {value.name if value is not None else None}")
        if node not in self.nodes:
            self.nodes.append(node)
        return node

    def linear(self, value: ir.Value | None) -> tuple[ir.Value, ir.Value, int]:
        """(input, packed weight, n) of the r1c.cpu::Linear producing `value`."""
        node = self.node(value, LINEAR_SPEC.name, CPU_DOMAIN)
        attr = node.attributes.get("n")
        if attr is None or len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
            raise _Miss(f"{node.name}: not a Linear(x, weight) with its n")
        return node.inputs[0], node.inputs[1], attr.as_int()

    def rmsnorm(self, value: ir.Value | None) -> tuple[ir.Value, ir.Value, float]:
        """(input, weight, epsilon) of the SimplifiedLayerNormalization over the last axis producing `value`."""
        node = self.node(value, "SimplifiedLayerNormalization")
        axis, eps = node.attributes.get("axis"), node.attributes.get("epsilon")
        if (axis is not None and axis.as_int() != -1) or len(node.inputs) != 2 or len(node.outputs) != 1 \
                or node.inputs[0] is None or node.inputs[1] is None:
            raise _Miss(f"{node.name}: not an RMSNorm over the last axis with one output")
        return node.inputs[0], node.inputs[1], 1e-5 if eps is None else eps.as_float()

    def slice_last(self, value: ir.Value | None, start: int | None = None) -> tuple[ir.Value, int, int]:
        """(input, start, end) of the `Slice(x, [start], [end], [-1])` (no steps, or step 1) producing `value`, its
        start checked when given."""
        node = self.node(value, "Slice")
        ins = list(node.inputs)
        bounds = [const_ints(v) for v in ins[1:4]] if len(ins) >= 4 else [None]
        steps = const_ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
        if ins[0] is None or steps != [1] or len(bounds) != 3 or bounds[2] != [-1] \
                or any(b is None or len(b) != 1 for b in bounds) or (start is not None and bounds[0] != [start]):
            raise _Miss(f"{node.name}: not a slice of the last axis" + ("" if start is None else f" from {start}"))
        b0, b1 = bounds[0], bounds[1]
        assert b0 is not None and b1 is not None
        return ins[0], b0[0], b1[0]

    def reshape(self, value: ir.Value | None, shape: list[int]) -> ir.Value:
        node = self.node(value, "Reshape")
        if len(node.inputs) != 2 or const_ints(node.inputs[1]) != shape or node.inputs[0] is None:
            raise _Miss(f"{node.name}: not a reshape to {shape}")
        allowzero = node.attributes.get("allowzero")
        if allowzero is not None and allowzero.as_int() != 0:
            raise _Miss(f"{node.name}: allowzero")
        return node.inputs[0]

    def rotary(self, value: ir.Value | None, heads: int) -> tuple[ir.Value, tuple[ir.Value, ...], int]:
        """(input, (position_ids, cos_cache, sin_cache), rotary_embedding_dim (0: the whole head)) of a
        non-interleaved RotaryEmbedding over `heads` heads producing `value`."""
        node = self.node(value, "RotaryEmbedding", ORT_DOMAIN)
        ins = list(node.inputs)
        attrs = {k: a.value for k, a in node.attributes.items()}
        if len(ins) != 4 or any(v is None for v in ins) or attrs.get("interleaved", 0) != 0 \
                or attrs.get("num_heads", 0) not in (0, heads) or attrs.get("is_packed_batching", 0) != 0 \
                or attrs.get("scale", 1.0) != 1.0:
            raise _Miss(f"{node.name}: not a plain non-interleaved rotary embedding over {heads} head(s)")
        assert ins[0] is not None
        return ins[0], tuple(v for v in ins[1:] if v is not None), int(attrs.get("rotary_embedding_dim", 0))

    def check_inside(self, outputs: set[ir.Value]) -> None:
        """Every value a matched node makes is read only by matched nodes, except `outputs`."""
        for node in self.nodes:
            for out in node.outputs:
                if out in outputs:
                    continue
                if out.is_graph_output() or any(use.node not in self.nodes for use in out.uses()):
                    raise _Miss(f"{out.name} is read outside the block")


def _shape3(value: ir.Value | None) -> list[int] | None:
    """The static shape of a rank-3 value, or None."""
    dims = None if value is None or value.shape is None else list(value.shape.dims)
    if dims is None or len(dims) != 3 or not all(isinstance(v, int) for v in dims):
        return None
    return [int(v) for v in dims]  # type: ignore[arg-type]


def _dims(value: ir.Value) -> list[int] | None:
    tensor = value.const_value
    return None if tensor is None else [int(d) for d in tensor.shape.numpy()]


def match(mla: ir.Node) -> tuple[list[ir.Value], dict[str, float], ir.Node, list[ir.Value], list[ir.Node]]:
    """The block around one MLAAttention node: (the MLABlock's inputs, its attributes, the o_proj Linear node,
    [o_proj's output, c_new, pe_new] (the values it takes over), the nodes it replaces). Raises _Miss."""
    m = _Match()
    m.nodes.append(mla)
    ins = list(mla.inputs)
    if len(ins) != len(ATTENTION_SPEC.inputs) or any(v is None for v in ins):
        raise _Miss(f"{mla.name}: not MLAAttention's {len(ATTENTION_SPEC.inputs)} inputs")
    q_nope, q_pe, c_new, pe_new, *attn_rest = ins
    assert q_nope is not None and q_pe is not None and c_new is not None and pe_new is not None
    wuk, wuv = _shape3(attn_rest[4]), _shape3(attn_rest[5])
    if wuk is None or wuv is None:
        raise _Miss(f"{mla.name}: the shapes of w_uk [N, D, C] and w_uv_t [N, C, Vd] are not known")
    heads, nope, latent = wuk
    scale = mla.attributes.get("scale")
    # o_proj: a Linear reading the attention's output (any other reader: check_inside below)
    readers = [use.node for use in mla.outputs[0].uses()]
    if not readers:
        raise _Miss(f"{mla.name}: its output is not read by o_proj")
    o_node = readers[0]
    attn_out, o_w, o_n = m.linear(o_node.outputs[0])
    if attn_out is not mla.outputs[0]:
        raise _Miss(f"{o_node.name}: o_proj does not read the attention's output")
    # kv: c_new = RMSNorm(Slice(kv, 0, C)), pe_new = RoPE(Slice(kv, C, C + R))
    kv_c, kv_norm, kv_eps = m.rmsnorm(c_new)
    kv, _, end = m.slice_last(kv_c, 0)
    if end != latent:
        raise _Miss(f"{mla.name}: c_new is not the first {latent} columns of kv_a")
    pe_in, rot, pe_dim = m.rotary(pe_new, 1)
    kv_pe, _, end = m.slice_last(pe_in, latent)
    rope = end - latent
    if kv_pe is not kv or rope < 2 or rope % 2:
        raise _Miss(f"{mla.name}: c_new and pe_new are not slices of one kv_a projection")
    hidden, kv_a, kv_n = m.linear(kv)
    # q: q_nope = Slice(qr, 0, D), q_pe = RoPE(Reshape(Slice(qr, D, D + R), [0, 0, -1]))
    qr, _, end = m.slice_last(q_nope, 0)
    qpe_flat, qrot, q_dim = m.rotary(q_pe, heads)
    if end != nope or m.slice_last(m.reshape(qpe_flat, [0, 0, -1]), nope) != (qr, nope, nope + rope):
        raise _Miss(f"{mla.name}: q_nope and q_pe are not slices of one q_b projection")
    if pe_dim not in (0, rope) or q_dim not in (0, rope):
        raise _Miss(f"{mla.name}: a rotary embedding turns part of the {rope} rope dims")
    if qrot != rot:
        raise _Miss(f"{mla.name}: the two rotary embeddings read different positions or caches")
    q = m.reshape(qr, [0, 0, heads, nope + rope])
    qn, q_b, q_n = m.linear(q)
    xa, q_norm, q_eps = m.rmsnorm(qn)
    hidden_q, q_a, qa_n = m.linear(xa)
    if hidden_q is not hidden:
        raise _Miss(f"{mla.name}: q_a and kv_a read different inputs")
    if kv_n != latent + rope or q_n != heads * (nope + rope):
        raise _Miss(f"{mla.name}: the projections' widths disagree with the attention's shapes")
    qa_dims = _dims(q_a)
    hidden_size = qa_dims[1] if qa_dims is not None and len(qa_dims) == 3 else -1
    # each packed weight [ceil(n / 32), K, 32]: q_a H -> QL, q_b QL -> N(D+R), kv_a H -> C+R, o N*Vd -> H
    for w, k, n in ((q_a, hidden_size, qa_n), (q_b, qa_n, q_n), (kv_a, hidden_size, kv_n),
                    (o_w, heads * wuv[2], hidden_size)):
        if _dims(w) != [-(-n // PANEL), k, PANEL]:
            raise _Miss(f"{w.name}: not a packed constant of {k} rows for {n} columns")
    if o_n != hidden_size:
        raise _Miss(f"{o_node.name}: o_proj's width {o_n} is not the hidden size {hidden_size}")
    m.check_inside({o_node.outputs[0], c_new, pe_new})
    inputs = [hidden, q_a, q_norm, q_b, kv_a, kv_norm, *rot, *(v for v in attn_rest if v is not None), o_w]
    attrs = {"scale": 1.0 if scale is None else scale.as_float(), "q_epsilon": q_eps, "kv_epsilon": kv_eps}
    return inputs, attrs, o_node, [o_node.outputs[0], c_new, pe_new], m.nodes


class FuseCpuMLABlockPass(CpuKernelPass):
    """Each layer's projections, norms, rotary embeddings, MLAAttention and o_proj -> r1c.cpu::MLABlock where the
    build asked for r1c's CPU kernels."""

    spec = MLA_BLOCK_SPEC
    counted = "MLA attention blocks"

    def swap(self, graph: ir.Graph) -> int:
        count = 0
        for mla in list(graph):
            if mla.op_type != ATTENTION_SPEC.name or mla.domain != CPU_DOMAIN:
                continue
            try:
                inputs, attrs, o_node, taken, nodes = match(mla)
            except _Miss as miss:
                logger.info("fuse_cpu_mla_block: %s left as it is: %s", mla.name, miss)
                continue
            new = ir.node(MLA_BLOCK_SPEC.name, inputs, attributes=MLA_BLOCK_SPEC.attrs(**attrs),
                          domain=MLA_BLOCK_SPEC.domain, version=MLA_BLOCK_SPEC.version, num_outputs=3,
                          name=f"{mla.name}.block")
            graph.insert_before(o_node, new)
            for out, old in zip(new.outputs, taken, strict=True):
                replace_value(out, old, ".unfused")
            graph.remove(nodes, safe=True)
            count += 1
        if count:
            graph.sort()  # a reader of c_new / pe_new may have come before o_proj
        return count
