"""Lower a DeepSeek-V3/R1 checkpoint into one ONNX graph that serves both prefill and decode.

The graph reads MLA's compressed latent cache and returns the new tokens' latents; the runtime owns the
cache buffer and writes those few values in place, so no step copies the whole cache.

Per layer the cache is two tensors, stored "channel-major" so that attention multiplies straight out of
them without a transpose (all heads share one latent, so the heads fold into the GEMM's M dimension):
    past_c.{l}  [B, kv_lora_rank, P]     normalized compressed KV (keys and values after absorption)
    past_pe.{l} [B, qk_rope_head_dim, P] the shared rotary key, already rotated
Inputs: input_ids int64 [B, S]; past_lengths int64 [B] (valid cached tokens per row, also each row's
position offset); the caches, P = capacity (entries at p >= past_lengths[b] are ignored).
Outputs: logits float32 [B, S, V]; new_c [L, B, S, kv_lora_rank]; new_pe [L, B, S, qk_rope_head_dim].

Legend: B = batch, S = new tokens, P = cache capacity, N = heads, H = hidden, C = kv_lora_rank,
R = qk_rope_head_dim, D = qk_nope_head_dim, Vd = v_head_dim, T = B*S tokens, E = experts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from r1c.config import ModelConfig
from r1c.errors import ExportError
from r1c.exporter.model import MLA_NORM_EPS, rope_parameters, router_attributes
from r1c.exporter.onnx_functions import experts_function, router_function
from r1c.outdir import atomic_output_dir, check_output_dir
from r1c.plugins import PLUGIN_NAMESPACE, R1C_DOMAIN, R1C_OPSET_VERSION
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC

logger = logging.getLogger(__name__)

ONNX_OPSET = 21
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GRAPH_IO_FILE = "graph_io.json"
GRAPH_IO_SCHEMA = 1


class _Graph:
    """A small builder over onnx.helper: unique deterministic names, initializers from tensors."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple[Any, ...], str] = {}
        self.scope = ""

    def name(self, hint: str) -> str:
        base = f"{self.scope}/{hint}" if self.scope else hint
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> Any:
        outs = [self.name(f"{op_type}_out{i}" if n_out > 1 else op_type) for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type + "_node"),
                                           domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def const(self, values: Iterable[int] | Iterable[float], dtype: int = TensorProto.INT64,
              scalar: bool = False) -> str:
        vals = list(values)
        key = (tuple(vals), dtype, scalar)
        if key not in self._consts:
            name = self.name("const")
            arr = np.array(vals[0] if scalar else vals, dtype=helper.tensor_dtype_to_np_dtype(dtype))
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, t: torch.Tensor | np.ndarray) -> str:
        if name in self._names:
            raise ExportError(f"export: weight {name} added twice")
        self._names.add(name)
        arr = t if isinstance(t, np.ndarray) else _to_numpy(t)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.float8_e4m3fn:
        import ml_dtypes

        return t.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.detach().contiguous().numpy()


