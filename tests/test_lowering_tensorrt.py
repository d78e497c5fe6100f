"""TensorRT lowering: r1c nodes become bodiless plugin nodes, FP8 linear layers become r1c::FP8Linear, and every
other node is checked against what TensorRT's ONNX parser supports (passes/tensorrt_ops.py). No TensorRT here: the
numerical side is that the check changes nothing (ORT outputs identical before/after), that without their bodies
the r1c nodes are exactly what ORT (no plugin) can no longer run, while every attribute the plugin reads is kept,
and that the FP8 linear fusion computes what the layer did.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from r1c.errors import PassError
from r1c.passes import run_pipeline
from r1c.passes.check_tensorrt_ops import CheckTensorRTOpsPass, tensorrt_problem
from r1c.passes.drop_r1c_function_bodies import DropR1CFunctionBodiesPass
from r1c.passes.testing import (
    copy,
    make_model,
    op_counts,
    r1c_moe_model,
    run,
    session,
    stock_experts_model,
    stock_moe_model,
    stock_router_model,
)
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC

E, H, INTER, K = 16, 16, 8, 4
RNG = np.random.default_rng(0)


def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def test_drop_r1c_function_bodies_keeps_complete_plugin_nodes() -> None:
    model, _ = r1c_moe_model(np.random.default_rng(0), experts=E, hidden=H, inter=INTER)
    router = model.graph.node("router")
    del router.attributes["plugin_namespace"]  # the pass adds what the parser needs
    assert DropR1CFunctionBodiesPass()(model).modified
    assert not model.functions
    assert op_counts(model) == {"r1c::MoERouter": 1, "r1c::MoEExperts": 1}
    for node in model.graph:
        assert node.attributes["plugin_namespace"].as_string() == "r1c"
    assert set(ROUTER_SPEC.attributes) <= set(router.attributes)
    with pytest.raises(Exception, match="MoERouter"):  # no body and no plugin: ORT cannot run it any more
        session(model)


def test_an_incomplete_plugin_node_is_an_error_naming_it() -> None:
    model, _ = r1c_moe_model(np.random.default_rng(0), experts=E, hidden=H, inter=INTER)
    del model.graph.node("router").attributes["top_k"]
    with pytest.raises(PassError, match=r"drop_r1c_function_bodies: node router \(r1c::MoERouter\): missing "
                                        r"attributes \['top_k'\]"):
        DropR1CFunctionBodiesPass()(model)


def one_node_model(node: object, inits: list[object]) -> ir.Model:
    return make_model([node], [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 8])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, None)], inits, extra_opsets={"com.microsoft": 1})


@pytest.mark.parametrize(("node", "inits", "why"), [
    (oh.make_node("QuickGelu", ["x"], ["y"], domain="com.microsoft", name="q"), [], "domain 'com.microsoft'"),
    (oh.make_node("Hardmax", ["x"], ["y"], name="h"), [], None),
    (oh.make_node("Col2Im", ["x", "a", "b"], ["y"], name="c"), [], "Col2Im is not supported by TensorRT's ONNX parser"),
    (oh.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0, name="t"), [nh.from_array(np.array([2]), "k")],
     "sorted=0"),
    (oh.make_node("TopK", ["x", "k"], ["y", "i"], name="t"), [nh.from_array(np.array([4000]), "k")], "k=4000"),
    (oh.make_node("ReduceSum", ["x", "x_axes"], ["y"], name="r"), [], "must be a constant"),
    (oh.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="add", name="s"), [], "reduction='add'"),
])
def test_tensorrt_support_matrix(node: object, inits: list[object], why: str | None) -> None:
    model = one_node_model(node, inits)
    problem = tensorrt_problem(model.graph.node(0))
    assert problem is None if why is None else why in (problem or "")
    if why is not None:
        with pytest.raises(PassError, match="check_tensorrt_ops: node "):
            CheckTensorRTOpsPass()(model)


def test_tensorrt_pipeline_fuses_moe_into_plugin_nodes_and_passes_the_check() -> None:
    """Router + experts as the stock exporter spells them -> two bodiless r1c plugin nodes; the check changes
    nothing (outputs of the r1c form under ORT are compared in tests/test_fusions_*)."""
    gate_w, bias = f32(E, H, scale=H**-0.5), f32(E, scale=0.1)
    model = stock_moe_model(stock_router_model(gate_w, bias, n_group=4, topk_group=2, top_k=K),
                            stock_experts_model(f32(E, 2 * INTER, H), f32(E, H, INTER), K))
    lowered = run_pipeline(model, "tensorrt")
    assert op_counts(lowered) == {"r1c::MoERouter": 1, "r1c::MoEExperts": 1}  # (the Identity is folded)
    assert not lowered.functions
    before = copy(lowered)
    assert not CheckTensorRTOpsPass()(lowered).modified
    assert ir.serde.serialize_model(before) == ir.serde.serialize_model(lowered)


def test_check_tensorrt_ops_changes_no_output() -> None:
    model = one_node_model(oh.make_node("Relu", ["x"], ["y"]), [])
    before = copy(model)
    CheckTensorRTOpsPass()(model)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(model, {"x": x})[0], run(before, {"x": x})[0])


# ---- FP8 linear layers -> r1c::FP8Linear ----------------------------------------------------------------------------
def fp8_linear_model(k: int, n: int, *, scale_kind: str = "block", readers: int = 1) -> ir.Model:
    """y_i = x @ DequantizeLinear(Wt, scale, axis=0, block_size=128) as the exporter writes an FP8 linear layer."""
    import torch

    from r1c.plugins.fp8 import quantize

    w = torch.randn(n, k) / k**0.5
    q, s = quantize(w)  # q [N, K] e4m3, s [ceil(N/128), ceil(K/128)]
    scale = s.t().repeat_interleave(128, dim=1)[:, :n].contiguous().numpy()  # [kb, N], constant per 128 columns
    if scale_kind == "per-column":
        scale = scale * (1 + np.arange(n, dtype=np.float32) / n)
    wt = oh.make_tensor("wt", TP.FLOAT8E4M3FN, [k, n], q.t().contiguous().view(torch.uint8).numpy().tobytes(),
                        raw=True)
    nodes = [oh.make_node("DequantizeLinear", ["wt", "scale"], ["w"], axis=0, block_size=128)]
    nodes += [oh.make_node("MatMul", ["x", "w"], [f"y{i}"]) for i in range(readers)]
    return make_model(nodes, [oh.make_tensor_value_info("x", TP.FLOAT, ["b", "s", k])],
                      [oh.make_tensor_value_info(f"y{i}", TP.FLOAT, None) for i in range(readers)],
                      [wt, nh.from_array(scale, "scale")])


def test_fuse_fp8_linear_keeps_the_math_and_makes_dequantization_plus_matmul_one_op() -> None:
    """The fused model (run through the op's function body under ORT) equals the original, and the op's own reference
    (FP8 weight [N, K] x DeepSeek block scales) equals it too: the pass transposed the weight and recovered the
    128x128 block scale exactly."""
    import torch

    from r1c.passes.fuse_fp8_linear import FuseFP8LinearPass
    from r1c.plugins.fp8_linear import fp8_linear_reference

    k, n = 300, 200  # partial blocks on both axes
    model = fp8_linear_model(k, n)
    before = copy(model)
    assert FuseFP8LinearPass()(model).modified
    assert op_counts(model) == {"r1c::FP8Linear": 1}
    node = next(iter(model.graph))
    assert node.attributes["plugin_namespace"].as_string() == "r1c" and node.attributes["block_size"].value == 128
    w, s = (node.inputs[i].const_value.numpy() for i in (1, 2))
    assert w.shape == (n, k) and s.shape == (2, 3)
    x = RNG.standard_normal((2, 3, k)).astype(np.float32)
    want = run(before, {"x": x})[0]
    np.testing.assert_allclose(run(model, {"x": x})[0], want, rtol=1e-6, atol=1e-6)
    ref = fp8_linear_reference(torch.from_numpy(x), torch.from_numpy(w.view(np.uint8)).view(torch.float8_e4m3fn),
                               torch.from_numpy(s)).numpy()
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "readers"), [("per-column", 1), ("block", 2)])
def test_fuse_fp8_linear_leaves_what_it_cannot_take(kind: str, readers: int) -> None:
    from r1c.passes.fuse_fp8_linear import FuseFP8LinearPass

    model = fp8_linear_model(256, 256, scale_kind=kind, readers=readers)
    assert not FuseFP8LinearPass()(model).modified
    assert "r1c::FP8Linear" not in op_counts(model)


def test_tensorrt_pipeline_turns_every_fp8_projection_of_the_tiny_export_into_fp8_linear(tmp_path: object) -> None:
    """Attention (q_a, q_b, kv_a, o), the dense MLP and the shared experts: every FP8 MatMul weight; kv_b (absorbed
    into per-head matrices, not a MatMul operand) keeps its DequantizeLinear."""
    from pathlib import Path

    from click.testing import CliRunner

    from r1c.cli import main
    from r1c.config import preset

    out = Path(str(tmp_path)) / "export"
    r = CliRunner().invoke(main, ["export", "--preset", "tiny", "--precision", "fp8", "--no-progress", "-o", str(out)])
    assert r.exit_code == 0, r.output
    lowered = run_pipeline(ir.load(out / "model.onnx"), "tensorrt")
    c = preset("tiny")
    per_layer = 4 if c.q_lora_rank else 3
    mlp = 3 * c.first_k_dense_replace + 3 * (c.num_hidden_layers - c.first_k_dense_replace) * int(bool(
        c.n_shared_experts))
    counts = op_counts(lowered)
    assert counts["r1c::FP8Linear"] == per_layer * c.num_hidden_layers + mlp, counts
    assert counts.get("DequantizeLinear", 0) == c.num_hidden_layers  # kv_b of each layer
    assert not lowered.functions
