"""Weight-only int8 / int4 for ONNX Runtime (`quantize_weights`, `r1c.plugins.int_block`, `r1c build --precision`).

Exactness: with float activations (accuracy_level 0) MatMulNBits and QMoE compute x @ dequantize(q)
exactly, so a quantized node must equal the float node on the *dequantized* weights at 1e-5; this proves the
packing (nibble order, block layout, zero point, scales) and the MoE routing semantics. With int8 activations
(accuracy_level 4, the build's default) the kernels quantize x per block: bounded at 2e-2 relative. The codec
itself is checked against a direct per-block computation of the rule in its docstring.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from r1c.cli import main
from r1c.passes.lower_moe_to_ort import LowerMoEToOrtPass
from r1c.passes.pipelines import BuildOptions, run_pipeline
from r1c.passes.quantize_weights import QuantizeWeightsPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.testing import copy, make_model, max_rel_err, moe_reference, op_counts, r1c_moe_model, run
from r1c.passes.widen_experts import WidenExpertsPass
from r1c.plugins import int_block

TOL = 1e-5
INT8_ACT_TOL = 2e-2
info = onnx.helper.make_tensor_value_info


# ---- the codec -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantization_follows_its_rule(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((5, 64)).astype(np.float32)
    w[1, :32] = 0.0  # an all-zero block
    p = int_block.quantize(w, bits, 32)
    assert p.q.shape == (5, 64 * bits // 8) and p.scales.shape == (5, 2) and p.q.dtype == np.uint8
    half = 1 << (bits - 1)
    ints = int_block.unpack(p.q, bits).astype(int) - half
    for r in range(5):
        for b in range(2):
            block = w[r, 32 * b: 32 * (b + 1)]
            m = block[np.argmax(np.abs(block))]
            d = m / -half
            assert p.scales[r, b] == pytest.approx(d, rel=1e-6)
            want = np.zeros(32, int) if d == 0 else np.clip(np.rint(block / d), -half, half - 1)
            assert (ints[r, 32 * b: 32 * (b + 1)] == want).all()
    if bits == 4:  # the first value of a pair in the low nibble
        assert (p.q[0, 0] & 0x0F) == ints[0, 0] + half and (p.q[0, 0] >> 4) == ints[0, 1] + half
    assert np.abs(p.dequantize() - w).max() <= np.abs(p.scales).max() + 1e-6  # a step where +2^(bits-1) clips
    assert int_block.block_for(96, 128) == 32 and int_block.block_for(24, 32) is None


# ---- dense layers ----------------------------------------------------------------------------------------
def matmul_model(k: int, n: int, w: np.ndarray | None = None, fp8: bool = False) -> tuple[object, np.ndarray]:
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32) if w is None else w
    if not fp8:
        return make_model([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], [info("x", 1, ["B", "S", k])],
                          [info("y", 1, ["B", "S", n])], [onnx.numpy_helper.from_array(w, "w")]), w
    import ml_dtypes

    blocks = np.abs(np.pad(w, ((0, -k % 128), (0, 0)))).reshape(-1, 128, n).max(axis=1)
    scale = (blocks / 448.0).astype(np.float32)  # e4m3fn's largest value at each block's largest weight
    q = (w / np.repeat(scale, 128, axis=0)[:k]).astype(ml_dtypes.float8_e4m3fn)
    wf = q.astype(np.float32) * np.repeat(scale, 128, axis=0)[:k]
    nodes = [onnx.helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], axis=0, block_size=128),
             onnx.helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [onnx.numpy_helper.from_array(q, "wq"), onnx.numpy_helper.from_array(scale, "ws")]
    return make_model(nodes, [info("x", 1, ["B", "S", k])], [info("y", 1, ["B", "S", n])], inits), wf


@pytest.mark.parametrize(("precision", "k", "n", "block"), [("int8", 256, 48, 128), ("int8", 96, 40, 32),
                                                             ("int4", 64, 48, 64), ("int4", 48, 24, 16)])
def test_matmul_becomes_matmulnbits(precision: str, k: int, n: int, block: int) -> None:
    bits = int(precision[3:])
    model, w = matmul_model(k, n)
    report: dict[str, object] = {}
    assert QuantizeWeightsPass(precision, report=report, accuracy_level=0)(model).modified  # type: ignore[arg-type]
    node = next(iter(model.graph))  # type: ignore[attr-defined]
    assert node.op_type == "MatMulNBits" and node.attributes["block_size"].as_int() == block
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)
    packed = int_block.quantize(np.ascontiguousarray(w.T), bits, block)
    assert max_rel_err(run(model, {"x": x})[0], x @ packed.dequantize().T) < TOL  # type: ignore[arg-type]
    assert report["tensors"] == 1 and report["max_relative_error"] == pytest.approx(
        int_block.relative_error(w.T, packed))
    fast = matmul_model(k, n, w)[0]
    QuantizeWeightsPass(precision)(fast)  # type: ignore[arg-type]
    assert max_rel_err(run(fast, {"x": x})[0], x @ packed.dequantize().T) < INT8_ACT_TOL  # type: ignore[arg-type]


def test_fp8_matmul_becomes_int8_from_its_float_values_and_auto_leaves_float_weights() -> None:
    model, wf = matmul_model(256, 32, fp8=True)
    assert QuantizeWeightsPass("auto", accuracy_level=0)(model).modified  # type: ignore[arg-type]
    RemoveDeadCodePass()(model)  # type: ignore[arg-type]
    assert op_counts(model) == {"com.microsoft::MatMulNBits": 1}  # type: ignore[arg-type]
    x = np.random.default_rng(2).standard_normal((1, 4, 256)).astype(np.float32)
    want = x @ int_block.quantize(np.ascontiguousarray(wf.T), 8, 128).dequantize().T
    assert max_rel_err(run(model, {"x": x})[0], want) < TOL  # type: ignore[arg-type]
    plain, _ = matmul_model(256, 32)
    assert not QuantizeWeightsPass("auto")(plain).modified  # type: ignore[arg-type]
    assert not QuantizeWeightsPass("fp32")(matmul_model(256, 32)[0]).modified  # type: ignore[arg-type]


def test_batched_matmul_becomes_dynamic_quantize_matmul() -> None:
    """MLA's absorbed per-head matrices [N, K, C]: int8 per head and column; activations quantized per tensor."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 16, 24)).astype(np.float32)
    model = make_model([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], [info("x", 1, [2, 4, 3, 16])],
                       [info("y", 1, [2, 4, 3, 24])], [onnx.numpy_helper.from_array(w, "w")])
    report: dict[str, object] = {}
    assert QuantizeWeightsPass("int4", report=report)(model).modified
    assert op_counts(model) == {"com.microsoft::DynamicQuantizeMatMul": 1}
    q, scales = int_block.quantize_columns(w)
    assert q.dtype == np.int8 and scales.shape == (4, 1, 24) and np.abs(q).max() == 127
    x = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    assert max_rel_err(run(model, {"x": x})[0], x @ (q * scales)) < INT8_ACT_TOL
    assert 0 < report["max_relative_error"] < 0.01  # type: ignore[operator]


