"""e2e tier: bfloat16 and float16 exports of the tiny preset, run by ONNX Runtime on the CPU, against
transformers' DeepseekV3 in the same dtype on the same (bf16) weights.

Tolerance, per token (max |a - b| over the vocabulary / max |b| over the batch): bfloat16 3e-2 (8 mantissa
bits: ~4e-3 per rounding, a few dozen roundings deep), float16 5e-3 (11 bits). Both sides keep the router in
float32 but round its input differently, so a token whose expert choice is a near-tie can route differently
and differ by O(1) (seen: 1 token of 18 in float16 with seed 1); up to 1 token in 6 may fall outside the
tolerance, and the median token must be 2x inside it. Graph facts checked too: weights in the export dtype
(half the float32 bytes), router and RMSNorm statistics float32, the latent cache I/O in the export dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import preset
from r1c.exporter.checkpoint import random_checkpoint, save_checkpoint
from r1c.runtime import load

TOL = {"bfloat16": 3e-2, "float16": 5e-3}
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ONNX = {"bfloat16": onnx.TensorProto.BFLOAT16, "float16": onnx.TensorProto.FLOAT16}


def cli(*args: str) -> None:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.stderr


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dtypes")
    config = preset("tiny")
    save_checkpoint(root / "ckpt", config, random_checkpoint(config, seed=1, dtype=torch.bfloat16))
    for dtype in ("float32", "bfloat16", "float16"):
        cli("export", str(root / "ckpt"), "--dtype", dtype, "--no-progress", "-o", str(root / dtype))
        cli("build", str(root / dtype), "-o", str(root / f"{dtype}.bundle"))
    return root


def test_auto_dtype_is_the_checkpoints(exports: Path, tmp_path: Path) -> None:
    cli("export", str(exports / "ckpt"), "--no-progress", "-o", str(tmp_path / "auto"))
    assert json.loads((tmp_path / "auto" / "source.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_graph_types_and_sizes(exports: Path, dtype: str) -> None:
    model = onnx.load(str(exports / dtype / "model.onnx"), load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["model.layers.1.mlp.experts.w13"] == types["lm_head.weight_t"] == ONNX[dtype]
    assert types["model.layers.1.mlp.gate.weight"] == types["model.layers.1.mlp.gate.e_score_correction_bias"] \
        == onnx.TensorProto.FLOAT
    io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert io["past_c.0"] == io["new_c"] == io["new_pe"] == ONNX[dtype] and io["logits"] == onnx.TensorProto.FLOAT
    graph_io = json.loads((exports / dtype / "graph_io.json").read_text())
    assert graph_io["kv_cache"]["dtype"] == dtype
    # RMSNorm: x widened to float32 before its statistics, the result narrowed before the weight
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    assert sum(1 for n in casts if n.attribute[0].i == onnx.TensorProto.FLOAT) >= 2 * preset("tiny").num_hidden_layers
    half = (exports / dtype / "model.onnx.data").stat().st_size
    full = (exports / "float32" / "model.onnx.data").stat().st_size
    assert 0.45 < half / full < 0.55


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_bundle_logits_match_transformers_in_the_same_dtype(exports: Path, dtype: str) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(exports / "ckpt"), dtype=TORCH[dtype]).eval()
    engine = load(exports / f"{dtype}.bundle")
    assert engine.cache_dtype.name == dtype
    ids = np.random.default_rng(0).integers(0, engine.vocab_size, size=(2, 9))
    got = engine.forward(ids)
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.float().numpy()
    per_token = (np.abs(got - want).max(-1) / np.abs(want).max()).ravel()
    assert np.median(per_token) < TOL[dtype] / 2, per_token
    assert np.mean(per_token > TOL[dtype]) <= 1 / 6, per_token
    # decode through the half-precision cache agrees with the cacheless forward of the same tokens
    prompt = [int(t) for t in ids[0, :5]]
    new = engine.generate([prompt], max_new_tokens=3)[0]
    full = engine.forward(np.array([prompt + new[:-1]]))
    assert full[0, len(prompt) - 1:].argmax(-1).tolist() == new
