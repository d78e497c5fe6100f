"""Helpers for the passes' tests and benchmark: build small models, run them under ONNX Runtime, compare.

(Library code rather than a conftest so that every test module and scripts/bench_passes.py share it.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from r1c.plugins import R1C_DOMAIN, R1C_OPSET_VERSION

ONNX_OPSET = 21


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = (), *,
               functions: Sequence[onnx.FunctionProto] = (), extra_opsets: Mapping[str, int] | None = None) -> ir.Model:
    """An onnx_ir model from onnx.helper pieces (opset 21, + r1c 1 when a node or function needs it)."""
    opsets = {"": ONNX_OPSET, **(extra_opsets or {})}
    if any(n.domain == R1C_DOMAIN for n in nodes) or functions:
        opsets[R1C_DOMAIN] = R1C_OPSET_VERSION
    graph = onnx.helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
                                   functions=list(functions), ir_version=10)
    return ir.serde.deserialize_model(proto)


def session(model: ir.Model | str | Path, *, optimize: bool = True, threads: int = 1,
            custom_ops: Sequence[Path] = ()) -> ort.InferenceSession:
    """A CPU session of an in-memory model (its tensors must be in memory) or of a model file; `custom_ops`:
    custom-op libraries to register (r1c's CPU kernels)."""
    opts = ort.SessionOptions()
    for library in custom_ops:
        opts.register_custom_ops_library(str(library))
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, (str, Path)) else ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run(model: ir.Model | str | Path, feeds: Mapping[str, np.ndarray], **kw: object) -> list[np.ndarray]:
    return session(model, **kw).run(None, dict(feeds))  # type: ignore[arg-type]


def max_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (0 when both are all zero)."""
    scale = float(np.abs(b).max()) if b.size else 0.0
    return float(np.abs(a.astype(np.float64) - b).max() / scale) if scale else float(np.abs(a).max() if a.size else 0)


def copy(model: ir.Model) -> ir.Model:
    """A deep copy through the proto (tensors must be in memory), for before/after comparisons."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- MoE graphs ---------------------------------------------------------------------------------------
def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(values, np.int64), name)


def _f32(name: str, value: float | np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(value, np.float32), name)


