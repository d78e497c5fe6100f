"""Split the embedding and the LM head along the vocabulary over the tensor-parallel group.

Rank t of a group of T holds vocabulary rows [t*V/T, (t+1)*V/T) of both (Megatron-LM's vocab-parallel
embedding and column-parallel output layer, Shoeybi et al. 2019, section 3):
    embedding  local = ids - t*V/T;  mine = 0 <= local < V/T
               x = AllReduce_tp( Where(mine, Gather(E_t, Where(mine, local, 0)), 0) )      [B, S, H]
    LM head    logits = AllGather_tp( h @ W_t^T, axis=-1 )                                 [B, S, V]
Every rank ends with the whole logits (the runtime's scheduler reads them on rank 0). T = 1: nothing changes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from r1c.errors import PassError
from r1c.passes.shard_util import GraphEditor, Linear, ShardPass, consumer, initializer, set_type, slice_initializer
from r1c.plugins.all_gather import SPEC as ALL_GATHER
from r1c.plugins.all_reduce import SPEC as ALL_REDUCE

PASS_NAME = "shard_vocab"
EMBEDDING = "model.embed_tokens.weight"  # [V, H]
LM_HEAD = "lm_head.weight_t"  # [H, V]


class ShardVocabPass(ShardPass):
    """Vocabulary-parallel embedding (masked lookup + all-reduce) and LM head (column split + all-gather)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        parts = self.layout.tensor_parallel
        if parts == 1:
            return ir.passes.PassResult(model, False)
        t = self.tp_rank
        local = self.config.vocab_size // parts
        lo = t * local
        edit = GraphEditor(model, "shard.vocab")
        self._embedding(model, edit, lo, local)
        head = Linear.find(model, LM_HEAD, PASS_NAME)
        if head.scale is not None:
            raise PassError(f"{PASS_NAME}: an FP8 LM head is not supported")
        head.slice(1, lo, lo + local, PASS_NAME)
        out = head.output
        shape = None if out.shape is None else ir.Shape([*list(out.shape)[:-1], self.config.vocab_size])
        edit.collective(ALL_GATHER, out, "head", shape, group="tp", axis=-1, group_size=parts)
        return ir.passes.PassResult(model, True)

    def _embedding(self, model: ir.Model, edit: GraphEditor, lo: int, local: int) -> None:
        table = initializer(model, EMBEDDING, PASS_NAME)
        gather = consumer(table, "Gather", PASS_NAME, index=0)
        if gather.attributes.get("axis", ir.AttrInt64("axis", 0)).as_int() != 0:
            raise PassError(f"{PASS_NAME}: the embedding Gather is not along axis 0")
        ids = gather.inputs[1]
        assert ids is not None
        slice_initializer(table, 0, lo, lo + local)
        n = edit.node
        shifted = n("Sub", [ids, edit.const(lo, np.int64, scalar=True)], "embed")
        above = n("GreaterOrEqual", [shifted.outputs[0], edit.const(0, np.int64, scalar=True)], "embed")
        below = n("Less", [shifted.outputs[0], edit.const(local, np.int64, scalar=True)], "embed")
        mine = n("And", [above.outputs[0], below.outputs[0]], "embed")
        safe = n("Where", [mine.outputs[0], shifted.outputs[0], edit.const(0, np.int64, scalar=True)], "embed")
        model.graph.insert_before(gather, [shifted, above, below, mine, safe])
        gather.replace_input_with(1, safe.outputs[0])
        rows = gather.outputs[0]
        readers = list(rows.uses())
        mask = n("Unsqueeze", [mine.outputs[0], edit.const([-1], np.int64)], "embed")
        zero = edit.const(0.0, table.dtype.numpy() if table.dtype is not None else np.float32, scalar=True)
        masked = n("Where", [mask.outputs[0], rows, zero], "embed_masked")  # zero in the table's dtype
        model.graph.insert_after(gather, [mask, masked])
        for use in readers:
            use.node.replace_input_with(use.idx, masked.outputs[0])
        set_type(masked.outputs[0], rows)
        edit.collective(ALL_REDUCE, masked.outputs[0], "embed", group="tp")
