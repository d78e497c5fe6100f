"""Cleanup and canonicalisation passes on small hand-built graphs: what each changes, and that ONNX Runtime
computes the same outputs before and after (tolerance: exact, these passes do not change arithmetic,
except constant folding where numpy and ORT may round differently: 1e-6 relative).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from r1c.passes.fold_constants import FoldConstantsPass
from r1c.passes.infer_shapes import InferShapesPass
from r1c.passes.name_deterministically import NameDeterministicallyPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.testing import copy, make_model, max_rel_err, op_counts, run

RNG = np.random.default_rng(0)


def x_info(name: str = "x", dims: list[int | str] | None = None) -> object:
    return oh.make_tensor_value_info(name, TP.FLOAT, dims or ["batch", 8])


def same_outputs(before: ir.Model, after: ir.Model, feeds: dict[str, np.ndarray], tol: float = 0.0) -> None:
    for a, b in zip(run(before, feeds), run(after, feeds)):
        assert a.shape == b.shape
        assert max_rel_err(b, a) <= tol


def test_remove_dead_code_drops_nodes_initializers_functions_and_opsets() -> None:
    unused_fn = oh.make_function("r1c", "Unused", ["a"], ["b"], [oh.make_node("Relu", ["a"], ["b"])],
                                 [oh.make_opsetid("", 21)])
    model = make_model(
        [oh.make_node("Relu", ["x"], ["y"], name="keep"),
         oh.make_node("Add", ["x", "w"], ["dead"], name="dead_add"),
         oh.make_node("Neg", ["dead"], ["dead2"], name="dead_neg")],
        [x_info()], [x_info("y")],
        [nh.from_array(np.ones(8, np.float32), "w"), nh.from_array(np.ones(3, np.float32), "junk")],
        functions=[unused_fn], extra_opsets={"com.microsoft": 1})
    before = copy(model)
    result = RemoveDeadCodePass()(model)
    assert result.modified
    assert [n.name for n in model.graph] == ["keep"]
    assert not model.graph.initializers
    assert not model.functions
    assert set(model.opset_imports) == {""}
    same_outputs(before, model, {"x": RNG.standard_normal((3, 8)).astype(np.float32)})


def test_fold_constants_folds_shape_arithmetic_but_not_fp8_weights_or_large_transposes() -> None:
    w8 = (RNG.standard_normal((8, 8)) * 0.5).astype(ml_dtypes.float8_e4m3fn)  # small, but FP8: never widened
    big = RNG.standard_normal((128, 128)).astype(np.float32)  # 16384 elements: a weight, never re-laid out
    small = RNG.standard_normal((8, 8)).astype(np.float32)
    model = make_model(
        [oh.make_node("Concat", ["minus1", "eight"], ["shape"], axis=0, name="shape_concat"),
         oh.make_node("Reshape", ["x", "shape"], ["x2"]),
         oh.make_node("Cast", ["w8"], ["w8f"], to=TP.FLOAT, name="fp8_cast"),
         oh.make_node("MatMul", ["x2", "w8f"], ["y1"]),
         oh.make_node("Transpose", ["small"], ["small_t"], name="small_transpose"),
         oh.make_node("MatMul", ["y1", "small_t"], ["y2"]),
         oh.make_node("Transpose", ["big"], ["big_t"], name="big_transpose"),
         oh.make_node("Slice", ["big_t", "zero", "eight", "zero", "one"], ["big_t8"]),
         oh.make_node("Slice", ["big_t8", "zero", "eight", "one", "one"], ["big_88"]),
         oh.make_node("MatMul", ["y2", "big_88"], ["y"])],
        [x_info()], [x_info("y")],
        [nh.from_array(np.array([-1], np.int64), "minus1"), nh.from_array(np.array([8], np.int64), "eight"),
         nh.from_array(np.array([0], np.int64), "zero"), nh.from_array(np.array([1], np.int64), "one"),
         nh.from_array(w8, "w8"), nh.from_array(big, "big"), nh.from_array(small, "small")])
    before = copy(model)
    FoldConstantsPass()(model)
    RemoveDeadCodePass()(model)
    names = {n.name for n in model.graph}
    assert "shape_concat" not in names and "small_transpose" not in names  # folded
    assert {"fp8_cast", "big_transpose"} <= names  # guarded
    dtypes = {v.name: v.const_value.dtype for v in model.graph.initializers.values()}
    assert dtypes["w8"] == ir.DataType.FLOAT8E4M3FN
    assert "w8f" not in model.graph.initializers  # no float32 copy of the FP8 weight
    same_outputs(before, model, {"x": RNG.standard_normal((3, 8)).astype(np.float32)}, tol=1e-6)


def test_infer_shapes_fills_missing_types_and_keeps_known_symbolic_shapes() -> None:
    model = make_model([oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Unsqueeze", ["r", "ax"], ["u"]),
                        oh.make_node("Squeeze", ["u", "ax"], ["y"])],
                       [x_info()], [x_info("y", ["tokens", 8])], [nh.from_array(np.array([1], np.int64), "ax")])
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert values["u"].dtype is None and values["u"].shape is None
    before = copy(model)
    InferShapesPass()(model)
    assert values["u"].dtype == ir.DataType.FLOAT
    assert [d if isinstance(d, int) else d.value for d in values["u"].shape] == ["batch", 1, 8]
    assert [d if isinstance(d, int) else d.value for d in model.graph.outputs[0].shape] == ["tokens", 8]  # kept
    same_outputs(before, model, {"x": RNG.standard_normal((2, 8)).astype(np.float32)})


def _generic_names_model() -> ir.Model:
    model = make_model([oh.make_node("Relu", ["x"], ["v_7"], name="node_3"), oh.make_node("Neg", ["v_7"], ["t"]),
                        oh.make_node("Relu", ["t"], ["y"], name="node")],
                       [x_info()], [x_info("y")], extra_opsets={"com.microsoft": 1})
    model.opset_imports.pop("")
    model.opset_imports[""] = 21  # unsorted on purpose
    return model


def test_name_deterministically_names_generic_nodes_by_op_and_is_reproducible() -> None:
    model = _generic_names_model()
    before = copy(model)
    NameDeterministicallyPass()(model)
    assert [n.name for n in model.graph] == ["Relu_0", "Neg_0", "Relu_1"]
    assert model.graph.node(0).outputs[0].name == "Relu_0_out0"
    assert model.graph.outputs[0].name == "y"  # graph I/O keeps its names
    assert list(model.opset_imports) == ["", "com.microsoft"]
    assert model.producer_name == "r1c"
    again = _generic_names_model()
    NameDeterministicallyPass()(again)
    assert ir.serde.serialize_model(again).SerializeToString() == ir.serde.serialize_model(model).SerializeToString()
    same_outputs(before, model, {"x": RNG.standard_normal((2, 8)).astype(np.float32)})
    assert op_counts(model) == {"Relu": 2, "Neg": 1}