def stock_router_model(gate_w: np.ndarray, bias: np.ndarray, *, n_group: int, topk_group: int, top_k: int,
                       gemm: bool = True, norm: str = "plain", scale: float | None = 2.5) -> ir.Model:
    """transformers' DeepseekV3TopkRouter as torch.onnx (dynamo) spells it: h [T, H] -> (w [T, K], ids int64).

    norm: "plain" (w / sum), "eps" (w / (sum + 1e-20)) or "none"; scale None: no multiplication.
    """
    n, e, h = onnx.helper.make_node, gate_w.shape[0], gate_w.shape[1]
    nodes = [n("Gemm", ["h", "gate_w"], ["logits"], transB=1) if gemm else n("MatMul", ["h", "gate_wt"], ["logits"]),
             n("Sigmoid", ["logits"], ["s"]), n("Add", ["s", "bias"], ["c"]),
             n("Reshape", ["c", "grouped_shape"], ["cg"]), n("TopK", ["cg", "two"], ["top2", "top2_i"], axis=-1),
             n("ReduceSum", ["top2", "last"], ["gs"], keepdims=0),
             n("TopK", ["gs", "tg"], ["gv", "gidx"], axis=-1, sorted=0),
             n("Shape", ["gs"], ["gs_shape"]), n("Expand", ["zero", "gs_shape"], ["zeros"]),
             n("Shape", ["gidx"], ["gi_shape"]),
             n("ConstantOfShape", ["gi_shape"], ["ones"],
               value=onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [1.0])),
             n("ScatterElements", ["zeros", "gidx", "ones"], ["gmask"], axis=1),
             n("Unsqueeze", ["gmask", "last"], ["gm3"]), n("Expand", ["gm3", "bcast"], ["gm3x"]),
             n("Reshape", ["gm3x", "flat"], ["emask"]), n("Cast", ["emask"], ["eb"], to=onnx.TensorProto.BOOL),
             n("Not", ["eb"], ["neb"]), n("Where", ["neb", "neg_inf", "c"], ["masked"]),
             n("TopK", ["masked", "k"], ["kv", "ids"], axis=-1, sorted=0),
             n("GatherElements", ["s", "ids"], ["w0"], axis=1)]
    w = "w0"
    if norm != "none":
        nodes.append(n("ReduceSum", ["w0", "last"], ["den"], keepdims=1))
        if norm == "eps":
            nodes.append(n("Add", ["den", "eps"], ["den_eps"]))
        nodes.append(n("Div", ["w0", "den_eps" if norm == "eps" else "den"], ["wn"]))
        w = "wn"
    nodes.append(n("Mul", [w, "scale"], ["w"]) if scale is not None else n("Identity", [w], ["w"]))
    inits = [_f32("gate_w", gate_w), _f32("gate_wt", np.ascontiguousarray(gate_w.T)), _f32("bias", bias),
             _ints("grouped_shape", [-1, n_group, e // n_group]), _ints("two", [2]), _ints("last", [-1]),
             _ints("tg", [topk_group]), _f32("zero", 0.0), _ints("bcast", [1, n_group, e // n_group]),
             _ints("flat", [-1, e]), _f32("neg_inf", -np.inf), _ints("k", [top_k]), _f32("eps", 1e-20),
             _f32("scale", 1.0 if scale is None else scale)]
    info = onnx.helper.make_tensor_value_info
    return make_model(nodes, [info("h", onnx.TensorProto.FLOAT, ["tokens", h])],
                      [info("w", onnx.TensorProto.FLOAT, ["tokens", top_k]),
                       info("ids", onnx.TensorProto.INT64, ["tokens", top_k])], inits)


def stock_experts_model(w13: np.ndarray, w2: np.ndarray, top_k: int) -> ir.Model:
    """transformers' batched_mm experts as torch.onnx (dynamo) spells them: (x, w, ids int64) -> out [T, H]."""
    n, h = onnx.helper.make_node, w13.shape[2]
    nodes = [n("Unsqueeze", ["x", "one"], ["x1"]), n("Expand", ["x1", "rep"], ["xk"]),
             n("Reshape", ["xk", "flat_h"], ["x_rep"]), n("Reshape", ["w", "minus1"], ["wf"]),
             n("Reshape", ["ids", "minus1"], ["idf"]), n("Unsqueeze", ["idf", "minus1"], ["pick"]),
             n("GatherND", ["w13", "pick"], ["w13s"]), n("Unsqueeze", ["x_rep", "minus1"], ["x3"]),
             n("MatMul", ["w13s", "x3"], ["gu3"]), n("Squeeze", ["gu3", "minus1"], ["gu"]),
             n("Split", ["gu"], ["g", "u"], axis=1, num_outputs=2), n("Sigmoid", ["g"], ["sg"]),
             n("Mul", ["g", "sg"], ["silu"]), n("Mul", ["silu", "u"], ["act"]),
             n("GatherND", ["w2", "pick"], ["w2s"]), n("Unsqueeze", ["act", "minus1"], ["act3"]),
             n("MatMul", ["w2s", "act3"], ["y3"]), n("Squeeze", ["y3", "minus1"], ["y"]),
             n("Unsqueeze", ["wf", "minus1"], ["wf2"]), n("Mul", ["y", "wf2"], ["yw"]),
             n("Reshape", ["yw", "pairs"], ["yk"]), n("ReduceSum", ["yk", "one"], ["out"], keepdims=0)]
    inits = [_f32("w13", w13), _f32("w2", w2), _ints("one", [1]), _ints("rep", [1, top_k, 1]),
             _ints("flat_h", [-1, h]), _ints("minus1", [-1]), _ints("pairs", [-1, top_k, h])]
    info = onnx.helper.make_tensor_value_info
    return make_model(nodes, [info("x", onnx.TensorProto.FLOAT, ["tokens", h]),
                              info("w", onnx.TensorProto.FLOAT, ["tokens", top_k]),
                              info("ids", onnx.TensorProto.INT64, ["tokens", top_k])],
                      [info("out", onnx.TensorProto.FLOAT, ["tokens", h])], inits)


def stock_moe_model(router: ir.Model, experts: ir.Model) -> ir.Model:
    """The two stock subgraphs chained as in a MoE layer: h -> routing -> experts(h, w, ids) -> out."""
    proto_r, proto_e = ir.serde.serialize_model(router), ir.serde.serialize_model(experts)
    names = {t.name for t in proto_r.graph.initializer}
    nodes = [*proto_r.graph.node, onnx.helper.make_node("Identity", ["h"], ["x"]), *proto_e.graph.node]
    return make_model(nodes, list(proto_r.graph.input), list(proto_e.graph.output),
                      [*proto_r.graph.initializer, *[t for t in proto_e.graph.initializer if t.name not in names]])


def r1c_moe_model(rng: np.random.Generator, *, experts: int, hidden: int, inter: int, quant: str = "none",
                  bias: np.ndarray | None = None, **router: object) -> tuple[ir.Model, dict[str, object]]:
    """h -> r1c::MoERouter -> r1c::MoEExperts -> out, with the exporter's function bodies, as `r1c export`
    writes a MoE layer. Returns the model and its float32 weights (FP8 ones dequantized) + router attributes."""
    import torch

    from r1c.exporter.onnx_functions import experts_function, router_function
    from r1c.plugins.fp8 import dequantize, quantize

    attrs: dict[str, Any] = {"top_k": 4, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
                             "norm_topk_prob": 1, "scoring": "sigmoid", "topk_method": "noaux_tc", **router}
    w: dict[str, object] = {
        "gate_w": (rng.standard_normal((experts, hidden)) * hidden**-0.5).astype(np.float32),
        "bias": (rng.uniform(-0.15, 0.15, experts) if bias is None else bias).astype(np.float32),
        "w13": (rng.standard_normal((experts, 2 * inter, hidden)) * hidden**-0.5).astype(np.float32),
        "w2": (rng.standard_normal((experts, hidden, inter)) * inter**-0.5).astype(np.float32),
        "attrs": attrs}
    inits = [_f32("gate_w", w["gate_w"]), _f32("bias", w["bias"])]  # type: ignore[arg-type]
    expert_inputs = ["h", "tw", "tid", "w13", "w2"]
    if quant == "fp8_block128":
        for name in ("w13", "w2"):
            q, scale = quantize(torch.from_numpy(w[name]))  # type: ignore[arg-type]
            w[name] = dequantize(q, scale).numpy()
            import ml_dtypes

            fp8 = q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
            inits += [onnx.numpy_helper.from_array(fp8, name), _f32(f"{name}_scale", scale.numpy())]
        expert_inputs += ["w13_scale", "w2_scale"]
    else:
        inits += [_f32("w13", w["w13"]), _f32("w2", w["w2"])]  # type: ignore[arg-type]
    make_node, info = onnx.helper.make_node, onnx.helper.make_tensor_value_info
    nodes = [make_node("MoERouter", ["h", "gate_w", "bias"], ["tw", "tid"], domain=R1C_DOMAIN, name="router",
                       plugin_namespace="r1c", **attrs),
             make_node("MoEExperts", expert_inputs, ["out"], domain=R1C_DOMAIN, name="experts",
                       plugin_namespace="r1c", quant=quant, activation="swiglu")]
    model = make_model(nodes, [info("h", onnx.TensorProto.FLOAT, ["tokens", hidden])],
                       [info("out", onnx.TensorProto.FLOAT, ["tokens", hidden])], inits,
                       functions=[router_function(), experts_function(quant)])
    return model, w


def moe_reference(h: np.ndarray, weights: Mapping[str, object]) -> np.ndarray:
    """The PyTorch references of r1c.plugins for the block `r1c_moe_model` builds."""
    import torch

    from r1c.plugins.moe_experts import moe_experts_reference
    from r1c.plugins.moe_router import moe_router_reference

    t = {k: torch.from_numpy(v) for k, v in weights.items() if isinstance(v, np.ndarray)}
    tw, ids = moe_router_reference(torch.from_numpy(h), t["gate_w"], t["bias"], **weights["attrs"])  # type: ignore[arg-type]
    return moe_experts_reference(torch.from_numpy(h), tw, ids, t["w13"], t["w2"]).numpy()