class _Lowering:
    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
        self.c = config
        self.t = tensors
        self.g = _Graph()
        self.quant = "fp8_block128" if any(t.dtype == torch.float8_e4m3fn for t in tensors.values()) else "none"

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.t[name]
        except KeyError:
            raise ExportError(f"export: checkpoint has no tensor {name}") from None

    # ---- building blocks -----------------------------------------------------------------
    def linear(self, x: str, prefix: str) -> str:
        """x [..., in] @ W^T with W stored pre-transposed [in, out] (no transpose at run time).

        FP8 weights stay FP8 in the file: W^T in e4m3fn and a DequantizeLinear blocked along `in`
        (its scale is the 128x128 block scale repeated along `out`: 1/32 of a float32 per weight).
        """
        w = self.get(prefix + ".weight")
        if w.dtype != torch.float8_e4m3fn:
            return self.g.op("MatMul", [x, self.g.weight(prefix + ".weight_t", w.to(torch.float32).t().contiguous())])
        return self.g.op("MatMul", [x, self.fp8_dequant(prefix + ".weight_t", w.t(),
                                                        self.get(prefix + ".weight_scale_inv").t())])

    def fp8_dequant(self, name: str, w: torch.Tensor, block_scale: torch.Tensor) -> str:
        """DequantizeLinear of a 2-D FP8 matrix [R, C] with 128x128 block scales [ceil(R/128), ceil(C/128)]."""
        from r1c.plugins.fp8 import BLOCK

        cols = w.shape[1]
        scale = block_scale.to(torch.float32).repeat_interleave(BLOCK, dim=1)[:, :cols].contiguous()
        wq = self.g.weight(name, w.contiguous())
        sc = self.g.weight(name + "_scale", scale)
        return self.g.op("DequantizeLinear", [wq, sc], axis=0, block_size=BLOCK)

    def rms_norm(self, x: str, weight_name: str, eps: float) -> str:
        """x * rsqrt(mean(x^2) + eps) * w; eps as the PyTorch model's norm of that name (model.RMSNorm)."""
        g = self.g
        w = g.weight(weight_name, self.get(weight_name).to(torch.float32))
        sq = g.op("Mul", [x, x])
        mean = g.op("ReduceMean", [sq, g.const([-1])], keepdims=1)
        var = g.op("Add", [mean, g.const([eps], TensorProto.FLOAT, scalar=True)])
        inv = g.op("Reciprocal", [g.op("Sqrt", [var])])
        return g.op("Mul", [g.op("Mul", [x, inv]), w])

    def silu_mul(self, gate: str, up: str) -> str:
        g = self.g
        return g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])

    def mlp(self, x: str, prefix: str) -> str:
        return self.linear(self.silu_mul(self.linear(x, prefix + ".gate_proj"), self.linear(x, prefix + ".up_proj")),
                           prefix + ".down_proj")

    def rope(self, x: str, cos: str, sin: str) -> str:
        """The rotated pairs, output as [firsts', seconds'] (same for q and k), as model.apply_rope.

        rope_interleave: pairs (x0, x1), (x2, x3), ... (DeepSeek's weight layout); else (x_i, x_{i + R/2}).
        """
        g = self.g
        r = self.c.qk_rope_head_dim
        if self.c.rope_interleave:
            x1 = g.op("Slice", [x, g.const([0]), g.const([r]), g.const([-1]), g.const([2])])
            x2 = g.op("Slice", [x, g.const([1]), g.const([r]), g.const([-1]), g.const([2])])
        else:
            x1 = g.op("Slice", [x, g.const([0]), g.const([r // 2]), g.const([-1])])
            x2 = g.op("Slice", [x, g.const([r // 2]), g.const([r]), g.const([-1])])
        a = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
        b = g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])
        return g.op("Concat", [a, b], axis=-1)

    # ---- the model -------------------------------------------------------------------------
    def build(self, progress: bool) -> onnx.ModelProto:
        c, g = self.c, self.g
        n_layers = c.num_hidden_layers
        ids, past_len = "input_ids", "past_lengths"
        shape_ids = g.op("Shape", [ids])
        b_dim = g.op("Slice", [shape_ids, g.const([0]), g.const([1])])
        s_dim = g.op("Slice", [shape_ids, g.const([1]), g.const([2])])
        s_scalar = g.op("Squeeze", [s_dim, g.const([0])])

        # positions [B, S] = past_lengths[b] + arange(S); rotary tables [B, S, R/2]
        ar = g.op("Range", [g.const([0], scalar=True), s_scalar, g.const([1], scalar=True)])
        positions = g.op("Add", [g.op("Unsqueeze", [past_len, g.const([1])]), ar])
        inv_freq, attn_factor = rope_parameters(c)  # the same tables as the PyTorch model
        freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [positions], to=TensorProto.FLOAT), g.const([-1])]),
                             g.weight("rope.inv_freq", inv_freq)])
        cos, sin = g.op("Cos", [freqs]), g.op("Sin", [freqs])
        if attn_factor != 1.0:
            af = g.const([attn_factor], TensorProto.FLOAT, scalar=True)
            cos, sin = g.op("Mul", [cos, af]), g.op("Mul", [sin, af])
        cos_q, sin_q = g.op("Unsqueeze", [cos, g.const([2])]), g.op("Unsqueeze", [sin, g.const([2])])  # [B,S,1,R/2]

        # masks: past keys valid where p < past_lengths[b]; new keys causal (j <= i)
        p_dim = g.op("Slice", [g.op("Shape", ["past_c.0"]), g.const([2]), g.const([3])])
        p_range = g.op("Range", [g.const([0], scalar=True), g.op("Squeeze", [p_dim, g.const([0])]),
                                 g.const([1], scalar=True)])
        past_valid = g.op("Less", [g.op("Unsqueeze", [p_range, g.const([0])]),
                                   g.op("Unsqueeze", [past_len, g.const([1])])])  # [B, P]
        past_valid = g.op("Unsqueeze", [past_valid, g.const([1])])  # [B, 1, P]
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [ar, g.const([0])]), g.op("Unsqueeze", [ar, g.const([1])])])
        heads = g.const([c.num_attention_heads])
        # row r of the folded scores is (s, head) = (r // N, r % N): repeat each causal row N times
        causal_rows = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [causal, g.const([1])]),
                                                      g.op("Concat", [s_dim, heads, s_dim], axis=0)]),
                                       g.op("Concat", [g.const([-1]), s_dim], axis=0)])  # [S*N, S]

        x = g.op("Gather", [g.weight("model.embed_tokens.weight", self.get("model.embed_tokens.weight")
                                     .to(torch.float32)), ids])  # [B, S, H]
        new_cs, new_pes = [], []
        layers: Iterable[int] = range(n_layers)
        if progress:
            layers = tqdm(layers, desc="export: layers", unit="layer", leave=False)
        for i in layers:
            g.scope = f"layers.{i}"
            p = f"model.layers.{i}"
            h = self.rms_norm(x, p + ".input_layernorm.weight", c.rms_norm_eps)
            attn, new_c, new_pe = self.attention(h, p + ".self_attn", i, b_dim, s_dim, cos, sin, cos_q, sin_q,
                                                 past_valid, causal_rows)
            new_cs.append(new_c)
            new_pes.append(new_pe)
            x = g.op("Add", [x, attn])
            h = self.rms_norm(x, p + ".post_attention_layernorm.weight", c.rms_norm_eps)
            mlp = self.moe(h, p + ".mlp") if c.is_moe_layer(i) else self.mlp(h, p + ".mlp")
            x = g.op("Add", [x, mlp])
        g.scope = "head"
        x = self.rms_norm(x, "model.norm.weight", c.rms_norm_eps)
        head_name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        head = self.get(head_name).to(torch.float32)
        logits = g.op("MatMul", [x, g.weight("lm_head.weight_t", head.t().contiguous())])
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
        g.nodes.append(helper.make_node("Concat", [g.op("Unsqueeze", [t, g.const([0])]) for t in new_cs],
                                        ["new_c"], axis=0, name="new_c_out"))
        g.nodes.append(helper.make_node("Concat", [g.op("Unsqueeze", [t, g.const([0])]) for t in new_pes],
                                        ["new_pe"], axis=0, name="new_pe_out"))
        return self.model()

    def attention(self, h: str, p: str, layer: int, b_dim: str, s_dim: str, cos: str, sin: str, cos_q: str,
                  sin_q: str, past_valid: str, causal_rows: str) -> tuple[str, str, str]:
        c, g = self.c, self.g
        n, d, r, kvr, vd = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
        if c.q_lora_rank is None:
            q = self.linear(h, p + ".q_proj")
        else:
            q = self.linear(self.rms_norm(self.linear(h, p + ".q_a_proj"), p + ".q_a_layernorm.weight",
                                          MLA_NORM_EPS), p + ".q_b_proj")
        q = g.op("Reshape", [q, g.const([0, 0, n, d + r])])  # [B, S, N, D+R]
        q_nope = g.op("Slice", [q, g.const([0]), g.const([d]), g.const([-1])])
        q_pe = self.rope(g.op("Slice", [q, g.const([d]), g.const([d + r]), g.const([-1])]), cos_q, sin_q)
        kv = self.linear(h, p + ".kv_a_proj_with_mqa")  # [B, S, C+R]
        new_c = self.rms_norm(g.op("Slice", [kv, g.const([0]), g.const([kvr]), g.const([-1])]),
                              p + ".kv_a_layernorm.weight", MLA_NORM_EPS)  # [B, S, C]
        new_pe = self.rope(g.op("Slice", [kv, g.const([kvr]), g.const([kvr + r]), g.const([-1])]), cos, sin)

        # absorb W_UK into the query: q_abs[b,s,n] = q_nope[b,s,n] @ W_UK[n]  ([D] -> [C])
        kv_b = self.get(p + ".kv_b_proj.weight")  # [N*(D+Vd), C]
        if kv_b.dtype == torch.float8_e4m3fn:
            # kept FP8 on disk; the split below is constant work a runtime folds once at load
            kv_b_f = g.op("Reshape", [self.fp8_dequant(p + ".kv_b_proj.weight", kv_b,
                                                       self.get(p + ".kv_b_proj.weight_scale_inv")),
                                      g.const([n, d + vd, kvr])])
            w_uk = g.op("Slice", [kv_b_f, g.const([0]), g.const([d]), g.const([1])])  # [N, D, C]
            w_uv_t = g.op("Transpose", [g.op("Slice", [kv_b_f, g.const([d]), g.const([d + vd]), g.const([1])])],
                          perm=[0, 2, 1])  # [N, C, Vd]
        else:
            kv_b = kv_b.to(torch.float32).view(n, d + vd, kvr)
            w_uk = g.weight(p + ".w_uk", kv_b[:, :d, :].contiguous())  # [N, D, C]
            w_uv_t = g.weight(p + ".w_uv_t", kv_b[:, d:, :].transpose(1, 2).contiguous())  # [N, C, Vd]
        scale = g.const([c.softmax_scale], TensorProto.FLOAT, scalar=True)
        q_nope_t = g.op("Transpose", [q_nope], perm=[0, 2, 1, 3])  # [B, N, S, D]
        q_abs = g.op("Transpose", [g.op("MatMul", [q_nope_t, w_uk])], perm=[0, 2, 1, 3])  # [B, S, N, C]
        rows = g.const([0, -1, kvr])
        q_abs = g.op("Mul", [g.op("Reshape", [q_abs, rows]), scale])  # [B, S*N, C]
        q_pe = g.op("Mul", [g.op("Reshape", [q_pe, g.const([0, -1, r])]), scale])  # [B, S*N, R]

        past_c, past_pe = f"past_c.{layer}", f"past_pe.{layer}"
        new_c_t = g.op("Transpose", [new_c], perm=[0, 2, 1])  # [B, C, S]
        new_pe_t = g.op("Transpose", [new_pe], perm=[0, 2, 1])  # [B, R, S]
        s_past = g.op("Add", [g.op("MatMul", [q_abs, past_c]), g.op("MatMul", [q_pe, past_pe])])  # [B, S*N, P]
        s_new = g.op("Add", [g.op("MatMul", [q_abs, new_c_t]), g.op("MatMul", [q_pe, new_pe_t])])  # [B, S*N, S]
        neg_inf = g.const([float("-inf")], TensorProto.FLOAT, scalar=True)
        s_past = g.op("Where", [past_valid, s_past, neg_inf])
        s_new = g.op("Where", [causal_rows, s_new, neg_inf])
        probs = g.op("Softmax", [g.op("Concat", [s_past, s_new], axis=-1)], axis=-1)
        p_dim = g.op("Slice", [g.op("Shape", [s_past]), g.const([2]), g.const([3])])
        probs_past, probs_new = g.op("Split", [probs, g.op("Concat", [p_dim, s_dim], axis=0)], n_out=2, axis=-1)
        # o^T [B, C, S*N] = past_c @ probs_past^T + new_c^T @ probs_new^T: the cache is read in place
        o_t = g.op("Add", [g.op("MatMul", [past_c, g.op("Transpose", [probs_past], perm=[0, 2, 1])]),
                           g.op("MatMul", [new_c_t, g.op("Transpose", [probs_new], perm=[0, 2, 1])])])
        o = g.op("Reshape", [g.op("Transpose", [o_t], perm=[0, 2, 1]), g.const([0, -1, n, kvr])])  # [B, S, N, C]
        o = g.op("MatMul", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), w_uv_t])  # [B, N, S, Vd]
        o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const([0, 0, n * vd])])  # [B, S, N*Vd]
        return self.linear(o, p + ".o_proj"), new_c, new_pe

    def moe(self, h: str, p: str) -> str:
        c, g = self.c, self.g
        flat = g.op("Reshape", [h, g.const([-1, c.hidden_size])])  # [T, H]
        gate_w = g.weight(p + ".gate.weight", self.get(p + ".gate.weight").to(torch.float32))
        if c.has_correction_bias:
            bias = g.weight(p + ".gate.e_score_correction_bias",
                            self.get(p + ".gate.e_score_correction_bias").to(torch.float32))
        else:  # the V2 methods read no bias; the op's input is zeros (one initializer for all layers)
            bias = g.const([0.0] * c.n_routed_experts, TensorProto.FLOAT)
        weights, ids = g.op(
            ROUTER_SPEC.name, [flat, gate_w, bias], n_out=2, domain=R1C_DOMAIN,
            **ROUTER_SPEC.attrs(**router_attributes(c)), plugin_namespace=PLUGIN_NAMESPACE,
        )
        w13 = self.get(p + ".experts.gate_up_proj")
        w2 = self.get(p + ".experts.down_proj")
        inputs = [flat, weights, ids]
        if self.quant == "fp8_block128":
            if w13.dtype != torch.float8_e4m3fn:
                raise ExportError(f"export: {p}.experts.gate_up_proj is {w13.dtype}, expected float8_e4m3fn")
            inputs += [g.weight(p + ".experts.w13", w13), g.weight(p + ".experts.w2", w2),
                       g.weight(p + ".experts.w13_scale", self.get(p + ".experts.gate_up_proj_scale_inv")),
                       g.weight(p + ".experts.w2_scale", self.get(p + ".experts.down_proj_scale_inv"))]
        else:
            inputs += [g.weight(p + ".experts.w13", w13.to(torch.float32)),
                       g.weight(p + ".experts.w2", w2.to(torch.float32))]
        routed = g.op(EXPERTS_SPEC.name, inputs, domain=R1C_DOMAIN,
                      **EXPERTS_SPEC.attrs(quant=self.quant), plugin_namespace=PLUGIN_NAMESPACE)
        out = routed
        if c.n_shared_experts:
            out = g.op("Add", [routed, self.mlp(flat, p + ".shared_experts")])
        return g.op("Reshape", [out, g.op("Shape", [h])])

    def model(self) -> onnx.ModelProto:
        c = self.c
        f32 = TensorProto.FLOAT
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  helper.make_tensor_value_info("past_lengths", TensorProto.INT64, ["batch"])]
        for i in range(c.num_hidden_layers):
            inputs.append(helper.make_tensor_value_info(f"past_c.{i}", f32, ["batch", c.kv_lora_rank, "capacity"]))
            inputs.append(helper.make_tensor_value_info(f"past_pe.{i}", f32,
                                                        ["batch", c.qk_rope_head_dim, "capacity"]))
        outputs = [
            helper.make_tensor_value_info("logits", f32, ["batch", "seq", c.vocab_size]),
            helper.make_tensor_value_info("new_c", f32, [c.num_hidden_layers, "batch", "seq", c.kv_lora_rank]),
            helper.make_tensor_value_info("new_pe", f32, [c.num_hidden_layers, "batch", "seq", c.qk_rope_head_dim]),
        ]
        graph = helper.make_graph(self.g.nodes, "deepseek_v3", inputs, outputs, self.g.initializers)
        functions = [router_function(), experts_function(self.quant)] if c.num_moe_layers else []
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(R1C_DOMAIN, R1C_OPSET_VERSION)],
            functions=functions,
            producer_name="r1c",
            ir_version=10,
        )
        return model


