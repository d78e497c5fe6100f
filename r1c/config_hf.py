"""Reading and writing HF `config.json` dicts for `r1c.config.ModelConfig`.

The architecture is read from `architectures` (DeepseekV3ForCausalLM, DeepseekV2ForCausalLM) whatever the
`model_type` (`deepseek_v3`, `kimi_k2`, ...); `model_type` decides only when `architectures` is absent. A field the
file leaves out takes transformers' default for that architecture (`DeepseekV3Config` / `DeepseekV2Config`), so
r1c and transformers read the same file the same way; the tensor sizes are required. Fields outside ModelConfig
that would change transformers' math (`attention_bias`, `mlp_bias`, ...) and every `quantization_config` but FP8
block-128 are refused with one line naming the field and its value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

from r1c.config import GROUPED_METHODS, V2_ARCHITECTURE, V3_ARCHITECTURE
from r1c.errors import ConfigError

if TYPE_CHECKING:
    from r1c.config import ModelConfig

MODEL_TYPES = {V3_ARCHITECTURE: "deepseek_v3", V2_ARCHITECTURE: "deepseek_v2"}
# Only consulted when a config has no `architectures`: the model types known to ship one of the two.
ARCHITECTURE_OF_MODEL_TYPE = {"deepseek_v3": V3_ARCHITECTURE, "kimi_k2": V3_ARCHITECTURE,
                              "deepseek_v2": V2_ARCHITECTURE}

# transformers' config-class defaults (configuration_deepseek_v3.py / _v2.py, transformers 5) for the fields a
# config.json may leave out. DeepSeek's V2 files carry `scoring_func`; transformers' V2 always uses softmax.
DEFAULTS: dict[str, dict[str, Any]] = {
    V3_ARCHITECTURE: dict(n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                          norm_topk_prob=True, first_k_dense_replace=3, rms_norm_eps=1e-6, rope_interleave=True,
                          max_position_embeddings=4096, scoring_func="sigmoid", topk_method="noaux_tc",
                          hidden_act="silu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
    V2_ARCHITECTURE: dict(n_shared_experts=2, n_group=None, topk_group=None, routed_scaling_factor=1.0,
                          norm_topk_prob=False, first_k_dense_replace=0, rms_norm_eps=1e-6, rope_interleave=True,
                          max_position_embeddings=2048, scoring_func="softmax", topk_method="greedy",
                          hidden_act="silu", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                 "n_routed_experts", "num_experts_per_tok")

# Fields outside ModelConfig that change transformers' (or DeepSeek's) math: the values r1c computes exactly.
# `num_key_value_heads` must equal num_attention_heads (MLA expands one latent to every head).
FOREIGN_FIELDS: dict[str, tuple[Any, ...]] = {
    "attention_bias": (False, None),  # biases on q_a_proj / kv_a_proj_with_mqa / o_proj
    "mlp_bias": (False, None),  # biases on the V2 MLPs
    "moe_layer_freq": (1, None),  # DeepSeek's code: MoE only every k-th layer; transformers ignores it
    "partial_rotary_factor": (1, 1.0, None),  # RoPE on a fraction of qk_rope_head_dim
    "pretraining_tp": (1, None),  # tensor-parallel slicing of the linear layers in some remote code
}

# quantization_config.quant_method: the one r1c reads, and what the others are (for the refusal's wording).
FP8_METHOD = "fp8"
FP8_KEYS = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt", "modules_to_not_convert",
            "ignored_layers", "dequantize"}
KNOWN_QUANT_METHODS = {
    "compressed-tensors": "compressed-tensors (e.g. INT4 `weight_packed`/`weight_scale` experts)",
    "modelopt": "NVIDIA ModelOpt (e.g. NVFP4)", "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes",
    "fbgemm_fp8": "FBGEMM per-channel FP8", "mxfp4": "MXFP4", "hqq": "HQQ", "torchao": "torchao", "quark": "Quark",
    "eetq": "EETQ", "gguf": "GGUF", "fp_quant": "FP-Quant", "auto-round": "AutoRound", "bitnet": "BitNet",
}
SUPPORTED_QUANTIZATION = "FP8 e4m3 with 128x128 block scales (quant_method 'fp8', DeepSeek's release format)"


def check_quantization_config(qc: Any) -> None:
    """ConfigError (one line naming quant_method or the key) unless `qc` is None or DeepSeek's FP8 block-128."""
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise ConfigError(f"config: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method != FP8_METHOD:
        what = KNOWN_QUANT_METHODS.get(str(method), "a method r1c does not know")
        raise ConfigError(f"config: quantization_config.quant_method {method!r} ({what}) is not supported; r1c "
                          f"reads {SUPPORTED_QUANTIZATION} or unquantized bf16/fp16/fp32 weights")
    unknown = sorted(set(qc) - FP8_KEYS)
    if unknown:
        raise ConfigError(f"config: quantization_config key {unknown[0]!r} (value {qc[unknown[0]]!r}) is not "
                          f"supported; r1c reads {SUPPORTED_QUANTIZATION}")
    checks = {"fmt": ("e4m3", None), "activation_scheme": ("dynamic", None), "scale_fmt": ("ue8m0", "fp32", None),
              "dequantize": (False, None)}
    for key, allowed in checks.items():
        if qc.get(key) not in allowed:
            raise ConfigError(f"config: quantization_config.{key} {qc.get(key)!r} is not supported (r1c reads "
                              f"{' or '.join(repr(a) for a in allowed if a is not None)})")
    block = qc.get("weight_block_size", [128, 128])
    if list(block or []) != [128, 128]:
        raise ConfigError(f"config: quantization_config.weight_block_size {block!r} is not supported (r1c reads "
                          "[128, 128] block scales)")


# ---- typed field readers: one line naming the field on a wrong type --------------------------------------
_MISSING = object()


def _value(d: dict[str, Any], key: str, default: Any) -> Any:
    if key in d:
        return d[key]
    if default is _MISSING:
        raise ConfigError(f"config: missing required field {key!r}")
    return default


def _int(d: dict[str, Any], key: str, default: Any = _MISSING, nullable: bool = False) -> Any:
    v = _value(d, key, default)
    if v is None and nullable:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"config: {key} must be an integer{' or null' if nullable else ''}, got {v!r}")
    return v


