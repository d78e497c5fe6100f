"""tensorrt tier: the r1c TensorRT plugins, the TensorRT build and the TensorRT backend.

With TensorRT for RTX installed (`pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`), its
builder runs on a CPU for an explicit compute capability (SM89): the plugin creators register, the tiny
export parses with every r1c node bound to an r1c plugin, and the engine builds with an optimization
profile. Running an engine needs full TensorRT and a CUDA GPU (the last test, skipped elsewhere).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
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
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC
from r1c.runtime import trt_build
from r1c.runtime.trt_build import build_tensorrt, check_with_tensorrt_rtx, drop_function_bodies, profile_shapes

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="TensorRT for RTX is not installed (module tensorrt_rtx_bindings; "
                               "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)")
PROFILE: dict[str, Any] = {"max_batch": 4, "max_seq": 32, "max_capacity": 64}


def export_tiny(out: Path, precision: str = "auto") -> Path:
    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--precision", precision, "--no-progress",
                                  "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("trt") / "export")


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
    from r1c.runtime.trt_backend import TensorRTBackend

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BundleError, match="TensorRT is not installed"):
        TensorRTBackend(Path("."), None)  # type: ignore[arg-type]


def test_profile_covers_decode_prefill_and_no_cache_calls() -> None:
    c = preset("tiny")
    names = ["input_ids", "past_lengths", *[f"past_{k}.{i}" for i in range(c.num_hidden_layers) for k in ("c", "pe")]]
    p = profile_shapes(c, names, PROFILE)
    assert p["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [4, 32]}
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
    for v in ("SM89", "sm_89", "8.9", 89, (8, 9)):
        assert trt_build.parse_compute_capability(v) == (8, 9)
    assert trt_build.parse_compute_capability("SM120") == (12, 0)
    with pytest.raises(BuildError, match="compute capability"):
        trt_build.parse_compute_capability("hopper")


def test_drop_function_bodies_keeps_nodes_and_weights(tiny_export: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_export, tmp_path / "m")
    path = tmp_path / "m" / "model.onnx"
    assert drop_function_bodies(path) == ["r1c::MoEExperts", "r1c::MoERouter"]
    model = onnx.load(str(path), load_external_data=False)
    assert not model.functions
    assert len(r1c_nodes(path)) == len(r1c_nodes(tiny_export / "model.onnx"))
    assert drop_function_bodies(path) == []  # idempotent
    onnx.load(str(path))  # the external data still resolves


def test_require_plugin_layers_names_the_unbound_node() -> None:
    layers = [{"name": "a", "plugin": "r1c::MoERouter"}, {"name": "b", "plugin": "other::MoEExperts"}]
    trt_build.require_plugin_layers([("a", "MoERouter")], layers)
    with pytest.raises(BuildError, match=r"b \(MoEExperts\)"):
        trt_build.require_plugin_layers([("a", "MoERouter"), ("b", "MoEExperts")], layers)


_KERNEL_SCRIPT = """
import torch
from r1c.plugins.fp8 import quantize
from r1c.plugins.moe_experts import tensorrt as experts_trt
from r1c.plugins.moe_experts.reference import moe_experts_reference
from r1c.plugins.moe_router import tensorrt as router_trt
from r1c.plugins.moe_router.reference import moe_router_reference

assert router_trt.router_kernel().__name__ == "triton_router", router_trt.router_kernel()
assert experts_trt.experts_kernel().__name__ == "triton_experts", experts_trt.experts_kernel()
g = torch.Generator().manual_seed(0)
T, H, E, I, K = 5, 64, 16, 32, 4
h, gate, bias = torch.randn(T, H, generator=g), torch.randn(E, H, generator=g), torch.randn(E, generator=g) / 10
attrs = router_trt.SPEC.attrs(top_k=K, n_group=4, topk_group=2, routed_scaling_factor=2.5)
want_w, want_ids = moe_router_reference(h, gate, bias, **attrs)
for run in (router_trt.MoERouterOp().execute, router_trt._reference):
    w, ids = torch.full((T, K), float("nan")), torch.full((T, K), -1, dtype=torch.int32)
    run(attrs, [h, gate, bias], [w, ids])  # writes into the given (TensorRT) buffers
    assert torch.equal(ids, want_ids) and (w - want_w).abs().max() < 1e-6, (ids, want_ids)
