"""The DeepSeek-V2/V3/R1 model config shared by every stage, read from a HF ``config.json`` or a preset.

Field names follow transformers' ``DeepseekV3Config`` / ``DeepseekV2Config`` so that a ``config.json`` maps one
to one; reading and writing those files (architectures, defaults, refused fields) is `r1c.config_hf`. Every field
that changes the math is honoured by both the PyTorch model (`r1c.exporter.model`) and the ONNX lowering
(`r1c.exporter.onnx_export`); tests/test_conformance.py holds the two equal to transformers field by field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from r1c.errors import ConfigError

V3_ARCHITECTURE = "DeepseekV3ForCausalLM"
V2_ARCHITECTURE = "DeepseekV2ForCausalLM"
SUPPORTED_ARCHITECTURES = (V3_ARCHITECTURE, V2_ARCHITECTURE)

# Routing per architecture (`scoring_func`, `topk_method`). transformers' DeepseekV3TopkRouter always computes
# sigmoid + noaux_tc and DeepSeek's V3 code raises on anything else; DeepseekV2TopkRouter always softmax, with
# greedy or group_limited_greedy. A pair outside these has no reference to be equal to, so it is refused.
ROUTING: dict[str, tuple[tuple[str, str], ...]] = {
    V3_ARCHITECTURE: (("sigmoid", "noaux_tc"),),
    V2_ARCHITECTURE: (("softmax", "greedy"), ("softmax", "group_limited_greedy")),
}
GROUPED_METHODS = ("noaux_tc", "group_limited_greedy")
# Keys a YaRN block may carry (transformers' `_validate_yarn_rope_parameters`), besides its type and rope_theta.
YARN_KEYS = ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # one routed (or shared) expert
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: a plain q_proj (V2-Lite, Moonlight)
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    rms_norm_eps: float = 1e-6  # the decoder norms; MLA's latent norms use 1e-6 always (model.MLA_NORM_EPS)
    rope_theta: float = 10000.0
    # YaRN parameters (`rope_scaling` / `rope_parameters`, type "yarn"); None means plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # FP8 block quantization of the checkpoint, as in `quantization_config`; None for bf16/fp32.
    quantization_config: dict[str, Any] | None = None
    architecture: str = V3_ARCHITECTURE

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:  # the form transformers standardizes to (`standardize_rope_params`)
            rs = dict(self.rope_scaling)
            rs["type"] = rs.pop("rope_type", rs.get("type", "yarn"))
            if rs["type"] == "yarn":
                rs.setdefault("original_max_position_embeddings", self.max_position_embeddings)
            object.__setattr__(self, "rope_scaling", rs)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: MLA's compressed KV plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def has_correction_bias(self) -> bool:
        """noaux_tc routing selects with `e_score_correction_bias`; the V2 methods have none."""
        return self.topk_method == "noaux_tc"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (transformers' yarn_apply_mscale)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def validate(self) -> None:
        """Raises ConfigError (one line naming the field and its value) for a config r1c cannot run exactly."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, f"q_lora_rank must be positive or null, got "
             f"{self.q_lora_rank}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], got "
             f"{self.first_k_dense_replace}")
        if self.first_k_dense_replace:
            need(self.intermediate_size > 0, f"intermediate_size must be positive, got {self.intermediate_size}")
        need(math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0,
             f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(math.isfinite(self.rope_theta) and self.rope_theta > 1, f"rope_theta must be > 1, got {self.rope_theta}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (silu only)")
        need(self.architecture in SUPPORTED_ARCHITECTURES,
             f"architecture {self.architecture!r} is not supported (r1c reads {', '.join(SUPPORTED_ARCHITECTURES)})")
        self._validate_routing(need)
        self._validate_rope(need)
        from r1c.config_hf import check_quantization_config

        check_quantization_config(self.quantization_config)

    def _validate_routing(self, need: Any) -> None:
        pair = (self.scoring_func, self.topk_method)
        allowed = ROUTING[self.architecture]
        need(pair in allowed, f"scoring_func {self.scoring_func!r} with topk_method {self.topk_method!r} is not "
             f"{self.architecture} routing: transformers and DeepSeek's code route it with "
             + " or ".join(f"{s} + {m}" for s, m in allowed) + " whatever the file says, so r1c refuses to guess")
        if self.topk_method != "noaux_tc":
            need(not self.norm_topk_prob, f"norm_topk_prob true with topk_method {self.topk_method!r} is refused: "
                 "DeepSeek's V2 code normalises instead of scaling while transformers ignores the flag")
        if self.architecture == V2_ARCHITECTURE:
            need(self.rope_interleave, "rope_interleave false is not DeepseekV2ForCausalLM (its rotary pairs are "
                 "always interleaved)")
        need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if not self.num_moe_layers:
            return
        need(self.moe_intermediate_size > 0, f"moe_intermediate_size must be positive, got "
             f"{self.moe_intermediate_size}")
        need(self.n_routed_experts > 0, f"n_routed_experts must be positive, got {self.n_routed_experts}")
        need(math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
             f"routed_scaling_factor must be positive, got {self.routed_scaling_factor}")
        kept = self.n_routed_experts
        if self.topk_method in GROUPED_METHODS:
            need(self.n_group > 0 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must divide into n_group ({self.n_group})")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if self.topk_method == "noaux_tc":  # the group score is a top-2 sum (transformers, DeepSeek: topk(2))
                need(self.n_group == 1 or self.n_routed_experts >= 2 * self.n_group,
                     f"n_group {self.n_group} leaves one expert per group, but noaux_tc scores a group by its "
                     "2 best experts")
            kept = self.n_routed_experts // self.n_group * self.topk_group
        need(1 <= self.num_experts_per_tok <= kept,
             f"num_experts_per_tok must be in [1, {kept}] (the experts left after the group mask), got "
             f"{self.num_experts_per_tok}")

    def _validate_rope(self, need: Any) -> None:
        rs = self.rope_scaling
        if rs is None or rs["type"] == "default":
            return
        need(rs["type"] == "yarn", f"rope_scaling type {rs['type']!r} is not supported (yarn or none)")
        unknown = sorted(set(rs) - {"type", *YARN_KEYS})
        need(not unknown, f"rope_scaling key {unknown[0] if unknown else ''!r} is not supported for yarn "
             f"(r1c reads {', '.join(YARN_KEYS)})")
        factor = rs.get("factor")
        need(isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 1,
             f"rope_scaling.factor must be a number >= 1, got {factor!r}")
        original = rs["original_max_position_embeddings"]
        need(isinstance(original, int) and original > 0,
             f"rope_scaling.original_max_position_embeddings must be a positive integer, got {original!r}")
        for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            v = rs.get(key)
            need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
                 f"rope_scaling.{key} must be a number, got {v!r}")
        need(rs.get("attention_factor") is None or rs["attention_factor"] > 0,
             f"rope_scaling.attention_factor must be positive, got {rs.get('attention_factor')!r}")
        need(isinstance(rs.get("truncate", True), bool), f"rope_scaling.truncate must be true or false, got "
             f"{rs.get('truncate')!r}")

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The config of a HF `config.json` dict; ConfigError (one line) for anything r1c would not run exactly."""
        from r1c.config_hf import config_from_hf_dict

        return config_from_hf_dict(cls, d)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        from r1c.jsonfile import read_json_object

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: {p} not found")
        return cls.from_hf_dict(read_json_object(p, ConfigError, "config"))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that both r1c and transformers' DeepseekV3Config / DeepseekV2Config read."""
        from r1c.config_hf import config_to_hf_dict

        return config_to_hf_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_hf_dict(), indent=2, sort_keys=True)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ---- sizes -----------------------------------------------------------------------------
    def num_parameters(self) -> int:
        h, c = self.hidden_size, self
        if c.q_lora_rank is None:
            q = h * c.num_attention_heads * c.qk_head_dim
        else:
            q = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.num_attention_heads * c.qk_head_dim
        attn = (q + h * c.latent_dim + c.kv_lora_rank
                + c.kv_lora_rank * c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim)
                + c.num_attention_heads * c.v_head_dim * h)
        dense = 3 * h * c.intermediate_size
        moe = (3 * h * c.moe_intermediate_size * (c.n_routed_experts + c.n_shared_experts)
               + c.n_routed_experts * h + (c.n_routed_experts if c.has_correction_bias else 0))
        per_layer_norms = 2 * h
        layers = c.num_hidden_layers * (attn + per_layer_norms)
        layers += c.first_k_dense_replace * dense + c.num_moe_layers * moe
        head = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + h
        return layers + head

    def num_active_parameters(self) -> int:
        """Parameters one token touches (routed experts counted top_k times, not E times)."""
        c = self
        inactive = 3 * c.hidden_size * c.moe_intermediate_size * (c.n_routed_experts - c.num_experts_per_tok)
        return self.num_parameters() - c.num_moe_layers * inactive - c.vocab_size * c.hidden_size  # no embed read

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes r1c's latent cache holds per token (all layers)."""
        return self.num_hidden_layers * self.latent_dim * dtype_bytes

    def per_head_kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes a per-head K/V cache (decompressed MLA) would hold per token (all layers)."""
        per_layer = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        return self.num_hidden_layers * per_layer * dtype_bytes


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(scale) + 1 (1 for scale <= 1); DeepSeek-V2 paper, transformers."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---- presets -------------------------------------------------------------------------------
_R1_ROPE = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

PRESETS: dict[str, ModelConfig] = {
    # Seconds on a laptop CPU; every feature of the architecture is present (q_lora, YaRN, dense + MoE
    # layers, groups, shared expert).
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
        rope_scaling={**_R1_ROPE, "factor": 4.0, "original_max_position_embeddings": 128},
        max_position_embeddings=512,
    ),
    # A benchmark size: ~560 MB of float32 weights, top-8 of 64 experts in 8 groups.
    "small": ModelConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=6, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
        rope_scaling={**_R1_ROPE, "factor": 8.0, "original_max_position_embeddings": 512},
        max_position_embeddings=4096,
    ),
    # The real DeepSeek-R1 (671B total, 37B active); build it on the `meta` device.
    "r1": ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3,
        rope_scaling=dict(_R1_ROPE), max_position_embeddings=163840,
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]},
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None
