"""What TensorRT's ONNX parser accepts, as data: the `check_tensorrt_ops` pass reads it.

Source: onnx-tensorrt `docs/operators.md` at the 10.1-GA release (commit 96e7811, June 2024), the newest
support matrix available here; every op marked "Y" is listed, with the restrictions the check can verify
on the graph. Newer parsers support more (e.g. opset-23 ops); widen the list when the matrix is updated.
"""

from __future__ import annotations

PARSER_MATRIX = "onnx-tensorrt docs/operators.md, TensorRT 10.1 GA"
# That matrix says "opset 9 to opset 20"; r1c models import opset 21 and target parsers >= 10.15 (see
# ARCHITECTURE.md), which read it. The op list is the part this check relies on.

SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# op -> input positions that must be constant ("must be an initializer" in the matrix)
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "CumSum": (1,), "Pad": (3,), "Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "TopK": (1,),
    **{op: (1,) for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}

# op -> (attribute, its ONNX default, the only value TensorRT accepts)
REQUIRED_ATTRIBUTES: dict[str, tuple[tuple[str, object, object], ...]] = {
    "TopK": (("sorted", 1, 1),),
    "ScatterND": (("reduction", "none", "none"),),
    "LSTM": (("input_forget", 0, 0), ("layout", 0, 0)),
}

TOPK_MAX_K = 3840  # "`K` input must be less than 3840"
