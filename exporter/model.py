"""DeepSeek-V3/R1 (and V2) in plain PyTorch: MLA attention with a latent KV cache, DeepSeekMoE, YaRN RoPE.

One model serves both architectures: what differs (routing method and scoring, the router's correction bias,
shared-expert count, q_lora, rope layout) is a config field, and every such field is honoured here and in the
ONNX lowering alike (tests/test_conformance.py holds both equal to transformers' DeepseekV3/V2ForCausalLM).
The state_dict uses transformers' v5 fused layout (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]); routing and routed experts call the r1c op references, so this
model is the reference the ONNX export is compared with.

Shape legend:
    B batch, S new tokens, P cached tokens, T = P + S keys, H hidden, V vocab,
    N heads, D qk_nope_head_dim, R qk_rope_head_dim, Dv v_head_dim,
    C kv_lora_rank, L = C + R latent values cached per token per layer, Q q_lora_rank,
    E routed experts, K experts per token, I expert intermediate size, F dense intermediate size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r1c.config import ModelConfig, yarn_get_mscale
from r1c.plugins.moe_experts import moe_experts_reference
from r1c.plugins.moe_router import moe_router_reference

# eps of MLA's q_a_layernorm / kv_a_layernorm: the RMSNorm default, whatever rms_norm_eps says (transformers 5's
# DeepseekV3Attention / DeepseekV2Attention build these two norms without the config's eps). The decoder norms
# use config.rms_norm_eps.
MLA_NORM_EPS = 1e-6


def router_attributes(config: ModelConfig) -> dict[str, Any]:
    """The `r1c::MoERouter` attributes of a model's MoE layers (the PyTorch model and the lowering both use these)."""
    return dict(top_k=config.num_experts_per_tok, n_group=config.n_group, topk_group=config.topk_group,
                routed_scaling_factor=float(config.routed_scaling_factor), norm_topk_prob=int(config.norm_topk_prob),
                scoring=config.scoring_func, topk_method=config.topk_method)


