"""The paper plan for a sharded deployment: per-rank memory, communication per decode step, decode latency.

Everything is derived from a `ModelConfig` (the `r1` preset for DeepSeek-R1) and a `ShardLayout`, with the
hardware and efficiency assumptions as named fields of `Hardware` (defaults: one 8 x H200 SXM node). It models
r1c's layout (`r1c.passes.shard_layout`): attention / dense MLP / shared expert / embedding / LM head split T ways
(q_a_proj, kv_a_proj and the latent cache replicated on every rank), routed experts split E x T ways, one
all-reduce after attention and one after each MLP / MoE, one all-gather of the logits.
Weights as DeepSeek ships R1: FP8 e4m3 linears (q_a/q_b/kv_a/kv_b/o_proj, dense MLP, experts, shared expert) with a
float32 scale per 128x128 block; bf16 embedding, LM head, router and norms (the router bias float32).
Decode time per token, batch B, context P (a roofline with latency terms, not a measurement):
    t = max_rank(weight bytes read + latent KV bytes read) / (HBM bandwidth * hbm_efficiency)
        + layers * (collectives per layer * (all-reduce latency + 2 (n-1)/n * message / NVLink bandwidth))
        + layers * kernel_overhead_per_layer
The expected routed experts a rank reads per step comes from `expected_busiest_partition_experts`, a Monte Carlo
run of r1c's own router (`moe_router_reference`) on random hidden states and gate weights: real, trained routing
is less uniform, so the busiest partition of an expert-parallel layout is, if anything, busier.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from r1c.config import ModelConfig
from r1c.passes.shard_layout import ShardLayout
from r1c.plugins.moe_router import moe_router_reference

FP8_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str = "8 x H200 SXM"
    gpus: int = 8
    memory_bytes: float = 141e9  # H200 SXM datasheet: 141 GB HBM3e
    hbm_bytes_per_s: float = 4.8e12  # H200 SXM datasheet: 4.8 TB/s
    nvlink_bytes_per_s: float = 450e9  # NVLink 4: 900 GB/s per GPU, both directions together
    allreduce_latency_s: float = 10e-6  # assumption: NCCL small-message all-reduce on one NVLink node
    hbm_efficiency: float = 0.7  # assumption: fraction of peak bandwidth skinny FP8 GEMMs reach at batch <= 8
    kernel_overhead_per_layer_s: float = 40e-6  # assumption: ~20 kernels a layer, ~2 us each under CUDA graphs
    reserve_bytes: float = 6e9  # assumption: CUDA context, TensorRT workspace and allocator slack per GPU


def _scale_bytes(rows: int, cols: int) -> int:
    return 4 * math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK)


def fp8(rows: int, cols: int) -> int:
    """Bytes of one FP8 weight [rows, cols] with its 128x128 float32 block scales."""
    return rows * cols + _scale_bytes(rows, cols)


@dataclasses.dataclass(frozen=True)
class Parts:
    """Parameter counts and stored bytes of the model's parts (per layer where it says so)."""

    attn_replicated: tuple[int, int]  # q_a, kv_a and their norms: every rank holds them
    attn_split: tuple[int, int]  # q_b, kv_b, o_proj: split by heads
    dense_mlp: tuple[int, int]  # one dense layer's MLP
    expert: tuple[int, int]  # one routed expert (gate, up, down)
    shared: tuple[int, int]  # the shared expert(s) of one MoE layer
    router: tuple[int, int]  # gate weight + correction bias of one MoE layer
    layer_norms: tuple[int, int]  # input + post-attention norms of one layer
    embed_head: tuple[int, int]  # embedding + LM head (+ final norm)


