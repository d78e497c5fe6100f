"""RoPE as ONNX Runtime's `com.microsoft.RotaryEmbedding`: 9 nodes per rotated tensor become 1 (or 2).

The export rotates DeepSeek's interleaved pairs (x0, x1), (x2, x3), ... and writes the result de-interleaved
(`r1c.exporter.onnx_export._Lowering.rope`):

    x1 = x[..., 0::2]   x2 = x[..., 1::2]                               (2 Slice)
    y  = Concat(x1*cos - x2*sin, x2*cos + x1*sin)                       (4 Mul, Sub, Add, Concat)

which is the rotate-half form of RotaryEmbedding(interleaved=0) applied to x' = [x1 | x2]. (A checkpoint with
`rope_interleave: false` is exported as x1 = x[..., :R/2], x2 = x[..., R/2:]: rotate-half already, fused
as it is.) For the interleaved layout the pass permutes
the output columns of the projection that produces x (kv_a_proj for the key, each head's rope part of q_b_proj
for the query) to [evens | odds] — free at build time, and exact — and replaces the rotation by one
RotaryEmbedding node. cos/sin are the export's per-token tables [B, S, R/2] (YaRN's attention factor already in
them); flattened to [B*S, R/2] they serve as RotaryEmbedding's cache, indexed by position_ids = b*S + s
(computed once per graph). The key [B, S, R] is rotated as is (num_heads 1); the query [B, S, N, R] is viewed
as [B, S, N*R] (num_heads N), which the export's next Reshape to [B, S*N, R] reads unchanged.

Matched only when the projection's weight is a constant used by nothing else (float32, or FP8 through a
DequantizeLinear blocked along K, whose scales are permuted alike) and every other reader of the projection
output takes columns outside the rotated ones; otherwise the reason is logged and the graph left as it is.
Legend: B = batch, S = new tokens, N = heads, R = qk_rope_head_dim, D = the head's other columns.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx_ir as ir

from r1c.passes._util import ORT_DOMAIN, attr_int, const_ints

logger = logging.getLogger(__name__)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _slice(value: ir.Value | None) -> tuple[ir.Value, int, int, int] | None:
    """(source, start, end, step) of a Slice along the last axis with constant bounds."""
    node = _producer(value, "Slice")
    if node is None or len(node.inputs) < 4 or node.inputs[0] is None:
        return None
    starts, ends, axes = (const_ints(node.inputs[i]) for i in (1, 2, 3))
    steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
    rank = None if node.inputs[0].shape is None else node.inputs[0].shape.rank()
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes[0] not in (-1, None if rank is None  # type: ignore[index,arg-type]
                                                                                       else rank - 1):
        return None
    return node.inputs[0], starts[0], ends[0], steps[0]  # type: ignore[index]


def _mul_pair(value: ir.Value | None) -> tuple[ir.Value, ir.Value] | None:
    node = _producer(value, "Mul")
    if node is None or node.inputs[0] is None or node.inputs[1] is None:
        return None
    return node.inputs[0], node.inputs[1]


class _Rope:
    """One matched rotation: y = Concat(x1*cos - x2*sin, x2*cos + x1*sin) with x1, x2 the even/odd slices of x."""

    def __init__(self, concat: ir.Node, x: ir.Value, cos: ir.Value, sin: ir.Value, rot: int,
                 interleaved: bool = True) -> None:
        self.concat, self.x, self.cos, self.sin, self.rot = concat, x, cos, sin, rot
        self.interleaved = interleaved  # pairs (x0, x1), ...; else halves (x_i, x_{i+R/2}): rotate-half already

    @classmethod
    def match(cls, node: ir.Node) -> _Rope | None:
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            return None
        sub, add = _producer(node.inputs[0], "Sub"), _producer(node.inputs[1], "Add")
        if sub is None or add is None:
            return None
        terms = [_mul_pair(v) for v in (*sub.inputs, *add.inputs)]
        if any(t is None for t in terms):
            return None
        (a, b), (c, d), (e, f), (g, h) = terms  # type: ignore[misc]
        # x1*cos - x2*sin, x2*cos + x1*sin (either operand order in each Mul)
        for x1, cos in ((a, b), (b, a)):
            for x2, sin in ((c, d), (d, c)):
                if {frozenset((e, f)), frozenset((g, h))} != {frozenset((x2, cos)), frozenset((x1, sin))}:
                    continue
                s1, s2 = _slice(x1), _slice(x2)
                if s1 is None or s2 is None or s1[0] is not s2[0]:
                    continue
                x = s1[0]
                rot = None if x.shape is None else x.shape[-1]
                if not isinstance(rot, int) or rot % 2:
                    continue
                if (s1[1], s1[3], s2[1], s2[3]) == (0, 2, 1, 2) and min(s1[2], s2[2]) >= rot - 1:
                    return cls(node, x, cos, sin, rot)
                if (s1[1:], s2[1:]) == ((0, rot // 2, 1), (rot // 2, rot, 1)):
                    return cls(node, x, cos, sin, rot, interleaved=False)
        return None


class FuseRotaryEmbeddingPass(ir.passes.InPlacePass):
    """Replaces the export's RoPE subgraphs by com.microsoft.RotaryEmbedding (projection columns permuted)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.count = 0
        tables: dict[tuple[str, str], tuple[ir.Value, ir.Value, ir.Value]] = {}
        for node in list(graph):
            rope = _Rope.match(node)
            if rope is None:
                continue
            base = self._tables_source(rope)
            if base is None:
                logger.info("fuse_rotary_embedding: %s left as it is: cos/sin are not [B, S, R/2] tables", node.name)
                continue
            heads = self._permute_projection(graph, rope) if rope.interleaved else self._heads(rope)
            if heads is None:
                continue
            key = (base[0].name or "", base[1].name or "")
            if key not in tables:
                tables[key] = self._flat_tables(graph, *base, rope.rot)
            positions, cos, sin = tables[key]
            label = node.name or node.outputs[0].name or f"rope{self.count}"
            x: ir.Value = rope.x
            if heads > 1:  # [B, S, N, R] -> [B, S, N*R]
                x = self._add(graph, node, "Reshape", [x, self._ints(graph, "rotary.heads_flat", [0, 0, -1])],
                              f"{label}.heads_flat")
            rotary = ir.node("RotaryEmbedding", [x, positions, cos, sin],
                             {"interleaved": 0, "num_heads": heads, "rotary_embedding_dim": rope.rot},
                             domain=ORT_DOMAIN, name=f"{label}.rotary", version=1)
            graph.insert_before(node, rotary)
            out, old = rotary.outputs[0], node.outputs[0]
            if heads > 1 and not self._readers_take_3d(old):  # back to the 4-D shape the Concat had
                out.name = f"{label}.rotated"
                out = self._add(graph, node, "Reshape", [out, self._shape(graph, node, rope.x, label)],
                                f"{label}.rotated4d")
            out.shape = None if heads > 1 and out.producer() is rotary else old.shape
            if old.dtype is not None:
                out.dtype = old.dtype
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            name = old.name
            graph.remove(node, safe=True)
            out.name = name
            self.count += 1
        logger.info("fuse_rotary_embedding: %d rotation(s) fused", self.count)
        return ir.passes.PassResult(model, self.count > 0)

    @staticmethod
    def _heads(rope: _Rope) -> int | None:
        """N of a [B, S, N, R] (1 for [B, S, R]) rotated as it is (the halves layout needs no permutation)."""
        shape = rope.x.shape
        heads = 1 if shape is not None and shape.rank() == 3 else None if shape is None else shape[2]
        if shape is None or shape.rank() not in (3, 4) or not isinstance(heads, int):
            logger.info("fuse_rotary_embedding: %s left as it is: unknown head count", rope.concat.name)
            return None
        return heads

    @staticmethod
    def _readers_take_3d(value: ir.Value) -> bool:
        """Whether every reader of the query's [B, S, N, R] is a Reshape by a constant shape that gives the same
        result from its [B, S, N*R] view: dim 0 copied (0) or given, no other dim copied (the export's
        Reshape to [B, S*N, R])."""
        if value.is_graph_output() or not value.uses():
            return False
        for use in value.uses():
            reader = use.node
            dims = const_ints(reader.inputs[1]) if reader.op_type == "Reshape" and use.idx == 0 else None
            if dims is None or 0 in dims[1:] or attr_int(reader, "allowzero", 0):
                return False
        return True

    # ---- the cos/sin tables -----------------------------------------------------------------------------
    @staticmethod
    def _tables_source(rope: _Rope) -> tuple[ir.Value, ir.Value] | None:
        """The [B, S, R/2] cos and sin behind the rotation's (possibly Unsqueezed to [B, S, 1, R/2]) factors."""
        bases = []
        for factor in (rope.cos, rope.sin):
            v: ir.Value | None = factor
            unsq = _producer(v, "Unsqueeze")
            if unsq is not None and const_ints(unsq.inputs[1]) == [2]:
                v = unsq.inputs[0]
            if v is None or v.shape is None or v.shape.rank() != 3 or v.shape[-1] != rope.rot // 2:
                return None
            bases.append(v)
        return bases[0], bases[1]

    def _flat_tables(self, graph: ir.Graph, cos: ir.Value, sin: ir.Value, rot: int
                     ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """position_ids [B, S] = b*S + s and the tables flattened to [B*S, R/2], placed after cos and sin."""
        anchor = max((cos.producer(), sin.producer()), key=lambda n: -1 if n is None else list(graph).index(n))
        where = anchor if anchor is not None else next(iter(graph))
        nodes: list[ir.Node] = []

        def add(op: str, inputs: list[ir.Value | None], name: str, **attrs: int) -> ir.Value:
            n = ir.node(op, inputs, attrs, name=name)
            n.outputs[0].name = name
            nodes.append(n)
            return n.outputs[0]

        prefix = f"rotary.{cos.name}"
        bs = add("Shape", [cos], f"{prefix}.bs", end=2)
        count = add("ReduceProd", [bs], f"{prefix}.tokens", keepdims=0)
        positions = add("Reshape", [add("Range", [self._ints(graph, "rotary.zero", 0), count,
                                                   self._ints(graph, "rotary.one", 1)], f"{prefix}.range"), bs],
                        f"{prefix}.position_ids")
        half = self._ints(graph, f"rotary.rows_{rot // 2}", [-1, rot // 2])
        flat_cos = add("Reshape", [cos, half], f"{prefix}.cos_cache")
        flat_sin = add("Reshape", [sin, half], f"{prefix}.sin_cache")
        if anchor is None:
            graph.insert_before(where, nodes)
        else:
            graph.insert_after(where, nodes)
        return positions, flat_cos, flat_sin

    # ---- the projection's columns ---------------------------------------------------------------------
    def _permute_projection(self, graph: ir.Graph, rope: _Rope) -> int | None:
        """Permutes the rotated columns of the projection that produces rope.x to [evens | odds]; returns the
        head count N (1 for a [B, S, R] key), or None (logged) when the graph is not the export's shape."""
        sliced = _slice(rope.x)
        if sliced is None or sliced[3] != 1 or sliced[2] - sliced[1] != rope.rot:
            return self._skip(rope, "the rotated tensor is not a slice of a projection")
        source: ir.Value | None = sliced[0]
        start = sliced[1]
        heads, head_dim = 1, None
        reshape = _producer(source, "Reshape")
        if reshape is not None:
            dims = const_ints(reshape.inputs[1])
            if dims is None or len(dims) != 4 or dims[:2] != [0, 0] or min(dims[2:]) <= 0:
                return self._skip(rope, "the query is not reshaped to [B, S, N, D+R] by constants")
            heads, head_dim = dims[2], dims[3]
            source = reshape.inputs[0]
        matmul = _producer(source, "MatMul")
        if matmul is None or matmul.inputs[1] is None:
            return self._skip(rope, "no MatMul with a constant weight produces the rotated columns")
        width = head_dim or (None if source is None or source.shape is None else source.shape[-1])
        if not isinstance(width, int) or start < 0 or start + rope.rot > width:
            return self._skip(rope, "unknown projection width")
        assert source is not None
        readers = [u.node for u in (source if reshape is None else reshape.outputs[0]).uses()]
        for reader in readers:  # every other reader must take columns outside the rotated ones
            other = _slice(reader.outputs[0])
            if reader.op_type != "Slice" or other is None:
                return self._skip(rope, f"{reader.name} ({reader.op_type}) reads the projection's rotated columns")
            if reader.outputs[0] is not rope.x and other[1] < start + rope.rot and other[2] > start:
                return self._skip(rope, f"{reader.name} reads the projection's rotated columns")
        columns = np.arange(heads * width).reshape(heads, width)
        rotated = columns[:, start:start + rope.rot]
        columns[:, start:start + rope.rot] = np.concatenate([rotated[:, 0::2], rotated[:, 1::2]], axis=1)
        if not self._permute_weight(graph, matmul, columns.reshape(-1)):
            return self._skip(rope, "the projection weight is shared or not a float32/FP8 constant")
        return heads

    @staticmethod
    def _permute_weight(graph: ir.Graph, matmul: ir.Node, perm: np.ndarray) -> bool:
        weight = matmul.inputs[1]
        assert weight is not None
        targets: list[tuple[ir.Node, int, ir.Value]] = []
        if weight.const_value is not None and weight.const_value.dtype == ir.DataType.FLOAT:
            targets.append((matmul, 1, weight))
        else:
            dq = _producer(weight, "DequantizeLinear")
            if dq is None or attr_int(dq, "axis", 1) != 0 or len(weight.uses()) != 1:
                return False
            for i in (0, 1):  # the FP8 values and their scales: both [., N]
                v = dq.inputs[i]
                if v is None or v.const_value is None or len(v.const_value.shape) != 2:
                    return False
                targets.append((dq, i, v))
        for _, _, value in targets:
            if len(value.uses()) != 1 or value.const_value is None or value.const_value.shape[-1] != perm.size:
                return False
        for node, index, value in targets:
            source = value.const_value
            assert source is not None
            lazy = ir.LazyTensor(functools.partial(_take_columns, source, perm), dtype=source.dtype,
                                 shape=ir.Shape(source.shape.numpy()), name=f"{value.name}.rope_deinterleaved")
            new = ir.Value(name=lazy.name, shape=lazy.shape, type=ir.TensorType(lazy.dtype), const_value=lazy)
            graph.register_initializer(new)
            node.replace_input_with(index, new)
            graph.initializers.pop(value.name)  # type: ignore[arg-type]
        return True

    # ---- small helpers --------------------------------------------------------------------------------
    @staticmethod
    def _skip(rope: _Rope, reason: str) -> None:
        logger.info("fuse_rotary_embedding: %s left as it is: %s", rope.concat.name, reason)
        return None

    @staticmethod
    def _ints(graph: ir.Graph, name: str, values: int | list[int]) -> ir.Value:
        if name in graph.initializers:
            return graph.initializers[name]
        array = np.array(values, np.int64)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64),
                         const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value

    @staticmethod
    def _add(graph: ir.Graph, before: ir.Node, op: str, inputs: list[ir.Value], name: str) -> ir.Value:
        node = ir.node(op, inputs, name=name)
        node.outputs[0].name = name
        graph.insert_before(before, node)
        return node.outputs[0]

    def _shape(self, graph: ir.Graph, before: ir.Node, value: ir.Value, label: str) -> ir.Value:
        node = ir.node("Shape", [value], name=f"{label}.shape")
        node.outputs[0].name = f"{label}.shape"
        graph.insert_before(before, node)
        return node.outputs[0]


def _take_columns(tensor: ir.TensorProtocol, perm: np.ndarray) -> ir.TensorProtocol:
    import ml_dtypes

    array = tensor.numpy()
    if tensor.dtype == ir.DataType.FLOAT8E4M3FN:  # permute the bytes; keep the dtype
        permuted = np.ascontiguousarray(np.asarray(array).view(np.uint8)[..., perm])
        return ir.tensor(permuted.view(ml_dtypes.float8_e4m3fn))
    return ir.tensor(np.ascontiguousarray(array[..., perm]))
