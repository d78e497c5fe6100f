"""The conformance matrix: ONE table of config.json files (as checkpoints of the family ship them, shrunk) and the
helpers that run each through r1c and through transformers on the same weights. tests/test_conformance.py runs it.

Every case is a base config.json plus overrides. What a case varies is not written by hand: it is the set of
ModelConfig fields (and YaRN keys) on which the parsed case differs from the parsed base, so the coverage test
cannot be satisfied by a label. Each case also names mutations: changes of the config (or of transformers' model)
that must move transformers' logits by more than 10x the tolerance on these inputs — the proof that a wrong eps,
rotation or routing rule would show. Activations are scaled for that: embeddings and MLA's compressed latents
(q_a_proj, kv_a_proj_with_mqa's latent rows) have RMS ~0.03, where eps 1e-5 vs 1e-6 moves a norm by ~0.5%.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from r1c.config import V2_ARCHITECTURE, V3_ARCHITECTURE, YARN_KEYS, ModelConfig
from r1c.exporter.checkpoint import SCALE_SUFFIX, random_checkpoint
from r1c.plugins.fp8 import FP8_MAX, block_shape, dequantize, expand_scale

RTOL = 1e-4  # max |ours - transformers| <= RTOL * max |transformers| (float32 logits)
SENSITIVITY = 10 * RTOL  # a mutation must move transformers' logits by more than this
SMALL_RMS = 0.03  # embeddings and MLA latents: where the norms' eps matters

BASE_V3: dict[str, Any] = {
    "architectures": [V3_ARCHITECTURE], "model_type": "deepseek_v3",
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 48, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "first_k_dense_replace": 1, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 512,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_interleave": True, "bos_token_id": 0, "eos_token_id": 1,
}
# DeepSeek-V2-Lite's config.json, shrunk (softmax greedy routing, no q_lora, 2 shared experts, YaRN mscale 0.707)
BASE_V2_LITE: dict[str, Any] = {
    **{k: v for k, v in BASE_V3.items() if k not in ("rope_interleave", "rope_scaling")},
    "architectures": [V2_ARCHITECTURE], "model_type": "deepseek_v2", "q_lora_rank": None,
    "n_shared_experts": 2, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
    "scoring_func": "softmax", "topk_method": "greedy", "bos_token_id": 1, "eos_token_id": 2,
    "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}


def _mla_eps(eps: float) -> Callable[[torch.nn.Module], None]:
    """A mutation of transformers' model: MLA's q_a/kv_a norms at `eps` (what a lowering using the config eps did)."""

    def mutate(model: torch.nn.Module) -> None:
        for name, module in model.named_modules():
            if name.endswith(("q_a_layernorm", "kv_a_layernorm")):
                module.variance_epsilon = eps

    return mutate


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    overrides: dict[str, Any]
    base: dict[str, Any] = dataclasses.field(default_factory=lambda: BASE_V3)
    # name -> config.json overrides for transformers, or a function that mutates transformers' model in place
    mutations: dict[str, dict[str, Any] | Callable[[torch.nn.Module], None]] = dataclasses.field(default_factory=dict)
    fp8: bool = False  # DeepSeek's release form: FP8 e4m3 weights, per-expert, 128x128 block scales

    def config_json(self) -> dict[str, Any]:
        d = copy.deepcopy(self.base)
        for key, value in self.overrides.items():
            if value is _DELETE:
                d.pop(key, None)
            else:
                d[key] = copy.deepcopy(value)
        return d


_DELETE = object()
_YARN = BASE_V3["rope_scaling"]

CASES: list[Case] = [
    Case("base_v3", {}, mutations={"no YaRN": {"rope_scaling": None}, "n_group 1": {"n_group": 1, "topk_group": 1},
                                   "norm_topk_prob false": {"norm_topk_prob": False}}),
    Case("sizes", {"vocab_size": 300, "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 24,
                   "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 40,
                   "kv_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 24, "v_head_dim": 20,
                   "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}),
    Case("rms_norm_eps_1e-5", {"rms_norm_eps": 1e-5},  # Moonlight-16B-A3B ships 1e-5
         mutations={"decoder norms at 1e-6": {"rms_norm_eps": 1e-6}, "MLA norms at the config eps": _mla_eps(1e-5)}),
    Case("rope_interleave_false", {"rope_interleave": False}, mutations={"interleaved": {"rope_interleave": True}}),
    Case("rope_plain", {"rope_scaling": None, "rope_theta": 50000.0},
         mutations={"rope_theta 10000": {"rope_theta": 10000.0}}),
    Case("yarn_minimal", {"rope_scaling": {"type": "yarn", "factor": 4.0}, "max_position_embeddings": 64},
         mutations={"original from 4096": {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 4096}}}),
    Case("yarn_mscale", {"rope_scaling": {**_YARN, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0}},
         mutations={"mscale 1": {"rope_scaling": {**_YARN, "factor": 40.0, "mscale_all_dim": 1.0}},
                    "no mscale_all_dim": {"rope_scaling": {**_YARN, "factor": 40.0, "mscale": 0.707,
                                                           "mscale_all_dim": 0}}}),
    Case("yarn_attention_factor_betas_truncate",
         {"rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                           "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}},
         mutations={"attention_factor 1": {"rope_scaling": {"type": "yarn", "factor": 8.0,
                                                            "original_max_position_embeddings": 32,
                                                            "attention_factor": 1.0, "beta_fast": 16.0,
                                                            "beta_slow": 2.0, "truncate": False}}}),
    Case("no_q_lora", {"q_lora_rank": None}),
    Case("v_head_dim_ne_nope", {"v_head_dim": 24, "qk_nope_head_dim": 8}),
    # Kimi-K2: DeepseekV3ForCausalLM under its own model_type, one group
    Case("kimi_k2_one_group", {"model_type": "kimi_k2", "n_routed_experts": 24, "n_group": 1, "topk_group": 1,
                               "num_experts_per_tok": 6, "routed_scaling_factor": 2.827},
         mutations={"4 groups": {"n_group": 4, "topk_group": 2}}),
    Case("top_k_fills_kept_groups", {"num_experts_per_tok": 8}),  # E / n_group * topk_group
    # n_group == E: every group one expert (group_limited_greedy then chooses what greedy would: no mutation shows)
    Case("v2_one_expert_per_group", {"topk_method": "group_limited_greedy", "n_routed_experts": 8, "n_group": 8,
                                     "topk_group": 4, "num_experts_per_tok": 3}, base=BASE_V2_LITE),
    Case("all_groups_kept", {"topk_group": 4}, mutations={"topk_group 1": {"topk_group": 1}}),
    Case("no_norm_scaled", {"norm_topk_prob": False, "routed_scaling_factor": 1.7},
         mutations={"norm_topk_prob true": {"norm_topk_prob": True},
                    "routed_scaling_factor 1": {"routed_scaling_factor": 1.0}}),
    Case("all_moe_no_shared", {"first_k_dense_replace": 0, "n_shared_experts": 0}),
    Case("two_shared", {"n_shared_experts": 2}),
    Case("tied_embeddings", {"tie_word_embeddings": True}),
    Case("v2_lite_greedy", {}, base=BASE_V2_LITE,
         mutations={"mscale_all_dim 0": {"rope_scaling": {**BASE_V2_LITE["rope_scaling"], "mscale_all_dim": 0}}}),
    Case("v2_group_limited_greedy", {"q_lora_rank": 48, "topk_method": "group_limited_greedy", "n_group": 4,
                                     "topk_group": 2, "routed_scaling_factor": 16.0}, base=BASE_V2_LITE,
         mutations={"greedy": {"topk_method": "greedy"}}),
    Case("v2_defaults", {"n_shared_experts": _DELETE, "routed_scaling_factor": _DELETE, "norm_topk_prob": _DELETE,
                         "topk_method": _DELETE, "first_k_dense_replace": _DELETE, "n_group": _DELETE,
                         "topk_group": _DELETE}, base=BASE_V2_LITE),  # transformers' DeepseekV2Config defaults
    # DeepSeek's release form, moe_intermediate_size 96: every expert's gate and up end in a partial 128-block;
    # scales as powers of two (scale_fmt ue8m0), the experts' stored as float8_e8m0fnu
    Case("fp8_partial_blocks_ue8m0", {"moe_intermediate_size": 96,
                                      "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                              "activation_scheme": "dynamic",
                                                              "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}},
         fp8=True),
]

# Values refused when the config is read: (config.json overrides, base, what the one-line message must contain).
REFUSED: dict[str, list[tuple[dict[str, Any], dict[str, Any], str]]] = {
    "hidden_act": [({"hidden_act": "gelu"}, BASE_V3, "hidden_act 'gelu'")],
    "topk_method": [({"topk_method": "greedy"}, BASE_V3, "topk_method 'greedy'"),
                    ({"topk_method": "noaux_tc"}, BASE_V2_LITE, "topk_method 'noaux_tc'"),
                    ({"topk_method": "top_p"}, BASE_V3, "topk_method 'top_p'")],
    "scoring_func": [({"scoring_func": "softmax"}, BASE_V3, "scoring_func 'softmax'"),
                     ({"scoring_func": "sigmoid"}, BASE_V2_LITE, "scoring_func 'sigmoid'")],
    "norm_topk_prob": [({"norm_topk_prob": True}, BASE_V2_LITE, "norm_topk_prob true with topk_method 'greedy'")],
    "rope_interleave": [({"rope_interleave": False}, BASE_V2_LITE, "rope_interleave false")],
    "max_position_embeddings": [({"max_position_embeddings": 0}, BASE_V3, "max_position_embeddings must be "
                                 "positive, got 0")],
    "rms_norm_eps": [({"rms_norm_eps": 0.0}, BASE_V3, "rms_norm_eps must be positive, got 0.0")],
    "rope_theta": [({"rope_theta": 0.5}, BASE_V3, "rope_theta must be > 1, got 0.5")],
    "rope_scaling": [({"rope_scaling": {"type": "linear", "factor": 2.0}}, BASE_V3, "rope_scaling type 'linear'"),
                     ({"rope_scaling": {"type": "yarn"}}, BASE_V3, "rope_scaling (yarn) has no 'factor'"),
                     ({"rope_scaling": {"type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}}, BASE_V3,
                      "rope_scaling key 'low_freq_factor'"),
                     ({"rope_scaling": {**_YARN, "partial_rotary_factor": 0.5}}, BASE_V3,
                      "partial_rotary_factor 0.5")],
    "n_group": [({"n_group": None}, BASE_V3, "n_group is null"), ({"n_group": 3}, BASE_V3, "must divide into n_group"),
                ({"n_group": 16, "topk_group": 8}, BASE_V3, "n_group 16 leaves one expert per group")],
    "topk_group": [({"topk_group": 5}, BASE_V3, "topk_group must be in [1, n_group=4], got 5")],
    "num_experts_per_tok": [({"num_experts_per_tok": 9}, BASE_V3, "num_experts_per_tok must be in [1, 8]")],
    "routed_scaling_factor": [({"routed_scaling_factor": 0}, BASE_V3, "routed_scaling_factor must be positive")],
    "first_k_dense_replace": [({"first_k_dense_replace": 3}, BASE_V3, "first_k_dense_replace must be in [0, "
                               "num_hidden_layers=2], got 3")],
    "q_lora_rank": [({"q_lora_rank": _DELETE}, BASE_V3, "missing required field 'q_lora_rank'")],
    "quantization_config": [
        ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"}}, BASE_V3,
         "quant_method 'compressed-tensors'"),
        ({"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}}, BASE_V3,
         "quant_method 'modelopt'"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, BASE_V3, "quant_method 'gptq'"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, BASE_V3, "quant_method 'awq'"),
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, BASE_V3,
         "quant_method 'bitsandbytes'"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [1, 128]}}, BASE_V3,
         "weight_block_size [1, 128]"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, BASE_V3, "quantization_config.fmt 'e5m2'"),
    ],
    "architecture": [({"architectures": ["DeepseekV32ForCausalLM"]}, BASE_V3, "architecture 'DeepseekV32ForCausalLM'"),
                     ({"architectures": _DELETE, "model_type": "llama"}, BASE_V3, "model_type 'llama'")],
    # fields outside ModelConfig that change transformers' math
    "attention_bias": [({"attention_bias": True}, BASE_V3, "attention_bias true")],
    "mlp_bias": [({"mlp_bias": True}, BASE_V2_LITE, "mlp_bias true")],
    "num_key_value_heads": [({"num_key_value_heads": 2}, BASE_V3, "num_key_value_heads 2")],
    "moe_layer_freq": [({"moe_layer_freq": 2}, BASE_V3, "moe_layer_freq 2")],
}
# Fields that do not change the logits (and why).
NOT_MATH = {
    "bos_token_id": "generation only: the token a prompt may start with",
    "eos_token_id": "generation only: where generation stops",
}


def parse(d: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_hf_dict(d)


def varied(case: Case) -> set[str]:
    """The ModelConfig fields (and `rope_scaling.<key>`) on which the case differs from the V3 base."""
    base, got = parse(BASE_V3), parse(case.config_json())
    out = {f.name for f in dataclasses.fields(ModelConfig) if getattr(base, f.name) != getattr(got, f.name)}
    if got.rope_scaling is not None:
        before = base.rope_scaling or {}
        out |= {f"rope_scaling.{k}" for k in YARN_KEYS if k in got.rope_scaling
                and got.rope_scaling.get(k) != before.get(k)}
    return out


# ---- weights --------------------------------------------------------------------------------------------
def weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights (r1c's `random_checkpoint`), scaled so that embeddings and MLA latents are small."""
    t = random_checkpoint(config, seed=seed)
    t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] * SMALL_RMS
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        if config.q_lora_rank is not None:
            t[p + "q_a_proj.weight"] = t[p + "q_a_proj.weight"] * SMALL_RMS
        kv = t[p + "kv_a_proj_with_mqa.weight"].clone()
        kv[: config.kv_lora_rank] *= SMALL_RMS
        t[p + "kv_a_proj_with_mqa.weight"] = kv
    return t


