// r1c's CPU kernel library: `r1c.cpu::MLAAttention`, the absorbed multi-head latent attention of one layer over
// the latent cache read in place (spec.py `ATTENTION_SPEC`; passes/use_cpu_attention_kernel.py swaps it in for
// the ~35 nodes the export writes for it, r1c/exporter/onnx_export.py `_Lowering.attention`).
//
// For each row b, new token s and head n (row index i = s * N + n, as the export's [B, S*N, ..] views):
//   qa[c]   = scale * sum_d q_nope[b, s, n, d] * w_uk[n, d, c]                        (W_UK absorbed, [C])
//   qp[r]   = scale * q_pe[b, s, n, r]
//   z[t]    = qa . past_c[b, :, t] + qp . past_pe[b, :, t]      t < P, -inf where !past_valid[b, i, t]
//   z[P+j]  = qa . c_new[b, j, :]  + qp . pe_new[b, j, :]       j < S, -inf where !new_valid[b, i, j]
//   p       = softmax(z)                                                             (float32, over P + S)
//   ol[c]   = sum_t p[t] past_c[b, c, t] + sum_j p[P+j] c_new[b, j, c]
//   out[b, s, n * Vd + v] = sum_c ol[c] * w_uv_t[n, c, v]
// Three parallel phases, split over the cache columns as flash-decoding does, so that a step reads the cache once
// whatever the head count: (1) per head n, the queries of every row and token (W_UK[n] read once); (2) per (b,
// block of tokens, chunk of 64-512 cache columns: `chunk_columns`), every head's scores, the chunk's max m, sum l
// and latent sum ol; (3) per head n, the chunks combined with weights exp(m - max m), divided by the total, times
// W_UV[n] (read once). The new tokens' columns come after, in chunks of up to 512.
// Scratch is the calling thread's and each worker's, kept across calls (released when far larger than needed).
// Legend: B rows, S new tokens, N heads, D nope head dim, R rope dim, C kv_lora_rank, P cache columns, Vd v dim.
#include "panels.h"

