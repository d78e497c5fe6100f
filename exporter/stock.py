"""The "stock" ONNX of a DeepSeek-V3 (or V2) model: what `torch.onnx.export(..., dynamo=True)` writes for
transformers' `DeepseekV3ForCausalLM` (`DeepseekV2ForCausalLM` for a V2 config), with no r1c op in it.

It is the foreign input that `r1c optimize` must fuse (RMSNorm, SwiGLU, MoE routing and experts) and the
peer that the benchmark compares r1c against. The experts run transformers' `batched_mm` implementation,
the only one the stock exporter traces today (the eager one loops over a data-dependent expert set).

Graph inputs and outputs (B = batch, S = new tokens, P = cached tokens, V = vocab, C = kv_lora_rank,
R = qk_rope_head_dim, L = layers). transformers caches MLA's compressed latents (one "head"):
    without cache:  input_ids int64 [B, S]                       -> logits float32 [B, S, V]
    with_cache:     input_ids int64 [B, S],
                    attention_mask int64 [B, P + S],
                    past_key_values.{l}.key float32 [B, 1, P, C]    (normalized compressed KV)
                    past_key_values.{l}.value float32 [B, 1, P, R]  (rotated shared rope key), l < L
                                                                 -> logits [B, S, V],
                                                                    present.{l}.key [B, 1, P + S, C],
                                                                    present.{l}.value [B, 1, P + S, R]
Positions are P..P+S-1 for every row (transformers' default from the cache length): right-padded batches only.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from r1c.config import V2_ARCHITECTURE, V3_ARCHITECTURE, ModelConfig
from r1c.errors import ExportError

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "batched_mm"
OPSET = 21


class _LogitsOnly(torch.nn.Module):
    """input_ids -> logits, no cache object in the traced outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class _WithCache(torch.nn.Module):
    """Flat tensors in and out: the DynamicCache is built and read inside the traced function."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[Any, ...]:
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        config: Any = self.model.config
        cache = DynamicCache(ddp_cache_data=pairs, config=config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        present = out.past_key_values
        flat: list[torch.Tensor] = []
        for i in range(self.num_layers):
            flat += [present.layers[i].keys, present.layers[i].values]
        return (out.logits, *flat)


# the transformers classes of each architecture r1c reads (`ModelConfig.architecture` is the model class's name)
_HF_CONFIG_CLASSES = {V3_ARCHITECTURE: "DeepseekV3Config", V2_ARCHITECTURE: "DeepseekV2Config"}


def hf_model_class(config: ModelConfig) -> Any:
    """transformers' model class of the config's architecture (DeepseekV3ForCausalLM or DeepseekV2ForCausalLM)."""
    import transformers

    if config.architecture not in _HF_CONFIG_CLASSES:
        raise ExportError(f"stock export: no transformers class for architecture {config.architecture!r}")
    return getattr(transformers, config.architecture)


def load_hf_model(checkpoint_dir: str | Path) -> torch.nn.Module:
    """transformers' model of the checkpoint's architecture (`hf_model_class`) in float32 from an r1c/HF checkpoint
    dir (FP8 weights dequantized; padded per-expert FP8 cut back to moe_intermediate_size)."""
    from r1c.exporter.checkpoint import dequantized, load_checkpoint

    ckpt = load_checkpoint(checkpoint_dir)
    model = hf_model_class(ckpt.config)(hf_config(ckpt.config))
    state = dequantized(ckpt.tensors, torch.float32, ckpt.config)
    if ckpt.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()  # transformers builds a zero-width shared expert for n_shared_experts 0
    if unexpected or [m for m in missing if not m.endswith("inv_freq") and own[m].numel() != 0]:
        raise ExportError(f"stock export: checkpoint does not fit transformers' model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def hf_config(config: ModelConfig) -> Any:
    """transformers' config (DeepseekV3Config / DeepseekV2Config, by architecture) for an r1c config, set up for
    the stock exporter."""
    import transformers

    d = config.to_hf_dict()
    d.pop("quantization_config", None)  # the stock model runs dequantized float32 weights
    hf = getattr(transformers, _HF_CONFIG_CLASSES[config.architecture])(**d)
    hf._experts_implementation = EXPERTS_IMPLEMENTATION
    hf._attn_implementation = "sdpa"
    return hf


def _sample_inputs(hf: Any, with_cache: bool) -> tuple[tuple[torch.Tensor, ...], list[str], list[str], Any]:
    b, s, p = 2, 5, 3  # sizes > 1 so that torch.export keeps the dims symbolic
    ids = torch.randint(0, hf.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    if not with_cache:
        return (ids,), ["input_ids"], ["logits"], ({0: "batch", 1: "seq"},)
    c, r = hf.kv_lora_rank, hf.qk_rope_head_dim
    past: list[torch.Tensor] = []
    in_names, out_names = ["input_ids", "attention_mask"], ["logits"]
    dyn: list[Any] = [{0: "batch", 1: "seq"}, {0: "batch", 1: "total_seq"}]
    for i in range(hf.num_hidden_layers):
        past += [torch.zeros(b, 1, p, c), torch.zeros(b, 1, p, r)]
        in_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        out_names += [f"present.{i}.key", f"present.{i}.value"]
        dyn += [{0: "batch", 2: "past_seq"}, {0: "batch", 2: "past_seq"}]
    mask = torch.ones(b, p + s, dtype=torch.int64)
    return (ids, mask, *past), in_names, out_names, tuple(dyn)


def export_stock(hf_model_or_checkpoint_dir: torch.nn.Module | str | Path, out_path: str | Path, *,
                 with_cache: bool = False, opset: int = OPSET) -> Path:
    """Write the stock ONNX (weights as external data beside it) to `out_path`; returns `out_path`.

    `hf_model_or_checkpoint_dir`: a transformers `DeepseekV3ForCausalLM` / `DeepseekV2ForCausalLM` (its experts
    implementation is set to `batched_mm` for the export) or a checkpoint directory (`config.json` + safetensors).
    The file appears whole or not at all: it is written in a sibling temp dir, then renamed. `opset`: the
    ONNX opset asked of torch.onnx (18 is its native one; it converts to others, or stays at 18 when it cannot).
    """
    model = hf_model_or_checkpoint_dir
    if isinstance(model, (str, Path)):
        model = load_hf_model(model)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ExportError("stock export: expected a transformers DeepseekV3/V2ForCausalLM or a checkpoint directory")
    hf_config: Any = model.config
    hf_config._experts_implementation = EXPERTS_IMPLEMENTATION
    model.eval()
    wrapper = _WithCache(model, hf_config.num_hidden_layers) if with_cache else _LogitsOnly(model)
    args, in_names, out_names, dynamic_shapes = _sample_inputs(hf_config, with_cache)
    if with_cache:  # *past is one variadic argument to torch.export
        dynamic_shapes = (*dynamic_shapes[:2], tuple(dynamic_shapes[2:]))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper.eval(), args, dynamo=True, opset_version=opset,
                                        input_names=in_names, output_names=out_names,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
        if program is None:
            raise ExportError("stock export: torch.onnx.export returned no program")
        program.save(str(tmp / out.name), external_data=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == out.name):  # the model file last
            os.replace(f, out.parent / f.name)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"stock export: torch.onnx.export failed ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("stock export written to %s", out)
    return out
