"""What TensorRT's ONNX parser accepts, as data: the `check_tensorrt_ops` pass reads it.

SUPPORTED_OPS is the answer of the parser r1c targets, `IParser.supports_operator(op)` for every op of ONNX's
default domain, taken from PARSER (TensorRT for RTX's parser: the one that installs and runs here; full TensorRT's
10.x parser comes from the same onnx-tensorrt sources). Regenerate it with
    python -c "from r1c.runtime.trt_rtx import supported_onnx_ops as s; r = s(); print(r['parser'], r['ops'])"
`tests/test_tensorrt.py` asks the installed parser again and fails when the two differ, so this list cannot go
stale silently. The restrictions below (inputs that must be constant, attribute values) are not reported by
`supports_operator`; they come from onnx-tensorrt's `docs/operators.md` and stay checked by hand.
"""

from __future__ import annotations

PARSER = "tensorrt_rtx 1.7.1.116 (nv_onnx_parser 200)"

SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike CausalConvWithState Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If InstanceNormalization IsInf
IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual LinearAttention Log LogSoftmax Loop LpNormalization
LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot
Or PRelu Pad Pow QuantizeLinear RMSNormalization RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign RotaryEmbedding Round STFT Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Swish Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
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