def _quantize_ue8m0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 with 128x128 block scales rounded up to powers of two (DeepSeek's scale_fmt ue8m0)."""
    rows, cols = w.shape[-2], w.shape[-1]
    br, bc = block_shape(rows, cols)
    pad = torch.zeros(br * 128, bc * 128)
    pad[:rows, :cols] = w
    amax = pad.reshape(br, 128, bc, 128).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (w / expand_scale(scale, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def release_fp8(config: ModelConfig, t: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                           dict[str, torch.Tensor]]:
    """(the per-expert FP8 file's tensors, the dequantized float32 tensors in transformers' fused names)."""
    file: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    inter = config.moe_intermediate_size
    for name, w in t.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            down = t[prefix + ".down_proj"]
            deq13, deq2 = [], []
            for e in range(w.shape[0]):
                parts = {"gate_proj": w[e, :inter], "up_proj": w[e, inter:], "down_proj": down[e]}
                for proj, part in parts.items():
                    q, s = _quantize_ue8m0(part)
                    file[f"{prefix}.{e}.{proj}.weight"] = q
                    file[f"{prefix}.{e}.{proj}.weight{SCALE_SUFFIX}"] = s.to(torch.float8_e8m0fnu)
                    parts[proj] = dequantize(q, s)
                deq13.append(torch.cat([parts["gate_proj"], parts["up_proj"]]))
                deq2.append(parts["down_proj"])
            ref[name], ref[prefix + ".down_proj"] = torch.stack(deq13), torch.stack(deq2)
        elif name.endswith("mlp.experts.down_proj"):
            continue
        elif name.endswith("_proj.weight") or name.endswith("_with_mqa.weight"):
            q, s = _quantize_ue8m0(w)
            file[name], file[name + SCALE_SUFFIX] = q, s
            ref[name] = dequantize(q, s)
        else:
            file[name] = ref[name] = w
    return file, ref


def write_checkpoint(root: Path, config_json: dict[str, Any], file_tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint directory holding the config.json as shipped and the tensors in DeepSeek's per-expert names."""
    from r1c.exporter.checkpoint import _per_expert

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config_json, indent=2))
    tensors = file_tensors
    if not any(".mlp.experts.0." in n for n in tensors):
        tensors = _per_expert(parse(config_json), tensors)
    save_file({n: t.contiguous().clone() for n, t in tensors.items()}, str(root / "model.safetensors"))
    return root


# ---- transformers --------------------------------------------------------------------------------------
def transformers_model(config_json: dict[str, Any], state: dict[str, torch.Tensor],
                       mutate: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """transformers' DeepseekV3/V2ForCausalLM built from the same config.json, holding `state` (float32)."""
    import transformers

    d = {k: v for k, v in config_json.items() if k not in ("architectures", "quantization_config")}
    v2 = config_json["architectures"][0] == V2_ARCHITECTURE
    cfg = (transformers.DeepseekV2Config if v2 else transformers.DeepseekV3Config)(**d)
    model = (transformers.DeepseekV2ForCausalLM if v2 else transformers.DeepseekV3ForCausalLM)(cfg).eval()
    state = dict(state)
    for name, p in model.state_dict().items():  # transformers builds a zero-width shared expert for 0 of them
        if p.numel() == 0:
            state.setdefault(name, p)
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if mutate is not None:
        mutate(model)
    return model


def transformers_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`, decoded through transformers' own cache."""
    out: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = model(torch.tensor([[out[-1]]]), cache=step.cache, use_cache=True)
    return out


def decode_logits(engine: Any, prompts: list[list[int]], prefill: int) -> np.ndarray:
    """Logits [B, S - prefill, V] of equal-length `prompts` [B, S] at positions prefill .. S-1, each computed by a
    decode step (one token a row, the cache holding the tokens before it) after a prefill of the first `prefill`:
    the runtime's decode path (the native decoder where the bundle has one), teacher-forced."""
    ids = np.asarray(prompts, dtype=np.int64)
    batch, total = ids.shape
    runner = engine._runner(batch, total, batch * prefill, 16)
    for _ in range(batch):
        runner.cache.add_row()
    runner.cache.resize(prefill)
    runner.step(ids[:, :prefill], 0, np.full(batch, prefill, np.int64))
    ones, out = np.ones(batch, np.int64), []
    for t in range(prefill, total):
        runner.cache.resize(t + 1)
        out.append(np.array(runner.step(np.ascontiguousarray(ids[:, t:t + 1]), 0, ones)[:, 0]))
    return np.stack(out, axis=1)


def rel_err(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
