"""e2e tier: bfloat16 and float16 exports run by ONNX Runtime on the CPU, held to transformers' own error in the
same dtype.

Half-precision logits cannot be compared with an absolute tolerance: DeepSeek's routing is a discontinuous
function (top-k of sigmoid scores), so whenever bf16 rounding moves a near-tie the token takes other experts and
its logits change by O(1), and attention carries that to the later tokens of its sequence. Which tokens flip is
luck, for transformers as much as for r1c. So each bundle is compared, like transformers' DeepseekV3 in the same
dtype, with transformers in float32 on the same (bf16) weights, and r1c's error must be at most
HALF_ERROR_RATIO x transformers' own:
    error(x) = median over tokens of  max_vocab |x - ref| / max |ref|     (ref: transformers float32)
over 16 short sequences of 8 tokens (short sequences keep one early flip from reaching most tokens).
Measured (/work/notes/issue-10-scale2.md; 3 weight seeds x 8 id seeds, tiny and the 64-expert config below):
the ratio was 0.79-1.11 for bfloat16 (0.97 and 1.00 for the seeds used here) and 0.41-0.49 for float16 (ONNX
Runtime's CPU provider runs fp16 element-wise ops in float32, so fewer roundings than torch). Faults put into
the lowering raised the bfloat16 ratio to 1.24/1.34 (RMSNorm statistics in bf16) and 1.02/1.20 (router weights
rounded to bf16). HALF_ERROR_RATIO = 1.15: above every fault-free ratio seen, below those faults.
Graph facts checked too: weights in the export dtype (half the float32 bytes), router and RMSNorm statistics
float32, the latent cache I/O in the export dtype; decode through the half cache equals the cacheless forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import ModelConfig, preset
from r1c.exporter.checkpoint import random_checkpoint, save_checkpoint
from r1c.runtime import load

HALF_ERROR_RATIO = 1.15
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ONNX = {"bfloat16": onnx.TensorProto.BFLOAT16, "float16": onnx.TensorProto.FLOAT16}
# the routing of the small preset (top-8 of 64 experts in 8 groups, 4 kept) at tiny widths, 3 MoE layers deep
CONFIGS: dict[str, ModelConfig] = {
    "tiny": preset("tiny"),
    "experts64": preset("tiny").replace(n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4,
                                        num_hidden_layers=4),
}


def cli(*args: str) -> None:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.stderr


def export_all(root: Path, config: ModelConfig, dtypes: tuple[str, ...]) -> Path:
    save_checkpoint(root / "ckpt", config, random_checkpoint(config, seed=1, dtype=torch.bfloat16))
    for dtype in dtypes:
        cli("export", str(root / "ckpt"), "--dtype", dtype, "--no-progress", "-o", str(root / dtype))
        cli("build", str(root / dtype), "-o", str(root / f"{dtype}.bundle"))
    return root


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_all(tmp_path_factory.mktemp("dtypes"), CONFIGS["tiny"], ("float32", "bfloat16", "float16"))


@pytest.fixture(scope="module")
def experts64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_all(tmp_path_factory.mktemp("dtypes64"), CONFIGS["experts64"], ("bfloat16", "float16"))


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


_LOGITS: dict[tuple[Path, str], np.ndarray] = {}


def transformers_logits(transformers: Any, root: Path, dtype: str, ids: np.ndarray) -> np.ndarray:
    """transformers' DeepseekV3 logits [B, S, V] (float32) on the checkpoint in `root`, in `dtype`; cached."""
    if (root, dtype) not in _LOGITS:
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(str(root / "ckpt"), dtype=TORCH[dtype]).eval()
        with torch.no_grad():
            _LOGITS[root, dtype] = model(torch.from_numpy(ids)).logits.float().numpy()
    return _LOGITS[root, dtype]


def half_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Median over tokens of max_vocab |got - ref| / max |ref| (logits [B, S, V])."""
    return float(np.median(np.abs(got - ref).max(-1) / np.abs(ref).max()))


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_bundle_error_is_at_most_transformers_own(exports: Path, experts64: Path, config: str,
                                                       dtype: str) -> None:
    transformers = pytest.importorskip("transformers")
    root = exports if config == "tiny" else experts64
    ids = np.random.default_rng(0).integers(0, CONFIGS[config].vocab_size, size=(16, 8))
    ref = transformers_logits(transformers, root, "float32", ids)
    got = load(root / f"{dtype}.bundle").forward(ids)
    ours, theirs = half_error(got, ref), half_error(transformers_logits(transformers, root, dtype, ids), ref)
    assert 0 < ours <= HALF_ERROR_RATIO * theirs, (ours, theirs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_decode_through_the_cache_equals_the_cacheless_forward(exports: Path, dtype: str) -> None:
    engine = load(exports / f"{dtype}.bundle")
    assert engine.cache_dtype.name == dtype
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, engine.vocab_size, size=5)]
    new = engine.generate([prompt], max_new_tokens=3)[0]
    full = engine.forward(np.array([prompt + new[:-1]]))
    assert full[0, len(prompt) - 1:].argmax(-1).tolist() == new
