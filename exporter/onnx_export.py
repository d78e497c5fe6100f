"""Lower a DeepSeek-V3/R1 checkpoint into one ONNX graph that serves both prefill and decode.

The graph reads MLA's compressed latent cache and returns the new tokens' latents; the runtime owns the
cache buffer and writes those few values in place, so no step copies the whole cache.

Per layer the cache is two tensors, stored "channel-major" so that attention multiplies straight out of
them without a transpose (all heads share one latent, so the heads fold into the GEMM's M dimension):
    past_c.{l}  [B, kv_lora_rank, P]     normalized compressed KV (keys and values after absorption)
    past_pe.{l} [B, qk_rope_head_dim, P] the shared rotary key, already rotated
Inputs: input_ids int64 [B, S]; past_lengths int64 [B] (valid cached tokens per row, also each row's
position offset); logits_index int64 [B, K] (the positions, < S, whose logits are computed: a sampling step asks
for each row's last token, scoring for all); the caches, P = capacity (entries at p >= past_lengths[b] are ignored).
Outputs: logits float32 [B, K, V]; new_c [L, B, S, kv_lora_rank]; new_pe [L, B, S, qk_rope_head_dim].
As llama.cpp does (its `inp_out_ids`), the last layer keeps only the K positions after its attention: its
residual, MLP/MoE, the final norm and the head run on B*K tokens, not B*S (a 128-token prefill runs the last
layer's experts and the head once, not 128 times); every layer still writes all S tokens' latents.

Legend: B = batch, S = new tokens, P = cache capacity, N = heads, H = hidden, C = kv_lora_rank,
R = qk_rope_head_dim, D = qk_nope_head_dim, Vd = v_head_dim, T = B*S tokens, E = experts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from r1c.config import ModelConfig
from r1c.errors import ExportError
from r1c.exporter.checkpoint_layouts import SCALE_SUFFIX
from r1c.exporter.graph_io import GRAPH_IO_FILE, graph_io, model_io
from r1c.exporter.model import MLA_NORM_EPS, rope_parameters, router_attributes
from r1c.exporter.onnx_functions import experts_function, router_function
from r1c.exporter.onnx_graph import DATA_FILE, DEFAULT_MAX_FILE_BYTES, DTYPES, Graph, WeightWriter, np_dtype, to_numpy
from r1c.exporter.tensor_source import DictSource, TensorSource
from r1c.graph_io import LOGITS_INDEX
from r1c.outdir import atomic_output_dir, check_output_dir
from r1c.plugins import PLUGIN_NAMESPACE, R1C_DOMAIN, R1C_OPSET_VERSION
from r1c.plugins.moe_experts import SPEC as EXPERTS_SPEC
from r1c.plugins.moe_router import SPEC as ROUTER_SPEC

logger = logging.getLogger(__name__)

ONNX_OPSET = 21
MODEL_FILE = "model.onnx"
__all__ = ["DATA_FILE", "GRAPH_IO_FILE", "MODEL_FILE", "export_onnx", "graph_io"]
FP8 = torch.float8_e4m3fn
F32 = TensorProto.FLOAT
ROUTER_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


class _Lowering:
    """The model's math as ONNX nodes; weights are streamed to `writer` as each one is reached.

    `dtype` (an ONNX dtype) is the activations' and the non-FP8 weights' type; the router and the RMSNorm
    statistics stay float32, FP8 weights stay FP8.
    """

    def __init__(self, config: ModelConfig, source: TensorSource, dtype: int, writer: WeightWriter) -> None:
        self.c = config
        self.src = source
        self.dt = dtype
        self.g = Graph(writer)
        self.quant = "fp8_block128" if any(source.dtype(n) == FP8 for n in source.names) else "none"

    def get(self, name: str) -> torch.Tensor:
        return self.src.get(self.need(name))

    def need(self, name: str) -> str:
        if name not in self.src:
            raise ExportError(f"export: checkpoint has no tensor {name}")
        return name

    def param(self, out_name: str, src_name: str, dims: tuple[int, ...] | None = None,
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None, dtype: int | None = None) -> str:
        """Initializer `out_name` = transform(source tensor), in `dtype` (default: FP8 stays FP8, the router
        float32, every other weight the export dtype); `dims` is the transformed shape."""
        self.need(src_name)
        if dtype is None:
            src_dtype = self.src.dtype(src_name)
            dtype = (TensorProto.FLOAT8E4M3FN if src_dtype == FP8 else
                     F32 if src_name.endswith(ROUTER_SUFFIXES) or src_name.endswith(SCALE_SUFFIX) else self.dt)
        fn = transform or (lambda t: t)
        out = dtype
        return self.g.weight(out_name, dims if dims is not None else self.src.shape(src_name), out,
                             lambda: [to_numpy(fn(self.src.get(src_name)), out)])

    def to_dt(self, x: str) -> str:
        """x (float32) cast to the export dtype (no node for float32 exports)."""
        return x if self.dt == F32 else self.g.op("Cast", [x], to=self.dt)

    def to_f32(self, x: str) -> str:
        return x if self.dt == F32 else self.g.op("Cast", [x], to=F32)

    # ---- building blocks -----------------------------------------------------------------
    def linear(self, x: str, prefix: str) -> str:
        """x [..., in] @ W^T with W stored pre-transposed [in, out] (no transpose at run time).

        FP8 weights stay FP8 in the file: W^T in e4m3fn and a DequantizeLinear blocked along `in`
        (its scale is the 128x128 block scale repeated along `out`: 1/32 of a float32 per weight).
        """
        name = self.need(prefix + ".weight")
        rows, cols = self.src.shape(name)
        if self.src.dtype(name) != FP8:
            return self.g.op("MatMul", [x, self.param(prefix + ".weight_t", name, (cols, rows), lambda t: t.t())])
        return self.g.op("MatMul", [x, self.to_dt(self.fp8_dequant(prefix + ".weight_t", name, transpose=True))])

    def fp8_dequant(self, name: str, src_name: str, transpose: bool) -> str:
        """DequantizeLinear (float32 out) of a 2-D FP8 matrix [R, C] (transposed first if `transpose`) with its
        128x128 block scales [ceil(R/128), ceil(C/128)], repeated along C in the file (1/32 float per weight)."""
        from r1c.plugins.fp8 import BLOCK

        rows, cols = self.src.shape(src_name)[::-1] if transpose else self.src.shape(src_name)
        flip: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t.t()) if transpose else (lambda t: t)
        wq = self.param(name, src_name, (rows, cols), flip)
        sc = self.param(name + "_scale", self.need(src_name + SCALE_SUFFIX), (-(-rows // BLOCK), cols),
                        lambda s: flip(s).to(torch.float32).repeat_interleave(BLOCK, dim=1)[:, :cols], F32)
        return self.g.op("DequantizeLinear", [wq, sc], axis=0, block_size=BLOCK)

    def rms_norm(self, x: str, weight_name: str, eps: float) -> str:
        """weight * (x / sqrt(mean(x^2) + eps)), the statistics in float32 whatever the export dtype
        (transformers' DeepseekV3RMSNorm: float32 variance, the normalized x cast back before the weight);
        eps as the PyTorch model's norm of that name (config.rms_norm_eps, or model.MLA_NORM_EPS in MLA)."""
        g = self.g
        w = self.param(weight_name, weight_name)
        x = self.to_f32(x)
        sq = g.op("Mul", [x, x])
        mean = g.op("ReduceMean", [sq, g.const([-1])], keepdims=1)
        var = g.op("Add", [mean, g.const([eps], TensorProto.FLOAT, scalar=True)])
        inv = g.op("Reciprocal", [g.op("Sqrt", [var])])
        return g.op("Mul", [self.to_dt(g.op("Mul", [x, inv])), w])

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
    def build(self) -> onnx.ModelProto:
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
                             g.value("rope.inv_freq", inv_freq.numpy())])
        cos, sin = g.op("Cos", [freqs]), g.op("Sin", [freqs])
        if attn_factor != 1.0:
            af = g.const([attn_factor], TensorProto.FLOAT, scalar=True)
            cos, sin = g.op("Mul", [cos, af]), g.op("Mul", [sin, af])
        cos, sin = self.to_dt(cos), self.to_dt(sin)  # tables in float32, applied in the export dtype
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

        x = g.op("Gather", [self.param("model.embed_tokens.weight", "model.embed_tokens.weight"), ids])  # [B, S, H]
        new_cs, new_pes = [], []
        layers: Iterable[int] = range(n_layers)
        for i in layers:
            g.scope = f"layers.{i}"
            p = f"model.layers.{i}"
            h = self.rms_norm(x, p + ".input_layernorm.weight", c.rms_norm_eps)
            attn, new_c, new_pe = self.attention(h, p + ".self_attn", i, b_dim, s_dim, cos, sin, cos_q, sin_q,
                                                 past_valid, causal_rows)
            new_cs.append(new_c)
            new_pes.append(new_pe)
            if i == n_layers - 1:  # past the last attention only the kept positions matter
                x, attn = self.keep_positions(x), self.keep_positions(attn)
            x = g.op("Add", [x, attn])
            h = self.rms_norm(x, p + ".post_attention_layernorm.weight", c.rms_norm_eps)
            mlp = self.moe(h, p + ".mlp") if c.is_moe_layer(i) else self.mlp(h, p + ".mlp")
            x = g.op("Add", [x, mlp])
            self.src.release()  # this layer's shards and mapped pages go; its weights are on disk
            logger.info("export: layer %d/%d written (%s)", i + 1, n_layers, self.g.writer.rate())
            self.g.writer.bar.set_description(f"export: layer {i + 1}/{n_layers}")
        g.scope = "head"
        x = self.rms_norm(x, "model.norm.weight", c.rms_norm_eps)
        head_name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        vocab, hidden = self.src.shape(self.need(head_name))
        head = self.param("lm_head.weight_t", head_name, (hidden, vocab), lambda t: t.t())
        logits = self.to_f32(g.op("MatMul", [x, head]))
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
        g.nodes.append(helper.make_node("Concat", [g.op("Unsqueeze", [t, g.const([0])]) for t in new_cs],
                                        ["new_c"], axis=0, name="new_c_out"))
        g.nodes.append(helper.make_node("Concat", [g.op("Unsqueeze", [t, g.const([0])]) for t in new_pes],
                                        ["new_pe"], axis=0, name="new_pe_out"))
        self.src.release()
        return self.model()

    def keep_positions(self, x: str) -> str:
        """x [B, S, H] -> [B, K, H]: the rows at `logits_index` [B, K] (GatherElements along S)."""
        g = self.g
        index = g.op("Unsqueeze", [LOGITS_INDEX, g.const([2])])  # [B, K, 1]
        shape = g.op("Concat", [g.op("Shape", [LOGITS_INDEX]), g.op("Slice", [g.op("Shape", [x]), g.const([2]),
                                                                                g.const([3])])], axis=0)
        return g.op("GatherElements", [x, g.op("Expand", [index, shape])], axis=1)

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
        kv_b = self.need(p + ".kv_b_proj.weight")  # [N*(D+Vd), C]
        if self.src.dtype(kv_b) == FP8:
            # kept FP8 on disk; the split below is constant work a runtime folds once at load
            kv_b_f = g.op("Reshape", [self.to_dt(self.fp8_dequant(kv_b, kv_b, transpose=False)),
                                      g.const([n, d + vd, kvr])])
            w_uk = g.op("Slice", [kv_b_f, g.const([0]), g.const([d]), g.const([1])])  # [N, D, C]
            w_uv_t = g.op("Transpose", [g.op("Slice", [kv_b_f, g.const([d]), g.const([d + vd]), g.const([1])])],
                          perm=[0, 2, 1])  # [N, C, Vd]
        else:
            w_uk = self.param(p + ".w_uk", kv_b, (n, d, kvr), lambda t: t.view(n, d + vd, kvr)[:, :d, :])  # [N, D, C]
            w_uv_t = self.param(p + ".w_uv_t", kv_b, (n, kvr, vd),
                                lambda t: t.view(n, d + vd, kvr)[:, d:, :].transpose(1, 2))  # [N, C, Vd]
        scale = g.const([c.softmax_scale], self.dt, scalar=True)
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
        neg_inf = g.const([float("-inf")], self.dt, scalar=True)
        s_past = g.op("Where", [past_valid, s_past, neg_inf])
        s_new = g.op("Where", [causal_rows, s_new, neg_inf])
        # softmax in float32 (transformers: softmax(..., dtype=float32).to(query dtype))
        probs = self.to_dt(g.op("Softmax", [self.to_f32(g.op("Concat", [s_past, s_new], axis=-1))], axis=-1))
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
        gate_w = self.param(p + ".gate.weight", p + ".gate.weight", dtype=F32)
        if c.has_correction_bias:
            bias = self.param(p + ".gate.e_score_correction_bias", p + ".gate.e_score_correction_bias", dtype=F32)
        else:  # the V2 methods read no bias; the op's input is zeros (one constant for all layers)
            bias = g.const([0.0] * c.n_routed_experts, F32)
        weights, ids = g.op(
            ROUTER_SPEC.name, [flat, gate_w, bias], n_out=2, domain=R1C_DOMAIN,
            **ROUTER_SPEC.attrs(**router_attributes(c)), plugin_namespace=PLUGIN_NAMESPACE,
        )
        w13, w2 = self.need(p + ".experts.gate_up_proj"), self.need(p + ".experts.down_proj")
        inputs = [flat, weights, ids]
        if self.quant == "fp8_block128" and self.src.dtype(w13) != FP8:
            raise ExportError(f"export: {w13} is {self.src.dtype(w13)}, expected float8_e4m3fn")
        inputs += [self.experts_weight(p + ".experts.w13", w13), self.experts_weight(p + ".experts.w2", w2)]
        if self.quant == "fp8_block128":
            inputs += [self.param(p + ".experts.w13_scale", w13 + SCALE_SUFFIX, dtype=F32),
                       self.param(p + ".experts.w2_scale", w2 + SCALE_SUFFIX, dtype=F32)]
        routed = g.op(EXPERTS_SPEC.name, inputs, domain=R1C_DOMAIN,
                      **EXPERTS_SPEC.attrs(quant=self.quant), plugin_namespace=PLUGIN_NAMESPACE)
        out = routed
        if c.n_shared_experts:
            out = g.op("Add", [routed, self.mlp(flat, p + ".shared_experts")])
        return g.op("Reshape", [out, g.op("Shape", [h])])

    def experts_weight(self, out_name: str, src_name: str) -> str:
        """A fused [E, rows, cols] expert tensor, streamed to disk one expert at a time (never held whole)."""
        dtype = TensorProto.FLOAT8E4M3FN if self.src.dtype(src_name) == FP8 else self.dt
        return self.g.weight(out_name, self.src.shape(src_name), dtype,
                             lambda: (to_numpy(t, dtype) for t in self.src.expert_chunks(src_name)))

    def model(self) -> onnx.ModelProto:
        c = self.c
        inputs, outputs = model_io(c, self.dt)
        graph = helper.make_graph(self.g.nodes, "deepseek_v3", inputs, outputs, self.g.initializers)
        functions = ([router_function(), experts_function(self.quant, cast_weights=self.dt != F32)]
                     if c.num_moe_layers else [])
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(R1C_DOMAIN, R1C_OPSET_VERSION)],
            functions=functions,
            producer_name="r1c",
            ir_version=10,
        )