namespace r1c_cpu {
namespace {

constexpr int64_t kBlockRows = 128;  // query rows (tokens x heads) per unit, at least one token

struct Mask {  // a bool tensor broadcast to [B, S*N, cols] (its shape left-padded with 1s to rank 3)
  const bool* data = nullptr;
  int64_t b_stride = 0, i_stride = 0;
  bool at(int64_t b, int64_t i, int64_t col) const { return data[b * b_stride + i * i_stride + col]; }
};

Mask make_mask(const Ort::Custom::Tensor<bool>& t, int64_t B, int64_t rows, int64_t cols, const char* name) {
  std::vector<int64_t> s = t.Shape();
  if (s.size() > 3) ORT_CXX_API_THROW(std::string("r1c.cpu::MLAAttention: ") + name + " has rank > 3",
                                      ORT_INVALID_ARGUMENT);
  while (s.size() < 3) s.insert(s.begin(), 1);
  if ((s[0] != 1 && s[0] != B) || (s[1] != 1 && s[1] != rows) || s[2] != cols)
    ORT_CXX_API_THROW(std::string("r1c.cpu::MLAAttention: ") + name + " does not broadcast to [B, S*N, " +
                      std::to_string(cols) + "]", ORT_INVALID_ARGUMENT);
  Mask m;
  m.data = t.Data();
  m.i_stride = s[1] == 1 ? 0 : cols;
  m.b_stride = s[0] == 1 ? 0 : s[1] * cols;
  return m;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a * x
  const vf va = splat(a);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(y + i, load(y + i) + va * load(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

struct AttnJob {
  const float *q_nope, *q_pe, *c_new, *pe_new, *past_c, *past_pe, *w_uk, *w_uv;
  Mask past_valid, new_valid;
  float scale;
  float* out;
  int64_t B, S, N, D, R, C, P, Vd;
  int64_t sb, nsb, chunk, past_chunks, chunks;  // tokens per unit, token blocks, columns per cache chunk, chunks
  float *q, *kt, *part_ol, *part_m, *part_l;  // the caller's scratch (see Compute)
};

constexpr int64_t kChunk = 512;  // at most, cache columns per unit
// The cache's columns per unit: a multiple of 64 from 64 to kChunk, P / 8 rounded down, so that a row's cache of
// 512 columns or more is at least 8 units (one decode row keeps every thread busy).
inline int64_t chunk_columns(int64_t P) { return std::min(kChunk, std::max<int64_t>(64, P / (8 * 64) * 64)); }

// O [M, Nc] (+)= A [M, K] (rows lda apart) times Bm [K, Nc] (rows ldb apart), O's rows ldo apart (`accumulate`:
// added to what O holds): register tiles of 4 rows x 4 vectors, then 4 rows x 1 vector (outer products over k, Bm
// read once per tile); rows left over (a decode step's one row) read Bm in order, row by row
void gemm_rows(const float* A, int64_t lda, const float* Bm, int64_t ldb, float* O, int64_t ldo, int64_t M,
               int64_t K, int64_t Nc, bool accumulate = false) {
  const int64_t M4 = M / 4 * 4;
  int64_t cb = 0;
  for (; cb + 4 * kW <= Nc; cb += 4 * kW)
    for (int64_t m0 = 0; m0 < M4; m0 += 4) {
      vf acc[4][4] = {};
      if (accumulate)
        for (int rr = 0; rr < 4; ++rr)
          for (int v = 0; v < 4; ++v) acc[rr][v] = load(O + (m0 + rr) * ldo + cb + v * kW);
      for (int64_t k = 0; k < K; ++k) {
        const float* w = Bm + k * ldb + cb;
        const vf b0 = load(w), b1 = load(w + kW), b2 = load(w + 2 * kW), b3 = load(w + 3 * kW);
        for (int rr = 0; rr < 4; ++rr) {
          const vf a = splat(A[(m0 + rr) * lda + k]);
          acc[rr][0] += a * b0;
          acc[rr][1] += a * b1;
          acc[rr][2] += a * b2;
          acc[rr][3] += a * b3;
        }
      }
      for (int rr = 0; rr < 4; ++rr)
        for (int v = 0; v < 4; ++v) store(O + (m0 + rr) * ldo + cb + v * kW, acc[rr][v]);
    }
  for (; cb + kW <= Nc; cb += kW)
    for (int64_t m0 = 0; m0 < M4; m0 += 4) {
      vf acc[4] = {};
      if (accumulate)
        for (int rr = 0; rr < 4; ++rr) acc[rr] = load(O + (m0 + rr) * ldo + cb);
      for (int64_t k = 0; k < K; ++k) {
        const vf w = load(Bm + k * ldb + cb);
        for (int rr = 0; rr < 4; ++rr) acc[rr] += splat(A[(m0 + rr) * lda + k]) * w;
      }
      for (int rr = 0; rr < 4; ++rr) store(O + (m0 + rr) * ldo + cb, acc[rr]);
    }
  for (int64_t m = 0; m < M; ++m) {  // the tiles' last columns (under a vector), and the rows left over, whole
    const int64_t c0 = m < M4 ? cb : 0;
    if (c0 == Nc) continue;
    float* o = O + m * ldo + c0;
    if (!accumulate) std::fill(o, o + (Nc - c0), 0.f);
    for (int64_t k = 0; k < K; ++k) axpy(o, A[m * lda + k], Bm + k * ldb + c0, Nc - c0);
  }
}

// phase 1, one unit per head n, every (b, s): q[b, s, n] = [scale * q_nope W_UK[n] | scale * q_pe] ([C + R]);
// W_UK[n] is read once
void query_unit(void* data, size_t unit) {
  const AttnJob& j = *static_cast<const AttnJob*>(data);
  const int64_t n = static_cast<int64_t>(unit), C = j.C, R = j.R, N = j.N, M = j.B * j.S;
  float* q = j.q + n * (C + R);
  gemm_rows(j.q_nope + n * j.D, N * j.D, j.w_uk + n * j.D * C, C, q, N * (C + R), M, j.D, C);
  for (int64_t m = 0; m < M; ++m) {
    float* qm = q + m * N * (C + R);
    for (int64_t k = 0; k < C; ++k) qm[k] *= j.scale;
    const float* qr = j.q_pe + (m * N + n) * R;
    for (int64_t k = 0; k < R; ++k) qm[C + k] = qr[k] * j.scale;
  }
}

thread_local std::vector<float> chunk_scores, chunk_latents;

// phase 2, one unit per (b, block of sb query tokens, chunk of columns), every head: the chunk's scores, their
// max m and sum of exponentials l per query row, and ol = sum_t exp(z_t - m) latent_t (cache read once here)
void chunk_unit(void* data, size_t unit) {
  const AttnJob& j = *static_cast<const AttnJob*>(data);
  const int64_t u = static_cast<int64_t>(unit), ch = u % j.chunks, sbi = u / j.chunks % j.nsb, b = u / j.chunks / j.nsb;
  const int64_t C = j.C, R = j.R, N = j.N, P = j.P, S = j.S;
  const int64_t s0 = sbi * j.sb, s1 = std::min(S, s0 + j.sb), rows = (s1 - s0) * N;
  const bool past = ch < j.past_chunks;
  const int64_t c0 = past ? ch * j.chunk : (ch - j.past_chunks) * kChunk;
  const int64_t full = std::min(past ? j.chunk : kChunk, (past ? P : S) - c0);
  int64_t width = full;
  {  // columns past the last one any row of the block sees are skipped (the future of a causal prefill), in whole
     // vectors where the chunk has them (the extra columns are masked like any invisible one)
    int64_t seen = 0;
    for (int64_t r = 0; r < rows && seen < width; ++r) {
      const int64_t i = (s0 + r / N) * N + r % N;
      for (int64_t t = width - 1; t >= seen; --t)
        if (past ? j.past_valid.at(b, i, c0 + t) : j.new_valid.at(b, i, c0 + t)) {
          seen = t + 1;
          break;
        }
    }
    width = std::min(full, (seen + kW - 1) / kW * kW);
  }
  const float* src_c = past ? j.past_c + b * C * P + c0 : j.kt + b * (C + R) * S + c0;  // rows of stride `ld`
  const float* src_pe = past ? j.past_pe + b * R * P + c0 : j.kt + b * (C + R) * S + C * S + c0;
  const int64_t ld = past ? P : S;
  std::vector<float>& z = chunk_scores;
  release_if_oversized(z, static_cast<size_t>(rows * kChunk));
  z.resize(static_cast<size_t>(rows * width));
  const float* q0 = j.q + (b * S + s0) * N * (C + R);  // rows (s, n) of this block, consecutive
  gemm_rows(q0, C + R, src_c, ld, z.data(), width, rows, C, width);  // latents, then rope keys
  gemm_rows(q0 + C, C + R, src_pe, ld, z.data(), width, rows, R, width, true);
  float* m = j.part_m + u * j.sb * N;
  float* l = j.part_l + u * j.sb * N;
  float* ol = j.part_ol + u * j.sb * N * C;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = (s0 + r / N) * N + r % N;  // the row's index in [B, S*N, ..]
    float* zr = z.data() + r * width;
    float mx = -INFINITY;
    for (int64_t t = 0; t < width; ++t) {
      if (!(past ? j.past_valid.at(b, i, c0 + t) : j.new_valid.at(b, i, c0 + t))) zr[t] = -INFINITY;
      mx = std::max(mx, zr[t]);
    }
    m[r] = mx;
    if (mx == -INFINITY) {  // nothing visible in this chunk: it adds nothing
      l[r] = 0.f;
      std::fill(zr, zr + width, 0.f);
      continue;
    }
    int64_t t = 0;
    for (; t + kW <= width; t += kW) {
      const vf v = load(zr + t);
      const vf e = vexp(v - splat(mx));
      store(zr + t, v == splat(-INFINITY) ? splat(0.f) : e);
    }
    for (; t < width; ++t) zr[t] = zr[t] == -INFINITY ? 0.f : std::exp(zr[t] - mx);
    float sum = 0.f;
    for (t = 0; t < width; ++t) sum += zr[t];
    l[r] = sum;
  }
  if (!past) {  // the new tokens' latents are [S, C] rows: ol = z times them as outer products
    gemm_rows(z.data(), width, j.c_new + (b * S + c0) * C, C, ol, C, rows, width, C);
    return;
  }
  // the cache chunk [C, width] turned to [width, C] once, then the same outer products (no lane sums)
  std::vector<float>& lt = chunk_latents;
  release_if_oversized(lt, static_cast<size_t>(kChunk * C));
  lt.resize(static_cast<size_t>(width * C));
  for (int64_t c = 0; c < C; ++c) {
    const float* seg = src_c + c * ld;
    for (int64_t t = 0; t < width; ++t) lt[t * C + c] = seg[t];
  }
  gemm_rows(z.data(), width, lt.data(), C, ol, C, rows, width, C);
}

thread_local std::vector<float> combined;

// phase 3, one unit per head n, every (b, s): the chunks combined (each scaled by exp(m - max m)) and divided by
// the total sum, then times W_UV[n] (read once)
void output_unit(void* data, size_t unit) {
  const AttnJob& j = *static_cast<const AttnJob*>(data);
  const int64_t n = static_cast<int64_t>(unit), C = j.C, N = j.N, M = j.B * j.S;
  std::vector<float>& ol = combined;
  release_if_oversized(ol, static_cast<size_t>(M * C));
  ol.assign(static_cast<size_t>(M * C), 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t b = m / j.S, s = m % j.S, sbi = s / j.sb, r = (s - sbi * j.sb) * N + n;
    const int64_t u0 = (b * j.nsb + sbi) * j.chunks;
    float mx = -INFINITY;
    for (int64_t ch = 0; ch < j.chunks; ++ch) mx = std::max(mx, j.part_m[(u0 + ch) * j.sb * N + r]);
    float total = 0.f;
    float* o = ol.data() + m * C;
    for (int64_t ch = 0; ch < j.chunks; ++ch) {
      const int64_t u = u0 + ch;
      const float mu = j.part_m[u * j.sb * N + r];
      if (mu == -INFINITY) continue;
      const float w = std::exp(mu - mx);
      total += w * j.part_l[u * j.sb * N + r];
      axpy(o, w, j.part_ol + (u * j.sb * N + r) * C, C);
    }
    const float inv = 1.f / total;  // no visible column at all: 1 / 0 and NaN, as softmax over all -inf
    for (int64_t k = 0; k < C; ++k) o[k] *= inv;
  }
  gemm_rows(ol.data(), C, j.w_uv + n * C * j.Vd, j.Vd, j.out + n * j.Vd, N * j.Vd, M, C, j.Vd);
}

struct AttnScratch {  // the calling thread's, kept across calls
  std::vector<float> q, kt, part_ol, part_m, part_l;
};
thread_local AttnScratch attn_scratch;

template <class T>
void fit(std::vector<T>& v, size_t n) {
  release_if_oversized(v, n);
  v.resize(n);
}

struct AttentionKernel {
  float scale_ = 1.f;
  std::string error_;

  AttentionKernel(const OrtApi* api, const OrtKernelInfo* info) {
    (void)api;
    try {
      scale_ = Ort::ConstKernelInfo(info).GetAttribute<float>("scale");
    } catch (const std::exception& e) {
      error_ = std::string("r1c.cpu::MLAAttention: ") + e.what();
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& q_nope,
                      const Ort::Custom::Tensor<float>& q_pe, const Ort::Custom::Tensor<float>& c_new,
                      const Ort::Custom::Tensor<float>& pe_new, const Ort::Custom::Tensor<float>& past_c,
                      const Ort::Custom::Tensor<float>& past_pe, const Ort::Custom::Tensor<bool>& past_valid,
                      const Ort::Custom::Tensor<bool>& new_valid, const Ort::Custom::Tensor<float>& w_uk,
                      const Ort::Custom::Tensor<float>& w_uv_t, Ort::Custom::Tensor<float>& output) {
    return as_status("r1c.cpu::MLAAttention", error_, [&] {
      const std::vector<int64_t> qs = q_nope.Shape(), cs = c_new.Shape(), ps = pe_new.Shape(),
                                 pcs = past_c.Shape(), pps = past_pe.Shape(), ks = w_uk.Shape(), vs = w_uv_t.Shape();
      if (qs.size() != 4 || cs.size() != 3 || ps.size() != 3 || pcs.size() != 3 || pps.size() != 3 ||
          ks.size() != 3 || vs.size() != 3)
        ORT_CXX_API_THROW("r1c.cpu::MLAAttention: ranks: q_nope 4, c_new/pe_new/past_c/past_pe/w_uk/w_uv_t 3",
                          ORT_INVALID_ARGUMENT);
      const int64_t B = qs[0], S = qs[1], N = qs[2], D = qs[3], C = cs[2], R = ps[2], P = pcs[2], Vd = vs[2];
      if (cs[0] != B || cs[1] != S || ps[0] != B || ps[1] != S || pcs[0] != B || pcs[1] != C || pps[0] != B ||
          pps[1] != R || pps[2] != P || ks[0] != N || ks[1] != D || ks[2] != C || vs[0] != N || vs[1] != C ||
          q_pe.NumberOfElement() != B * S * N * R)
        ORT_CXX_API_THROW("r1c.cpu::MLAAttention: shapes disagree (q_nope [B, S, N, D], q_pe B*S*N*R, c_new "
                          "[B, S, C], pe_new [B, S, R], past_c [B, C, P], past_pe [B, R, P], w_uk [N, D, C], "
                          "w_uv_t [N, C, Vd])", ORT_INVALID_ARGUMENT);
      float* y = output.Allocate({B, S, N * Vd});
      if (B * S * N == 0) return;
      const int64_t sb = std::max<int64_t>(1, kBlockRows / N), nsb = (S + sb - 1) / sb;
      const int64_t chunk = chunk_columns(P), past_chunks = (P + chunk - 1) / chunk;
      const int64_t chunks = past_chunks + (S + kChunk - 1) / kChunk;
      AttnScratch& s = attn_scratch;
      fit(s.q, static_cast<size_t>(B * S * N * (C + R)));
      fit(s.kt, static_cast<size_t>(B * (C + R) * S));
      const int64_t units = B * nsb * chunks;
      fit(s.part_m, static_cast<size_t>(units * sb * N));
      fit(s.part_l, static_cast<size_t>(units * sb * N));
      fit(s.part_ol, static_cast<size_t>(units * sb * N * C));
      const float *cn = c_new.Data(), *pn = pe_new.Data();
      for (int64_t b = 0; b < B; ++b)  // the new tokens' latents as columns, [C + R, S] per row
        for (int64_t t = 0; t < S; ++t) {
          float* kt = s.kt.data() + b * (C + R) * S + t;
          for (int64_t k = 0; k < C; ++k) kt[k * S] = cn[(b * S + t) * C + k];
          for (int64_t k = 0; k < R; ++k) kt[(C + k) * S] = pn[(b * S + t) * R + k];
        }
      AttnJob job{q_nope.Data(), q_pe.Data(), cn, pn, past_c.Data(), past_pe.Data(), w_uk.Data(), w_uv_t.Data(),
                  make_mask(past_valid, B, S * N, P, "past_valid"), make_mask(new_valid, B, S * N, S, "new_valid"),
                  scale_, y, B, S, N, D, R, C, P, Vd, sb, nsb, chunk, past_chunks, chunks, s.q.data(), s.kt.data(),
                  s.part_ol.data(), s.part_m.data(), s.part_l.data()};
      Ort::KernelContext ctx(context);
      ctx.ParallelFor(query_unit, static_cast<size_t>(N), 0, &job);
      ctx.ParallelFor(chunk_unit, static_cast<size_t>(units), 0, &job);
      ctx.ParallelFor(output_unit, static_cast<size_t>(N), 0, &job);
    });
  }
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* make_attention_op() {
  return Ort::Custom::CreateLiteCustomOp<AttentionKernel>("MLAAttention", "CPUExecutionProvider");
}

}  // namespace r1c_cpu
