"""tensorrt tier: the r1c TensorRT plugins, the TensorRT builds and the TensorRT backend.

With TensorRT for RTX installed (`pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`), its builder runs
on a CPU for an explicit compute capability: the plugin creators register, the plugins declare their workspace
through TensorRT's own descriptors, the tiny export parses with every r1c node bound to an r1c plugin, and
`r1c build --target tensorrt-rtx --arch sm89` writes a bundle (engine streamed to disk, kernel library for sm_89,
manifest naming the arch and library). Running an engine needs a CUDA GPU (the last test, skipped elsewhere).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import ModelConfig, preset
from r1c.errors import BuildError, BundleError
from r1c.plugins import PLUGIN_NAMESPACE
from r1c.plugins.fp8_linear import SPEC as LINEAR_SPEC
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC
from r1c.runtime import trt_build, trt_lib
from r1c.runtime.trt_build import build_tensorrt, drop_function_bodies
from r1c.runtime.trt_profiles import parse_compute_capability, profile_shapes
from tests.trt_helpers import dyn_desc

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT for RTX is not installed (module tensorrt_rtx_bindings; "
                               "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (the kernels are Triton)")
PROFILE: dict[str, Any] = {"max_batch": 4, "max_seq": 32, "max_capacity": 64}


def export_tiny(out: Path, precision: str = "auto", dtype: str = "auto") -> Path:
    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--precision", precision, "--dtype", dtype,
                                  "--no-progress", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("trt") / "export")


@pytest.fixture(scope="module")
def tiny_fp8_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP8 weights, bfloat16 activations and cache (`r1c export --precision fp8 --dtype bfloat16`)."""
    return export_tiny(tmp_path_factory.mktemp("trt8") / "export", "fp8", "bfloat16")


def r1c_nodes(model_path: Path) -> list[onnx.NodeProto]:
    model = onnx.load(str(model_path), load_external_data=False)
    return [n for n in model.graph.node if n.domain == "r1c"]


# ---- without TensorRT ---------------------------------------------------------------------------------------------
@pytest.mark.tensorrt
def test_build_tensorrt_without_tensorrt_raises_clear_build_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(BuildError, match=r"TensorRT is not installed: .*install TensorRT 10\.x for Hopper.*"
                                         r"or use --target onnxruntime"):
        build_tensorrt(tmp_path, preset("tiny"))


@pytest.mark.tensorrt
def test_backend_without_tensorrt_raises_bundle_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from r1c.manifest import Manifest
    from r1c.runtime.trt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    m = Manifest(target="tensorrt", precision="none", model_config={}, config_hash="", graph_io={}, files={},
                 libraries={}, device={})
    with pytest.raises(BundleError, match="TensorRT is not installed"):
        TensorRTBackend(Path("."), m)