w13, w2 = torch.randn(E, 2 * I, H, generator=g) / 10, torch.randn(E, H, I, generator=g) / 10
for quant, tol in (("none", 1e-5), ("fp8_block128", 1e-2)):
    ins = [h, want_w, want_ids, w13, w2]
    if quant == "fp8_block128":
        (q13, s13), (q2, s2) = quantize(w13), quantize(w2)
        ins = [h, want_w, want_ids, q13, q2, s13, s2]
    a = experts_trt.SPEC.attrs(quant=quant)
    want = moe_experts_reference(*ins, **a)
    for run in (experts_trt.MoEExpertsOp().execute, experts_trt._reference):
        out = torch.full((T, H), float("nan"))
        run(a, ins, [out])
        err = float((out - want).abs().max() / want.abs().max())
        assert err < tol, (quant, err)
print("ok")
"""


@pytest.mark.tensorrt
@pytest.mark.kernels
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_plugin_execute_writes_kernel_results_into_given_buffers() -> None:
    """The plugins' enqueue body on CPU tensors: Triton kernels (TRITON_INTERPRET=1) and the reference fallback.

    Tolerances: router fp32 1e-6 absolute, ids exact; experts fp32 1e-5 relative; fp8 1e-2 relative (the
    Triton kernel may quantize activations 1x128). A child process, since TRITON_INTERPRET is read at import.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ---- TensorRT for RTX on the CPU ----------------------------------------------------------------------------------
def _spec_cases() -> list[tuple[Any, dict[str, Any]]]:
    return [
        (ROUTER_SPEC, ROUTER_SPEC.attrs(top_k=6, n_group=4, topk_group=3, routed_scaling_factor=1.75,
                                        norm_topk_prob=0, scoring="softmax")),
        (EXPERTS_SPEC, EXPERTS_SPEC.attrs(quant="fp8_block128")),
    ]


