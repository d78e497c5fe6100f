"""Model-local ONNX function bodies of the r1c ops: their decomposition into standard ONNX ops.

A runtime that inlines functions (ONNX Runtime) runs an r1c model with no plugin; TensorRT binds a
plugin instead (the `tensorrt` lowering drops these bodies). Numeric attributes are read from the
calling node through `ref_attr_name`, so a pass that changes a node's attribute changes what its body
computes. Shapes: T = tokens, H = hidden, E = experts, G = n_group, K = top_k, I = expert intermediate.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from r1c.plugins import OpSpec
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC

OPSET_IMPORTS = [helper.make_opsetid("", 21)]
FP8_BLOCK = 128


def _ref_const(out: str, attr: str, kind: str) -> onnx.NodeProto:
    """Constant whose value is the calling node's attribute `attr` (kind: value_int | value_float | value_string)."""
    node = helper.make_node("Constant", [], [out])
    a = onnx.AttributeProto()
    a.name = kind
    a.ref_attr_name = attr
    a.type = {"value_int": onnx.AttributeProto.INT, "value_float": onnx.AttributeProto.FLOAT,
              "value_string": onnx.AttributeProto.STRING}[kind]
    node.attribute.append(a)
    return node


def _const(out: str, values: list[int] | list[float] | float, dtype: int = TensorProto.INT64) -> onnx.NodeProto:
    dims = [] if isinstance(values, float) else [len(values)]
    vals = [values] if isinstance(values, float) else values
    return helper.make_node("Constant", [], [out], value=helper.make_tensor(out, dtype, dims, vals))


def _string(out: str, value: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value_string=value)


