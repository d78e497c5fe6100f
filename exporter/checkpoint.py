"""Checkpoint I/O in the HF layout: `config.json` + safetensors (one file, or shards with an index).

Canonical tensor names are transformers' v5 fused layout (see `expected_shapes`); DeepSeek's release
names its routed experts one by one (`mlp.experts.{e}.gate_proj.weight`, ...), which loading fuses.
FP8 weights stay FP8: the weight's name holds the float8_e4m3fn tensor and `<name>_scale_inv` its
float32 128x128 block scales. Which layouts and quantizations are read and which are refused (with the
reason, in one line) is `checkpoint_layouts`; the lazy reader over the shards is `checkpoint_reader`.

Shape legend: V vocab, H hidden, N heads, D qk_nope_head_dim, R qk_rope_head_dim, Dv v_head_dim,
C kv_lora_rank, Q q_lora_rank, E routed experts, I expert intermediate size, F dense intermediate size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from r1c.config import ModelConfig
from r1c.errors import CheckpointError
from r1c.exporter.checkpoint_layouts import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    is_padded,
    layer_index,
    padded_width,
    parse_per_expert,
    unpad_experts,
)
from r1c.exporter.model import DeepseekV3ForCausalLM
from r1c.plugins import fp8

logger = logging.getLogger(__name__)

FP8_QUANTIZATION_CONFIG = fp8.QUANTIZATION_CONFIG
__all__ = ["FP8_DTYPE", "SCALE_SUFFIX", "layer_index", "parse_per_expert"]


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # canonical names
    source: Path

    @property
    def is_fp8(self) -> bool:
        return any(name.endswith(SCALE_SUFFIX) for name in self.tensors)


# ---- the canonical layout ------------------------------------------------------------------------
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name (no FP8 scales) and its shape, in model order."""
    c, h = config, config.hidden_size
    n = c.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        if c.q_lora_rank is None:
            shapes[p + "self_attn.q_proj.weight"] = (n * c.qk_head_dim, h)
        else:
            shapes[p + "self_attn.q_a_proj.weight"] = (c.q_lora_rank, h)
            shapes[p + "self_attn.q_a_layernorm.weight"] = (c.q_lora_rank,)
            shapes[p + "self_attn.q_b_proj.weight"] = (n * c.qk_head_dim, c.q_lora_rank)
        shapes[p + "self_attn.kv_a_proj_with_mqa.weight"] = (c.latent_dim, h)
        shapes[p + "self_attn.kv_a_layernorm.weight"] = (c.kv_lora_rank,)
        shapes[p + "self_attn.kv_b_proj.weight"] = (n * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        shapes[p + "self_attn.o_proj.weight"] = (h, n * c.v_head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if not c.is_moe_layer(i):
            f = c.intermediate_size
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
            continue
        e, inter = c.n_routed_experts, c.moe_intermediate_size
        shapes[p + "mlp.gate.weight"] = (e, h)
        if c.has_correction_bias:  # noaux_tc; DeepSeek-V2's routers have none
            shapes[p + "mlp.gate.e_score_correction_bias"] = (e,)
        shapes[p + "mlp.experts.gate_up_proj"] = (e, 2 * inter, h)
        shapes[p + "mlp.experts.down_proj"] = (e, h, inter)
        if c.n_shared_experts:
            si = inter * c.n_shared_experts
            shapes.update({p + "mlp.shared_experts.gate_proj.weight": (si, h),
                           p + "mlp.shared_experts.up_proj.weight": (si, h),
                           p + "mlp.shared_experts.down_proj.weight": (h, si)})
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def is_quantizable(name: str, ndim: int) -> bool:
    """FP8-quantized in DeepSeek's release: linear and expert weights; not norms, embeddings, lm_head, router."""
    if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
        return ndim == 3
    if not name.endswith("_proj.weight") and not name.endswith("_proj_with_mqa.weight"):
        return False
    return ndim == 2 and not name.startswith(("model.embed_tokens", "lm_head"))


# ---- loading ---------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> Checkpoint:
    """Reads an HF-layout checkpoint dir into canonical names; raises CheckpointError/ConfigError on bad input.

    Every tensor is read (see `CheckpointReader` for the lazy view that `r1c export` streams from, and for what
    is refused before a tensor is read). A `quantization_config` that no FP8 tensor backs (a bf16 copy of an FP8
    release) is dropped from the config; FP8 tensors without one get DeepSeek's.
    """
    from r1c.exporter.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(path)
    names = reader.names
    bar = tqdm(names, desc="loading tensors", unit="tensor", file=sys.stderr,
               disable=len(reader.files) < 2 or not sys.stderr.isatty())
    tensors = {name: reader.get(name) for name in bar}
    for name in list(tensors):  # the router runs in float32 (transformers keeps these in fp32 too)
        if name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            tensors[name] = tensors[name].to(torch.float32)
    config = reader.config
    has_fp8 = any(t.dtype == FP8_DTYPE for t in tensors.values())
    if config.quantization_config is not None and not has_fp8:
        logger.info("checkpoint %s: config.json's quantization_config (%s) describes no tensor (the weights are "
                    "not FP8): dropped", reader.root, config.quantization_config.get("quant_method"))
        config = config.replace(quantization_config=None)
    elif config.quantization_config is None and has_fp8:
        config = config.replace(quantization_config=dict(FP8_QUANTIZATION_CONFIG))
    return Checkpoint(config=config, tensors=tensors, source=reader.root)


# ---- saving ----------------------------------------------------------------------------------------
def _per_expert(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused expert tensors -> DeepSeek's per-expert names (other tensors unchanged, order kept).

    Padded FP8 experts (`checkpoint_layouts`) split back exactly; unpadded FP8 ones whose 128-row scale blocks
    straddle gate and up rows cannot be split (CheckpointError).
    """
    inter = config.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        base = name.removesuffix(SCALE_SUFFIX)
        kind = "weight" + (SCALE_SUFFIX if name != base else "")
        if not base.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            out[name] = t
            continue
        padded = is_padded(config, base, tuple(tensors[base].shape))
        prefix = base.rsplit(".", 1)[0]
        for e in range(t.shape[0]):
            if base.endswith("down_proj"):
                parts = {"down_proj": t[e] if kind != "weight" else t[e][:, :inter]}
            elif kind != "weight":
                if inter % fp8.BLOCK and not padded:
                    raise CheckpointError(f"checkpoint: cannot split FP8 scales of {name} per expert when "
                                          f"moe_intermediate_size ({inter}) is not a multiple of {fp8.BLOCK}")
                half = t.shape[1] // 2
                parts = {"gate_proj": t[e, :half], "up_proj": t[e, half:]}
            else:
                width = padded_width(inter) if padded else inter
                parts = {"gate_proj": t[e, :inter], "up_proj": t[e, width : width + inter]}
            for proj, part in parts.items():
                out[f"{prefix}.{e}.{proj}.{kind}"] = part
    return out


def save_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    *,
    layout: Literal["fused", "per_expert"] = "fused",
    max_shard_bytes: int | None = None,
) -> Path:
    """Writes config.json and safetensors (sharded with model.safetensors.index.json when max_shard_bytes)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"save_checkpoint: unknown layout {layout!r}")
    if config.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    if layout == "per_expert":
        tensors = _per_expert(config, tensors)
    # safetensors refuses views that share storage: give every tensor its own.
    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    (root / "config.json").write_text(config.to_json() + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in owned.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(shards[0], str(root / "model.safetensors"), metadata=meta)
        return root
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in owned.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


# ---- synthetic and quantized checkpoints -------------------------------------------------------------
def random_checkpoint(
    config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Seeded random weights that keep activations O(1) and make routing non-degenerate.

    Linear weights ~ N(0, 1/fan_in); norms ~ U(0.8, 1.2); embeddings ~ N(0, 1); router weights ~ N(0, 1/H)
    (logits of std ~1 so sigmoid scores spread over (0, 1)); correction bias ~ U(-0.15, 0.15).
    The router's weight and bias stay float32.
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("e_score_correction_bias"):
            out[name] = torch.rand(shape, generator=g) * 0.3 - 0.15
            continue
        if len(shape) == 1:  # RMSNorm weights
            t = 0.8 + 0.4 * torch.rand(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=g)
        else:  # [out, in] or [E, out, in]: std 1/sqrt(in)
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        out[name] = t if name.endswith("mlp.gate.weight") else t.to(dtype)
    return out


def quantize_checkpoint_fp8(
    config: ModelConfig, tensors: dict[str, torch.Tensor]
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """FP8 e4m3fn with 128x128 block scales (`<name>_scale_inv`) for linear and expert weights."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX) or t.dtype == FP8_DTYPE or not is_quantizable(name, t.dim()):
            out[name] = t
            continue
        q, scale = fp8.quantize(t)
        out[name] = q
        out[name + SCALE_SUFFIX] = scale
    return config.replace(quantization_config=dict(FP8_QUANTIZATION_CONFIG)), out


def dequantized(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """The canonical tensors in `dtype`, FP8 weights dequantized with their block scales (scales dropped).

    With `config`, padded FP8 experts (per-expert FP8 with a partial last block, `checkpoint_layouts`) are cut
    back to moe_intermediate_size, so the result loads into a model of that config (r1c's or transformers');
    without it they keep their zero padding (exact for an export, not loadable into such a model).
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        out[name] = (fp8.dequantize(t, scale) if scale is not None else t).to(dtype)
    return out if config is None else unpad_experts(config, out)


def model_from_checkpoint(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> DeepseekV3ForCausalLM:
    """The PyTorch model on CPU in `dtype` (float32 by default), FP8 weights dequantized; in eval mode."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(ckpt.config)
    state = dequantized(ckpt.tensors, dtype, ckpt.config)
    for name, t in state.items():
        if name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            state[name] = t.to(torch.float32)
    if ckpt.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()
