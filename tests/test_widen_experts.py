"""`widen_experts`: a bf16 MoE block (weights and hidden state) becomes float32 around ORT's MoE lowering, so it runs
only the chosen experts instead of its dense function body, with the export's dtype kept outside the block.
Equal to the bf16 block's function body under ONNX Runtime within bf16 rounding of the output (1e-2 relative:
the body rounds each expert's partial products to bf16, the widened block rounds once at the end).
(FP8 blocks: tests/test_quantize_weights.py.)
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from r1c.exporter.onnx_functions import experts_function
from r1c.passes.lower_moe_to_ort import LowerMoEToOrtPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.testing import copy, max_rel_err, op_counts, r1c_moe_model, run
from r1c.passes.widen_experts import WidenExpertsPass

BF16_TOL = 1e-2


def bf16_block() -> ir.Model:
    model, _ = r1c_moe_model(np.random.default_rng(2), experts=16, hidden=32, inter=16)
    body = ir.serde.deserialize_function(experts_function("none", cast_weights=True))  # a --dtype export's body
    model.functions[body.identifier()] = body
    for name in ("w13", "w2"):  # the expert weights in bf16, as a bf16 export stores them
        value = model.graph.initializers[name]
        assert value.const_value is not None
        value.const_value = ir.tensor(value.const_value.numpy().astype(ml_dtypes.bfloat16), name=name)
        value.dtype = ir.DataType.BFLOAT16
    # the block reads and writes bf16; the graph's I/O stays float32 (numpy and ORT's Python API have no bf16)
    graph, h, out = model.graph, model.graph.inputs[0], model.graph.outputs[0]
    h32 = ir.Value(name="h32", shape=h.shape, type=ir.TensorType(ir.DataType.FLOAT))
    narrow = ir.node("Cast", [h32], {"to": int(ir.DataType.BFLOAT16)}, name="to_bf16")
    graph.insert_before(next(iter(graph)), narrow)
    ir.convenience.replace_all_uses_with(h, narrow.outputs[0])
    narrow.outputs[0].dtype, narrow.outputs[0].shape = ir.DataType.BFLOAT16, h.shape
    graph.inputs[0] = h32
    widen = ir.node("Cast", [out], {"to": int(ir.DataType.FLOAT)}, name="to_f32")
    graph.append(widen)
    out.dtype = ir.DataType.BFLOAT16
    widen.outputs[0].name, widen.outputs[0].dtype, widen.outputs[0].shape = "out32", ir.DataType.FLOAT, out.shape
    graph.outputs[0] = widen.outputs[0]
    return model


def test_bf16_block_is_widened_and_lowered() -> None:
    model = bf16_block()
    before = copy(model)
    assert WidenExpertsPass()(model).modified
    assert LowerMoEToOrtPass()(model).modified  # float32 now: ORT's MoE runs only the chosen experts
    RemoveDeadCodePass()(model)
    counts = op_counts(model)
    assert counts["com.microsoft::MoE"] == 1 and not any(k.startswith("r1c::") for k in counts)
    assert counts["Cast"] == 2 + 2  # the test's I/O casts, the block's widening and narrowing
    h = np.random.default_rng(3).standard_normal((5, 32)).astype(ml_dtypes.bfloat16).astype(np.float32)
    assert max_rel_err(run(model, {"h32": h})[0], run(before, {"h32": h})[0]) < BF16_TOL
