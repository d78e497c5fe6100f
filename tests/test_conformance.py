"""The conformance matrix (tests/conformance.py): for every config field that changes the math, the ONNX Runtime
bundle (checkpoint -> `r1c export` -> `r1c build --target onnxruntime` -> runtime) and r1c's PyTorch model equal
transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM on the same weights, read from the same config.json.

Tolerance: float32 logits within 1e-4 of the largest |logit| (max |ours - transformers| <= 1e-4 * max |theirs|),
both of a whole-prompt forward and of decode steps (the last 4 positions, one token a step through the latent
cache: the native decoder where the bundle's graph has one, r1c/runtime/native_decode.py, which every V3-form case
with q_lora and without `norm_topk_prob: false` must have, but the FP8 one: an FP8 export built at fp32 keeps its
MLA nodes unfused); greedy tokens equal (6 decoded through the cache).
Each case's mutations must move transformers' own logits by more than 10x that tolerance, so the inputs would show
a wrong eps, rotation or routing rule.
Every ModelConfig field is varied by some case, refused with a named value, or listed as not changing the math.
R1C_CONFORMANCE_REPORT=<file> appends one JSON line per case (the closing note's table).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import conformance as cf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import YARN_KEYS, ModelConfig
from r1c.errors import ConfigError
from r1c.exporter.checkpoint import load_checkpoint, model_from_checkpoint
from r1c.exporter.onnx_export import export_onnx
from r1c.plugins.cpu_moe import library as cpu_library
from r1c.runtime import load

pytest.importorskip("transformers")

PROMPTS = [[3, 17, 42, 99, 5, 250, 7, 64, 128, 11, 200, 31], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 255, 254]]
NEW_TOKENS = 6
DECODE_FROM = 8  # decode steps at positions 8 .. 11


def _report(row: dict[str, Any]) -> None:
    path = os.environ.get("R1C_CONFORMANCE_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' 0 shared experts
@pytest.mark.parametrize("case", cf.CASES, ids=lambda c: c.name)
def test_bundle_equals_transformers(case: cf.Case, tmp_path: Path) -> None:
    config_json = case.config_json()
    config = cf.parse(config_json)
    tensors = cf.weights(config, seed=len(case.name))
    if case.fp8:
        file_tensors, reference = cf.release_fp8(config, tensors)
    else:
        file_tensors, reference = tensors, tensors
    ckpt_dir = cf.write_checkpoint(tmp_path / "ckpt", config_json, file_tensors)

    ckpt = load_checkpoint(ckpt_dir)
    assert ckpt.config == config and ckpt.is_fp8 == case.fp8
    for args in (["export", str(ckpt_dir), "-o", str(tmp_path / "export")],
                 ["build", str(tmp_path / "export"), "-o", str(tmp_path / "bundle"), "--target", "onnxruntime",
                  "--precision", "fp32"]):  # the model's math (an FP8 export's default CPU bundle is int8 blocks)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    engine = load(tmp_path / "bundle")
    bundle_logits = engine.forward(PROMPTS)
    bundle_tokens = engine.generate([PROMPTS[0]], max_new_tokens=NEW_TOKENS)[0]
    step_logits = cf.decode_logits(engine, PROMPTS, DECODE_FROM)
    native = getattr(engine.backend, "native", None) is not None

    hf = cf.transformers_model(config_json, reference)
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        ref = hf(ids).logits
        torch_logits = model_from_checkpoint(ckpt)(ids)
    assert ref.std() > 0.1, "flat logits would hide differences"
    err_bundle, err_torch = cf.rel_err(bundle_logits, ref), cf.rel_err(torch_logits, ref)
    err_steps = cf.rel_err(step_logits, ref[:, DECODE_FROM:])
    ref_tokens = cf.transformers_greedy(hf, PROMPTS[0], NEW_TOKENS)

    sensitivity = {}
    for label, mutation in case.mutations.items():
        if callable(mutation):
            other = cf.transformers_model(config_json, reference, mutate=mutation)
        else:
            other = cf.transformers_model({**config_json, **mutation}, reference)
        with torch.no_grad():
            sensitivity[label] = cf.rel_err(other(ids).logits, ref)
    _report({"case": case.name, "varies": sorted(cf.varied(case)), "bundle_rel_err": err_bundle,
             "decode_rel_err": err_steps, "native_decode": native, "torch_rel_err": err_torch,
             "tokens_equal": list(bundle_tokens) == ref_tokens, "mutations": sensitivity})
    assert err_bundle <= cf.RTOL, f"bundle vs transformers: {err_bundle:.3g} > {cf.RTOL}"
    assert err_steps <= cf.RTOL, f"decode steps vs transformers: {err_steps:.3g} > {cf.RTOL}"
    if cpu_library.why_unavailable() is None:  # the bundle has r1c's kernels: the native decoder where it applies
        assert native == (config.scoring_func == "sigmoid" and config.norm_topk_prob and
                          config.q_lora_rank is not None and not case.fp8), native
    assert err_torch <= cf.RTOL, f"r1c's PyTorch model vs transformers: {err_torch:.3g} > {cf.RTOL}"
    assert list(bundle_tokens) == ref_tokens
    weak = {k: v for k, v in sensitivity.items() if v <= cf.SENSITIVITY}
    assert not weak, f"mutations that the inputs would not show: {weak}"


def test_every_field_is_in_the_matrix_or_refused_or_not_math() -> None:
    """A new ModelConfig field (or YaRN key) fails here until a case varies it, a refusal names it, or NOT_MATH says
    why it leaves the logits alone."""
    covered = set().union(*(cf.varied(case) for case in cf.CASES))
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unaccounted = fields - covered - set(cf.REFUSED) - set(cf.NOT_MATH)
    assert not unaccounted, f"ModelConfig fields neither in the matrix, refused, nor NOT_MATH: {sorted(unaccounted)}"
    yarn = {f"rope_scaling.{k}" for k in YARN_KEYS} - covered
    assert not yarn, f"YaRN keys no case varies: {sorted(yarn)}"
    # the routing modes and the architectures each have a case
    parsed = [cf.parse(case.config_json()) for case in cf.CASES]
    assert {(c.architecture, c.scoring_func, c.topk_method) for c in parsed} == {
        ("DeepseekV3ForCausalLM", "sigmoid", "noaux_tc"), ("DeepseekV2ForCausalLM", "softmax", "greedy"),
        ("DeepseekV2ForCausalLM", "softmax", "group_limited_greedy")}
    assert {c.n_shared_experts for c in parsed} >= {0, 1, 2} and {c.first_k_dense_replace for c in parsed} >= {0, 1}


@pytest.mark.parametrize(("field", "index"), [(f, i) for f, cases in cf.REFUSED.items() for i in range(len(cases))])
def test_refused_when_the_config_is_read(field: str, index: int) -> None:
    overrides, base, fragment = cf.REFUSED[field][index]
    d = cf.Case("refused", overrides, base=base).config_json()
    with pytest.raises(ConfigError) as info:
        cf.parse(d)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("config: ") and fragment in msg, msg


def test_transformers_v3_ignores_topk_method_and_scoring_func() -> None:
    """Why a V3 config with another topk_method / scoring_func is refused rather than honoured: transformers'
    DeepseekV3 computes sigmoid + noaux_tc whatever they say (and DeepSeek's V3 code raises NotImplementedError),
    so such a file has no reference to be equal to."""
    config = cf.parse(cf.BASE_V3)
    tensors = cf.weights(config)
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        base = cf.transformers_model(cf.BASE_V3, tensors)(ids).logits
        other = cf.transformers_model({**cf.BASE_V3, "topk_method": "greedy", "scoring_func": "softmax"},
                                      tensors)(ids).logits
    assert torch.equal(base, other)


def test_minimal_yarn_block_fills_original_from_max_position_embeddings() -> None:
    d = {**cf.BASE_V3, "rope_scaling": {"type": "yarn", "factor": 4.0}, "max_position_embeddings": 64}
    config = cf.parse(d)
    assert config.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert cf.parse(json.loads(config.to_json())) == config  # the export's config.json reads back the same


def test_stale_fp8_quantization_config_is_not_exported(tmp_path: Path) -> None:
    """A bf16 copy of an FP8 release keeps the FP8 `quantization_config` in its config.json: the checkpoint reads
    as unquantized and the export's config.json carries none."""
    d = {**cf.BASE_V3, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                               "weight_block_size": [128, 128]}}
    config = cf.parse(d)
    tensors = {n: (t.to(torch.bfloat16) if t.dim() >= 2 else t) for n, t in cf.weights(config).items()}
    ckpt = load_checkpoint(cf.write_checkpoint(tmp_path / "ckpt", d, tensors))
    assert not ckpt.is_fp8 and ckpt.config.quantization_config is None
    export_onnx(ckpt.config, ckpt.tensors, tmp_path / "export", progress=False)
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "quantization_config" not in written


def test_case_weights_really_have_small_latents() -> None:
    """The activation profile the eps cases rely on: latent RMS ~0.03 entering MLA's norms (measured, not assumed)."""
    config = cf.parse(cf.BASE_V3)
    model = cf.transformers_model(cf.BASE_V3, cf.weights(config))
    seen: list[float] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(float(inp[0].pow(2).mean().sqrt())))
             for name, m in model.named_modules() if name.endswith(("q_a_layernorm", "kv_a_layernorm"))]
    with torch.no_grad():
        model(torch.tensor(PROMPTS))
    for h in hooks:
        h.remove()
    assert seen and all(0.005 < rms < 0.1 for rms in seen), seen
    assert np.isfinite(seen).all()