def graph_io(config: ModelConfig, quant: str) -> dict[str, Any]:
    """The description of the graph's I/O and cache layout that the runtime reads."""
    L, C, R = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
    return {
        "schema": GRAPH_IO_SCHEMA,
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "past_lengths", "dtype": "int64", "shape": ["batch"]},
            *[{"name": f"past_c.{i}", "dtype": "float32", "shape": ["batch", C, "capacity"]} for i in range(L)],
            *[{"name": f"past_pe.{i}", "dtype": "float32", "shape": ["batch", R, "capacity"]} for i in range(L)],
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", "seq", config.vocab_size]},
            {"name": "new_c", "dtype": "float32", "shape": [L, "batch", "seq", C]},
            {"name": "new_pe", "dtype": "float32", "shape": [L, "batch", "seq", R]},
        ],
        "kv_cache": {
            "kind": "mla_latent",
            "layers": L,
            "tensors": {"c": {"input": "past_c.{layer}", "output": "new_c", "channels": C},
                        "pe": {"input": "past_pe.{layer}", "output": "new_pe", "channels": R}},
            "layout": "[batch, channels, capacity] per layer; outputs [layers, batch, seq, channels]",
            "values_per_token_per_layer": config.latent_dim,
        },
        "weights_quant": quant,
    }


def export_onnx(config: ModelConfig, tensors: dict[str, torch.Tensor], out_dir: str | Path, *,
                progress: bool = True, extra_files: dict[str, str] | None = None,
                postprocess: Callable[[Path], None] | None = None) -> Path:
    """Write `model.onnx` + `model.onnx.data` + `graph_io.json` (+ config.json) into `out_dir`.

    The directory appears whole or not at all: everything is written to a sibling temp dir first.
    `postprocess(tmp_dir)` may rewrite the model there (the pass pipeline) before the rename.
    """
    out = Path(out_dir)
    check_output_dir(out, ExportError, "export")
    lowering = _Lowering(config, tensors)
    model = lowering.build(progress)
    with atomic_output_dir(out, ExportError, "export") as tmp:
        onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024, convert_attribute=False)
        (tmp / GRAPH_IO_FILE).write_text(json.dumps(graph_io(config, lowering.quant), indent=2) + "\n")
        if lowering.quant == "none":  # no FP8 tensor: a quantization_config would describe nothing (a stale one)
            config = config.replace(quantization_config=None)
        (tmp / "config.json").write_text(config.to_json() + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if postprocess is not None:
            postprocess(tmp)
    logger.info("exported %d nodes to %s", len(model.graph.node), out)
    return out