def parts(c: ModelConfig) -> Parts:
    h, n, bf16 = c.hidden_size, c.num_attention_heads, 2
    q_b_out = n * c.qk_head_dim
    if c.q_lora_rank is None:
        q = (h * q_b_out, fp8(h, q_b_out))
        q_rep: tuple[int, int] = (0, 0)
    else:
        q = (c.q_lora_rank * q_b_out, fp8(c.q_lora_rank, q_b_out))
        q_rep = (h * c.q_lora_rank + c.q_lora_rank, fp8(h, c.q_lora_rank) + bf16 * c.q_lora_rank)
    kv_a = (h * c.latent_dim + c.kv_lora_rank, fp8(h, c.latent_dim) + bf16 * c.kv_lora_rank)
    kv_b_out = n * (c.qk_nope_head_dim + c.v_head_dim)
    kv_b = (c.kv_lora_rank * kv_b_out, fp8(c.kv_lora_rank, kv_b_out))
    o = (n * c.v_head_dim * h, fp8(n * c.v_head_dim, h))
    i, im = c.intermediate_size, c.moe_intermediate_size
    expert = (3 * h * im, 2 * fp8(im, h) + fp8(h, im))
    shared_i = im * c.n_shared_experts
    heads = 1 if c.tie_word_embeddings else 2
    return Parts(
        attn_replicated=(q_rep[0] + kv_a[0], q_rep[1] + kv_a[1]),
        attn_split=(q[0] + kv_b[0] + o[0], q[1] + kv_b[1] + o[1]),
        dense_mlp=(3 * h * i, 2 * fp8(i, h) + fp8(h, i)),
        expert=expert,
        shared=(3 * h * shared_i, (2 * fp8(shared_i, h) + fp8(h, shared_i)) if shared_i else 0),
        router=(c.n_routed_experts * h + c.n_routed_experts, bf16 * c.n_routed_experts * h + 4 * c.n_routed_experts),
        layer_norms=(2 * h, bf16 * 2 * h),
        embed_head=(heads * c.vocab_size * h + h, bf16 * (heads * c.vocab_size * h + h)),
    )


def total_parameters(c: ModelConfig) -> int:
    """Parameters summed from `parts` (tests hold it equal to ModelConfig.num_parameters)."""
    p = parts(c)
    per_layer = p.attn_replicated[0] + p.attn_split[0] + p.layer_norms[0]
    moe = c.n_routed_experts * p.expert[0] + p.shared[0] + p.router[0]
    return (c.num_hidden_layers * per_layer + c.first_k_dense_replace * p.dense_mlp[0] + c.num_moe_layers * moe
            + p.embed_head[0])


_BUSIEST: dict[tuple[str, int, int, int, int], float] = {}


def expected_busiest_partition_experts(c: ModelConfig, partitions: int, batch: int = 1, tokens: int = 4096,
                                       seed: int = 0) -> float:
    """E[max over expert partitions of the distinct experts a batch of `batch` tokens chose in it].

    r1c's router (`moe_router_reference`, noaux_tc with groups) on random hidden states and gate weights.
    """
    key = (c.hash(), partitions, batch, tokens, seed)
    if key not in _BUSIEST:
        _BUSIEST[key] = _busiest(c, partitions, batch, tokens, seed)
    return _BUSIEST[key]


def _busiest(c: ModelConfig, partitions: int, batch: int, tokens: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, c.hidden_size, generator=g)
    gate = torch.randn(c.n_routed_experts, c.hidden_size, generator=g) / math.sqrt(c.hidden_size)
    bias = torch.zeros(c.n_routed_experts)
    _, ids = moe_router_reference(hidden, gate, bias, top_k=c.num_experts_per_tok, n_group=c.n_group,
                                  topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor,
                                  norm_topk_prob=c.norm_topk_prob, scoring=c.scoring_func)
    steps = tokens // batch
    chosen = torch.zeros(steps, c.n_routed_experts, dtype=torch.bool)  # experts each step's batch touches
    chosen.scatter_(1, ids[: steps * batch].long().view(steps, -1), True)
    per_partition = chosen.view(steps, partitions, -1).sum(-1)  # [steps, partitions]
    return float(per_partition.max(1).values.float().mean())