def _estimate_bytes(source: TensorSource, config: ModelConfig, dtype: int) -> int:
    """About how many bytes the export writes (for the progress bar's ETA): FP8 stays 1 byte, 2-D FP8 scales
    are repeated along a 128-wide axis, the router float32, the rest the export dtype."""
    from r1c.plugins.fp8 import BLOCK

    total = 0
    for name in source.names:
        shape, t = source.shape(name), source.dtype(name)
        n = int(np.prod(shape, dtype=np.int64))
        if t == FP8:
            total += n
        elif name.endswith(SCALE_SUFFIX):
            total += n * 4 * (BLOCK if len(shape) == 2 else 1)
        else:
            total += n * (4 if name.endswith(ROUTER_SUFFIXES) else np_dtype(dtype).itemsize)
    if config.tie_word_embeddings:
        total += config.vocab_size * config.hidden_size * np_dtype(dtype).itemsize
    return total


def export_onnx(config: ModelConfig, tensors: dict[str, torch.Tensor] | TensorSource, out_dir: str | Path, *,
                dtype: str = "float32", write_weights: bool = True, progress: bool = True,
                extra_files: dict[str, str] | None = None, postprocess: Callable[[Path], None] | None = None,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Path:
    """Write `model.onnx` + its data files + `graph_io.json` (+ config.json) into `out_dir`.

    Weights stream from `tensors` (a dict, or a lazy source such as `CheckpointReader`) into the data files
    as each layer is lowered: memory stays about one layer's tensors whatever the model's size.
    `dtype`: float32 | bfloat16 | float16, the activations', latent cache's and non-FP8 weights' type.
    `write_weights=False`: the full graph and data-file layout with no weight bytes (sparse files).
    The directory appears whole or not at all: everything is written to a sibling temp dir first.
    `postprocess(tmp_dir)` may rewrite the model there (the pass pipeline) before the rename.
    Raises ExportError (bad dtype, a tensor missing or of the wrong dtype, an existing non-empty `out_dir`).
    """
    if dtype not in DTYPES:
        raise ExportError(f"export: unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    source: TensorSource = DictSource(tensors) if isinstance(tensors, dict) else tensors
    out = Path(out_dir)
    check_output_dir(out, ExportError, "export")
    with atomic_output_dir(out, ExportError, "export") as tmp:
        total = _estimate_bytes(source, config, DTYPES[dtype]) if write_weights else None
        writer = WeightWriter(tmp, write_bytes=write_weights, max_file_bytes=max_file_bytes, total_bytes=total,
                              progress=progress)
        try:
            lowering = _Lowering(config, source, DTYPES[dtype], writer)
            model = lowering.build()
        finally:
            writer.finish()
        onnx.save_model(model, str(tmp / MODEL_FILE))  # the weights are in the data files already
        logger.info("export: %d nodes, %s in %d data file(s)", len(model.graph.node), writer.rate(),
                    len(writer.files))
        (tmp / GRAPH_IO_FILE).write_text(json.dumps(graph_io(config, lowering.quant, dtype), indent=2) + "\n")
        # the export's quantization_config describes its tensors: none without FP8 (a bf16 copy of an FP8
        # release keeps a stale one in its config.json), DeepSeek's FP8 block-128 with them
        from r1c.plugins.fp8 import QUANTIZATION_CONFIG

        quantization = QUANTIZATION_CONFIG if lowering.quant == "fp8_block128" else None
        if (config.quantization_config is None) != (quantization is None):
            config = config.replace(quantization_config=quantization and dict(quantization))
        (tmp / "config.json").write_text(config.to_json() + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        n_nodes = len(model.graph.node)
        del model
        if postprocess is not None:
            postprocess(tmp)
    logger.info("exported %d nodes to %s", n_nodes, out)
    return out
