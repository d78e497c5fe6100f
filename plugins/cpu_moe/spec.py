"""The definitions of r1c's CPU kernels (ONNX Runtime custom ops, domain `r1c.cpu`): `MoE` (SPEC, below), `Linear`
(LINEAR_SPEC, further down), the packed weight layout both read, and `MLAAttention` / `MLAAttentionInt8`
(ATTENTION_SPEC, ATTENTION_INT8_SPEC, at the end).

`MoE` takes the inputs and computes the function of ONNX Runtime's `com.microsoft.MoE` in the one form r1c's
lowering emits (passes/lower_moe_to_ort.py: interleaved SwiGLU, silu, no biases), so that a pass can swap one for
the other (passes/use_cpu_moe_kernel.py). The kernel is `moe_cpu.cc` beside this file (its header comment has the
formulas); `library.py` builds the library.

Inputs (float32): input [.., H]; router_probs [T, E] (T = the product of input's leading dims); the expert weights
in the kernel's packed layout (`pack_experts`, applied once by the pass): fc1_packed [E, P1, H, 32] from
`com.microsoft.MoE`'s fc1_experts_weights [E, 2I, H] (rows gate 0, up 0, gate 1, up 1, ...), fc2_packed
[E, ceil(H / 32), 16 P1, 32] from fc2_experts_weights [E, H, I]. Output: output, input's shape.
Attributes: k (experts per token: the k largest router_probs, ties to the higher expert index as in ORT's MoE),
normalize_routing_weights (1: softmax over the k chosen probs; 0: softmax over all E, taken at the k chosen).
Legend: T tokens, H hidden, E experts, I expert intermediate size, P1 = ceil(I / 16) fc1 panels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from r1c.plugins import OpSpec

CPU_DOMAIN = "r1c.cpu"

SPEC = OpSpec(
    name="MoE",
    inputs=("input", "router_probs", "fc1_packed", "fc2_packed"),
    optional_inputs=(),
    outputs=("output",),
    attributes={"k": 1, "normalize_routing_weights": 1},
    domain=CPU_DOMAIN,
)

PANEL = 32  # weight rows per packed panel (panels.h kPanel)

# `r1c.cpu::Linear`: y [.., N] = input [.., K] @ W [K, N] float32, W a constant stored packed (`pack_linear`):
# weight_packed [ceil(N / 32), K, 32]; attribute n = N. The kernel is linear_cpu.cc; passes/use_cpu_linear_kernel.py
# swaps it in for ONNX MatMul nodes whose second input is such a constant.
LINEAR_SPEC = OpSpec(
    name="Linear",
    inputs=("input", "weight_packed"),
    optional_inputs=(),
    outputs=("output",),
    attributes={"n": 1},
    domain=CPU_DOMAIN,
)


def pack_linear(w: np.ndarray) -> np.ndarray:
    """A MatMul's constant [K, N] -> [ceil(N / 32), K, 32] float32 (panel p = columns 32p .. 32p + 31 for each input
    index, zero past N), C-contiguous."""
    k, n = w.shape
    p = -(-n // PANEL)
    padded = np.zeros((k, p * PANEL), np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, p, PANEL).transpose(1, 0, 2))


def pack_experts(fc1: np.ndarray, fc2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`com.microsoft.MoE`'s interleaved SwiGLU weights in the kernel's packed layout (moe_cpu.cc's header):
    (`pack_fc1(fc1)`, `pack_fc2(fc2)`). Raises ValueError when fc1 [E, 2I, H] and fc2 [E, H, I] disagree."""
    e, two_i, hidden = fc1.shape
    if two_i % 2 or fc2.shape != (e, hidden, two_i // 2):
        raise ValueError(f"pack_experts: fc1 [E, 2I, H] and fc2 [E, H, I] disagree: {fc1.shape}, {fc2.shape}")
    return pack_fc1(fc1), pack_fc2(fc2)


def packed_shape(which: str, shape: Sequence[int]) -> tuple[int, int, int, int]:
    """The packed shape of `which` ("fc1": [E, 2I, H] -> [E, P1, H, 32]; "fc2": [E, H, I] -> [E, P2, 16 P1, 32])."""
    half = PANEL // 2
    if which == "fc1":
        e, two_i, hidden = shape
        return e, -(-(two_i // 2) // half), hidden, PANEL
    e, hidden, inter = shape
    return e, -(-hidden // PANEL), -(-inter // half) * half, PANEL


def pack_fc1(fc1: np.ndarray) -> np.ndarray:
    """fc1 [E, 2I, H] (rows gate 0, up 0, gate 1, ...) -> [E, P1, H, 32] float32, P1 = ceil(I / 16): panel p holds,
    for each input index, the gates of intermediates 16p .. 16p + 15, then their up weights; zero past I."""
    e, p1, hidden, _ = packed_shape("fc1", fc1.shape)
    inter, half = fc1.shape[1] // 2, PANEL // 2
    gate = np.zeros((e, p1 * half, hidden), np.float32)
    up = np.zeros_like(gate)
    gate[:, :inter], up[:, :inter] = fc1[:, 0::2], fc1[:, 1::2]
    rows = np.concatenate([gate.reshape(e, p1, half, hidden), up.reshape(e, p1, half, hidden)], axis=2)
    return np.ascontiguousarray(rows.transpose(0, 1, 3, 2))


def pack_fc2(fc2: np.ndarray) -> np.ndarray:
    """fc2 [E, H, I] -> [E, P2, 16 P1, 32] float32, P2 = ceil(H / 32), P1 = ceil(I / 16): panel q holds output rows
    32q .. 32q + 31 for each intermediate; zero past H and past I."""
    e, p2, i16, _ = packed_shape("fc2", fc2.shape)
    hidden, inter = fc2.shape[1:]
    down = np.zeros((e, p2 * PANEL, i16), np.float32)
    down[:, :hidden, :inter] = fc2
    return np.ascontiguousarray(down.reshape(e, p2, PANEL, i16).transpose(0, 1, 3, 2))


# `r1c.cpu::MLAAttention`: one layer's absorbed multi-head latent attention (DeepSeek-V2 paper, section 2.1; the
# export's form, r1c/exporter/onnx_export.py `_Lowering.attention`), the latent cache read in place. Inputs
# (float32 unless said): q_nope [B, S, N, D]; q_pe (rotated) with B*S*N*R elements in (b, s, n, r) order; c_new
# [B, S, C] (normalized latents of the new tokens); pe_new [B, S, R] (their rotated key); past_c [B, C, P] and
# past_pe [B, R, P] (the cache, latent-major); past_valid and new_valid (bool, [B or 1, S*N or 1, P] and [B or 1,
# S*N or 1, S], rank 3 or less, left-padded with 1s: which cache columns and which new tokens row s*N + n attends
# to); w_uk [N, D, C]; w_uv_t [N, C, Vd].
# Attribute scale (the softmax scale, config.softmax_scale). Output [B, S, N*Vd]: softmax(scale * (q_nope W_UK .
# latents + q_pe . keys_pe), masked with -inf, over P + S) times the latents, times W_UV. The kernel is
# attention_cpu.cc (its header has the formulas); passes/use_cpu_attention_kernel.py swaps it in.
# Legend: B rows, S new tokens, N heads, D qk_nope_head_dim, R qk_rope_head_dim, C kv_lora_rank, P cache columns,
# Vd v_head_dim.
ATTENTION_SPEC = OpSpec(
    name="MLAAttention",
    inputs=("q_nope", "q_pe", "c_new", "pe_new", "past_c", "past_pe", "past_valid", "new_valid", "w_uk", "w_uv_t"),
    optional_inputs=(),
    outputs=("output",),
    attributes={"scale": 1.0},
    domain=CPU_DOMAIN,
)

# `r1c.cpu::MLAAttentionInt8`: the same function and attribute, W_UK and W_UV as int8 with a float32 scale per head and
# output column (r1c/plugins/int_block.py `quantize_columns`, what passes/quantize_weights.py makes of MLA's batched
# absorbed matrices at --precision int8/int4): w_uk = w_uk_q [N, D, C] * w_uk_scale [N, 1, C], w_uv_t = w_uv_t_q
# [N, C, Vd] * w_uv_t_scale [N, 1, Vd]. The kernel widens the int8 values as it reads them (1 byte per weight a
# step); activations stay float32 (ONNX Runtime's DynamicQuantizeMatMul, which it replaces, rounds them to int8).
ATTENTION_INT8_SPEC = OpSpec(
    name="MLAAttentionInt8",
    inputs=(*ATTENTION_SPEC.inputs[:8], "w_uk_q", "w_uk_scale", "w_uv_t_q", "w_uv_t_scale"),
    optional_inputs=(),
    outputs=("output",),
    attributes={"scale": 1.0},
    domain=CPU_DOMAIN,
)

# `r1c.cpu::MLABlock`: one layer's whole MLA attention block in one node (mla_block_cpu.cc's header has the
# formulas; passes/fuse_cpu_mla_block.py swaps it in for the q/kv projections, their norms, the rotary embeddings,
# `MLAAttention` and o_proj). Inputs (float32 unless said): hidden [B, S, H] (the normalized layer input); q_a
# [ceil(QL / 32), H, 32], q_b [ceil(N(D+R) / 32), QL, 32], kv_a [ceil((C+R) / 32), H, 32], o [ceil(H / 32), N*Vd,
# 32] (packed as `pack_linear`; q_b's and kv_a's rope columns as the export leaves them, each head's D nope columns
# then its R rope columns, kv_a's C latent columns then R rope columns); q_norm [QL] and kv_norm [C] (RMSNorm
# weights); position_ids int64 (B*S values, or 1: the first position) and cos_cache / sin_cache [positions, R/2]
# (com.microsoft.RotaryEmbedding's, non-interleaved); past_c, past_pe, past_valid, new_valid, w_uk, w_uv_t as
# `MLAAttention`'s. Outputs: output [B, S, H] (o_proj's), c_new [B, S, C] (the normalized latents), pe_new [B, S, R]
# (the rotated rope key). Attributes: scale (the softmax scale), q_epsilon and kv_epsilon (the two RMSNorms').
# Legend: as ATTENTION_SPEC's, H hidden, QL q_lora_rank.
MLA_BLOCK_SPEC = OpSpec(
    name="MLABlock",
    inputs=("hidden", "q_a", "q_norm", "q_b", "kv_a", "kv_norm", "position_ids", "cos_cache", "sin_cache",
            *ATTENTION_SPEC.inputs[4:], "o"),
    optional_inputs=(),
    outputs=("output", "c_new", "pe_new"),
    attributes={"scale": 1.0, "q_epsilon": 1e-6, "kv_epsilon": 1e-6},
    domain=CPU_DOMAIN,
)