class LatentCache:
    """MLA's compressed KV per layer: [B, P, L] = normalized kv (C values) then the roped key (R values).

    The roped key is stored as `apply_rope` returns it: the rotated pairs' first elements, then their second
    elements (with rope_interleave the weights' interleaved pairs come out de-interleaved, as in transformers).
    """

    def __init__(self, num_layers: int) -> None:
        self.layers: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """P: tokens cached so far."""
        first = self.layers[0]
        return 0 if first is None else first.shape[1]

    def update(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Appends latent [B, S, L]; returns the layer's whole cache [B, P + S, L]."""
        old = self.layers[layer]
        full = latent if old is None else torch.cat([old, latent], dim=1)
        self.layers[layer] = full
        return full


# ---- building blocks ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_parameters(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [R/2] float32 on CPU, attention_factor): plain RoPE or YaRN as in the R1 config."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)  # [R/2]
    inv_extrapolation = 1.0 / pos_freqs
    rs = config.rope_scaling
    if not rs or rs.get("type", "yarn") == "default":
        return inv_extrapolation, 1.0
    original = float(rs["original_max_position_embeddings"])  # filled from max_position_embeddings when absent
    factor = float(rs["factor"])
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, float(mscale)) / yarn_get_mscale(factor, float(mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = float(rs.get("beta_fast") or 32.0)
    beta_slow = float(rs.get("beta_slow") or 1.0)

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency; 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + inv_extrapolation * extrapolate
    return inv_freq, float(attention_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [B, n, S, R], cos/sin [B, 1, S, R/2] -> [B, n, S, R], pairs laid out as (all first, all second).

    interleave: the rotated pairs are (x0, x1), (x2, x3), ... (DeepSeek's weight layout); otherwise
    (x_i, x_{i + R/2}). Either way the output puts the pairs' first elements, then their second elements.
    """
    if interleave:
        a, b = x[..., 0::2], x[..., 1::2]
    else:
        a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


class MLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared experts."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """DeepSeek routing (V3 noaux_tc; V2 greedy / group_limited_greedy): the `r1c::MoERouter` op."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h = config.n_routed_experts, config.hidden_size
        self.weight = nn.Parameter(torch.zeros(e, h, dtype=torch.float32))
        self.e_score_correction_bias: nn.Parameter | None = None
        if config.has_correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(e, dtype=torch.float32), requires_grad=False)
        self.attributes = router_attributes(config)

    def op_attributes(self) -> dict[str, Any]:
        """The `r1c::MoERouter` attributes of this layer."""
        return dict(self.attributes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K] float32, ids [T, K] int32)."""
        bias: torch.Tensor
        if self.e_score_correction_bias is not None:
            bias = self.e_score_correction_bias
        else:  # the V2 methods select on the scores alone
            bias = torch.zeros(self.weight.shape[0], dtype=torch.float32, device=self.weight.device)
        return moe_router_reference(x, self.weight, bias, **self.attributes)


class Experts(nn.Module):
    """Routed experts as fused 3-D weights: the `r1c::MoEExperts` op."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights [T, K], ids [T, K] -> [T, H]."""
        return moe_experts_reference(x, weights, ids, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(b * s, h)  # [T, H]
        weights, ids = self.gate(flat)  # [T, K] each
        out = self.experts(flat, weights, ids).view(b, s, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Attention(nn.Module):
    """Multi-head latent attention; caches L = C + R values per token instead of per-head K/V."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c, h, n = config, config.hidden_size, config.num_attention_heads
        self.n_heads, self.nope, self.rope, self.v_dim = n, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_rank = c.kv_lora_rank
        self.interleave = c.rope_interleave
        self.scale = c.softmax_scale
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(h, n * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, MLA_NORM_EPS)
            self.q_b_proj = nn.Linear(c.q_lora_rank, n * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, c.latent_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, MLA_NORM_EPS)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, n * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n * c.v_head_dim, h, bias=False)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] -> q [B, S, N*(D+R)]."""
        if self.q_proj is not None:
            return self.q_proj(x)
        assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,  # [B, 1, S, R/2]
        sin: torch.Tensor,  # [B, 1, S, R/2]
        allowed: torch.Tensor,  # [B or 1, 1, S, T] bool
        cache: LatentCache | None,
        layer: int,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        n = self.n_heads
        q = self.query(x).view(b, s, n, self.nope + self.rope).transpose(1, 2)  # [B, N, S, D+R]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin, self.interleave)], dim=-1)

        kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)  # [B, S, C], [B, S, R]
        k_rope = apply_rope(k_rope[:, None], cos, sin, self.interleave)[:, 0]  # one key head shared by all
        latent = torch.cat([self.kv_a_layernorm(kv), k_rope], dim=-1)  # [B, S, L]
        if cache is not None:
            latent = cache.update(layer, latent)  # [B, T, L]
        t = latent.shape[1]
        kv, k_rope = latent.split([self.kv_rank, self.rope], dim=-1)  # [B, T, C], [B, T, R]

        kv = self.kv_b_proj(kv).view(b, t, n, self.nope + self.v_dim).transpose(1, 2)  # [B, N, T, D+Dv]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(b, n, t, self.rope)], dim=-1)  # [B, N, T, D+R]

        scores = (q @ k.transpose(-1, -2)) * self.scale  # [B, N, S, T]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, s, n * self.v_dim)  # [B, S, N*Dv]
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(config)
        self.mlp: MLP | MoE = MoE(config) if config.is_moe_layer(layer) else MLP(
            config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,
        sin: torch.Tensor,
        allowed: torch.Tensor,
        cache: LatentCache | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache, self.layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # A plain attribute, not a buffer: it stays valid when the model is built on `meta` and loaded later.
        self.inv_freq, self.attention_factor = rope_parameters(config)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, 1, S, R/2] (YaRN's attention factor folded in)."""
        inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids[..., None].to(torch.float32) * inv_freq  # [B, S, R/2]
        cos = (angles.cos() * self.attention_factor).to(dtype)[:, None]
        sin = (angles.sin() * self.attention_factor).to(dtype)[:, None]
        return cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        position_ids: torch.Tensor,  # [B, S]
        allowed: torch.Tensor,  # [B or 1, 1, S, T]
        cache: LatentCache | None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [B, S, H]
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, allowed, cache)
        return self.norm(x)


def attention_allowed(past: int, new: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Causal mask [B or 1, 1, S, T] (True = may attend): key j <= the query's cache index, and a real token."""
    q_index = past + torch.arange(new, device=device)[:, None]  # [S, 1]
    k_index = torch.arange(past + new, device=device)[None, :]  # [1, T]
    allowed = (k_index <= q_index)[None]  # [1, S, T]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # [B, S, T]
    return allowed[:, None]


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self) -> LatentCache:
        return LatentCache(self.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        cache: LatentCache | None = None,
        position_ids: torch.Tensor | None = None,  # [B, S]; default: the next positions
        attention_mask: torch.Tensor | None = None,  # [B, P + S]; 1 = a real token, 0 = padding
    ) -> torch.Tensor:
        """Logits [B, S, V]; appends this step's latents to `cache` when given.

        With an attention_mask, padded keys are never attended to and the default position of a token is
        the number of real tokens before it, so right-padded prompts decode like unpadded ones.
        """
        b, s = input_ids.shape
        past = cache.length if cache is not None else 0
        device = input_ids.device
        if attention_mask is not None and attention_mask.shape != (b, past + s):
            raise ValueError(f"attention_mask must be [{b}, {past + s}], got {list(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = (past + torch.arange(s, device=device))[None].expand(b, s)
            else:
                position_ids = (attention_mask.to(device).long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, s)
        allowed = attention_allowed(past, s, attention_mask, device)
        return self.lm_head(self.model(input_ids, position_ids, allowed, cache))