def _float(d: dict[str, Any], key: str, default: Any = _MISSING) -> float:
    v = _value(d, key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"config: {key} must be a finite number, got {v!r}")
    return float(v)


def _bool(d: dict[str, Any], key: str, default: Any = _MISSING) -> bool:
    v = _value(d, key, default)
    if v not in (True, False):  # also 0 / 1
        raise ConfigError(f"config: {key} must be true or false, got {v!r}")
    return bool(v)


def _str(d: dict[str, Any], key: str, default: Any = _MISSING) -> str:
    v = _value(d, key, default)
    if not isinstance(v, str):
        raise ConfigError(f"config: {key} must be a string, got {v!r}")
    return v


def _token(d: dict[str, Any], key: str, default: Any) -> int | None:
    v = _value(d, key, default)
    if isinstance(v, list):  # several EOS ids: the first one ends generation
        v = v[0] if v else None
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise ConfigError(f"config: {key} must be an integer, a list of integers or null, got {v!r}")
    return v


# ---- reading ------------------------------------------------------------------------------------------
def architecture_of(d: dict[str, Any]) -> str:
    archs = d.get("architectures")
    model_type = d.get("model_type")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"config: architectures must be a list of names, got {archs!r}")
    supported = ", ".join(MODEL_TYPES)
    if archs:
        for arch in archs:
            if arch in MODEL_TYPES:
                return arch
        raise ConfigError(f"config: architecture {archs[0]!r} is not supported (r1c reads {supported}, under any "
                          "model_type)")
    if model_type is None:
        if {"dim", "n_layers"} <= set(d):
            raise ConfigError("config: this is DeepSeek's reference-inference ModelArgs (dim, n_layers, ...), not a "
                              "Hugging Face config.json; r1c reads the Hugging Face checkpoint (config.json with "
                              "architectures DeepseekV3ForCausalLM + model*.safetensors)")
        raise ConfigError("config: neither 'architectures' nor 'model_type' is set")
    if model_type not in ARCHITECTURE_OF_MODEL_TYPE:
        raise ConfigError(f"config: model_type {model_type!r} without 'architectures' is not supported (set "
                          f"architectures to one of {supported})")
    return ARCHITECTURE_OF_MODEL_TYPE[model_type]


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the YaRN block or None) the way transformers standardizes them (`convert_rope_params_to_dict`):
    `rope_scaling` before `rope_parameters`; `rope_type` before `type`; the block's rope_theta before the top level."""
    block = d.get("rope_scaling") or d.get("rope_parameters")
    if block is not None and not isinstance(block, dict):
        raise ConfigError(f"config: rope_scaling must be an object or null, got {block!r}")
    block = dict(block or {})
    theta = block.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ConfigError(f"config: rope_theta must be a number, got {theta!r}")
    kind = block.pop("rope_type", None) or block.pop("type", None) or "default"
    block.pop("type", None)
    partial = block.pop("partial_rotary_factor", None)
    if partial not in FOREIGN_FIELDS["partial_rotary_factor"]:
        raise ConfigError(f"config: rope_scaling.partial_rotary_factor {partial!r} is not supported (r1c rotates "
                          "all qk_rope_head_dim channels)")
    if kind == "default":
        if block:
            raise ConfigError(f"config: rope_scaling key {sorted(block)[0]!r} needs a rope type (none given)")
        return float(theta), None
    if kind == "yarn":
        if "factor" not in block:
            raise ConfigError("config: rope_scaling (yarn) has no 'factor'")
        original = block.get("original_max_position_embeddings")
        if isinstance(original, float) and original.is_integer():
            block["original_max_position_embeddings"] = int(original)
        top = d.get("original_max_position_embeddings")
        if top is not None and top != block.get("original_max_position_embeddings", top):
            raise ConfigError(f"config: original_max_position_embeddings {top!r} disagrees with rope_scaling's "
                              f"{block['original_max_position_embeddings']!r}")
        if top is not None:
            block["original_max_position_embeddings"] = top
    return float(theta), {**block, "type": kind}