def _function(spec: OpSpec, inputs: list[str], nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
    """The body with the SPEC's attributes and their defaults (a node that omits one computes the default)."""
    return helper.make_function(
        spec.domain,
        spec.name,
        inputs,
        list(spec.outputs),
        nodes,
        OPSET_IMPORTS,
        attributes=["plugin_namespace"],
        attribute_protos=[helper.make_attribute(name, value) for name, value in spec.attributes.items()],
    )


def router_function() -> onnx.FunctionProto:
    """`r1c::MoERouter` as standard ops, every mode of the op in one body (plugins/moe_router/reference.py).

    Every attribute, the strings included, is read from the calling node (`ref_attr_name`), so one body serves
    any model and a pass that changes an attribute changes what the body computes. The modes are one dataflow:
        s = sigmoid | softmax (logits)                      scoring
        c = s + correction_bias (noaux_tc) | s              selection scores
        groups G = 1 (greedy) | n_group; kept = 1 | topk_group
        group score = sum of the top-2 (noaux_tc) | top-1 = max (V2) of c in each group
        experts of dropped groups: c = -inf (noaux_tc) | 0 (V2); ids = TopK(c, top_k); weights = s at ids
    (both scorings are computed and one is selected: [T, E] work, folded by a runtime's constant folding when the
    attribute is a constant). norm_topk_prob with a V2 method is refused before a model is written.
    """
    n = helper.make_node
    nodes = [
        n("Cast", ["hidden"], ["h32"], to=TensorProto.FLOAT),
        n("Gemm", ["h32", "gate_weight"], ["logits"], transB=1),  # [T, E]; no weight transpose per call
        _ref_const("scoring", "scoring", "value_string"),
        _string("softmax_name", "softmax"),
        n("Equal", ["scoring", "softmax_name"], ["is_softmax"]),
        n("Sigmoid", ["logits"], ["s_sigmoid"]),
        n("Softmax", ["logits"], ["s_softmax"], axis=-1),
        n("Where", ["is_softmax", "s_softmax", "s_sigmoid"], ["s"]),
        _ref_const("method", "topk_method", "value_string"),
        _string("noaux_tc_name", "noaux_tc"),
        _string("greedy_name", "greedy"),
        n("Equal", ["method", "noaux_tc_name"], ["is_v3"]),
        n("Equal", ["method", "greedy_name"], ["is_greedy"]),
        n("Add", ["s", "correction_bias"], ["biased"]),
        n("Where", ["is_v3", "biased", "s"], ["c"]),  # selection scores [T, E]
        # groups: G = 1 for greedy, else n_group; group score = sum of the top-2 (V3) or top-1 (V2) of each group
        n("Shape", ["c"], ["c_shape"]),
        n("Shape", ["c"], ["t_dim"], start=0, end=1),
        _const("one", [1]),
        _const("axis0", [0]),
        _ref_const("n_group_attr", "n_group", "value_int"),
        n("Unsqueeze", ["n_group_attr", "axis0"], ["n_group_1d"]),
        n("Where", ["is_greedy", "one", "n_group_1d"], ["g_dim"]),
        _ref_const("topk_group_attr", "topk_group", "value_int"),
        n("Unsqueeze", ["topk_group_attr", "axis0"], ["topk_group_1d"]),
        n("Where", ["is_greedy", "one", "topk_group_1d"], ["kg"]),
        _const("minus_one", [-1]),
        n("Concat", ["t_dim", "g_dim", "minus_one"], ["grouped_shape"], axis=0),
        n("Reshape", ["c", "grouped_shape"], ["grouped"]),  # [T, G, E/G]
        n("Shape", ["grouped"], ["per_group"], start=2, end=3),
        _const("two", [2]),
        n("Where", ["is_v3", "two", "one"], ["best_n"]),
        n("Min", ["best_n", "per_group"], ["best_k"]),  # a group of one expert has no second best
        n("TopK", ["grouped", "best_k"], ["best", "best_idx"], axis=-1),
        n("ReduceSum", ["best", "minus_one"], ["group_score"], keepdims=0),  # [T, G]
        n("TopK", ["group_score", "kg"], ["kept_score", "kept"], axis=-1),  # [T, kept groups]
        n("Shape", ["group_score"], ["gs_shape"]),
        n("ConstantOfShape", ["gs_shape"], ["no_group"], value=helper.make_tensor("z", TensorProto.BOOL, [1],
                                                                                  [False])),
        n("Shape", ["kept"], ["kept_shape"]),
        n("ConstantOfShape", ["kept_shape"], ["trues"], value=helper.make_tensor("t", TensorProto.BOOL, [1], [True])),
        n("ScatterElements", ["no_group", "kept", "trues"], ["group_mask"], axis=1),  # [T, G]
        n("Unsqueeze", ["group_mask", "minus_one"], ["group_mask3"]),  # [T, G, 1]
        _const("neg_inf", float("-inf"), TensorProto.FLOAT),
        _const("zero", 0.0, TensorProto.FLOAT),
        n("Where", ["is_v3", "neg_inf", "zero"], ["dropped"]),
        n("Where", ["group_mask3", "grouped", "dropped"], ["masked3"]),
        n("Reshape", ["masked3", "c_shape"], ["masked"]),  # [T, E]
        _ref_const("k_scalar", "top_k", "value_int"),
        n("Unsqueeze", ["k_scalar", "axis0"], ["k"]),
        # ONNX TopK: descending, and equal values keep the lower index first
        n("TopK", ["masked", "k"], ["top_c", "ids64"], axis=-1),
        n("GatherElements", ["s", "ids64"], ["w_raw"], axis=1),  # unbiased scores at the chosen ids
        n("ReduceSum", ["w_raw", "minus_one"], ["w_sum"], keepdims=1),
        _const("tiny", 1e-20, TensorProto.FLOAT),
        n("Add", ["w_sum", "tiny"], ["denom"]),
        n("Div", ["w_raw", "denom"], ["w_norm"]),
        _ref_const("norm_int", "norm_topk_prob", "value_int"),
        n("Cast", ["norm_int"], ["norm_flag"], to=TensorProto.BOOL),
        n("Where", ["norm_flag", "w_norm", "w_raw"], ["w_sel"]),
        _ref_const("scale", "routed_scaling_factor", "value_float"),
        n("Mul", ["w_sel", "scale"], ["topk_weights"]),
        n("Cast", ["ids64"], ["topk_ids"], to=TensorProto.INT32),
    ]
    return _function(ROUTER_SPEC, list(ROUTER_SPEC.inputs), nodes)


def _dequant_nodes(w: str, scale: str, out: str) -> list[onnx.NodeProto]:
    """w [E, R, C] fp8 and scale [E, ceil(R/128), ceil(C/128)] -> float32 w * scale[block]."""
    n = helper.make_node
    p = f"{out}_"
    return [
        n("Cast", [w], [p + "w32"], to=TensorProto.FLOAT),
        n("Shape", [w], [p + "wshape"]),
        n("Shape", [scale], [p + "sshape"]),
        _const(p + "axes", [2, 4]),
        n("Unsqueeze", [scale, p + "axes"], [p + "s5"]),  # [E, br, 1, bc, 1]
        _const(p + "blk", [1, 1, FP8_BLOCK, 1, FP8_BLOCK]),
        n("Expand", [p + "s5", p + "blk"], [p + "s5x"]),  # [E, br, 128, bc, 128]
        _const(p + "sel_e", [0]),
        n("Gather", [p + "sshape", p + "sel_e"], [p + "e"]),
        _const(p + "sel_rc", [1, 2]),
        n("Gather", [p + "sshape", p + "sel_rc"], [p + "brc"]),
        _const(p + "blk2", [FP8_BLOCK, FP8_BLOCK]),
        n("Mul", [p + "brc", p + "blk2"], [p + "padded_rc"]),
        n("Concat", [p + "e", p + "padded_rc"], [p + "padded_shape"], axis=0),
        n("Reshape", [p + "s5x", p + "padded_shape"], [p + "sfull"]),  # [E, br*128, bc*128]
        _const(p + "zero3", [0, 0, 0]),
        n("Slice", [p + "sfull", p + "zero3", p + "wshape"], [p + "s"]),  # [E, R, C]
        n("Mul", [p + "w32", p + "s"], [out]),
    ]


def experts_function(quant: str = "none", cast_weights: bool = False) -> onnx.FunctionProto:
    """`r1c::MoEExperts` as standard ops: every expert on every token, weighted by a dense [T, E] routing.

    `cast_weights`: the weights are bfloat16/float16 (a `--dtype` export) and are widened to float32 first.
    This is the portable meaning of the op, not its fast path: targets lower it to a fused kernel
    (ONNX Runtime's MoE, a TensorRT plugin). With ONNX Runtime the fp8 dequantization below depends only
    on initializers, so the session's constant folding does it once at load.
    """
    n = helper.make_node
    inputs = list(EXPERTS_SPEC.inputs)
    nodes: list[onnx.NodeProto] = []
    w13, w2 = "w13", "w2"
    if quant == "fp8_block128":
        inputs += list(EXPERTS_SPEC.optional_inputs)
        nodes += _dequant_nodes("w13", "w13_scale", "w13_f")
        nodes += _dequant_nodes("w2", "w2_scale", "w2_f")
        w13, w2 = "w13_f", "w2_f"
    elif quant != "none":
        raise ValueError(f"MoEExperts: unknown quant {quant!r}")
    elif cast_weights:  # bf16/fp16 weights: the body computes in float32 (a runtime folds the casts at load)
        nodes += [n("Cast", ["w13"], ["w13_f"], to=TensorProto.FLOAT),
                  n("Cast", ["w2"], ["w2_f"], to=TensorProto.FLOAT)]
        w13, w2 = "w13_f", "w2_f"
    nodes += [
        n("Cast", ["hidden"], ["h32"], to=TensorProto.FLOAT),
        n("Transpose", ["h32"], ["hT"], perm=[1, 0]),  # [H, T]
        n("MatMul", [w13, "hT"], ["gu"]),  # [E, 2I, T]
        n("Split", ["gu"], ["g", "u"], axis=1, num_outputs=2),  # [E, I, T] each
        n("Sigmoid", ["g"], ["g_sig"]),
        n("Mul", ["g", "g_sig"], ["g_silu"]),
        n("Mul", ["g_silu", "u"], ["act"]),
        n("MatMul", [w2, "act"], ["y"]),  # [E, H, T]
        # dense routing weights [T, E]: zero for experts a token did not choose
        n("Shape", ["h32"], ["t_dim"], start=0, end=1),
        n("Shape", [w13], ["e_dim"], start=0, end=1),
        n("Concat", ["t_dim", "e_dim"], ["te_shape"], axis=0),
        n("ConstantOfShape", ["te_shape"], ["zeros"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        n("Cast", ["topk_ids"], ["ids64"], to=TensorProto.INT64),
        # reduction=add: a repeated id sums its slots, as the reference does (sharding routes the slots of other
        # ranks' experts to a local id with weight 0)
        n("ScatterElements", ["zeros", "ids64", "topk_weights"], ["dense_w"], axis=1, reduction="add"),
        n("Transpose", ["dense_w"], ["dense_wT"], perm=[1, 0]),  # [E, T]
        _const("axis1", [1]),
        n("Unsqueeze", ["dense_wT", "axis1"], ["dense_w3"]),  # [E, 1, T]
        n("Mul", ["y", "dense_w3"], ["y_w"]),
        _const("axis0", [0]),
        n("ReduceSum", ["y_w", "axis0"], ["outT"], keepdims=0),  # [H, T]
        n("Transpose", ["outT"], ["out32"], perm=[1, 0]),
        n("CastLike", ["out32", "hidden"], ["output"]),
    ]
    return _function(EXPERTS_SPEC, inputs, nodes)
