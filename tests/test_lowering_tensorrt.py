"""TensorRT lowering: r1c nodes become bodiless plugin nodes, and every other node is checked against the
TensorRT ONNX support matrix (passes/tensorrt_ops.py). No TensorRT here: the numerical side is that the
check changes nothing (ORT outputs identical before/after), and that without their bodies the r1c nodes
are exactly what ORT (no plugin) can no longer run, while every attribute the plugin reads is kept.
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
    (oh.make_node("Col2Im", ["x", "a", "b"], ["y"], name="c"), [], "Col2Im is not in the TensorRT"),
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