# ---- routed experts --------------------------------------------------------------------------------------
H, INTER, E = 64, 32, 16


def dequantized_weights(w: dict[str, object], bits: int, block: int) -> dict[str, object]:
    out = dict(w)
    for name in ("w13", "w2"):
        arr = w[name]
        assert isinstance(arr, np.ndarray)
        out[name] = np.stack([int_block.quantize(e, bits, block).dequantize() for e in arr])
    return out


@pytest.mark.parametrize(("precision", "acc", "tol"), [("int4", 0, TOL), ("int8", 4, INT8_ACT_TOL),
                                                       ("int4", 4, INT8_ACT_TOL)])
def test_moe_becomes_qmoe(precision: str, acc: int, tol: float) -> None:
    bits = int(precision[3:])
    model, w = r1c_moe_model(np.random.default_rng(bits + acc), experts=E, hidden=H, inter=INTER)
    LowerMoEToOrtPass()(model)
    assert QuantizeWeightsPass(precision, accuracy_level=acc)(model).modified
    RemoveDeadCodePass()(model)
    counts = op_counts(model)
    assert counts["com.microsoft::QMoE"] == 1 and "com.microsoft::MoE" not in counts
    h = np.random.default_rng(3).standard_normal((6, H)).astype(np.float32)
    block = 32  # both prefer 128 and halve to what divides H = 64 and I = 32
    want = moe_reference(h, dequantized_weights(w, bits, block))
    assert max_rel_err(run(model, {"h": h})[0], want) < tol


