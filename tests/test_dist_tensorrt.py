"""The collectives as TensorRT plugins, and sharded TensorRT bundles.

* unit (no TensorRT): the plugins' `communicate` — what their enqueue runs on TensorRT's buffers — on 2 gloo ranks
  (torch.distributed on CPU tensors), against the ops' PyTorch references; a node built for another group size is
  refused by the plugin and by the ONNX Runtime binding.
* tensorrt (TensorRT for RTX, no GPU): the collective creators register with the other r1c plugins through the one
  `register_plugins`; fields round-trip; the plugins declare their workspace (all-reduce none, all-gather the
  staging of G inputs unless it gathers along axis 0); a build-phase plugin does not communicate; running needs the
  process group. One rank of TP2 x EP2 parses with every r1c node a plugin and the logits vocabulary-wide, and
  `r1c build --target tensorrt-rtx --tensor-parallel 2 --expert-parallel 2` writes a bundle of 4 engines and one
  kernel library by the one-rank TensorRT build.
Running the engines over NCCL needs GPUs: `scripts/dist_gpu_check.sh` (not verified here).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from r1c.config import ModelConfig
from r1c.errors import BundleError
from r1c.plugins.all_gather import SPEC as GATHER_SPEC
from r1c.plugins.all_gather import all_gather_reference
from r1c.plugins.all_gather.tensorrt import AllGatherOp
from r1c.plugins.all_reduce import SPEC as REDUCE_SPEC
from r1c.plugins.all_reduce import all_reduce_reference
from r1c.plugins.all_reduce.tensorrt import AllReduceOp
from tests.dist_helpers import cli, export
from tests.trt_helpers import dyn_desc

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None,
                               reason="TensorRT for RTX is not installed (pip install -e '.[tensorrt-rtx]')")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (the r1c plugins' kernels are Triton)")
WORLD = 2


def _rank_input(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rank r's input: distinct values on every rank, exact in bfloat16."""
    n = int(np.prod(shape))
    return (torch.arange(n, dtype=torch.float32).reshape(shape) + 1000 * rank).to(dtype)


def _collectives_on_rank(rank: int, store_path: str) -> None:
    """Run on each of WORLD gloo ranks (torch.multiprocessing): every check raises on its own rank."""
    import torch.distributed as dist

    from r1c.runtime.distributed import collectives
    from r1c.runtime.distributed.groups import close_groups, init_groups

    init_groups(rank, WORLD, {"tp": [list(range(WORLD))], "world": [list(range(WORLD))]},
                store=dist.FileStore(store_path, WORLD))
    try:
        shape = (2, 3, 4)
        for dtype in (torch.float32, torch.bfloat16):
            ins = [_rank_input(r, shape, dtype) for r in range(WORLD)]
            attrs = REDUCE_SPEC.attrs(group="world")
            AllReduceOp().require_runtime(attrs)
            y = torch.full(shape, -1.0, dtype=dtype)
            AllReduceOp().execute(attrs, [ins[rank]], [y])
            torch.testing.assert_close(y, all_reduce_reference(ins), rtol=0, atol=0)
            for axis in (-1, 0, 1):
                attrs = GATHER_SPEC.attrs(group="tp", axis=axis, group_size=WORLD)
                y = torch.full(AllGatherOp().output_shape(attrs, shape), -1.0, dtype=dtype)
                AllGatherOp().execute(attrs, [ins[rank]], [y])
                torch.testing.assert_close(y, all_gather_reference(ins, axis=axis), rtol=0, atol=0)
        wrong = GATHER_SPEC.attrs(group="tp", axis=-1, group_size=WORLD + 1)
        for call in (lambda: AllGatherOp().require_runtime(wrong),
                     lambda: collectives.all_gather(np.zeros(shape, np.float32), "tp", -1, WORLD + 1)):
            with pytest.raises(BundleError, match=f"over {WORLD + 1} ranks, but this process's 'tp' group has 2"):
                call()
    finally:
        close_groups()


def test_collective_plugins_communicate_as_the_references_on_gloo_ranks(tmp_path: Path) -> None:
    """All-reduce (sum) and all-gather along the last, first and a middle axis, float32 and bfloat16 (integers below
    2**8: exact in both, so the results must be equal, not close)."""
    import torch.multiprocessing as mp

    mp.start_processes(_collectives_on_rank, args=(str(tmp_path / "store"),), nprocs=WORLD, start_method="spawn")