def _check_foreign(d: dict[str, Any], arch: str) -> None:
    for key, allowed in FOREIGN_FIELDS.items():
        if key in d and d[key] not in allowed:
            raise ConfigError(f"config: {key} {json.dumps(d[key])} is not supported (r1c computes {arch} with "
                              f"{key} {json.dumps(allowed[0])})")
    heads, kv_heads = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        raise ConfigError(f"config: num_key_value_heads {kv_heads!r} differs from num_attention_heads {heads!r} "
                          "(MLA gives every head its own key and value from one latent)")


def config_from_hf_dict(cls: type[ModelConfig], d: dict[str, Any]) -> ModelConfig:
    check_quantization_config(d.get("quantization_config"))  # first: a quantized file fails for this reason
    arch = architecture_of(d)
    _check_foreign(d, arch)
    default = DEFAULTS[arch]
    sizes = {key: _int(d, key) for key in REQUIRED_INTS}
    topk_method = _str(d, "topk_method", default["topk_method"])
    grouped = topk_method in GROUPED_METHODS
    groups = {}
    for key in ("n_group", "topk_group"):
        v = _int(d, key, default[key], nullable=True)
        if v is None:
            if grouped:
                raise ConfigError(f"config: {key} is null, but topk_method {topk_method!r} routes by groups")
            v = 1  # greedy routing has no groups
        groups[key] = v
    rope_theta, rope_scaling = _rope(d)
    return cls(
        **sizes,
        q_lora_rank=_int(d, "q_lora_rank", nullable=True),
        n_shared_experts=_int(d, "n_shared_experts", default["n_shared_experts"]),
        **groups,
        routed_scaling_factor=_float(d, "routed_scaling_factor", default["routed_scaling_factor"]),
        norm_topk_prob=_bool(d, "norm_topk_prob", default["norm_topk_prob"]),
        first_k_dense_replace=_int(d, "first_k_dense_replace", default["first_k_dense_replace"]),
        rms_norm_eps=_float(d, "rms_norm_eps", default["rms_norm_eps"]),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rope_interleave=_bool(d, "rope_interleave", default["rope_interleave"]),
        max_position_embeddings=_int(d, "max_position_embeddings", default["max_position_embeddings"]),
        scoring_func=_str(d, "scoring_func", default["scoring_func"]),
        topk_method=topk_method,
        hidden_act=_str(d, "hidden_act", default["hidden_act"]),
        tie_word_embeddings=_bool(d, "tie_word_embeddings", default["tie_word_embeddings"]),
        bos_token_id=_token(d, "bos_token_id", default["bos_token_id"]),
        eos_token_id=_token(d, "eos_token_id", default["eos_token_id"]),
        quantization_config=d.get("quantization_config"),
        architecture=arch,
    )


# ---- writing ------------------------------------------------------------------------------------------
def config_to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """A config.json that r1c and transformers' config class of the architecture both read the same way."""
    d: dict[str, Any] = {
        "architectures": [config.architecture],
        "model_type": MODEL_TYPES[config.architecture],
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
    }
    del d["architecture"], d["rope_scaling"]
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling:
        rope.update({k: v for k, v in config.rope_scaling.items() if k != "type"})
        rope["rope_type"] = config.rope_scaling["type"]
    d["rope_parameters"] = rope
    d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} if config.rope_scaling else None
    d["num_key_value_heads"] = config.num_attention_heads
    if d["quantization_config"] is None:
        d.pop("quantization_config")
    return d
