"""Split the dense SwiGLU MLPs (the first `first_k_dense_replace` layers) over the tensor-parallel group.

Megatron-LM's MLP split (Shoeybi et al. 2019, section 3): rank t of T keeps the intermediate slice
[t*I/T, (t+1)*I/T) — columns of gate_proj and up_proj, rows of down_proj — so silu(x Wg_t) * (x Wu_t) needs no
communication and y = AllReduce_tp(h_t Wd_t). I = intermediate_size. T = 1: nothing changes.
The shared expert of the MoE layers is split the same way by `shard_moe` (its sum joins the experts').
"""

from __future__ import annotations

import onnx_ir as ir

from r1c.passes.shard_util import GraphEditor, Linear, ShardPass
from r1c.plugins.all_reduce import SPEC as ALL_REDUCE

PASS_NAME = "shard_mlp"


def split_swiglu(model: ir.Model, prefix: str, inter: int, parts: int, t: int, pass_name: str) -> Linear:
    """Slice t of T of the SwiGLU MLP whose weights are `{prefix}.{gate,up,down}_proj.weight_t`; returns down."""
    local = inter // parts
    lo, hi = t * local, (t + 1) * local
    for name in ("gate_proj", "up_proj"):
        Linear.find(model, f"{prefix}.{name}.weight_t", pass_name).slice(1, lo, hi, pass_name)
    down = Linear.find(model, f"{prefix}.down_proj.weight_t", pass_name)
    down.slice(0, lo, hi, pass_name)
    return down


class ShardMLPPass(ShardPass):
    """Column/row split of each dense MLP with one all-reduce (tp group) after down_proj."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        parts = self.layout.tensor_parallel
        dense = [i for i in range(self.config.num_hidden_layers) if not self.config.is_moe_layer(i)]
        if parts == 1 or not dense:
            return ir.passes.PassResult(model, False)
        t = self.tp_rank
        edit = GraphEditor(model, "shard.mlp")
        for layer in dense:
            down = split_swiglu(model, f"model.layers.{layer}.mlp", self.config.intermediate_size, parts, t,
                                PASS_NAME)
            edit.collective(ALL_REDUCE, down.output, f"layers.{layer}.mlp", group="tp")
        return ir.passes.PassResult(model, True)
