"""r1c's CPU Linear kernel (`r1c.cpu::Linear`, r1c/plugins/cpu_moe/linear_cpu.cc) against float64 NumPy, and the pass
that swaps it in for MatMul nodes by a constant weight (passes/use_cpu_linear_kernel.py).

Tolerance: max |ours - ref| <= 1e-5 * max |ref| (float32 dot products of at most 1024 terms against float64). Shapes
cover N not a multiple of 32 (the last panel partial) and below one vector, K of 1, token counts below, at and above a
tile (1, 3, 12, 13, 40), a 3-D input and none at all, for each level's build this CPU runs; 1 and 2 threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from r1c.passes.testing import copy, make_model, max_rel_err, op_counts, run
from r1c.passes.use_cpu_linear_kernel import UseCpuLinearKernelPass
from r1c.plugins.cpu_moe import LINEAR_SPEC, pack_linear

TOL = 1e-5
info = onnx.helper.make_tensor_value_info


def linear_model(w: np.ndarray, rank: int = 2) -> ir.Model:
    k, n = w.shape
    node = onnx.helper.make_node(LINEAR_SPEC.name, ["x", "w"], ["y"], domain=LINEAR_SPEC.domain, n=n)
    x_shape = ["B", "S", k] if rank == 3 else ["T", k]
    return make_model([node], [info("x", 1, x_shape)], [info("y", 1, None)],
                      [onnx.numpy_helper.from_array(pack_linear(w), "w")], extra_opsets={LINEAR_SPEC.domain: 1})


@pytest.mark.parametrize("k,n", [(64, 96), (40, 33), (128, 7), (1, 50), (200, 1024)])
def test_linear_matches_float64(any_level: Path, k: int, n: int) -> None:
    rng = np.random.default_rng(k * 1000 + n)
    w = (rng.standard_normal((k, n)) / k**0.5).astype(np.float32)
    model = linear_model(w)
    for tokens in (1, 3, 12, 13, 40):
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64)
        for threads in (1, 2):
            got = run(model, {"x": x}, threads=threads, custom_ops=[any_level])[0]
            assert got.shape == (tokens, n) and got.dtype == np.float32
            assert max_rel_err(got, want) < TOL, (tokens, threads)


def test_linear_takes_a_3d_input_and_no_tokens(kernel: Path) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    x = rng.standard_normal((2, 5, 24)).astype(np.float32)
    got = run(linear_model(w, rank=3), {"x": x}, custom_ops=[kernel])[0]
    assert got.shape == (2, 5, 40) and max_rel_err(got, x.astype(np.float64) @ w) < TOL
    empty = run(linear_model(w), {"x": np.zeros((0, 24), np.float32)}, custom_ops=[kernel])[0]
    assert empty.shape == (0, 40)


def test_linear_refuses_a_weight_that_disagrees(kernel: Path) -> None:
    w = np.zeros((16, 40), np.float32)
    model = linear_model(w)
    next(iter(model.graph)).attributes["n"] = ir.AttrInt64("n", 100)  # 4 panels expected, the weight has 2
    with pytest.raises(Exception, match=r"r1c\.cpu::Linear: input \[\.\., K\], packed weight"):
        run(model, {"x": np.zeros((2, 16), np.float32)}, custom_ops=[kernel])


def matmuls() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """MatMuls by: w1 (a float32 constant read by that node alone: the kernel's), `shared` (read by two nodes), a
    computed matrix, and a batched [2, K, N] constant: only the first is swapped."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((16, 24)).astype(np.float32)
    shared = rng.standard_normal((24, 24)).astype(np.float32)
    w3 = rng.standard_normal((2, 24, 24)).astype(np.float32)  # batched: left to ORT
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["a"]),
             onnx.helper.make_node("MatMul", ["a", "shared"], ["b"]),
             onnx.helper.make_node("MatMul", ["b", "shared"], ["c"]),
             onnx.helper.make_node("Transpose", ["c"], ["c_t"], perm=[1, 0]),
             onnx.helper.make_node("MatMul", ["a", "c_t"], ["d"]),
             onnx.helper.make_node("MatMul", ["c", "w3"], ["y"])]
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in {"w1": w1, "shared": shared, "w3": w3}.items()]
    model = make_model(nodes, [info("x", 1, [3, 16])], [info("y", 1, None), info("d", 1, None)], inits)
    return model, {"x": rng.standard_normal((3, 16)).astype(np.float32)}


def test_pass_swaps_matmuls_by_a_constant_and_leaves_the_rest(kernel: Path) -> None:
    model, feeds = matmuls()
    before = copy(model)
    report: dict[str, object] = {}
    assert UseCpuLinearKernelPass("ort", report)(model).modified is False
    result = UseCpuLinearKernelPass("r1c", report)(model)
    assert result.modified and report["nodes"] == 1
    counts = op_counts(result.model)
    assert counts[f"{LINEAR_SPEC.domain}::{LINEAR_SPEC.name}"] == 1 and counts["MatMul"] == 4
    assert "w1" not in result.model.graph.initializers  # repacked, the original dropped
    for got, want in zip(run(result.model, feeds, custom_ops=[kernel]), run(before, feeds), strict=True):
        assert max_rel_err(got, want) < TOL
