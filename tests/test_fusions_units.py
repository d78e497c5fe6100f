"""Each fusion on a small hand-built graph spelled the way torch.onnx exports it: the fused op appears, the
pattern's nodes are gone, and ONNX Runtime computes the same outputs before and after.

Tolerances (float32): RMSNorm / SwiGLU 1e-5 relative (one fused kernel vs the decomposition); MoE
router and experts 1e-5 relative, compared with the unfused graph and with the PyTorch references in
r1c.plugins (ids compared as per-token sets, because the stock graph's TopK(sorted=0) leaves order open).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from r1c.passes.fuse_moe_experts import FuseMoEExpertsPass
from r1c.passes.fuse_moe_router import FuseMoERouterPass
from r1c.passes.fuse_rmsnorm import FuseRMSNormPass
from r1c.passes.fuse_swiglu import FuseSwiGLUPass
from r1c.passes.infer_shapes import InferShapesPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.testing import (
    copy,
    make_model,
    max_rel_err,
    op_counts,
    run,
    stock_experts_model,
    stock_moe_model,
    stock_router_model,
)
from r1c.plugins.moe_experts import moe_experts_reference
from r1c.plugins.moe_router import moe_router_reference

RNG = np.random.default_rng(0)
TOL = 1e-5
T, H, INTER, E, G, TG, K = 7, 16, 8, 16, 4, 2, 4  # tokens, hidden, expert width, experts, ...


def f32(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def ints(name: str, values: list[int]) -> object:
    return nh.from_array(np.array(values, np.int64), name)


def scalar(name: str, value: float) -> object:
    return nh.from_array(np.array(value, np.float32), name)


def vi(name: str, dtype: int, dims: list[int | str]) -> object:
    return oh.make_tensor_value_info(name, dtype, dims)


# ---- RMSNorm --------------------------------------------------------------------------------
def rmsnorm_model(square: str, inverse: str, weight_first: bool, axis: int = -1) -> object:
    n = oh.make_node
    nodes = [n("Pow", ["x", "two"], ["sq"]) if square == "Pow" else n("Mul", ["x", "x"], ["sq"]),
             n("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1), n("Add", ["ms", "eps"], ["var"]),
             n("Sqrt", ["var"], ["rms"])]
    if inverse == "Reciprocal":
        nodes += [n("Reciprocal", ["rms"], ["inv"]), n("Mul", ["x", "inv"], ["normed"])]
    else:
        nodes += [n("Div", ["x", "rms"], ["normed"])]
    nodes.append(n("Mul", ["w", "normed"] if weight_first else ["normed", "w"], ["y"]))
    return make_model(nodes, [vi("x", TP.FLOAT, ["batch", "seq", H])], [vi("y", TP.FLOAT, ["batch", "seq", H])],
                      [scalar("two", 2.0), ints("axes", [axis]), scalar("eps", 1e-6),
                       nh.from_array(f32(H, scale=0.3) + 1, "w")])


@pytest.mark.parametrize("square", ["Pow", "Mul"])
@pytest.mark.parametrize("inverse", ["Reciprocal", "Div"])
@pytest.mark.parametrize("weight_first", [True, False])
def test_fuse_rmsnorm(square: str, inverse: str, weight_first: bool) -> None:
    model = rmsnorm_model(square, inverse, weight_first)
    before = copy(model)
    assert FuseRMSNormPass()(model).modified
    RemoveDeadCodePass()(model)
    assert op_counts(model) == {"SimplifiedLayerNormalization": 1}
    feeds = {"x": f32(2, 5, H)}
    assert max_rel_err(run(model, feeds)[0], run(before, feeds)[0]) < TOL


def test_rmsnorm_that_does_not_fit_is_left_and_the_reason_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = rmsnorm_model("Pow", "Reciprocal", True, axis=0)
    with caplog.at_level(logging.INFO, logger="r1c.passes"):
        assert not FuseRMSNormPass()(model).modified
    assert "reduces over axes [0], not the last one" in caplog.text


# ---- SwiGLU ---------------------------------------------------------------------------------
def mlp_model(gate_from_matmul: bool) -> object:
    n = oh.make_node
    nodes = [n("MatMul", ["x", "wg"], ["g"]) if gate_from_matmul else n("Neg", ["x"], ["g"]),
             n("MatMul", ["x", "wu"] if gate_from_matmul else ["x", "wu_sq"], ["u"]),
             n("Sigmoid", ["g"], ["sg"]), n("Mul", ["g", "sg"], ["silu"]), n("Mul", ["silu", "u"], ["act"]),
             n("MatMul", ["act", "wd"] if gate_from_matmul else ["act", "wd_sq"], ["y"])]
    return make_model(nodes, [vi("x", TP.FLOAT, ["tokens", H])], [vi("y", TP.FLOAT, ["tokens", H])],
                      [nh.from_array(f32(H, INTER), "wg"), nh.from_array(f32(H, INTER), "wu"),
                       nh.from_array(f32(INTER, H), "wd"), nh.from_array(f32(H, H), "wu_sq"),
                       nh.from_array(f32(H, H), "wd_sq")])


def test_fuse_swiglu_merges_gate_and_up_gemms() -> None:
    model = mlp_model(gate_from_matmul=True)
    before = copy(model)
    assert FuseSwiGLUPass()(model).modified
    RemoveDeadCodePass()(model)
    assert op_counts(model) == {"MatMul": 2, "Split": 1, "com.microsoft::QuickGelu": 1, "Mul": 1}
    merged = model.graph.initializers["wg.gate_up"].const_value
    assert merged.shape == (H, 2 * INTER)
    assert "wg" not in model.graph.initializers and "wu" not in model.graph.initializers
    feeds = {"x": f32(5, H)}
    assert max_rel_err(run(model, feeds)[0], run(before, feeds)[0]) < TOL


def test_fuse_swiglu_activation_only_when_the_gate_is_not_a_projection() -> None:
    model = mlp_model(gate_from_matmul=False)
    before = copy(model)
    assert FuseSwiGLUPass()(model).modified
    RemoveDeadCodePass()(model)
    assert op_counts(model) == {"Neg": 1, "MatMul": 2, "com.microsoft::QuickGelu": 1, "Mul": 1}
    feeds = {"x": f32(5, H)}
    assert max_rel_err(run(model, feeds)[0], run(before, feeds)[0]) < TOL


# ---- MoE routing ----------------------------------------------------------------------------
def by_id(weights: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=-1)
    return np.take_along_axis(weights, order, -1), np.take_along_axis(ids, order, -1)


@pytest.mark.parametrize("gemm", [True, False])
@pytest.mark.parametrize(("norm", "scale"), [("plain", 2.5), ("eps", 2.5), ("none", 2.5), ("plain", None)])
def test_fuse_moe_router(gemm: bool, norm: str, scale: float | None) -> None:
    gate_w, bias = f32(E, H, scale=H**-0.5), f32(E, scale=0.1)
    model = stock_router_model(gate_w, bias, n_group=G, topk_group=TG, top_k=K, gemm=gemm, norm=norm,
                               scale=scale)
    before = copy(model)
    assert FuseMoERouterPass()(model).modified
    RemoveDeadCodePass()(model)
    counts = op_counts(model)
    assert counts.pop("r1c::MoERouter") == 1 and "TopK" not in counts and "ScatterElements" not in counts
    router = next(n for n in model.graph if n.op_type == "MoERouter")
    attrs = {k: a.value for k, a in router.attributes.items()}
    assert attrs == {"top_k": K, "n_group": G, "topk_group": TG, "routed_scaling_factor": scale or 1.0,
                     "norm_topk_prob": int(norm != "none"), "scoring": "sigmoid", "topk_method": "noaux_tc",
                     "plugin_namespace": "r1c"}
    assert ("r1c", "MoERouter", "") in model.functions
    feeds = {"h": f32(T, H)}
    (w_a, ids_a), (w_b, ids_b) = (by_id(*run(m, feeds)) for m in (model, before))
    np.testing.assert_array_equal(ids_a, ids_b)
    assert max_rel_err(w_a, w_b) < TOL
    ref_w, ref_ids = moe_router_reference(torch.from_numpy(feeds["h"]), torch.from_numpy(gate_w),
                                          torch.from_numpy(bias), **{k: v for k, v in attrs.items()
                                                                     if k != "plugin_namespace"})
    w_r, ids_r = by_id(ref_w.numpy(), ref_ids.numpy().astype(np.int64))
    np.testing.assert_array_equal(ids_a, ids_r)
    assert max_rel_err(w_a, w_r) < TOL


# ---- MoE experts ----------------------------------------------------------------------------
def test_fuse_moe_experts() -> None:
    w13, w2 = f32(E, 2 * INTER, H, scale=H**-0.5), f32(E, H, INTER, scale=INTER**-0.5)
    model = stock_experts_model(w13, w2, K)
    before = copy(model)
    assert FuseMoEExpertsPass()(model).modified
    RemoveDeadCodePass()(model)
    assert op_counts(model) == {"Cast": 1, "r1c::MoEExperts": 1}  # ids int64 -> the op's int32
    assert ("r1c", "MoEExperts", "") in model.functions
    ids = np.stack([RNG.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    feeds = {"x": f32(T, H), "w": np.abs(f32(T, K)), "ids": ids}
    out = run(model, feeds)[0]
    assert max_rel_err(out, run(before, feeds)[0]) < TOL
    ref = moe_experts_reference(*(torch.from_numpy(a) for a in (feeds["x"], feeds["w"], ids, w13, w2)))
    assert max_rel_err(out, ref.numpy()) < TOL


def test_router_then_experts_fuse_into_one_r1c_block() -> None:
    """The router fusion's int32 ids reach the experts directly (its int64 Cast becomes dead)."""
    gate_w, bias = f32(E, H, scale=H**-0.5), f32(E, scale=0.1)
    w13, w2 = f32(E, 2 * INTER, H, scale=H**-0.5), f32(E, H, INTER, scale=INTER**-0.5)
    model = stock_moe_model(stock_router_model(gate_w, bias, n_group=G, topk_group=TG, top_k=K),
                            stock_experts_model(w13, w2, K))
    before = copy(model)
    InferShapesPass()(model)  # as in the pipelines: the experts rule reads top_k from the weights' shape
    FuseMoERouterPass()(model)
    FuseMoEExpertsPass()(model)
    RemoveDeadCodePass()(model)
    assert op_counts(model) == {"r1c::MoERouter": 1, "Identity": 1, "r1c::MoEExperts": 1}
    feeds = {"h": f32(T, H)}
    assert max_rel_err(run(model, feeds)[0], run(before, feeds)[0]) < TOL
