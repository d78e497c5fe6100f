// r1c's CPU kernel library: `r1c.cpu::MLABlock`, one layer's whole MLA attention block in one ONNX Runtime node
// (spec.py `MLA_BLOCK_SPEC`; passes/fuse_cpu_mla_block.py swaps it in for the 15 nodes it replaces). After a decode
// step's weights have streamed through the caches every node starts cold: ~1-3.5 us per node on this project's VM
// (scripts/step_parts.py's "+1 identity"), so the block's 10 small nodes per layer (norms, reshapes, slices,
// rotary embeddings) cost more than their arithmetic.
//
// For the T = B*S tokens of hidden [B, S, H] (the layer's normalized input), DeepSeek-V2 paper section 2.1 /
// transformers' DeepseekV3Attention, in the export's absorbed form (r1c/exporter/onnx_export.py):
//   q      = rmsnorm(hidden @ W_qa, q_norm, q_eps) @ W_qb         [T, N*(D+R)], per head D nope then R rope
//   kv     = hidden @ W_kva                                       [T, C+R]
//   c_new  = rmsnorm(kv[:, :C], kv_norm, kv_eps)                  output 1, [B, S, C]
//   pe_new = rope(kv[:, C:])                                      output 2, [B, S, R]
//   attn   = MLAAttention(q_nope, rope(q_pe), c_new, pe_new, past_c, past_pe, past_valid, new_valid, w_uk, w_uv_t)
//   output = attn @ W_o                                           output 0, [B, S, H]
// rmsnorm(x, w, eps) = x / sqrt(mean(x^2) + eps) * w (ONNX SimplifiedLayerNormalization; the sum of squares in
// double, then times the reciprocal: the form closest to ONNX Runtime 1.32's CPU kernel, within 2e-7); rope(x)
// with half = R/2, cos/sin rows at the token's position p (position_ids [B, S], or one value: the first position,
// the others following): x[i] cos[p, i] - x[i + half] sin[p, i] and x[i + half] cos[p, i] + x[i] sin[p, i]
// (com.microsoft.RotaryEmbedding, interleaved = 0). The four matrices are packed as
// the Linear kernel's (spec.py pack_linear), their panels shared among ONNX Runtime's threads (q_a's and kv_a's in
// one ParallelFor: both read the same input); the small steps (norms, rotations, the q split: ~1 us a token) run
// on the calling thread, also in a prefill; scratch is the calling thread's, kept across calls.
// Legend: B rows, S new tokens, T = B*S, H hidden, QL q_lora_rank, N heads, D nope head dim, R rope dim, C
// kv_lora_rank, P cache columns, Vd v head dim.
#include "kernels.h"

namespace r1c_cpu {
namespace {

struct BlockScratch {
  std::vector<float> xa, xkv, q, q_nope, q_pe, attn;
};
thread_local BlockScratch block_scratch;
thread_local std::vector<int64_t> block_positions;  // the op's: each token's position (its cos/sin row)

// y[0 .. 2 half) = x rotated by the cos / sin rows (non-interleaved halves)
void rope(const float* x, const float* cos, const float* sin, int64_t half, float* y) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    y[i] = a * cos[i] - b * sin[i];
    y[i + half] = b * cos[i] + a * sin[i];
  }
}

bool packed_as(const std::vector<int64_t>& s, int64_t k, int64_t n) {
  return s.size() == 3 && s[0] == panels(n) && s[1] == k && s[2] == kPanel;
}

struct BlockKernel {
  float scale_ = 1.f, q_eps_ = 0.f, kv_eps_ = 0.f;
  std::string error_;

