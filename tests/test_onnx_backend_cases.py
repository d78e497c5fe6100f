"""Any valid ONNX through `r1c optimize`: ONNX's backend node cases (onnx.backend.test.case.node, ~1,900
generated models) keep ONNX Runtime's outputs through the `r1c` and `onnxruntime` pipelines.

The reference is ONNX Runtime's output on the original model (one session per model, computed once per
module); tolerances per dtype are in `r1c.passes.onnx_backend_cases.TOLERANCE` (float16 at fp16 rounding).
Measured with onnxruntime 1.32 / onnx 1.23: 1,526 of 1,884 cases run by ORT, all bit-equal after either
pipeline. The whole module takes ~40 s of CPU time (see the closing note of issue 8 for the command).
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
import pytest

from r1c.passes.fold_constants import FoldConstantsPass
from r1c.passes.infer_shapes import InferShapesPass
from r1c.passes.onnx_backend_cases import Reference, check_pipeline, collect_references, summary

MIN_RUN_BY_ORT = 1400  # ORT 1.32 runs 1,526: far fewer means the harness (not the passes) broke


@pytest.fixture(scope="module")
def references() -> list[Reference]:
    refs, total = collect_references()
    assert total > 1800 and len(refs) >= MIN_RUN_BY_ORT, (total, len(refs))
    return refs


@pytest.mark.parametrize("target", ["r1c", "onnxruntime"])
def test_every_case_keeps_onnxruntime_outputs(references: list[Reference], target: str) -> None:
    results = check_pipeline(references, target)
    bad = [f"{r.name}: {r.status} {r.detail}" for r in results if r.status != "equal"]
    assert not bad, f"{len(bad)} of {len(results)} cases broke:\n" + "\n".join(bad)
    assert summary(results)["equal"] == len(references)


def _case(name: str) -> onnx.ModelProto:
    from onnx.backend.test.case.node import collect_testcases

    model = next(c.model for c in collect_testcases(name.split("_")[1]) if c.name == f"test_{name}")
    assert model is not None
    return model


def test_fold_constants_leaves_a_node_it_cannot_evaluate_untouched(caplog: pytest.LogCaptureFixture) -> None:
    # onnxscript's SplitToSequence evaluator crashes on a computed `split` input
    model = ir.serde.deserialize_model(_case("split_to_sequence_1"))
    with caplog.at_level(logging.DEBUG, logger="r1c.passes"):
        result = FoldConstantsPass()(model)
    assert [n.op_type for n in result.model.graph] == ["SplitToSequence"]
    assert any(getattr(r, "untouched", False) and "SplitToSequence" in r.getMessage() for r in caplog.records)


def test_infer_shapes_keeps_a_sequence_a_sequence() -> None:
    # a Loop body whose If yields a sequence: onnx_ir's merge typed it float tensor, which ORT rejects
    model = ir.serde.deserialize_model(_case("loop16_seq_none"))
    InferShapesPass()(model)
    body = model.graph.node(0).attributes["body"].as_graph()
    sequence = next(n for n in body if n.op_type == "If").outputs[0]
    assert isinstance(sequence.type, ir.SequenceType), sequence.type
