"""Split MLA attention by heads over the tensor-parallel group (column / row split + one all-reduce).

Rank t of T keeps heads [t*N/T, (t+1)*N/T) (N = num_attention_heads) of every per-head weight:
    q_b_proj (q_proj without q_lora)   columns of those heads          [Q, N/T*(D+R)]
    kv_b_proj, absorbed: w_uk [N/T, D, C], w_uv_t [N/T, C, Vd] (FP8: the kv_b rows of those heads)
    o_proj                              rows of those heads             [N/T*Vd, H]
and the attention output becomes AllReduce_tp(o_proj partial). q_a_proj, kv_a_proj_with_mqa and their norms
stay whole: they produce the latent (kv_lora_rank + rope dims) that every head reads, so each rank computes
the same latent and the latent KV cache is REPLICATED on every rank of the group (it has no head axis to
split; DeepSeek-V3's own serving splits requests over data-parallel attention instead, not built here).
The graph's head counts (the q reshape [0,0,N,D+R], the output reshapes [0,-1,N,C] and [0,0,N*Vd], and the
causal mask's row repeat [S, N, S]) become N/T; each is located from the weights it belongs to, and a
graph that does not have the exported structure is refused with the reason.
Legend: N heads, D qk_nope_head_dim, R qk_rope_head_dim, C kv_lora_rank, Vd v_head_dim, Q q_lora_rank, H hidden.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from r1c.errors import PassError
from r1c.passes._util import const_ints
from r1c.passes.shard_util import (
    GraphEditor,
    Linear,
    ShardPass,
    consumer,
    has_initializer,
    producer,
    set_reshape,
    slice_initializer,
)
from r1c.plugins.all_reduce import SPEC as ALL_REDUCE
from r1c.plugins.fp8 import BLOCK

PASS_NAME = "shard_attention"


class ShardAttentionPass(ShardPass):
    """MLA heads split over the TP group; one all-reduce after o_proj per layer; latent cache replicated."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        parts = self.layout.tensor_parallel
        if parts == 1:
            return ir.passes.PassResult(model, False)
        c = self.config
        n = c.num_attention_heads
        local = n // parts
        t = self.tp_rank
        heads = (t * local, (t + 1) * local)
        edit = GraphEditor(model, "shard.attn")
        for layer in range(c.num_hidden_layers):
            self._layer(model, edit, layer, heads)
        self._causal_mask(model, edit, n, local)
        return ir.passes.PassResult(model, True)

    def _layer(self, model: ir.Model, edit: GraphEditor, layer: int, heads: tuple[int, int]) -> None:
        c = self.config
        n, d, r, vd, kvr = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        lo, hi = heads
        local = hi - lo
        p = f"model.layers.{layer}.self_attn"

        # queries: the heads' columns, and the [B, S, N, D+R] view of them
        q = Linear.find(model, f"{p}.q_b_proj.weight_t" if c.q_lora_rank is not None else f"{p}.q_proj.weight_t",
                        PASS_NAME)
        q.slice(1, lo * (d + r), hi * (d + r), PASS_NAME)
        set_reshape(consumer(q.output, "Reshape", PASS_NAME, index=0), edit, [0, 0, n, d + r], [0, 0, local, d + r],
                    PASS_NAME)

        # absorbed kv_b: per-head [N, ...] tensors (float), or the FP8 kv_b rows and their [N, D+Vd, C] view
        if has_initializer(model, f"{p}.w_uk"):
            for name in (f"{p}.w_uk", f"{p}.w_uv_t"):
                slice_initializer(model.graph.initializers[name], 0, lo, hi)
        else:
            self._fp8_kv_b(model, edit, p, lo, hi)

        # output: o_proj rows of the heads; the reshapes that feed it; the all-reduce after it
        o = Linear.find(model, f"{p}.o_proj.weight_t", PASS_NAME)
        o.slice(0, lo * vd, hi * vd, PASS_NAME)
        merge = producer(o.matmul.inputs[0], "Reshape", PASS_NAME)  # [B, S, N, Vd] -> [B, S, N*Vd]
        set_reshape(merge, edit, [0, 0, n * vd], [0, 0, local * vd], PASS_NAME)
        per_head = producer(producer(merge.inputs[0], "Transpose", PASS_NAME).inputs[0], "MatMul", PASS_NAME)
        split = producer(producer(per_head.inputs[0], "Transpose", PASS_NAME).inputs[0], "Reshape", PASS_NAME)
        set_reshape(split, edit, [0, -1, n, kvr], [0, -1, local, kvr], PASS_NAME)  # [B, S*N, C] -> [B, S, N, C]
        edit.collective(ALL_REDUCE, o.output, f"layers.{layer}.attn", group="tp")

    def _fp8_kv_b(self, model: ir.Model, edit: GraphEditor, p: str, lo: int, hi: int) -> None:
        c = self.config
        rows_per_head = c.qk_nope_head_dim + c.v_head_dim
        name = f"{p}.kv_b_proj.weight"  # FP8 [N*(D+Vd), C], dequantized by 128-row blocks, then [N, D+Vd, C]
        if not has_initializer(model, name):
            raise PassError(f"{PASS_NAME}: {p} has neither w_uk/w_uv_t nor an FP8 kv_b_proj.weight")
        w = model.graph.initializers[name]
        dq = consumer(w, "DequantizeLinear", PASS_NAME, index=0)
        start, stop = lo * rows_per_head, hi * rows_per_head
        if start % BLOCK or stop % BLOCK:
            raise PassError(f"{PASS_NAME}: {name}: FP8 rows [{start}, {stop}) of the heads do not fall on {BLOCK}-row "
                            "scale blocks; choose a tensor-parallel size that keeps them aligned")
        scale = dq.inputs[1]
        assert scale is not None
        slice_initializer(w, 0, start, stop)
        slice_initializer(scale, 0, start // BLOCK, stop // BLOCK)
        view = consumer(dq.outputs[0], "Reshape", PASS_NAME, index=0)
        n = c.num_attention_heads
        set_reshape(view, edit, [n, rows_per_head, c.kv_lora_rank], [hi - lo, rows_per_head, c.kv_lora_rank],
                    PASS_NAME)

    def _causal_mask(self, model: ir.Model, edit: GraphEditor, n: int, local: int) -> None:
        """The mask of the new tokens' folded score rows (S*N of them) repeats each causal row N times:
        Reshape(Expand(causal [S, 1, S], Concat(S, [N], S)), [-1, S]) read as Where's condition in every layer."""
        found = 0
        for node in model.graph:
            if node.op_type != "Where" or node.inputs[0] is None:
                continue
            rows = node.inputs[0].producer()
            if rows is None or rows.op_type != "Reshape":
                continue
            expand = rows.inputs[0].producer() if rows.inputs[0] is not None else None
            if expand is None or expand.op_type != "Expand" or expand.inputs[1] is None:
                continue
            concat = expand.inputs[1].producer()
            if concat is None or concat.op_type != "Concat":
                continue
            for i, value in enumerate(concat.inputs):
                if const_ints(value) == [n]:
                    concat.replace_input_with(i, edit.const([local], np.int64))
                    found += 1
                elif const_ints(value) == [local] and value is not None and str(value.name).startswith("shard.attn"):
                    found += 1  # shared by several layers' masks: already rewritten
        if not found:
            raise PassError(f"{PASS_NAME}: found no causal mask that repeats its rows {n} times (one per head)")
