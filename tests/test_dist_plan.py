"""unit tier: the 8 x H200 plan's arithmetic (runtime/distributed/plan.py) against the config's own sizes."""

from __future__ import annotations

import pytest

from r1c.config import PRESETS, preset
from r1c.passes.shard_layout import ShardLayout
from r1c.runtime.distributed.plan import Hardware, expected_busiest_partition_experts, parts, plan, total_parameters


@pytest.mark.parametrize("name", list(PRESETS))
def test_parts_add_up_to_the_configs_parameter_count(name: str) -> None:
    assert total_parameters(preset(name)) == preset(name).num_parameters()


def test_r1_fp8_sizes() -> None:
    c = preset("r1")
    p = parts(c)
    assert p.expert[1] == 3 * 7168 * 2048 + 3 * 4 * 16 * 56  # FP8 bytes + one float32 scale per 128x128 block
    stored = (c.num_hidden_layers * (p.attn_replicated[1] + p.attn_split[1] + p.layer_norms[1])
              + c.first_k_dense_replace * p.dense_mlp[1]
              + c.num_moe_layers * (c.n_routed_experts * p.expert[1] + p.shared[1] + p.router[1]) + p.embed_head[1])
    assert 650e9 < stored < 700e9  # the FP8 release is ~0.69 TB with its MTP layer, which r1c does not load
    tp8 = plan(c, ShardLayout(8, 1), batch=1, context=32768, routing_tokens=256)
    assert tp8["kv_bytes_per_token"] == c.kv_cache_bytes_per_token(2) == 61 * 576 * 2
    replicated = c.num_hidden_layers * (p.attn_replicated[1] + p.layer_norms[1]) + c.num_moe_layers * p.router[1]
    assert tp8["weights_gb_per_rank"] * 1e9 == pytest.approx((stored - replicated) / 8 + replicated, rel=1e-9)
    assert tp8["weights_gb_per_rank"] < Hardware().memory_bytes / 1e9 and tp8["sequences_at_context"] > 0
    ep8 = plan(c, ShardLayout(1, 8), batch=1, context=32768, routing_tokens=256)
    assert ep8["weights_gb_per_rank"] > tp8["weights_gb_per_rank"]  # attention replicated on every rank


def test_busiest_partition() -> None:
    c = preset("r1")
    assert expected_busiest_partition_experts(c, 1, tokens=256) == c.num_experts_per_tok
    # groups of 32 experts = partitions of EP8; a token keeps topk_group = 4 groups, so some group gets >= 2
    assert 2 <= expected_busiest_partition_experts(c, 8, tokens=256) <= c.num_experts_per_tok
