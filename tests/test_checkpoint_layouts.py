"""The layouts and quantizations of the family's checkpoints: read (MTP layer skipped and said once), or refused
in one line that names the layout / quantization and what r1c reads instead (exporter/checkpoint_layouts.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from r1c.config import ModelConfig, preset
from r1c.errors import CheckpointError, ConfigError, R1CError
from r1c.exporter.checkpoint import load_checkpoint, random_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return preset("tiny").replace(num_hidden_layers=2)


@pytest.fixture(scope="module")
def tensors(config: ModelConfig) -> dict[str, torch.Tensor]:
    return random_checkpoint(config, seed=0)


def expect(path: Path, cls: type[R1CError], *fragments: str) -> str:
    with pytest.raises(cls) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def test_mtp_layer_is_skipped_and_said_once(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor],
                                            caplog: pytest.LogCaptureFixture) -> None:
    mtp = config.num_hidden_layers  # DeepSeek ships its multi-token-prediction module as one more layer
    extra = {f"model.layers.{mtp}.eh_proj.weight": torch.zeros(64, 128),
             f"model.layers.{mtp}.enorm.weight": torch.zeros(64),
             f"model.layers.{mtp}.mlp.experts.0.gate_proj.weight": torch.zeros(3, 3),  # bad shape: never read
             f"model.layers.{mtp}.self_attn.o_proj.weight": torch.zeros(64, 64)}
    save_checkpoint(tmp_path, config, {**tensors, **extra}, layout="per_expert", max_shard_bytes=200_000)
    with caplog.at_level(logging.INFO, logger="r1c.exporter.checkpoint"):
        ckpt = load_checkpoint(tmp_path)
    assert set(ckpt.tensors) == set(tensors)
    lines = [r.getMessage() for r in caplog.records]
    said = [line for line in lines if "multi-token-prediction" in line]
    assert len(said) == 1 and f"(4 tensors, model.layers.{mtp}.*)" in said[0], lines
    assert not any("unknown" in line or "ignored" in line for line in lines), lines


def test_unknown_tensor_is_refused_by_name(tmp_path: Path, config: ModelConfig,
                                           tensors: dict[str, torch.Tensor]) -> None:
    """A tensor r1c would not read (here an attention bias the config does not declare) changes the math: refused."""
    save_checkpoint(tmp_path, config, {**tensors, "model.layers.0.self_attn.q_a_proj.bias": torch.zeros(48)})
    expect(tmp_path, CheckpointError, "model.layers.0.self_attn.q_a_proj.bias", "not part of")


QUANTIZED = {
    # Kimi-K2-Thinking style compressed-tensors INT4 experts
    "compressed-tensors": ({"weight_packed": torch.zeros(32, 8, dtype=torch.int32), "weight_scale": torch.ones(32, 2),
                            "weight_shape": torch.tensor([32, 64])}, "compressed-tensors"),
    "nvfp4": ({"weight": torch.zeros(32, 32, dtype=torch.uint8), "weight_scale": torch.ones(32, 4),
               "weight_scale_2": torch.ones(()), "input_scale": torch.ones(())}, "ModelOpt NVFP4"),
    "gptq": ({"qweight": torch.zeros(8, 32, dtype=torch.int32), "qzeros": torch.zeros(1, 4, dtype=torch.int32),
              "scales": torch.ones(1, 32)}, "GPTQ/AWQ"),
    "bitsandbytes": ({"weight": torch.zeros(32, 64, dtype=torch.int8), "SCB": torch.ones(32)}, "bitsandbytes"),
}


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_other_quantizations_are_refused_by_their_tensors(fmt: str, tmp_path: Path, config: ModelConfig,
                                                          tensors: dict[str, torch.Tensor]) -> None:
    """No quantization_config (or one r1c never sees), but one expert's tensors in another format: the message names
    the format, not a "missing tensor" or a "wrong shape"."""
    parts, name = QUANTIZED[fmt]
    save_checkpoint(tmp_path, config, tensors, layout="per_expert")
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("model.layers.1.mlp.experts.0.gate_proj.")}
    for suffix, t in parts.items():
        kept[f"model.layers.1.mlp.experts.0.gate_proj.{suffix}"] = t
    save_file(kept, str(path))
    msg = expect(tmp_path, CheckpointError, name, "dequantize the checkpoint to bf16")
    assert "missing" not in msg and "shape" not in msg


def test_quantization_config_is_read_first(tmp_path: Path, config: ModelConfig,
                                           tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path, config, tensors)
    d = json.loads((tmp_path / "config.json").read_text())
    d["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                "config_groups": {"group_0": {"weights": {"num_bits": 4}}}}
    (tmp_path / "config.json").write_text(json.dumps(d))
    expect(tmp_path, ConfigError, "quant_method 'compressed-tensors'", "not supported")


def test_modelopt_directory_is_refused(tmp_path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path, config, tensors)
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    expect(tmp_path, CheckpointError, "ModelOpt", "hf_quant_config.json")


def test_reference_inference_shards_are_refused(tmp_path: Path) -> None:
    """DeepSeek's inference/convert.py output: model{rank}-mp{world}.safetensors, names like layers.0.attn.wq_a."""
    save_file({"embed.weight": torch.zeros(4, 4), "layers.0.attn.wq_a.weight": torch.zeros(4, 4)},
              str(tmp_path / "model0-mp1.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"dim": 7168, "n_layers": 61, "n_heads": 128}))
    expect(tmp_path, CheckpointError, "reference-inference layout", "model0-mp1.safetensors",
           "export the Hugging Face checkpoint")


def test_reference_inference_names_in_a_hf_file_are_refused(tmp_path: Path, config: ModelConfig,
                                                            tensors: dict[str, torch.Tensor]) -> None:
    save_checkpoint(tmp_path, config, {**tensors, "layers.0.attn.wq_a.weight": torch.zeros(48, 64)})
    expect(tmp_path, CheckpointError, "layers.0.attn.wq_a.weight", "reference-inference layout")


def test_reference_inference_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 129280, "dim": 7168, "n_layers": 61}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    expect(tmp_path, ConfigError, "reference-inference", "ModelArgs")


@pytest.mark.parametrize(("file", "what"), [("pytorch_model.bin", "PyTorch pickle"), ("model.gguf", "GGUF")])
def test_other_file_formats_are_refused(file: str, what: str, tmp_path: Path, config: ModelConfig) -> None:
    (tmp_path / "config.json").write_text(config.to_json())
    (tmp_path / file).write_bytes(b"\0" * 16)
    expect(tmp_path, CheckpointError, what, "safetensors")