def plan(c: ModelConfig, layout: ShardLayout, hw: Hardware | None = None, *, batch: int = 1,
         context: int = 32768, kv_bytes: int = 2, act_bytes: int = 2, routing_tokens: int = 4096) -> dict[str, Any]:
    """Per-rank memory, communication per decode step and the decode-time model (see the module docstring)."""
    hw = hw or Hardware()
    layout.check(c)
    t, e_p, world = layout.tensor_parallel, layout.expert_parallel, layout.world_size
    p = parts(c)
    L, moe, dense = c.num_hidden_layers, c.num_moe_layers, c.first_k_dense_replace
    experts_local = c.n_routed_experts // e_p

    def weights(partition0: bool) -> float:
        per_layer = p.attn_replicated[1] + p.attn_split[1] / t + p.layer_norms[1]
        per_moe = experts_local * p.expert[1] / t + p.router[1] + (p.shared[1] / t if partition0 else 0)
        return L * per_layer + dense * p.dense_mlp[1] / t + moe * per_moe + p.embed_head[1] / t

    weight_bytes = max(weights(True), weights(False))
    kv_per_token = c.kv_cache_bytes_per_token(kv_bytes)  # replicated on every rank (no head axis to split)
    kv_per_sequence = kv_per_token * context
    # activations: r1c's exported attention materializes the scores [B, S*N/T, P] (float32); decode S = 1
    heads_local = c.num_attention_heads // t
    decode_scores = batch * heads_local * context * 4
    decode_hidden = batch * max(c.hidden_size, heads_local * c.qk_head_dim, c.num_experts_per_tok * 2
                                * c.moe_intermediate_size // t) * 4 * 4  # a few live [B, width] float32 tensors
    activations = decode_scores + decode_hidden
    free = hw.memory_bytes - weight_bytes - activations - hw.reserve_bytes
    sequences = max(0, math.floor(free / kv_per_sequence))

    # decode: bytes each rank reads for one step of `batch` tokens at `context`
    busiest = expected_busiest_partition_experts(c, e_p, batch, tokens=routing_tokens)
    routed_read = busiest * p.expert[1] / t
    read = (L * (p.attn_replicated[1] + p.attn_split[1] / t) + dense * p.dense_mlp[1] / t
            + moe * (routed_read + p.router[1] + p.shared[1] / t) + p.embed_head[1] / 2 / t
            + batch * context * kv_per_token)
    message = batch * c.hidden_size * act_bytes
    ring = 2 * (t - 1) / t if t > 1 else 0.0
    ring_world = 2 * (world - 1) / world if world > 1 else 0.0
    attn_ar = hw.allreduce_latency_s + ring * message / hw.nvlink_bytes_per_s if t > 1 else 0.0
    mlp_ar = hw.allreduce_latency_s + ring * message / hw.nvlink_bytes_per_s if t > 1 else 0.0
    moe_ar = hw.allreduce_latency_s + ring_world * message / hw.nvlink_bytes_per_s if world > 1 else 0.0
    logits = batch * c.vocab_size * 4
    gather = (hw.allreduce_latency_s + (t - 1) / t * logits / hw.nvlink_bytes_per_s) if t > 1 else 0.0
    t_mem = read / (hw.hbm_bytes_per_s * hw.hbm_efficiency)
    t_comm = L * attn_ar + dense * mlp_ar + moe * moe_ar + gather + (attn_ar if t > 1 else 0.0)  # + embedding
    t_kernels = L * hw.kernel_overhead_per_layer_s
    step = t_mem + t_comm + t_kernels
    return {
        "layout": str(layout), "ranks": world, "hardware": hw.name, "batch": batch, "context": context,
        "weights_gb_per_rank": weight_bytes / 1e9,
        "kv_bytes_per_token": kv_per_token, "kv_gb_per_sequence": kv_per_sequence / 1e9,
        "activations_gb": activations / 1e9, "free_for_kv_gb": free / 1e9, "sequences_at_context": sequences,
        "busiest_partition_experts_per_step": busiest,
        "bytes_read_per_step_gb": read / 1e9,
        "comm_per_layer_bytes": {"attention_allreduce_message": message if t > 1 else 0,
                                 "moe_allreduce_message": message if world > 1 else 0,
                                 "per_rank_traffic": (ring + ring_world) * message},
        "collectives_per_step": (L + dense + 1 if t > 1 else 0) + (moe if world > 1 else 0) + (1 if t > 1 else 0),
        "decode_ms": {"memory": 1e3 * t_mem, "communication": 1e3 * t_comm, "kernels": 1e3 * t_kernels,
                      "total": 1e3 * step},
        "tokens_per_s_per_user": 1.0 / step,
    }
