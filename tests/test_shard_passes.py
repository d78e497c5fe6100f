"""unit tier: the sharding passes, checked without process groups.

Every rank of a layout runs in this process, in lockstep, with the collectives' PyTorch references
(`r1c.runtime.distributed.simulate`); their outputs must equal the unsharded model's within REL_TOL (float32,
see dist_helpers). The multi-process runs over torch.distributed are tests/test_dist_e2e.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from r1c.config import ModelConfig, preset
from r1c.errors import PassError
from r1c.passes.shard_layout import ShardLayout
from r1c.passes.shard_model import ShardModelPass
from r1c.passes.shard_pipelines import run_sharded_pipeline, sharded_pipeline
from r1c.passes.testing import make_model, op_counts
from r1c.passes.testing import run as ort_run
from r1c.plugins.moe_experts import moe_experts_reference
from r1c.runtime.distributed.segments import Collective, Segment, split
from r1c.runtime.distributed.simulate import run_lockstep
from tests.dist_helpers import LAYOUTS, REL_TOL, export, feeds_with_past, rel_err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("shard") / "tiny")


def _reference(export_dir: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_lockstep([ir.load(export_dir / "model.onnx")], ShardLayout(), feeds, base_dir=str(export_dir))[0]


def _ranks(export_dir: Path, layout: ShardLayout, target: str | None = None) -> list[ir.Model]:
    config = ModelConfig.from_json(export_dir / "config.json")
    models = []
    for rank in range(layout.world_size):
        model = ir.load(export_dir / "model.onnx")
        if target is None:
            models.append(ShardModelPass(config, layout, rank)(model).model)
        else:
            models.append(run_sharded_pipeline(model, target, config, layout, rank))
    return models


def _assert_equal_outputs(outs: list[dict[str, np.ndarray]], want: dict[str, np.ndarray]) -> None:
    for rank, got in enumerate(outs):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].shape == want[name].shape, (rank, name)
            assert rel_err(got[name], want[name]) < REL_TOL, (rank, name, rel_err(got[name], want[name]))


@pytest.mark.parametrize(("tp", "ep"), LAYOUTS)
def test_sharded_ranks_compute_the_unsharded_model(tiny: Path, tp: int, ep: int) -> None:
    layout = ShardLayout(tp, ep)
    feeds = feeds_with_past(preset("tiny"))
    outs = run_lockstep(_ranks(tiny, layout), layout, feeds, base_dir=str(tiny))
    _assert_equal_outputs(outs, _reference(tiny, feeds))


@pytest.mark.parametrize(("tp", "ep"), [(1, 2), (2, 2)])
def test_sharded_onnxruntime_pipeline_lowers_local_experts_and_stays_equal(tiny: Path, tp: int, ep: int) -> None:
    """The rank pipeline for ONNX Runtime: EP experts run as ORT's MoE (local experts + a zero remainder)."""
    layout = ShardLayout(tp, ep)
    models = _ranks(tiny, layout, "onnxruntime")
    for model in models:
        ops = op_counts(model)
        assert ops.get("com.microsoft::MoE") == preset("tiny").num_moe_layers
        assert not any(k.startswith("r1c::") for k in ops), ops
        assert ops.get("ai.onnx.contrib::R1cAllReduce")
    feeds = feeds_with_past(preset("tiny"), seed=1)
    _assert_equal_outputs(run_lockstep(models, layout, feeds, base_dir=str(tiny)), _reference(tiny, feeds))


