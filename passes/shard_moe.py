"""Split each MoE layer over all T x E ranks: experts by partition (EP), each expert's intermediate by TP.

Rank (e, t) holds the routed experts [e*E/P, (e+1)*E/P) (P = expert_parallel, E = n_routed_experts) and, of each,
the intermediate slice [t*I/T, (t+1)*I/T) (I = moe_intermediate_size): w13 [E/P, 2I/T, H] (its gate rows and its
up rows), w2 [E/P, H, I/T], FP8 block scales cut alike (I/T must then be a multiple of 128). The router stays
whole and replicated (every rank computes the same top-k), and the `r1c::MoEExperts` node computes only its
local experts' contribution: with P > 1 its routing is remapped to local ids,
    local = topk_ids - e*E/P;  mine = 0 <= local < E/P
    MoEExperts(h, Where(mine, topk_weights, 0), Where(mine, local, 0), w13_e, w2_e)
(a token's slot routed elsewhere weighs 0; the op's contract is unchanged). The shared expert is added on the
ranks of partition 0 only, TP-split like a dense MLP; then one AllReduce over the world sums routed and shared
parts: y = AllReduce_world(routed_(e,t) + [e == 0] shared_t). world = 1: nothing changes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from r1c.errors import PassError
from r1c.passes.shard_mlp import split_swiglu
from r1c.passes.shard_util import (
    GraphEditor,
    Linear,
    ShardPass,
    consumer,
    initializer,
    set_type,
    static_shape,
    transform,
)
from r1c.plugins.all_reduce import SPEC as ALL_REDUCE
from r1c.plugins.fp8 import BLOCK
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC

PASS_NAME = "shard_moe"


class ShardMoEPass(ShardPass):
    """Expert-parallel x tensor-parallel routed experts, shared expert on partition 0, one world all-reduce."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        moe = [i for i in range(self.config.num_hidden_layers) if self.config.is_moe_layer(i)]
        if self.layout.world_size == 1 or not moe:
            return ir.passes.PassResult(model, False)
        edit = GraphEditor(model, "shard.moe")
        for layer in moe:
            self._layer(model, edit, layer)
        return ir.passes.PassResult(model, True)

    def _layer(self, model: ir.Model, edit: GraphEditor, layer: int) -> None:
        c, layout = self.config, self.layout
        e, t = layout.coords(self.rank)
        parts_e, parts_t = layout.expert_parallel, layout.tensor_parallel
        experts_local, inter = c.n_routed_experts // parts_e, c.moe_intermediate_size
        inter_local = inter // parts_t
        p = f"model.layers.{layer}.mlp"
        w13 = initializer(model, f"{p}.experts.w13", PASS_NAME)
        node = consumer(w13, EXPERTS_SPEC.name, PASS_NAME, index=3)
        ex = slice(e * experts_local, (e + 1) * experts_local)
        gate = slice(t * inter_local, (t + 1) * inter_local)
        up = slice(inter + t * inter_local, inter + (t + 1) * inter_local)
        h = static_shape(w13)[2]
        transform(w13, [experts_local, 2 * inter_local, h],
                  lambda w: np.concatenate([w[ex, gate], w[ex, up]], axis=1))
        w2 = node.inputs[4]
        assert w2 is not None
        transform(w2, [experts_local, h, inter_local], lambda w: w[ex, :, gate])
        if len(node.inputs) > 5 and node.inputs[5] is not None:
            self._fp8_scales(node, ex, inter, inter_local, t, parts_t)

        if parts_e > 1:
            self._remap(model, edit, node, e * experts_local, experts_local, layer)

        routed = node.outputs[0]
        combined = routed
        if c.n_shared_experts:
            prefix = f"{p}.shared_experts"
            down = Linear.find(model, f"{prefix}.down_proj.weight_t", PASS_NAME)
            add = consumer(routed, "Add", PASS_NAME)
            if down.output not in add.inputs:
                raise PassError(f"{PASS_NAME}: {add.name} does not add the shared expert to the routed experts")
            combined = add.outputs[0]
            if e == 0:
                if parts_t > 1:
                    split_swiglu(model, prefix, inter * c.n_shared_experts, parts_t, t, PASS_NAME)
            else:  # partition 0 adds the shared expert; here the routed part goes straight to the all-reduce
                combined.replace_all_uses_with(routed)
                model.graph.remove(add, safe=True)
                combined = routed
        edit.collective(ALL_REDUCE, combined, f"layers.{layer}.moe", group="world")

    def _fp8_scales(self, node: ir.Node, ex: slice, inter: int, inter_local: int, t: int, parts_t: int) -> None:
        s13, s2 = node.inputs[5], node.inputs[6]
        assert s13 is not None and s2 is not None
        if parts_t == 1:  # whole experts: the scales are cut by expert only
            for s in (s13, s2):
                shape = static_shape(s)
                transform(s, [ex.stop - ex.start, *shape[1:]], lambda a: a[ex])
            return
        if inter_local % BLOCK or inter % BLOCK:
            raise PassError(f"{PASS_NAME}: FP8 experts: moe_intermediate_size / TP = {inter_local} is not a multiple "
                            f"of the {BLOCK}-wide scale blocks; choose a smaller tensor-parallel size")
        s13, s2 = node.inputs[5], node.inputs[6]
        assert s13 is not None and s2 is not None
        b_local, b_inter = inter_local // BLOCK, inter // BLOCK
        gate = slice(t * b_local, (t + 1) * b_local)
        up = slice(b_inter + t * b_local, b_inter + (t + 1) * b_local)
        n_ex = ex.stop - ex.start
        transform(s13, [n_ex, 2 * b_local, static_shape(s13)[2]],
                  lambda s: np.concatenate([s[ex, gate], s[ex, up]], axis=1))
        transform(s2, [n_ex, static_shape(s2)[1], b_local], lambda s: s[ex, :, gate])

    def _remap(self, model: ir.Model, edit: GraphEditor, node: ir.Node, first: int, count: int, layer: int) -> None:
        weights, ids = node.inputs[1], node.inputs[2]
        assert weights is not None and ids is not None
        n, name = edit.node, f"layers.{layer}.moe"
        shifted = n("Sub", [ids, edit.const(first, np.int32, scalar=True)], name)
        above = n("GreaterOrEqual", [shifted.outputs[0], edit.const(0, np.int32, scalar=True)], name)
        below = n("Less", [shifted.outputs[0], edit.const(count, np.int32, scalar=True)], name)
        mine = n("And", [above.outputs[0], below.outputs[0]], name)
        local_w = n("Where", [mine.outputs[0], weights, edit.const(0.0, np.float32, scalar=True)], name)
        local_ids = n("Where", [mine.outputs[0], shifted.outputs[0], edit.const(0, np.int32, scalar=True)], name)
        for new, like in ((local_w, weights), (local_ids, ids)):
            set_type(new.outputs[0], like)
        model.graph.insert_before(node, [shifted, above, below, mine, local_w, local_ids])
        node.replace_input_with(1, local_w.outputs[0])
        node.replace_input_with(2, local_ids.outputs[0])