@pytest.mark.tensorrt
@needs_rtx
def test_plugin_creators_register_and_round_trip_fields() -> None:
    from r1c.plugins.tensorrt_common import attrs_from_fields, field_collection, register_plugins

    trt = trt_build.import_tensorrt_rtx()
    creators = register_plugins(trt)
    assert set(creators) == {ROUTER_SPEC.plugin_id, EXPERTS_SPEC.plugin_id}
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
        runtime_plugin = creator.create_plugin(spec.name, serialized, trt.TensorRTPhase.RUNTIME)
        assert runtime_plugin.attrs == attrs
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
def test_build_tensorrt_refuses_rtx_in_process_without_parser_library(tiny_export: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process the parser would abort() on dlopen("libtensorrt_rtx.so"); the build must say so instead.
    monkeypatch.setattr(trt_build, "_rtx_parser_library_reachable", lambda lib_dir: False)
    shutil.copytree(tiny_export, tmp_path / "m")
    with pytest.raises(BuildError, match="LD_LIBRARY_PATH"):
        build_tensorrt(tmp_path / "m", preset("tiny"), module=trt_build.import_tensorrt_rtx(),
                       compute_capability="SM89")


@pytest.mark.tensorrt
@needs_rtx
@pytest.mark.parametrize("variant", ["export", "export-fp8", "lowered"])
def test_tiny_export_parses_and_builds_with_tensorrt_rtx(variant: str, tiny_export: Path, tmp_path: Path,
                                                         record_property: Any) -> None:
    """export: `r1c export --preset tiny` as is (bodies dropped here); export-fp8: with FP8 expert weights;
    lowered: after the `tensorrt` pass pipeline (what `r1c build --target tensorrt` hands to TensorRT)."""
    export = export_tiny(tmp_path / "export", "fp8") if variant == "export-fp8" else tiny_export
    config = ModelConfig.from_json(export / "config.json")
    model_path = export / "model.onnx"
    if variant == "lowered":
        pipelines = pytest.importorskip("r1c.passes.pipelines", reason="the pass pipelines are not available")
        model_path = pipelines.lower_file(model_path, tmp_path / "lowered" / "model.onnx", target="tensorrt")
    nodes = r1c_nodes(model_path)
    assert len(nodes) == 2 * config.num_moe_layers

    report = check_with_tensorrt_rtx(model_path, config, compute_capability="SM89", **PROFILE)
    record_property("tensorrt_rtx_layers", report.layers)
    print(f"\n{variant}: {report.onnx_nodes} ONNX nodes -> {report.layers} TensorRT layers, "
          f"{len(report.plugin_layers)} r1c plugin layers; engine {report.engine_bytes} bytes "
          f"in {report.build_seconds} s")

    # the export keeps its bodies (dropped from a copy); the lowering already dropped them
    model = onnx.load(str(model_path), load_external_data=False)
    if variant == "lowered":
        assert report.dropped_function_bodies == [] and not model.functions
    else:
        assert report.dropped_function_bodies == ["r1c::MoEExperts", "r1c::MoERouter"]
        assert len(model.functions) == 2
    assert report.onnx_nodes == len(model.graph.node)
    assert report.layers > report.onnx_nodes  # every node parsed (parse fails otherwise), some into several layers
    assert report.fp8 == (variant == "export-fp8")

    # every r1c node is an r1c plugin layer, with the node's attributes and the plugin's output shapes
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
        else:
            assert layer["output_shapes"] == [[-1, config.hidden_size]]
            assert layer["output_dtypes"] == ["FLOAT"]

    L, V = config.num_hidden_layers, config.vocab_size
    assert report.outputs == {
        "logits": {"shape": [-1, -1, V], "dtype": "FLOAT"},
        "new_c": {"shape": [L, -1, -1, config.kv_lora_rank], "dtype": "FLOAT"},
        "new_pe": {"shape": [L, -1, -1, config.qk_rope_head_dim], "dtype": "FLOAT"},
    }
    assert report.inputs["input_ids"] == {"shape": [-1, -1], "dtype": "INT64"}
    assert report.inputs["past_c.0"] == {"shape": [-1, config.kv_lora_rank, -1], "dtype": "FLOAT"}
    assert report.profile["past_pe.1"]["max"] == [4, config.qk_rope_head_dim, 64]

    # the engine builds and serializes on the CPU for SM89 (TensorRT for RTX compiles kernels at load time)
    assert report.build_error is None
    assert report.compute_capability == "8.9"
    assert report.engine_bytes is not None and report.engine_bytes > 0


@pytest.mark.tensorrt
@needs_rtx
def test_tensorrt_rtx_parse_failure_is_a_build_error_naming_the_node(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery", domain="elsewhere")],
                              "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("elsewhere", 1)])
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(BuildError, match=r"could not parse model\.onnx: .*mystery"):
        check_with_tensorrt_rtx(tmp_path / "model.onnx", preset("tiny"), build=False)


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
    from r1c.manifest import Manifest, sha256_file
    from r1c.runtime import load
    from r1c.runtime.build import build_bundle

    config = ModelConfig.from_json(tiny_export / "config.json")
    bundle = tmp_path / "trt"
    bundle.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copyfile(tiny_export / name, bundle / name)
    target_options, libraries = build_tensorrt(bundle, config, **PROFILE)
    assert sorted(p.name for p in bundle.iterdir()) == ["model.engine"]
    Manifest(target="tensorrt", precision="none", model_config=config.to_hf_dict(), config_hash=config.hash(),
             graph_io={}, files={"model.engine": sha256_file(bundle / "model.engine")}, libraries=libraries,
             device={}, target_options=target_options).write(bundle)

    ort = load(build_bundle(tiny_export, tmp_path / "ort"))
    trt_engine = load(bundle)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 7))
    got, want = trt_engine.forward(ids), ort.forward(ids)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-2
    assert len(trt_engine.generate([[1, 2, 3], [4, 5]], 4)[1]) == 4
