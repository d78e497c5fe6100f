"""Shard an `r1c export` model for one rank of a `--tensor-parallel T --expert-parallel E` layout.

The composition of the sharding passes (see `shard_layout` for the layout and the collective groups):
    shard_vocab      embedding and LM head along the vocabulary        AllReduce_tp, AllGather_tp
    shard_attention  MLA heads (q_b / kv_b / o_proj)                   AllReduce_tp per layer
    shard_mlp        dense MLPs, column / row                          AllReduce_tp per dense layer
    shard_moe        routed experts EP x TP, shared expert TP          AllReduce_world per MoE layer
then dead code (the slices other ranks hold, the shared expert off partition 0) is removed and shapes are
inferred again. The collectives are `r1c::AllReduce` / `r1c::AllGather` nodes with no function body; their
output shapes are set here, since ONNX's inference cannot see through them. Weights are sliced lazily.
"""

from __future__ import annotations

import onnx_ir as ir

from r1c.config import ModelConfig
from r1c.errors import PassError
from r1c.passes.infer_shapes import InferShapesPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.shard_attention import ShardAttentionPass
from r1c.passes.shard_layout import ShardLayout
from r1c.passes.shard_mlp import ShardMLPPass
from r1c.passes.shard_moe import ShardMoEPass
from r1c.passes.shard_vocab import ShardVocabPass
from r1c.plugins import R1C_DOMAIN
from r1c.plugins.all_gather import SPEC as ALL_GATHER
from r1c.plugins.all_reduce import SPEC as ALL_REDUCE

EXPECTED_INPUTS = ("input_ids", "past_lengths")
EXPECTED_OUTPUTS = ("logits", "new_c", "new_pe")


class _RefreshShapesPass(ir.passes.InPlacePass):
    """Forget the shapes that sharding made stale (standard-op outputs), then infer them again.

    Outputs of r1c ops keep theirs: the MoE ops' do not change with sharding, and the collectives' were set
    when they were inserted (ONNX's shape inference cannot see through a node without a function body).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in model.graph:
            if node.domain == R1C_DOMAIN:
                continue
            for out in node.outputs:
                if not out.is_graph_output():
                    out.shape = None
        return InferShapesPass()(model)


class ShardModelPass(ir.passes.Sequential):
    """One rank's share of the model; other ranks' weights are dropped, collectives inserted."""

    def __init__(self, config: ModelConfig, layout: ShardLayout, rank: int) -> None:
        layout.check(config)
        layout.coords(rank)
        self.config, self.layout, self.rank = config, layout, rank
        super().__init__(ShardVocabPass(config, layout, rank), ShardAttentionPass(config, layout, rank),
                         ShardMLPPass(config, layout, rank), ShardMoEPass(config, layout, rank),
                         RemoveDeadCodePass(), _RefreshShapesPass())

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """The steps in order (not Sequential's call: a step's PassError must reach the caller unwrapped)."""
        modified = False
        for step in self.passes:
            result = step(model)
            model, modified = result.model, modified or result.modified
        return ir.passes.PassResult(model, modified)

    def requires(self, model: ir.Model) -> None:
        inputs = [v.name for v in model.graph.inputs]
        outputs = [v.name for v in model.graph.outputs]
        if tuple(inputs[:2]) != EXPECTED_INPUTS or tuple(outputs) != EXPECTED_OUTPUTS:
            raise PassError(f"shard_model: expected an `r1c export` graph (inputs {EXPECTED_INPUTS} + caches, outputs "
                            f"{EXPECTED_OUTPUTS}); got inputs {inputs[:2]}..., outputs {outputs}")
        collectives = (ALL_REDUCE.name, ALL_GATHER.name)
        if any(node.domain == R1C_DOMAIN and node.op_type in collectives for node in model.graph):
            raise PassError("shard_model: the model is already sharded")