def test_collective_workspace_and_shapes_without_tensorrt() -> None:
    gather = AllGatherOp()
    last = GATHER_SPEC.attrs(axis=-1, group_size=4)
    assert gather.output_shape(last, (2, 3, 8)) == (2, 3, 32)
    assert gather.workspace_bytes(last, [(2, 3, 8)], ["bfloat16"]) == 4 * 2 * 3 * 8 * 2  # G x the input, staged
    assert gather.workspace_bytes(GATHER_SPEC.attrs(axis=0, group_size=4), [(2, 3, 8)], ["float32"]) == 0
    assert AllReduceOp().workspace_bytes(REDUCE_SPEC.attrs(), [(2, 3, 8)], ["float32"]) == 0
    with pytest.raises(ValueError, match="group_size must be the number of ranks"):
        gather.validate(GATHER_SPEC.attrs())  # the default 0: a node the sharding did not write
    with pytest.raises(ValueError, match="group 'dp' is not one of"):
        AllReduceOp().validate(REDUCE_SPEC.attrs(group="dp"))
    with pytest.raises(ValueError, match="axis 3 is outside a rank-3 input"):
        gather.check_shapes(GATHER_SPEC.attrs(axis=3, group_size=2), [(2, 3, 8)])
    with pytest.raises(BundleError, match="collective over group 'tp', which this rank does not have"):
        AllReduceOp().require_runtime(REDUCE_SPEC.attrs())  # this process is no rank of a sharded bundle


# ---- TensorRT for RTX (no GPU) -------------------------------------------------------------------------------------
@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_collective_plugin_creators_register_with_the_other_plugins() -> None:
    from r1c.plugins.tensorrt_common import attrs_from_fields, field_collection, register_plugins
    from r1c.runtime.trt_lib import import_tensorrt_rtx

    trt = import_tensorrt_rtx()
    creators = register_plugins(trt)
    f32, bf16 = trt.DataType.FLOAT, trt.DataType.BF16
    for spec, attrs in ((REDUCE_SPEC, REDUCE_SPEC.attrs(group="world")),
                        (GATHER_SPEC, GATHER_SPEC.attrs(group="tp", axis=-1, group_size=2))):
        creator = creators[spec.plugin_id]
        assert [f.name for f in creator.field_names] == list(spec.attributes)
        fields, _keep = field_collection(trt, spec, attrs)
        plugin = creator.create_plugin(spec.name, fields, trt.TensorRTPhase.BUILD)
        assert plugin.attrs == attrs and attrs_from_fields(spec, plugin.get_fields_to_serialize()) == attrs
        with pytest.raises(BundleError, match="which this rank does not have"):  # running needs the process group
            creator.create_plugin(spec.name, fields, trt.TensorRTPhase.RUNTIME)
        # the builder times plugins by running them; a collective has no peers then: nothing runs, nothing fails
        pd = trt.PluginTensorDesc()
        pd.type, pd.dims = f32, trt.Dims([1, 1, 8])
        plugin.on_shape_change([pd], [pd])
        plugin.enqueue([pd], [pd], [0], [0], 0, 0)
        assert plugin._prepared is None
        declared = plugin.get_workspace_size([dyn_desc(trt, bf16, [1, 1, 8], [4, 16, 8])],
                                             [dyn_desc(trt, bf16, [1, 1, 16], [4, 16, 16])])
        assert declared == (2 * 4 * 16 * 8 * 2 if spec is GATHER_SPEC else 0)
    bad, _keep = field_collection(trt, GATHER_SPEC, GATHER_SPEC.attrs())
    with pytest.raises(ValueError, match="group_size must be"):
        creators[GATHER_SPEC.plugin_id].create_plugin("g", bad, trt.TensorRTPhase.BUILD)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("dist-trt") / "tiny")


def _r1c_node_counts(config: ModelConfig, tensor_parallel: int) -> dict[str, int]:
    """r1c nodes of one rank: per layer an all-reduce after attention and after the MLP / MoE, one after the
    embedding; the logits' all-gather (TP > 1); a router and experts per MoE layer."""
    moe = config.num_hidden_layers - config.first_k_dense_replace
    counts = {"r1c::AllReduce": 2 * config.num_hidden_layers + (1 if tensor_parallel > 1 else 0),
              "r1c::MoERouter": moe, "r1c::MoEExperts": moe}
    if tensor_parallel > 1:
        counts["r1c::AllGather"] = 1
    return counts