def test_each_rank_holds_only_its_share(tiny: Path) -> None:
    c = preset("tiny")
    layout = ShardLayout(2, 2)
    models = _ranks(tiny, layout)
    p = f"model.layers.{c.first_k_dense_replace}.mlp"
    for rank, model in enumerate(models):
        e, _ = layout.coords(rank)
        inits = model.graph.initializers
        assert list(inits[f"{p}.experts.w13"].shape) == [c.n_routed_experts // 2, c.moe_intermediate_size,
                                                         c.hidden_size]
        assert list(inits["model.embed_tokens.weight"].shape) == [c.vocab_size // 2, c.hidden_size]
        assert next(iter(inits["model.layers.0.self_attn.w_uk"].shape)) == c.num_attention_heads // 2
        assert (f"{p}.shared_experts.down_proj.weight_t" in inits) == (e == 0)  # partition 0 adds the shared expert
        ops = op_counts(model)
        # one all-reduce per attention and per MLP / MoE, one for the embedding; one all-gather for the logits
        assert ops["r1c::AllReduce"] == 2 * c.num_hidden_layers + 1 and ops["r1c::AllGather"] == 1


def test_sliced_weights_are_read_lazily(tiny: Path) -> None:
    model = ShardModelPass(preset("tiny"), ShardLayout(2, 1), 1)(ir.load(tiny / "model.onnx")).model
    table = model.graph.initializers["model.embed_tokens.weight"].const_value
    assert isinstance(table, ir.LazyTensor)  # nothing read until the model is saved
    full = ir.load(tiny / "model.onnx").graph.initializers["model.embed_tokens.weight"].const_value.numpy()
    np.testing.assert_array_equal(table.numpy(), full[full.shape[0] // 2:])


def test_split_alternates_segments_and_collectives(tiny: Path) -> None:
    steps = split(_ranks(tiny, ShardLayout(2, 1))[0])
    kinds = [type(s) for s in steps]
    assert kinds[0] is Segment and kinds[-1] is Collective  # the logits all-gather is last
    assert all(a is not b for a, b in itertools.pairwise(kinds))
    assert [s.group for s in steps if isinstance(s, Collective)].count("world") == preset("tiny").num_moe_layers


def test_layout_rejects_sizes_it_does_not_divide() -> None:
    with pytest.raises(PassError, match="num_attention_heads = 4 does not split into 3"):
        ShardLayout(3, 1).check(preset("tiny"))
    with pytest.raises(PassError, match="n_routed_experts = 16 does not split into 3"):
        ShardLayout(1, 3).check(preset("tiny"))
    with pytest.raises(PassError, match="must be >= 1"):
        ShardLayout(0, 1)
    assert ShardLayout(2, 2).groups() == {"tp": [[0, 1], [2, 3]], "world": [[0, 1, 2, 3]]}


def test_sharded_pipelines_put_sharding_before_the_swiglu_fusion_and_lowerings() -> None:
    from r1c.passes.pipelines import pass_name

    names = [pass_name(p) for p in sharded_pipeline("onnxruntime", preset("tiny"), ShardLayout(2, 1), 0)]
    order = ["fuse_moe_experts", "shard_model", "fuse_swiglu", "shard_lower_moe_to_ort", "lower_moe_to_ort",
             "shard_lower_collectives_to_ort", "inline_r1c_functions"]
    assert [n for n in names if n in order] == order
    names = [pass_name(p) for p in sharded_pipeline("tensorrt", preset("tiny"), ShardLayout(2, 1), 0)]
    assert names.index("shard_model") == names.index("drop_r1c_function_bodies") + 1


def test_fp8_experts_shard_by_partition_and_unaligned_heads_are_refused(tmp_path: Path) -> None:
    fp8 = export(tmp_path / "fp8", "--precision", "fp8")
    layout = ShardLayout(1, 2)
    feeds = feeds_with_past(preset("tiny"), seed=2)
    outs = run_lockstep(_ranks(fp8, layout), layout, feeds, base_dir=str(fp8))
    _assert_equal_outputs(outs, _reference(fp8, feeds))
    with pytest.raises(PassError, match="128-row"):  # tiny's heads are 32 kv_b rows: not on FP8 scale blocks
        _ranks(fp8, ShardLayout(2, 1))


def test_moe_experts_body_sums_repeated_ids() -> None:
    """Sharding routes other ranks' slots to a local id with weight 0: the op's body must add, not overwrite."""
    from r1c.exporter.onnx_functions import experts_function
    from r1c.plugins.moe_experts import SPEC

    rng = np.random.default_rng(0)
    t, h, i, e = 3, 8, 4, 2
    x = rng.standard_normal((t, h)).astype(np.float32)
    w13 = rng.standard_normal((e, 2 * i, h)).astype(np.float32)
    w2 = rng.standard_normal((e, h, i)).astype(np.float32)
    ids = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 1]], np.int32)  # repeats, some with weight 0
    weights = np.array([[0.5, 0.0, 0.25], [1.0, 0.0, 0.5], [0.0, 2.0, 0.0]], np.float32)
    f = onnx.TensorProto.FLOAT
    node = onnx.helper.make_node(SPEC.name, list(SPEC.inputs), ["y"], domain=SPEC.domain, **SPEC.attrs())
    model = make_model([node], [onnx.helper.make_tensor_value_info(n, f if n != "topk_ids" else onnx.TensorProto.INT32,
                                                                   None) for n in SPEC.inputs],
                       [onnx.helper.make_tensor_value_info("y", f, None)], functions=[experts_function()])
    got = ort_run(model, {"hidden": x, "topk_weights": weights, "topk_ids": ids, "w13": w13, "w2": w2})[0]
    want = moe_experts_reference(*(torch.from_numpy(a) for a in (x, weights, ids, w13, w2))).numpy()
    assert rel_err(got, want) < REL_TOL
