"""The balanced decode MoE: `split_moe_experts` cuts each expert of ORT's float MoE into P sub-experts along its
intermediate dimension. Exact by construction (SwiGLU is elementwise, the down projection sums over I; fc2 is
scaled by P, a power of two), so the split block must equal the unsplit one and the PyTorch reference at float32
tolerance 1e-5 (ORT sums the sub-experts in another order), for decode (1 token) and prefill, on 1 and 2 threads,
normalized routing (the DeepSeek lowering) and ORT's unnormalized full-softmax routing.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from r1c.passes.lower_moe_to_ort import LowerMoEToOrtPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.split_moe_experts import MIN_PARTS, SplitMoEExpertsPass, parts_for
from r1c.passes.testing import copy, make_model, max_rel_err, moe_reference, op_counts, r1c_moe_model, run

TOL = 1e-5
H, INTER, E = 32, 16, 16


def lowered_block(seed: int) -> tuple[object, dict[str, object]]:
    model, w = r1c_moe_model(np.random.default_rng(seed), experts=E, hidden=H, inter=INTER)
    assert LowerMoEToOrtPass()(model).modified
    RemoveDeadCodePass()(model)
    return model, w


@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("tokens", [1, 7])
def test_split_equals_unsplit_and_reference(parts: int, tokens: int) -> None:
    model, w = lowered_block(parts + tokens)
    before = copy(model)  # type: ignore[arg-type]
    assert SplitMoEExpertsPass(parts=parts)(model).modified  # type: ignore[arg-type]
    moe = next(n for n in model.graph if n.op_type == "MoE")  # type: ignore[attr-defined]
    assert moe.attributes["k"].as_int() == 4 * parts
    assert [moe.inputs[2].shape[0], moe.inputs[4].shape[2]] == [parts * E, INTER // parts]
    assert op_counts(model)["Tile"] == 1  # type: ignore[arg-type]
    h = np.random.default_rng(tokens).standard_normal((tokens, H)).astype(np.float32)
    want = moe_reference(h, w)
    for threads in (1, 2):
        got = run(model, {"h": h}, threads=threads)[0]  # type: ignore[arg-type]
        assert max_rel_err(got, run(before, {"h": h}, threads=threads)[0]) < TOL
        assert max_rel_err(got, want) < TOL


def test_split_keeps_unnormalized_full_softmax_routing() -> None:
    """normalize_routing_weights=0: ORT weighs each chosen expert by the softmax over all E scores; tiling the
    scores P times divides that softmax by P for every copy, which the P-scaled fc2 restores."""
    rng = np.random.default_rng(11)
    w13 = rng.standard_normal((E, 2 * INTER, H)).astype(np.float32) / H**0.5
    w2 = rng.standard_normal((E, H, INTER)).astype(np.float32) / INTER**0.5
    info = onnx.helper.make_tensor_value_info
    node = onnx.helper.make_node("MoE", ["x", "probs", "w13", "", "w2"], ["y"], domain="com.microsoft", k=3,
                                 activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=0,
                                 activation_alpha=1.0, activation_beta=0.0)
    model = make_model([node], [info("x", 1, ["T", H]), info("probs", 1, ["T", E])], [info("y", 1, ["T", H])],
                       [onnx.numpy_helper.from_array(w13, "w13"), onnx.numpy_helper.from_array(w2, "w2")],
                       extra_opsets={"com.microsoft": 1})
    before = copy(model)
    assert SplitMoEExpertsPass(parts=4)(model).modified
    feeds = {"x": rng.standard_normal((5, H)).astype(np.float32),
             "probs": rng.standard_normal((5, E)).astype(np.float32)}  # every score finite
    assert max_rel_err(run(model, feeds)[0], run(before, feeds)[0]) < TOL


def test_parts_follow_threads_and_the_intermediate_size() -> None:
    assert parts_for(1, 256) == MIN_PARTS == 4
    assert parts_for(2, 256) == 4 and parts_for(8, 256) == 8 and parts_for(6, 256) == 8
    assert parts_for(4, 32) == 2  # slices of at least 16 rows
    assert parts_for(4, 24) == 1  # 24 = 16 + 8: no power of two splits it into slices of >= 16