def test_profile_covers_decode_prefill_and_no_cache_calls() -> None:
    c = preset("tiny")
    names = ["input_ids", "past_lengths", "logits_index",
             *[f"past_{k}.{i}" for i in range(c.num_hidden_layers) for k in ("c", "pe")]]
    p = profile_shapes(c, names, PROFILE)
    assert p["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [4, 32]}
    # kept positions: 1 for a sampling step (prefill or decode), up to every new token for scoring / forward
    assert p["logits_index"] == {"min": [1, 1], "opt": [4, 1], "max": [4, 32]}
    assert "logits_index" not in profile_shapes(c, [n for n in names if n != "logits_index"])  # an older export
    assert p["past_lengths"] == {"min": [1], "opt": [4], "max": [4]}
    assert p["past_c.2"] == {"min": [1, c.kv_lora_rank, 1], "opt": [4, c.kv_lora_rank, 64],
                             "max": [4, c.kv_lora_rank, 64]}
    assert p["past_pe.0"]["max"] == [4, c.qk_rope_head_dim, 64]
    default = profile_shapes(c, names)
    assert default["input_ids"]["max"][1] == default["past_c.0"]["max"][2] == c.max_position_embeddings
    with pytest.raises(BuildError, match="max_position_embeddings"):
        profile_shapes(c, names, {"max_capacity": c.max_position_embeddings + 1})
    with pytest.raises(BuildError, match="unknown TensorRT profile options"):
        profile_shapes(c, names, {"max_tokens": 4})
    with pytest.raises(BuildError, match="no optimization profile rule"):
        profile_shapes(c, [*names, "attention_mask"])


def test_compute_capability_spellings() -> None:
    for v in ("SM89", "sm_89", "sm89", "8.9", 89, (8, 9)):
        assert parse_compute_capability(v) == (8, 9)
    assert parse_compute_capability("sm120") == (12, 0)
    with pytest.raises(BuildError, match="compute capability"):
        parse_compute_capability("hopper")


def test_drop_function_bodies_uses_the_pass_and_keeps_nodes_and_weights(tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tiny_export, tmp_path / "m")
    path = tmp_path / "m" / "model.onnx"
    assert drop_function_bodies(path) == ["r1c::MoEExperts", "r1c::MoERouter"]
    model = onnx.load(str(path), load_external_data=False)
    assert not model.functions
    assert len(r1c_nodes(path)) == len(r1c_nodes(tiny_export / "model.onnx"))
    assert drop_function_bodies(path) == []  # idempotent
    assert (tmp_path / "m" / "model.onnx.data").stat().st_size == (tiny_export / "model.onnx.data").stat().st_size
    onnx.load(str(path))  # the external data still resolves


def test_require_plugin_layers_names_the_unbound_node() -> None:
    layers = [{"name": "a", "plugin": "r1c::MoERouter"}, {"name": "b", "plugin": "other::MoEExperts"}]
    trt_build.require_plugin_layers([("a", "MoERouter")], layers)
    with pytest.raises(BuildError, match=r"b \(MoEExperts\)"):
        trt_build.require_plugin_layers([("a", "MoERouter"), ("b", "MoEExperts")], layers)


class _FakeTrt:
    """Just enough of a TensorRT module for `_serialize`: a stream-writer base class."""

    class IStreamWriter:
        def __init__(self) -> None:
            pass


def test_plan_is_streamed_to_the_engine_file(tmp_path: Path) -> None:
    """The builder's stream writer receives the plan in chunks; `build_serialized_network` (the whole plan as one
    host buffer) is never called, and a failed build leaves no file."""

    class Builder:
        def build_serialized_network_to_stream(self, network: Any, cfg: Any, writer: Any) -> bool:
            for i in range(5):
                assert writer.write(bytes([i]) * 1000) == 1000
            return True

        def build_serialized_network(self, *a: Any) -> Any:
            raise AssertionError("the plan must be streamed")

    parsed: Any = type("P", (), {"builder": Builder(), "network": None})()
    engine = tmp_path / "model.engine"
    assert trt_build._serialize(_FakeTrt, parsed, None, engine) == 5000
    assert engine.read_bytes() == b"".join(bytes([i]) * 1000 for i in range(5))
    parsed.builder.build_serialized_network_to_stream = lambda n, c, w: w.write(b"x") and False
    assert trt_build._serialize(_FakeTrt, parsed, None, tmp_path / "failed.engine") is None
    assert not list(tmp_path.glob("failed.engine*"))


# ---- the plugins without a GPU ------------------------------------------------------------------------------------
@pytest.mark.tensorrt
@needs_triton
def test_plugins_without_a_kernel_library_refuse_to_run() -> None:
    """No fallback: with no kernel library loaded, a plugin cannot be created for running or enqueued."""
    from r1c.plugins.tensorrt_common import kernel_runner, use_kernel_library

    use_kernel_library(None)
    with pytest.raises(BundleError, match="no r1c kernel library is loaded"):
        kernel_runner()


def _spec_cases() -> list[tuple[Any, dict[str, Any]]]:
    return [
        (ROUTER_SPEC, ROUTER_SPEC.attrs(top_k=6, n_group=4, topk_group=3, routed_scaling_factor=1.75,
                                        norm_topk_prob=0, scoring="softmax")),
        (EXPERTS_SPEC, EXPERTS_SPEC.attrs(quant="fp8_block128")),
        (LINEAR_SPEC, LINEAR_SPEC.attrs()),
    ]


@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_plugin_creators_register_and_round_trip_fields() -> None:
    from r1c.plugins.tensorrt_common import attrs_from_fields, field_collection, register_plugins

    trt = trt_lib.import_tensorrt_rtx()
    creators = register_plugins(trt)
    # the compute ops are checked here, the collectives in tests/test_dist_tensorrt.py
    assert set(creators) == {ROUTER_SPEC.plugin_id, EXPERTS_SPEC.plugin_id, LINEAR_SPEC.plugin_id,
                             "r1c::AllReduce", "r1c::AllGather"}
    assert register_plugins(trt) == creators  # idempotent
    registry = trt.get_plugin_registry()
    for spec, attrs in _spec_cases():
        creator = registry.get_creator(spec.name, str(spec.version), PLUGIN_NAMESPACE)
        assert creator is creators[spec.plugin_id]
        assert (creator.name, creator.plugin_namespace, creator.plugin_version) == (spec.name, "r1c", "1")
        assert [f.name for f in creator.field_names] == list(spec.attributes)

        fields, _keep = field_collection(trt, spec, attrs)
        plugin = creator.create_plugin(spec.name, fields, trt.TensorRTPhase.BUILD)
        assert plugin.attrs == attrs
        assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == (spec.name, "r1c", "1")
        assert plugin.num_outputs == len(spec.outputs)
        serialized = plugin.get_fields_to_serialize()
        assert attrs_from_fields(spec, serialized) == attrs
        with pytest.raises(BundleError, match="no r1c kernel library"):  # running needs the kernels
            creator.create_plugin(spec.name, serialized, trt.TensorRTPhase.RUNTIME)
        twin = plugin.clone()
        assert twin is not plugin and twin.attrs == attrs and type(twin) is type(plugin)

    router = creators[ROUTER_SPEC.plugin_id]
    bad, _keep = field_collection(trt, ROUTER_SPEC, ROUTER_SPEC.attrs(scoring="tanh"))
    with pytest.raises(ValueError, match="unknown scoring 'tanh'"):
        router.create_plugin("r", bad, trt.TensorRTPhase.BUILD)
    extra = trt.PluginFieldCollection([trt.PluginField("topk", np.array([2], np.int32), trt.PluginFieldType.INT32)])
    with pytest.raises(ValueError, match="unknown attribute 'topk'"):
        router.create_plugin("r", extra, trt.TensorRTPhase.BUILD)


@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_plugins_declare_their_workspace_from_the_profile_maxima() -> None:
    """`get_workspace_size` (called by TensorRT's builder with the profile's min/max shapes) returns what the launch
    plan of the largest token count needs, and grows with the profile."""
    from r1c.plugins.moe_experts.plan import ExpertsProblem, experts_plan
    from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
    from r1c.plugins.tensorrt_common import field_collection, register_plugins

    trt = trt_lib.import_tensorrt_rtx()
    creators = register_plugins(trt)
    f32, i32, fp8 = trt.DataType.FLOAT, trt.DataType.INT32, trt.DataType.FP8
    e, h, i, k = 16, 256, 128, 4
    sizes, attrs = [], EXPERTS_SPEC.attrs(quant="fp8_block128")
    for t_max in (8, 64, 512):
        fields, _keep = field_collection(trt, EXPERTS_SPEC, attrs)
        plugin = creators[EXPERTS_SPEC.plugin_id].create_plugin("e", fields, trt.TensorRTPhase.BUILD)
        ins = [dyn_desc(trt, f32, [1, h], [t_max, h]), dyn_desc(trt, f32, [1, k], [t_max, k]),
               dyn_desc(trt, i32, [1, k], [t_max, k]), dyn_desc(trt, fp8, [e, 2 * i, h], [e, 2 * i, h]),
               dyn_desc(trt, fp8, [e, h, i], [e, h, i]), dyn_desc(trt, f32, [e, 2, 2], [e, 2, 2]),
               dyn_desc(trt, f32, [e, 2, 1], [e, 2, 1])]
        declared = plugin.get_workspace_size(ins, [dyn_desc(trt, f32, [1, h], [t_max, h])])
        problem = ExpertsProblem(t_max, k, e, h, i, "float32", "float8_e4m3fn")
        assert declared == MoEExpertsOp().workspace_size(attrs, problem) >= experts_plan(problem).workspace_size > 0
        sizes.append(declared)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


@pytest.mark.tensorrt
@needs_rtx
def test_op_list_is_the_targeted_parsers_answer() -> None:
    """passes/tensorrt_ops.py is tied to the parser: the installed one must report the same ops and version."""
    from r1c.passes import tensorrt_ops
    from r1c.runtime.trt_rtx import supported_onnx_ops

    found = supported_onnx_ops()
    assert found["parser"] == tensorrt_ops.PARSER, "another parser: regenerate passes/tensorrt_ops.py"
    assert sorted(tensorrt_ops.SUPPORTED_OPS) == found["ops"]


@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_build_tensorrt_refuses_rtx_in_process_without_parser_library(tiny_export: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process the parser would abort() on dlopen("libtensorrt_rtx.so"); the build must say so instead.
    import shutil

    monkeypatch.setattr(trt_build, "rtx_parser_library_reachable", lambda lib_dir: False)
    shutil.copytree(tiny_export, tmp_path / "m")
    with pytest.raises(BuildError, match="LD_LIBRARY_PATH"):
        trt_build.parse_and_build(trt_lib.import_tensorrt_rtx(), tmp_path / "m" / "model.onnx", preset("tiny"),
                                  compute_capability="sm89")


@pytest.mark.tensorrt
@needs_rtx
def test_tensorrt_rtx_refuses_fp8_and_unknown_targets_before_compiling(tiny_fp8_export: Path, tmp_path: Path) -> None:
    for arch, why in (("sm86", "no FP8 tensor cores"), ("sm90", "cannot target sm90")):
        r = CliRunner().invoke(main, ["build", str(tiny_fp8_export), "-o", str(tmp_path / arch), "--target",
                                      "tensorrt-rtx", "--arch", arch])
        assert r.exit_code == 1 and why in r.stderr, r.stderr
        assert not (tmp_path / arch).exists()


# ---- TensorRT for RTX on the CPU: the tiny preset, parsed and built -----------------------------------------------
def _check_plugin_layers(report: Any, model_path: Path, config: ModelConfig) -> None:
    nodes = r1c_nodes(model_path)
    by_name = {p["name"]: p for p in report.plugin_layers}
    assert sorted(by_name) == sorted(n.name for n in nodes)
    for node in nodes:
        layer = by_name[node.name]
        assert layer["plugin"] == f"r1c::{node.op_type}" and layer["version"] == "1"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        want = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items() if k != "plugin_namespace"}
        assert layer["attributes"] == pytest.approx(want)
        if node.op_type == "MoERouter":  # T stays symbolic; K is the top_k attribute
            assert layer["output_shapes"] == [[-1, config.num_experts_per_tok]] * 2
            assert layer["output_dtypes"] == ["FLOAT", "INT32"]
        elif node.op_type == "MoEExperts":
            assert layer["output_shapes"] == [[-1, config.hidden_size]] and layer["output_dtypes"] == ["FLOAT"]
        else:  # FP8Linear: x's leading dims, then N
            assert layer["output_shapes"][0][-1] > 0 and layer["output_dtypes"] == ["FLOAT"]


@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_tiny_export_parses_and_builds_with_tensorrt_rtx(tiny_export: Path, record_property: Any) -> None:
    """The export as `r1c export` writes it (function bodies dropped from a copy), parsed and built for SM89."""
    from r1c.runtime.trt_rtx import check_with_tensorrt_rtx

    config = ModelConfig.from_json(tiny_export / "config.json")
    model_path = tiny_export / "model.onnx"
    report = check_with_tensorrt_rtx(model_path, config, compute_capability="sm89", **PROFILE)
    record_property("tensorrt_rtx_layers", report.layers)
    print(f"\nexport: {report.onnx_nodes} ONNX nodes -> {report.layers} TensorRT layers, "
          f"{len(report.plugin_layers)} r1c plugin layers; engine {report.engine_bytes} bytes in "
          f"{report.build_seconds} s")
    assert report.dropped_function_bodies == ["r1c::MoEExperts", "r1c::MoERouter"]
    assert len(onnx.load(str(model_path), load_external_data=False).functions) == 2  # the export is untouched
    assert report.layers > report.onnx_nodes and not report.fp8
    assert report.parser.startswith("tensorrt_rtx ")
    _check_plugin_layers(report, model_path, config)
    L, V = config.num_hidden_layers, config.vocab_size
    assert report.outputs == {
        "logits": {"shape": [-1, -1, V], "dtype": "FLOAT"},
        "new_c": {"shape": [L, -1, -1, config.kv_lora_rank], "dtype": "FLOAT"},
        "new_pe": {"shape": [L, -1, -1, config.qk_rope_head_dim], "dtype": "FLOAT"},
    }
    assert report.inputs["input_ids"] == {"shape": [-1, -1], "dtype": "INT64"}
    assert report.profile["past_pe.1"]["max"] == [4, config.qk_rope_head_dim, 64]
    assert report.build_error is None and report.compute_capability == "8.9" and report.engine_bytes


@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_fp16_fp8_export_lowers_to_a_strongly_typed_fp16_network(tmp_path: Path) -> None:
    """`--dtype float16`: the lowered model parses into an fp16 network with every r1c node (FP8Linear included)
    bound to its plugin, fp16 in and out."""
    from r1c.passes.pipelines import lower_file
    from r1c.runtime.trt_rtx import check_with_tensorrt_rtx

    export = export_tiny(tmp_path / "export", "fp8", "float16")
    lowered = lower_file(export / "model.onnx", tmp_path / "lowered" / "model.onnx", target="tensorrt")
    report = check_with_tensorrt_rtx(lowered, ModelConfig.from_json(export / "config.json"), build=False, **PROFILE)
    assert report.strongly_typed and report.inputs["past_c.0"]["dtype"] == "HALF"
    dtypes = {p["plugin"]: p["output_dtypes"] for p in report.plugin_layers}
    assert dtypes == {"r1c::FP8Linear": ["HALF"], "r1c::MoEExperts": ["HALF"], "r1c::MoERouter": ["FLOAT", "INT32"]}


@pytest.mark.tensorrt
@needs_rtx
@needs_triton
def test_r1c_build_tensorrt_rtx_writes_a_bundle_for_sm89(tiny_fp8_export: Path, tmp_path: Path,
                                                         record_property: Any) -> None:
    """`r1c build --target tensorrt-rtx --arch sm89` on the FP8 bf16 tiny export: the tensorrt lowering (FP8
    projections become r1c::FP8Linear), a strongly typed bf16 network (plugins, cache and activations bf16), the
    kernel library compiled for sm_89, the engine streamed into the bundle, and a manifest that names the arch and
    the library; every file hashed."""
    from r1c.manifest import read_manifest
    from r1c.plugins.kernel_library import KernelLibrary

    bundle = tmp_path / "rtx.bundle"
    r = CliRunner().invoke(main, ["build", str(tiny_fp8_export), "-o", str(bundle), "--target", "tensorrt-rtx",
                                  "--arch", "sm89"])
    assert r.exit_code == 0, r.stderr
    m = read_manifest(bundle)
    opts = m.target_options
    shown = {k: opts[k] for k in ("layers", "plugin_layers", "kernels_compiled", "seconds")}
    print(f"\nrtx bundle: {json.dumps(shown)}")
    record_property("tensorrt_rtx_bundle", json.dumps(opts["seconds"]))
    assert m.target == "tensorrt-rtx" and set(m.libraries) >= {"tensorrt_rtx", "triton", "onnx"}
    assert (opts["arch"], opts["compute_capability"], opts["fp8"]) == ("sm89", "8.9", True)
    assert opts["strongly_typed"] and opts["network_dtypes"]["past_c.0"] == "BF16"
    assert opts["plugin_output_dtypes"] == {"r1c::FP8Linear": ["BF16"], "r1c::MoEExperts": ["BF16"],
                                            "r1c::MoERouter": ["FLOAT", "INT32"]}
    assert opts["plugins"] == ["r1c::FP8Linear", "r1c::MoEExperts", "r1c::MoERouter"]
    c = m.config
    assert opts["plugin_layers"] > 2 * (c.num_hidden_layers - c.first_k_dense_replace)  # FP8Linear layers bound too
    assert (bundle / opts["engine"]).stat().st_size > 0
    assert not (bundle / "model.onnx").exists()  # the bundle holds the engine, not the ONNX
    lib = KernelLibrary(bundle / opts["kernels"])
    assert lib.compute_capability == "8.9" and len(lib.entries) == opts["kernels_compiled"] > 0
    assert {f"{opts['kernels']}/index.json", opts["engine"]} <= set(m.files)
    assert any(name.endswith(".cubin") for name in m.files)


# ---- full TensorRT on a GPU ---------------------------------------------------------------------------------------
def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="no CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="full TensorRT is not installed")
def test_tensorrt_bundle_matches_onnxruntime(tiny_export: Path, tmp_path: Path) -> None:
    """Tolerance: 1e-2 relative on logits (TensorRT may run the float32 GEMMs in TF32)."""
    from r1c.runtime import load
    from r1c.runtime.build import build_bundle

    config = ModelConfig.from_json(tiny_export / "config.json")
    trt_engine = load(build_bundle(tiny_export, tmp_path / "trt", target="tensorrt", tensorrt_options=PROFILE))
    ort = load(build_bundle(tiny_export, tmp_path / "ort"))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 7))
    got, want = trt_engine.forward(ids), ort.forward(ids)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-2
    assert len(trt_engine.generate([[1, 2, 3], [4, 5]], 4)[1]) == 4
    assert dataclasses.is_dataclass(trt_engine.manifest)
