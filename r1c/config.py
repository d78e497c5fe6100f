"""The DeepSeek-V3/R1 model config shared by every stage, read from a HF ``config.json`` or a preset.

Field names follow the HF ``DeepseekV3Config`` so that a ``config.json`` maps one to one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from r1c.errors import ConfigError
from r1c.jsonfile import read_json_object

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("deepseek_v3",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # one routed (or shared) expert
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: a plain q_proj (V2-Lite style)
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
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # YaRN parameters as in the R1 config (`rope_scaling` / `rope_parameters`); None means plain RoPE.
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

    def __post_init__(self) -> None:
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
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank"):
            need(getattr(self, name) > 0, f"config: {name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, "config: qk_rope_head_dim must be even")
        if self.num_moe_layers:
            need(self.n_routed_experts > 0, "config: n_routed_experts must be positive")
            need(self.n_group > 0 and self.n_routed_experts % self.n_group == 0,
                 f"config: n_routed_experts ({self.n_routed_experts}) must divide into n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            need(per_group >= 2 or self.n_group == 1, "config: each expert group needs at least 2 experts")
            need(1 <= self.topk_group <= self.n_group, "config: topk_group must be in [1, n_group]")
            need(1 <= self.num_experts_per_tok <= per_group * self.topk_group,
                 "config: num_experts_per_tok exceeds the experts in the kept groups")
        need(self.scoring_func in ("sigmoid", "softmax"), f"config: unknown scoring_func {self.scoring_func!r}")
        need(self.topk_method in ("noaux_tc", "greedy", "group_limited_greedy"),
             f"config: unknown topk_method {self.topk_method!r}")
        need(self.hidden_act == "silu", f"config: hidden_act {self.hidden_act!r} is not supported (silu only)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", "default", None), f"config: rope scaling {kind!r} is not supported (yarn only)")

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"config: unsupported architecture {archs[0]!r} (r1c supports {SUPPORTED_ARCHITECTURES[0]})"
            )
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"config: unsupported model_type {model_type!r} (r1c supports deepseek_v3)")
        if not archs and model_type is None:
            raise ConfigError("config: neither 'architectures' nor 'model_type' is set")
        # transformers 5 writes `rope_parameters` (with rope_theta inside); the DeepSeek release `rope_scaling`.
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        rope_theta = float(d.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0)
        rope_scaling = None
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                rope_scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
                rope_scaling["type"] = kind
        eos = d.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        try:
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                moe_intermediate_size=int(d["moe_intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=int(d["num_attention_heads"]),
                q_lora_rank=None if d.get("q_lora_rank") is None else int(d["q_lora_rank"]),
                kv_lora_rank=int(d["kv_lora_rank"]),
                qk_rope_head_dim=int(d["qk_rope_head_dim"]),
                qk_nope_head_dim=int(d["qk_nope_head_dim"]),
                v_head_dim=int(d["v_head_dim"]),
                n_routed_experts=int(d["n_routed_experts"]),
                n_shared_experts=int(d.get("n_shared_experts") or 0),
                num_experts_per_tok=int(d["num_experts_per_tok"]),
                n_group=int(d.get("n_group") or 1),
                topk_group=int(d.get("topk_group") or 1),
                routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
                norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                first_k_dense_replace=int(d.get("first_k_dense_replace") or 0),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                rope_interleave=bool(d.get("rope_interleave", True)),
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                scoring_func=str(d.get("scoring_func", "sigmoid")),
                topk_method=str(d.get("topk_method", "noaux_tc")),
                hidden_act=str(d.get("hidden_act", "silu")),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id", 0),
                eos_token_id=eos,
                quantization_config=d.get("quantization_config"),
            )
        except KeyError as e:
            raise ConfigError(f"config: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config: bad value ({e})") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: {p} not found")
        return cls.from_hf_dict(read_json_object(p, ConfigError, "config"))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that both r1c and transformers' DeepseekV3Config read."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
        }
        d.pop("rope_scaling")
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rope["rope_type"] = self.rope_scaling.get("type", "yarn")
        d["rope_parameters"] = rope
        d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} if self.rope_scaling else None
        d["num_key_value_heads"] = self.num_attention_heads
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        return d

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
               + c.n_routed_experts * h + c.n_routed_experts)
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