@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_rank_model_parses_with_every_r1c_node_a_plugin_and_vocabulary_wide_logits(tiny: Path, tmp_path: Path
                                                                                    ) -> None:
    """One rank (3) of TP2 x EP2, parsed by the one-rank check (`check_with_tensorrt_rtx`): each r1c node, the
    collectives included, a plugin layer with the node's attributes; the all-gather's output as wide as the
    vocabulary."""
    from r1c.passes.shard_layout import ShardLayout
    from r1c.passes.shard_pipelines import lower_rank_file
    from r1c.runtime.trt_rtx import check_with_tensorrt_rtx

    c = ModelConfig.from_json(tiny / "config.json")
    model = lower_rank_file(tiny / "model.onnx", tmp_path / "model.onnx", target="tensorrt", config=c,
                            layout=ShardLayout(2, 2), rank=3)
    report = check_with_tensorrt_rtx(model, c, build=False)
    plugins = [p["plugin"] for p in report.plugin_layers]
    assert {p: plugins.count(p) for p in set(plugins)} == _r1c_node_counts(c, 2)
    gather = next(p for p in report.plugin_layers if p["plugin"] == "r1c::AllGather")
    assert gather["attributes"] == {"group": "tp", "axis": -1, "group_size": 2}
    assert gather["output_shapes"] == [[-1, -1, c.vocab_size]]
    assert report.outputs["logits"] == {"shape": [-1, -1, c.vocab_size], "dtype": "FLOAT"}
    assert {p["attributes"]["group"] for p in report.plugin_layers if p["plugin"] == "r1c::AllReduce"} == \
        {"tp", "world"}


@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_r1c_build_tensorrt_rtx_tp2_ep2_writes_four_engines_and_one_kernel_library(tiny: Path, tmp_path: Path,
                                                                                   record_property: Any) -> None:
    """`r1c build --target tensorrt-rtx --tensor-parallel 2 --expert-parallel 2`: each rank through the one-rank
    TensorRT build (kernels for sm_89, every r1c node a plugin layer or the build fails, engine streamed), engines
    model.rank{r}.engine, the ranks' kernels in one library, every file in the manifest."""
    from r1c.manifest import read_manifest
    from r1c.plugins.kernel_library import KernelLibrary

    bundle = tmp_path / "b"
    code, _, err = cli("build", str(tiny), "-o", str(bundle), "--target", "tensorrt-rtx", "--tensor-parallel", "2",
                       "--expert-parallel", "2")
    assert code == 0, err
    m = read_manifest(bundle)
    opts, dist = m.target_options, m.target_options["distributed"]
    record_property("rank_build_seconds", [r["seconds"] for r in dist["ranks"]])
    assert m.target == "tensorrt-rtx" and set(m.libraries) >= {"tensorrt_rtx", "triton", "onnx"}
    assert (opts["arch"], opts["compute_capability"], dist["world_size"], dist["backend"]) == ("sm89", "8.9", 4,
                                                                                                "nccl")
    want = _r1c_node_counts(m.config, 2)
    for rank, entry in enumerate(dist["ranks"]):
        assert entry["engine"] == f"model.rank{rank}.engine" and (bundle / entry["engine"]).stat().st_size > 0
        assert entry["plugins"] == sorted(want) and entry["plugin_layers"] == sum(want.values())
        assert entry["engine"] in m.files
    lib = KernelLibrary(bundle / opts["kernels"])
    assert lib.compute_capability == "8.9" and len(lib.entries) == opts["kernels_compiled"] > 0
    assert all(0 < e["kernels_compiled"] <= opts["kernels_compiled"] for e in dist["ranks"])  # shared kernels once
    assert {Path(f).name for f in m.files if f.startswith("kernels/")} == \
        {"index.json", *(e["cubin"] for e in lib.entries.values())}
    assert sorted(p.name for p in bundle.iterdir()) == ["kernels", "manifest.json",
                                                        *(f"model.rank{r}.engine" for r in range(4))]
