"""`r1c::FP8Linear`'s model-local ONNX function body: the blocked DequantizeLinear + MatMul it stands for.

x [..., K]; weight [N, K] float8_e4m3fn; weight_scale [nb, kb] = [ceil(N/128), ceil(K/128)] float32:
    scale_rows = Slice(Reshape(Expand(Unsqueeze(weight_scale, 1), [nb, 128, kb]), [nb*128, kb]), [0], [N])  [N, kb]
    w = DequantizeLinear(weight, scale_rows, axis=1, block_size=128)                                       [N, K]
    y = MatMul(x, CastLike(Transpose(w), x))                                                                [..., N]
(opset 21: DequantizeLinear with block_size).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from r1c.plugins.fp8 import BLOCK
from r1c.plugins.fp8_linear.spec import SPEC

OPSET_IMPORTS = [helper.make_opsetid("", 21)]


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)],
                                                                            values))


def fp8_linear_function() -> onnx.FunctionProto:
    n = helper.make_node
    nodes = [
        _const("one", [1]), _const("zero", [0]), _const("blk", [BLOCK]),
        n("Shape", ["weight_scale"], ["sshape"]),
        n("Gather", ["sshape", "zero"], ["nb"]),
        n("Gather", ["sshape", "one"], ["kb"]),
        n("Unsqueeze", ["weight_scale", "one"], ["s3"]),  # [nb, 1, kb]
        n("Concat", ["nb", "blk", "kb"], ["s3_shape"], axis=0),
        n("Expand", ["s3", "s3_shape"], ["s3x"]),  # [nb, 128, kb]
        n("Mul", ["nb", "blk"], ["rows"]),
        n("Concat", ["rows", "kb"], ["s2_shape"], axis=0),
        n("Reshape", ["s3x", "s2_shape"], ["s2"]),  # [nb*128, kb]
        n("Shape", ["weight"], ["wshape"]),
        n("Gather", ["wshape", "zero"], ["n"]),
        n("Slice", ["s2", "zero", "n", "zero"], ["scale_rows"]),  # [N, kb]
        n("DequantizeLinear", ["weight", "scale_rows"], ["w"], axis=1, block_size=BLOCK),  # [N, K] float32
        n("Transpose", ["w"], ["wt"], perm=[1, 0]),
        n("CastLike", ["wt", "x"], ["wt_x"]),
        n("MatMul", ["x", "wt_x"], ["y"]),
    ]
    return helper.make_function(SPEC.domain, SPEC.name, list(SPEC.inputs), list(SPEC.outputs), nodes, OPSET_IMPORTS,
                                attributes=[*SPEC.attributes, "plugin_namespace"])