  BlockKernel(const OrtApi* api, const OrtKernelInfo* info) {
    (void)api;
    try {
      Ort::ConstKernelInfo k(info);
      scale_ = k.GetAttribute<float>("scale");
      q_eps_ = k.GetAttribute<float>("q_epsilon");
      kv_eps_ = k.GetAttribute<float>("kv_epsilon");
    } catch (const std::exception& e) {
      error_ = std::string("r1c.cpu::MLABlock: ") + e.what();
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& hidden,
                      const Ort::Custom::Tensor<float>& q_a, const Ort::Custom::Tensor<float>& q_norm,
                      const Ort::Custom::Tensor<float>& q_b, const Ort::Custom::Tensor<float>& kv_a,
                      const Ort::Custom::Tensor<float>& kv_norm, const Ort::Custom::Tensor<int64_t>& position_ids,
                      const Ort::Custom::Tensor<float>& cos_cache, const Ort::Custom::Tensor<float>& sin_cache,
                      const Ort::Custom::Tensor<float>& past_c, const Ort::Custom::Tensor<float>& past_pe,
                      const Ort::Custom::Tensor<bool>& past_valid, const Ort::Custom::Tensor<bool>& new_valid,
                      const Ort::Custom::Tensor<float>& w_uk, const Ort::Custom::Tensor<float>& w_uv_t,
                      const Ort::Custom::Tensor<float>& o, Ort::Custom::Tensor<float>& output,
                      Ort::Custom::Tensor<float>& c_out, Ort::Custom::Tensor<float>& pe_out) {
    return as_status("r1c.cpu::MLABlock", error_, [&] {
      const char* op = "r1c.cpu::MLABlock";
      const std::vector<int64_t> hs = hidden.Shape(), ks = w_uk.Shape(), vs = w_uv_t.Shape(), cs = cos_cache.Shape(),
                                 pcs = past_c.Shape(), pps = past_pe.Shape();
      if (hs.size() != 3 || ks.size() != 3 || vs.size() != 3 || cs.size() != 2 || pcs.size() != 3 ||
          pps.size() != 3 || sin_cache.Shape() != cs)
        ORT_CXX_API_THROW("r1c.cpu::MLABlock: ranks: hidden, past_c, past_pe, w_uk, w_uv_t 3; cos_cache and "
                          "sin_cache 2 and equal", ORT_INVALID_ARGUMENT);
      const int64_t B = hs[0], S = hs[1], H = hs[2], T = B * S, QL = q_norm.NumberOfElement();
      const int64_t N = ks[0], D = ks[1], C = ks[2], half = cs[1], R = 2 * half, P = pcs[2], Vd = vs[2];
      const int64_t npos = position_ids.NumberOfElement(), max_pos = cs[0];
      if (!packed_as(q_a.Shape(), H, QL) || !packed_as(q_b.Shape(), QL, N * (D + R)) ||
          !packed_as(kv_a.Shape(), H, C + R) || !packed_as(o.Shape(), N * Vd, H) || kv_norm.NumberOfElement() != C ||
          vs[0] != N || vs[1] != C || pcs[0] != B || pcs[1] != C || pps[0] != B || pps[1] != R || pps[2] != P ||
          (npos != T && npos != 1))
        ORT_CXX_API_THROW("r1c.cpu::MLABlock: shapes disagree (hidden [B, S, H]; q_a, q_b, kv_a, o packed [ceil(n / "
                          "32), K, 32] for H -> QL, QL -> N*(D+R), H -> C+R, N*Vd -> H; q_norm [QL]; kv_norm [C]; "
                          "position_ids B*S or 1 values; cos/sin [positions, R/2]; past_c [B, C, P]; past_pe "
                          "[B, R, P]; w_uk [N, D, C]; w_uv_t [N, C, Vd])", ORT_INVALID_ARGUMENT);
      float* y = output.Allocate({B, S, H});
      float* c_new = c_out.Allocate({B, S, C});
      float* pe_new = pe_out.Allocate({B, S, R});
      if (T == 0) return;
      std::vector<int64_t>& pos = block_positions;
      fit(pos, static_cast<size_t>(T));
      const int64_t* given = position_ids.Data();
      for (int64_t t = 0; t < T; ++t) {  // checked before any work
        const int64_t p = pos[t] = npos == 1 ? given[0] + t % S : given[t];
        if (p < 0 || p >= max_pos)
          ORT_CXX_API_THROW("r1c.cpu::MLABlock: a position_ids value is outside the cos/sin caches",
                            ORT_INVALID_ARGUMENT);
      }
      BlockArgs args{hidden.Data(), q_a.Data(), q_norm.Data(), q_b.Data(), kv_a.Data(), kv_norm.Data(),
                     cos_cache.Data(), sin_cache.Data(), past_c.Data(), past_pe.Data(), w_uk.Data(), w_uv_t.Data(),
                     o.Data(), pos.data(), make_mask(past_valid, B, S * N, P, op, "past_valid"),
                     make_mask(new_valid, B, S * N, S, op, "new_valid"), scale_, q_eps_, kv_eps_, B, S, H, QL, N,
                     D, R, C, P, Vd, y, c_new, pe_new};
      mla_block(Parallel{context}, args);
    });
  }
};

}  // namespace

void mla_block(const Parallel& par, const BlockArgs& a) {
  const int64_t T = a.B * a.S, H = a.H, QL = a.QL, N = a.N, D = a.D, R = a.R, C = a.C, half = R / 2;
  if (T == 0) return;
  BlockScratch& s = block_scratch;
  fit(s.xa, static_cast<size_t>(T * QL));
  fit(s.xkv, static_cast<size_t>(T * (C + R)));
  fit(s.q, static_cast<size_t>(T * N * (D + R)));
  fit(s.q_nope, static_cast<size_t>(T * N * D));
  fit(s.q_pe, static_cast<size_t>(T * N * R));
  fit(s.attn, static_cast<size_t>(T * N * a.Vd));
  linear_rows_pair(par, a.x, T, H, a.q_a, QL, s.xa.data(), a.kv_a, C + R, s.xkv.data());
  for (int64_t t = 0; t < T; ++t) {
    float* xa = s.xa.data() + t * QL;
    rmsnorm(xa, a.q_norm, QL, a.q_eps, xa);
    const float* kv = s.xkv.data() + t * (C + R);
    const int64_t p = a.pos[t];
    rmsnorm(kv, a.kv_norm, C, a.kv_eps, a.c_new + t * C);
    rope(kv + C, a.cos + p * half, a.sin + p * half, half, a.pe_new + t * R);
  }
  linear_rows(par, a.q_b, QL, N * (D + R), s.xa.data(), T, s.q.data());
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = a.pos[t];
    for (int64_t n = 0; n < N; ++n) {
      const float* qh = s.q.data() + (t * N + n) * (D + R);
      std::copy(qh, qh + D, s.q_nope.data() + (t * N + n) * D);
      rope(qh + D, a.cos + p * half, a.sin + p * half, half, s.q_pe.data() + (t * N + n) * R);
    }
  }
  AttentionArgs args{s.q_nope.data(), s.q_pe.data(), a.c_new, a.pe_new, a.past_c, a.past_pe, a.w_uk, a.w_uv_t,
                     a.past_valid, a.new_valid, a.scale, a.B, a.S, N, D, R, C, a.P, a.Vd, s.attn.data(), a.extent};
  mla_attention(par, args);
  linear_rows(par, a.o, N * a.Vd, H, s.attn.data(), T, a.y);
}

Ort::Custom::OrtLiteCustomOp* make_mla_block_op() {
  return Ort::Custom::CreateLiteCustomOp<BlockKernel>("MLABlock", "CPUExecutionProvider");
}

}  // namespace r1c_cpu
