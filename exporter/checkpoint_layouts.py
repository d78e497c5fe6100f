"""The checkpoint layouts of the DeepSeek family: which r1c reads, and a one-line refusal for the others.

Read: the HF layout (`config.json` + `model.safetensors` or shards with `model.safetensors.index.json`), with the
routed experts fused (transformers v5: `mlp.experts.gate_up_proj`) or one by one (DeepSeek's release:
`mlp.experts.{e}.gate_proj.weight`), FP8 block-128 (`weight_scale_inv`) or unquantized. The multi-token-prediction
layer (`model.layers.{num_hidden_layers}.*`) is skipped on purpose.
Refused, naming the layout and what to convert to: DeepSeek's reference-inference shards (`model0-mp1.safetensors`,
`layers.0.attn.wq_a.weight`, `embed.weight`), PyTorch pickles (`pytorch_model*.bin`), GGUF, MLX (`switch_mlp`),
and tensors of other quantization formats (compressed-tensors `weight_packed`, GPTQ/AWQ `qweight`, ModelOpt
`weight_scale_2`, bitsandbytes `SCB`/`absmax`).

Per-expert FP8 experts whose moe_intermediate_size I is not a multiple of 128 have separate gate and up scale
grids whose last 128-row blocks are partial; fused as is, a block would straddle gate and up rows. They are fused
padded to Ip = ceil(I/128)*128 rows each (zero FP8 rows, which add silu(0) * 0 = 0 to every output): w13
[E, 2Ip, H] with the two grids stacked, w2 [E, H, Ip] with zero columns. `unpad_experts` undoes it exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from r1c.config import ModelConfig
from r1c.errors import CheckpointError
from r1c.plugins import fp8

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight(?:_scale_inv)?)$")

HF_LAYOUT = ("the Hugging Face layout (config.json + model*.safetensors, tensor names like "
             "model.layers.0.self_attn.q_a_proj.weight)")
# tensor-name suffix -> the quantization format whose tensors end so
QUANTIZED_TENSOR_SUFFIXES = {  # the most specific sign first
    ".weight_scale_2": "NVIDIA ModelOpt NVFP4 (`weight_scale_2`)",
    ".weight_packed": "compressed-tensors packed INT4/INT8 (`weight_packed`)",
    ".weight_shape": "compressed-tensors packed INT4/INT8 (`weight_shape`)",
    ".weight_zero_point": "compressed-tensors (`weight_zero_point`)",
    ".input_scale": "a static-activation quantization (`input_scale`: ModelOpt / compressed-tensors FP8)",
    ".weight_scale": "a non-DeepSeek weight scale (`weight_scale`: compressed-tensors, ModelOpt or FBGEMM)",
    ".qweight": "GPTQ/AWQ (`qweight`)",
    ".qzeros": "GPTQ/AWQ (`qzeros`)",
    ".g_idx": "GPTQ (`g_idx`)",
    ".SCB": "bitsandbytes LLM.int8 (`SCB`)",
    ".weight_format": "bitsandbytes LLM.int8 (`weight_format`)",
    ".absmax": "bitsandbytes 4-bit (`absmax`)",
    ".quant_map": "bitsandbytes 4-bit (`quant_map`)",
}
_REFERENCE_NAME = re.compile(r"^(embed\.weight|head\.weight|norm\.weight|layers\.\d+\.(attn|ffn|attn_norm|ffn_norm)\.)")
_REFERENCE_FILE = re.compile(r"^model\d+-mp\d+\.safetensors$")
HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer older exports saved; recomputed from the config


def refuse_foreign_files(root: Path) -> None:
    """CheckpointError naming the layout when `root` holds a layout r1c does not read (checked by file names)."""
    names = sorted(p.name for p in root.iterdir())
    reference = [n for n in names if _REFERENCE_FILE.match(n)]
    if reference:
        raise CheckpointError(f"checkpoint: {root} is in DeepSeek's reference-inference layout ({reference[0]}: "
                              "shards converted by inference/convert.py, names like layers.0.attn.wq_a.weight); "
                              f"r1c reads {HF_LAYOUT}: export the Hugging Face checkpoint those shards were "
                              "converted from")
    if not any(n.endswith(".safetensors") for n in names):
        for pattern, what in ((".gguf", "GGUF (llama.cpp)"), (".bin", "PyTorch pickle (pytorch_model*.bin)"),
                              (".pt", "PyTorch pickle (*.pt)"), (".pth", "PyTorch pickle (*.pth)")):
            found = [n for n in names if n.endswith(pattern)]
            if found:
                raise CheckpointError(f"checkpoint: {root} holds {what} weights ({found[0]}); r1c reads {HF_LAYOUT}: "
                                      "convert them to safetensors (transformers: save_pretrained) first")
    if "hf_quant_config.json" in names:
        raise CheckpointError(f"checkpoint: {root} is quantized with NVIDIA ModelOpt (hf_quant_config.json, e.g. "
                              "NVFP4), which r1c does not read; r1c reads FP8 block-128 (quant_method 'fp8') or "
                              "unquantized weights")


def refuse_foreign_tensors(root: Path, names: list[str]) -> None:
    """CheckpointError naming the quantization format or layout that tensors r1c does not read belong to (the most
    specific sign first: NVFP4's `weight_scale_2` before the `input_scale` it shares with FP8 formats)."""
    for suffix, what in QUANTIZED_TENSOR_SUFFIXES.items():
        found = [n for n in names if n.endswith(suffix)]
        if found:
            raise CheckpointError(f"checkpoint {root}: tensor {found[0]} is {what}, a quantization r1c does not "
                                  "read; r1c reads FP8 block-128 (quant_method 'fp8', `weight_scale_inv`) or "
                                  "unquantized weights: dequantize the checkpoint to bf16 first")
    reference = [n for n in names if _REFERENCE_NAME.match(n)]
    if reference:
        raise CheckpointError(f"checkpoint {root}: tensor {reference[0]} is named in DeepSeek's reference-inference "
                              f"layout; r1c reads {HF_LAYOUT}: export the Hugging Face checkpoint instead")
    mlx = [n for n in names if ".switch_mlp." in n]
    if mlx:
        raise CheckpointError(f"checkpoint {root}: tensor {mlx[0]} is in the MLX layout (switch_mlp); r1c reads "
                              f"{HF_LAYOUT}")


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (`model.layers.{i}.*`), or None."""
    m = LAYER.match(name)
    return int(m.group(1)) if m else None


def parse_per_expert(name: str) -> tuple[str, int, str, str] | None:
    """DeepSeek's per-expert name -> (prefix `model.layers.{i}.mlp.experts`, expert, proj, kind), or None."""
    m = PER_EXPERT.match(name)
    return (m.group(1), int(m.group(2)), m.group(3), m.group(4)) if m else None


def padded_width(inter: int) -> int:
    """moe_intermediate_size rounded up to whole 128-row blocks."""
    return -(-inter // fp8.BLOCK) * fp8.BLOCK


def _pads(config: ModelConfig, kind: str, dtype: torch.dtype) -> bool:
    """Per-expert FP8 weights whose last 128-block is partial are fused padded (see the module docstring)."""
    return kind == "weight" and dtype == FP8_DTYPE and config.moe_intermediate_size % fp8.BLOCK != 0


def expert_part_shape(config: ModelConfig, proj: str, kind: str) -> tuple[int, int]:
    """The shape of one expert's `proj` tensor (`kind` weight) or of its FP8 block-scale grid."""
    h, inter = config.hidden_size, config.moe_intermediate_size
    rows, cols = (h, inter) if proj == "down_proj" else (inter, h)
    return fp8.block_shape(rows, cols) if kind.endswith(SCALE_SUFFIX) else (rows, cols)


def fused_expert_shape(config: ModelConfig, fused: str, kind: str, dtype: torch.dtype) -> tuple[int, int, int]:
    """[E, rows, cols] of the fused tensor (`fused` .gate_up_proj | .down_proj) that per-expert parts make."""
    e = config.n_routed_experts
    width = padded_width(config.moe_intermediate_size) if _pads(config, kind, dtype) else None
    gate = expert_part_shape(config, "gate_proj", kind)
    down = expert_part_shape(config, "down_proj", kind)
    if fused == ".gate_up_proj":
        return e, 2 * (width or gate[0]), gate[1]
    return e, down[0], width or down[1]


def fuse_expert(config: ModelConfig, fused: str, kind: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """One expert's fused tensor from its parts ([gate, up] or [down]): gate rows then up rows, each padded with
    zero rows (down: zero columns) to whole 128-blocks when FP8 with a partial last block; scale grids stacked."""
    if not _pads(config, kind, parts[0].dtype):
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    width = padded_width(config.moe_intermediate_size)
    if fused == ".down_proj":
        out = torch.zeros(parts[0].shape[0], width, dtype=parts[0].dtype)
        out[:, : parts[0].shape[1]] = parts[0]
        return out
    out = torch.zeros(2 * width, parts[0].shape[1], dtype=parts[0].dtype)
    out[: parts[0].shape[0]], out[width : width + parts[1].shape[0]] = parts[0], parts[1]
    return out


def skippable(config: ModelConfig, name: str, shape: tuple[int, ...]) -> bool:
    """A tensor outside the model that carries nothing: a zero-width shared expert (transformers saves one when
    n_shared_experts is 0) or a rotary `inv_freq` buffer (recomputed from the config)."""
    zero_shared = ".mlp.shared_experts." in name and not config.n_shared_experts and 0 in shape
    return zero_shared or bool(HARMLESS.search(name))


def refuse_unknown_tensors(root: Path, config: ModelConfig, names: list[str]) -> None:
    """CheckpointError for tensors the config does not describe: the format or layout they belong to when it is
    known (`refuse_foreign_tensors`), else the first name (r1c would ignore it and compute something else)."""
    if not names:
        return
    refuse_foreign_tensors(root, names)
    raise CheckpointError(f"checkpoint {root}: tensor {names[0]} is not part of the {config.architecture} model "
                          f"this config.json describes ({len(names)} such tensors); r1c would ignore it and compute "
                          "something else")


def is_padded(config: ModelConfig, name: str, shape: tuple[int, ...]) -> bool:
    """True for a fused FP8 expert tensor of the padded width (per-expert FP8 with a partial last block)."""
    inter = config.moe_intermediate_size
    if inter % fp8.BLOCK == 0:
        return False
    width = padded_width(inter)
    if name.endswith("mlp.experts.gate_up_proj"):
        return len(shape) == 3 and shape[1] == 2 * width
    if name.endswith("mlp.experts.down_proj"):
        return len(shape) == 3 and shape[2] == width
    return False


def unpad_experts(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The padded expert tensors of `tensors` cut back to moe_intermediate_size (exact: the pads are zero)."""
    inter, width = config.moe_intermediate_size, padded_width(config.moe_intermediate_size)
    out = dict(tensors)
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX) or not is_padded(config, name, tuple(t.shape)):
            continue
        if name.endswith("gate_up_proj"):
            out[name] = torch.cat([t[:, :inter], t[:, width : width + inter]], dim=1)
        else:
            out[name] = t[..., :inter].contiguous()
    return out
