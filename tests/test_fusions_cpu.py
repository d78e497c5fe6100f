"""The `onnxruntime` pipeline's decode fusions into ONNX Runtime contrib kernels: RoPE -> RotaryEmbedding (with
the projection's columns permuted), residual add + RMSNorm -> SkipSimplifiedLayerNormalization, the MoE output
scale folded into the down projection (float weights or int block scales). Each must fire
on the export's own spelling, compute the same outputs as the unfused graph under ONNX Runtime (float32,
1e-5 relative: the same arithmetic in another order), and leave a graph it cannot prove alone (reason logged).
The whole-model proof is the e2e tier (tests/test_e2e.py compares bundles with transformers).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from r1c.passes.fuse_rotary_embedding import FuseRotaryEmbeddingPass
from r1c.passes.fuse_skip_rmsnorm import FuseSkipRMSNormPass
from r1c.passes.infer_shapes import InferShapesPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.testing import copy, make_model, max_rel_err, op_counts, run

TOL = 1e-5
B, S, N, D, R, C, HID, QL = 2, 3, 4, 6, 8, 10, 16, 12  # R = rope dims, C = latent rank, QL = q_lora rank
info, node = onnx.helper.make_tensor_value_info, onnx.helper.make_node


def ints(name: str, values: list[int]) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(values, np.int64), name)


def rope_nodes(x: str, cos: str, sin: str, out: str, halves: bool = False) -> list[onnx.NodeProto]:
    """The export's rope (onnx_export._Lowering.rope): interleaved pairs (or, for `rope_interleave: false`, the
    halves), the result as [firsts', seconds']."""
    bounds = ((["c0", "cR2", "cm1"], ["cR2", "cR", "cm1"]) if halves
              else (["c0", "cR", "cm1", "c2"], ["c1", "cR", "cm1", "c2"]))
    slices = [node("Slice", [x, *bounds[0]], [f"{out}.x1"]), node("Slice", [x, *bounds[1]], [f"{out}.x2"])]
    return [*slices,
            node("Mul", [f"{out}.x1", cos], [f"{out}.a1"]), node("Mul", [f"{out}.x2", sin], [f"{out}.a2"]),
            node("Sub", [f"{out}.a1", f"{out}.a2"], [f"{out}.a"]),
            node("Mul", [f"{out}.x2", cos], [f"{out}.b1"]), node("Mul", [f"{out}.x1", sin], [f"{out}.b2"]),
            node("Add", [f"{out}.b1", f"{out}.b2"], [f"{out}.b"]),
            node("Concat", [f"{out}.a", f"{out}.b"], [out], axis=-1)]


def attention_inputs_model(fp8_key: bool = False, extra_reader: bool = False, query_reshaped: bool = False,
                           halves: bool = False) -> tuple[object, dict[str, np.ndarray]]:
    """h -> (q rope [B, S, N, R] and q nope, key rope [B, S, R] and latent) as MLA's projections produce them."""
    rng = np.random.default_rng(3)
    wq = rng.standard_normal((QL, N * (D + R))).astype(np.float32)
    wkv = rng.standard_normal((HID, C + R)).astype(np.float32)
    nodes = [node("MatMul", ["qa", "wq"], ["q"]), node("Reshape", ["q", "qshape"], ["q4"]),
             node("Slice", ["q4", "c0", "cD", "cm1"], ["q_nope"]), node("Slice", ["q4", "cD", "cDR", "cm1"], ["q_pe"]),
             node("Unsqueeze", ["cos", "c2"], ["cos_q"]), node("Unsqueeze", ["sin", "c2"], ["sin_q"]),
             *rope_nodes("q_pe", "cos_q", "sin_q", "q_rot", halves),
             node("MatMul", ["h", "wkv_f"], ["kv"]), node("Slice", ["kv", "c0", "cC", "cm1"], ["latent"]),
             node("Slice", ["kv", "cC", "cCR", "cm1"], ["k_pe"]), *rope_nodes("k_pe", "cos", "sin", "k_rot", halves)]
    inits = [onnx.numpy_helper.from_array(wq, "wq"), ints("qshape", [0, 0, N, D + R]),
             *(ints(n, [v]) for n, v in (("c0", 0), ("c1", 1), ("c2", 2), ("cm1", -1), ("cR", R), ("cR2", R // 2),
                                          ("cD", D), ("cDR", D + R), ("cC", C), ("cCR", C + R)))]
    if fp8_key:
        import ml_dtypes

        scale = np.full((1, C + R), 0.05, np.float32)
        q = (wkv / 0.05).astype(ml_dtypes.float8_e4m3fn)
        nodes.insert(0, node("DequantizeLinear", ["wkv_q", "wkv_s"], ["wkv_f"], axis=0, block_size=128))
        inits += [onnx.numpy_helper.from_array(q, "wkv_q"), onnx.numpy_helper.from_array(scale, "wkv_s")]
    else:
        inits.append(onnx.numpy_helper.from_array(wkv, "wkv_f"))
    outputs = [info("q_rot", 1, [B, S, N, R]), info("q_nope", 1, [B, S, N, D]), info("k_rot", 1, [B, S, R]),
               info("latent", 1, [B, S, C])]
    if query_reshaped:  # as the export reads it: [B, S*N, R]
        nodes.append(node("Reshape", ["q_rot", "rows"], ["q_rows"]))
        inits.append(ints("rows", [0, -1, R]))
        outputs[0] = info("q_rows", 1, [B, S * N, R])
    if extra_reader:  # something else reads the key's rotated columns: the fusion must not permute them
        nodes.append(node("Slice", ["kv", "c0", "cCR", "cm1"], ["kv_all"]))
        outputs.append(info("kv_all", 1, [B, S, C + R]))
    model = make_model(nodes, [info("qa", 1, [B, S, QL]), info("h", 1, [B, S, HID]), info("cos", 1, [B, S, R // 2]),
                               info("sin", 1, [B, S, R // 2])], outputs, inits)
    InferShapesPass()(model)  # as the pipeline does first: the pass reads the rotated width from shapes
    pos = rng.uniform(0, 50, (B, S, 1)).astype(np.float32) * rng.uniform(0.1, 1, R // 2).astype(np.float32)
    feeds = {"qa": rng.standard_normal((B, S, QL)).astype(np.float32),
             "h": rng.standard_normal((B, S, HID)).astype(np.float32),
             "cos": np.cos(pos).astype(np.float32) * 1.2, "sin": np.sin(pos).astype(np.float32) * 1.2}
    return model, feeds


@pytest.mark.parametrize(("fp8_key", "query_reshaped", "halves"),
                         [(False, False, False), (True, False, False), (False, True, False), (False, False, True)])
def test_rope_becomes_rotary_embedding(fp8_key: bool, query_reshaped: bool, halves: bool) -> None:
    model, feeds = attention_inputs_model(fp8_key, query_reshaped=query_reshaped, halves=halves)
    before = copy(model)  # type: ignore[arg-type]
    fused = FuseRotaryEmbeddingPass()
    assert fused(model).modified and fused.count == 2  # type: ignore[arg-type]
    RemoveDeadCodePass()(model)  # type: ignore[arg-type]
    counts = op_counts(model)  # type: ignore[arg-type]
    assert counts["com.microsoft::RotaryEmbedding"] == 2 and "Concat" not in counts and "Sub" not in counts
    # the query rotates as [B, S, N*R]; a 4-D view is restored only for readers that need it
    assert counts["Shape"] == (1 if query_reshaped else 2)  # 2: Shape + Reshape back to [B, S, N, R]
    want, got = run(before, feeds), run(model, feeds)  # type: ignore[arg-type]
    for w, g in zip(want, got, strict=True):
        assert max_rel_err(g, w) < TOL


def test_rope_left_alone_when_its_columns_are_read_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    model, feeds = attention_inputs_model(extra_reader=True)
    before = copy(model)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="r1c.passes"):
        fused = FuseRotaryEmbeddingPass()
        fused(model)  # type: ignore[arg-type]
    assert fused.count == 1 and "reads the projection's rotated columns" in caplog.text  # the query still fuses
    for w, g in zip(run(before, feeds), run(model, feeds), strict=True):  # type: ignore[arg-type]
        assert max_rel_err(g, w) < TOL


def test_residual_add_and_rmsnorm_become_skip_simplified_layer_norm() -> None:
    rng = np.random.default_rng(1)
    gamma = rng.uniform(0.5, 1.5, HID).astype(np.float32)
    nodes = [node("Add", ["x", "y"], ["s"]),
             node("SimplifiedLayerNormalization", ["s", "gamma"], ["n"], axis=-1, epsilon=1e-6, stash_type=1),
             node("Add", ["s", "n"], ["out"])]  # the residual stream reads the sum too
    model = make_model(nodes, [info("x", 1, [B, S, HID]), info("y", 1, [B, S, HID])],
                       [info("out", 1, [B, S, HID]), info("n", 1, [B, S, HID])],
                       [onnx.numpy_helper.from_array(gamma, "gamma")])
    before = copy(model)
    assert FuseSkipRMSNormPass()(model).modified
    counts = op_counts(model)
    assert counts == {"com.microsoft::SkipSimplifiedLayerNormalization": 1, "Add": 1}
    feeds = {"x": rng.standard_normal((B, S, HID)).astype(np.float32),
             "y": rng.standard_normal((B, S, HID)).astype(np.float32)}
    for w, g in zip(run(before, feeds), run(model, feeds), strict=True):
        assert max_rel_err(g, w) < TOL


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_moe_output_scale_folds_into_the_down_projection(precision: str) -> None:
    from r1c.passes.fold_moe_output_scale import FoldMoEOutputScalePass
    from r1c.passes.lower_moe_to_ort import LowerMoEToOrtPass
    from r1c.passes.quantize_weights import QuantizeWeightsPass
    from r1c.passes.testing import r1c_moe_model

    model, _ = r1c_moe_model(np.random.default_rng(4), experts=16, hidden=32, inter=16)
    LowerMoEToOrtPass()(model)
    if precision == "int4":
        QuantizeWeightsPass("int4", accuracy_level=0)(model)
    RemoveDeadCodePass()(model)
    before = copy(model)
    muls = op_counts(model).get("Mul", 0)
    assert FoldMoEOutputScalePass()(model).modified
    RemoveDeadCodePass()(model)
    assert op_counts(model).get("Mul", 0) == muls - 1
    h = np.random.default_rng(5).standard_normal((7, 32)).astype(np.float32)
    assert max_rel_err(run(model, {"h": h})[0], run(before, {"h": h})[0]) < TOL