def test_qmoe_keeps_unnormalized_full_softmax_routing() -> None:
    """MoE with normalize_routing_weights=0 weighs by the softmax over all E; QMoE gets it as router_weights."""
    rng = np.random.default_rng(5)
    w13 = rng.standard_normal((E, 2 * INTER, H)).astype(np.float32) / H**0.5
    w2 = rng.standard_normal((E, H, INTER)).astype(np.float32) / INTER**0.5
    node = onnx.helper.make_node("MoE", ["x", "probs", "w13", "", "w2"], ["y"], domain="com.microsoft", k=3,
                                 activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=0,
                                 activation_alpha=1.0, activation_beta=0.0)

    def moe(a: np.ndarray, b: np.ndarray) -> object:
        return make_model([node], [info("x", 1, ["T", H]), info("probs", 1, ["T", E])], [info("y", 1, ["T", H])],
                          [onnx.numpy_helper.from_array(a, "w13"), onnx.numpy_helper.from_array(b, "w2")],
                          extra_opsets={"com.microsoft": 1})

    model = moe(w13, w2)
    assert QuantizeWeightsPass("int4", accuracy_level=0)(model).modified  # type: ignore[arg-type]
    assert op_counts(model)["Softmax"] == 1  # type: ignore[arg-type]
    deq = [np.stack([int_block.quantize(e, 4, 32).dequantize() for e in a]) for a in (w13, w2)]
    feeds = {"x": rng.standard_normal((5, H)).astype(np.float32),
             "probs": rng.standard_normal((5, E)).astype(np.float32)}
    assert max_rel_err(run(model, feeds)[0], run(moe(*deq), feeds)[0]) < TOL  # type: ignore[arg-type]


def test_fp8_experts_become_int8_qmoe_in_the_onnxruntime_pipeline() -> None:
    """An FP8 block: dequantized (the op's definition), lowered, stored as int8 blocks (precision auto)."""
    model, w = r1c_moe_model(np.random.default_rng(9), experts=E, hidden=H, inter=INTER, quant="fp8_block128")
    before = copy(model)
    assert WidenExpertsPass()(copy(model)).modified
    options = BuildOptions()
    model = run_pipeline(model, "onnxruntime", options=options)
    counts = op_counts(model)
    assert counts["com.microsoft::QMoE"] == 1 and not any(k.startswith("r1c::") for k in counts)
    dtypes = {v.const_value.dtype.name for v in model.graph.initializers.values() if v.const_value is not None}
    assert "FLOAT8E4M3FN" not in dtypes and "UINT8" in dtypes
    assert options.report["quantize_weights"]["precision"] == "int8"
    h = np.random.default_rng(4).standard_normal((6, H)).astype(np.float32)
    want = moe_reference(h, dequantized_weights(w, 8, 32))  # w holds the FP8 values as float32
    assert max_rel_err(run(model, {"h": h})[0], want) < INT8_ACT_TOL
    assert max_rel_err(run(before, {"h": h})[0], moe_reference(h, w)) < TOL


# ---- r1c build --precision ---------------------------------------------------------------------------------
def test_build_precision_int8_reports_and_runs(tmp_path: Path) -> None:
    cli = CliRunner()
    r = cli.invoke(main, ["export", "--preset", "tiny", "-o", str(tmp_path / "e"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = cli.invoke(main, ["build", str(tmp_path / "e"), "-o", str(tmp_path / "b"), "--precision", "int8"])
    assert r.exit_code == 0, r.output
    assert "int8: quantized" in r.stderr and "relative error mean" in r.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    report = json.loads((tmp_path / "b" / "quantization.json").read_text())
    assert manifest["precision"] == "int8" and manifest["target_options"]["quantization"]["bits"] == 8
    assert report["tensors"] > 0 and 0.001 < report["mean_relative_error"] < 0.02  # int8 blocks: ~0.6%
    r = cli.invoke(main, ["run", str(tmp_path / "b"), "--input-ids", "1 2 3", "--max-new-tokens", "4"])
    assert r.exit_code == 0 and len(r.stdout.rsplit(":", 1)[-1].split()) == 4, r.output
    r = cli.invoke(main, ["build", str(tmp_path / "e"), "-o", str(tmp_path / "t"), "--target", "tensorrt",
                          "--precision", "int4"])
    assert r.exit_code != 0 and "for a one-rank onnxruntime bundle" in r.output
