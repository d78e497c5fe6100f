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
// Three parallel phases (split over the cache columns, as flash-decoding does, so that a decode step reads the
// cache once whatever the head count): queries per (b, s, n); per (b, block of tokens, chunk of 512 columns) the
// scores of every head, the chunk's max m, sum l and ol; per (b, s, n) the chunks combined with weights
// exp(m - max m), divided by the total, times W_UV. Scratch is the calling thread's and each worker's, kept across
// calls (released when far larger than needed).
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

// the sum of a vector's lanes by halving (log2(kW) dependent adds rather than kW)
template <int W>
inline float hsum_w(const float* lanes) {
  if constexpr (W == 1) {
    return lanes[0];
  } else {
    typedef float vh __attribute__((vector_size(W / 2 * sizeof(float))));
    vh a, b;
    std::memcpy(&a, lanes, sizeof a);
    std::memcpy(&b, lanes + W / 2, sizeof b);
    a += b;
    float half[W / 2];
    std::memcpy(half, &a, sizeof a);
    return hsum_w<W / 2>(half);
  }
}

inline float hsum(vf v) {
  float lanes[kW];
  std::memcpy(lanes, &v, sizeof v);
  return hsum_w<kW>(lanes);
}

inline float dot(const float* a, const float* b, int64_t n) {
  vf acc{};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
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
  int64_t sb, nsb, past_chunks, chunks;  // query tokens per unit, s-blocks, column chunks (past, all)
  float *q, *kt, *part_ol, *part_m, *part_l;  // the caller's scratch (see Compute)
};

constexpr int64_t kChunk = 512;  // cache columns per unit

// phase 1, one unit per (b, s, n): q[b, s, n] = [scale * q_nope W_UK[n] | scale * q_pe] ([C + R])
void query_unit(void* data, size_t unit) {
  const AttnJob& j = *static_cast<const AttnJob*>(data);
  const int64_t bsn = static_cast<int64_t>(unit), n = bsn % j.N, C = j.C, R = j.R;
  float* q = j.q + bsn * (C + R);
  std::fill(q, q + C, 0.f);
  const float* qn = j.q_nope + bsn * j.D;
  const float* wk = j.w_uk + n * j.D * C;
  for (int64_t d = 0; d < j.D; ++d) axpy(q, qn[d], wk + d * C, C);
  for (int64_t k = 0; k < C; ++k) q[k] *= j.scale;
  const float* qr = j.q_pe + bsn * R;
  for (int64_t k = 0; k < R; ++k) q[C + k] = qr[k] * j.scale;
}

// z [rows, width] = q [rows, C + R] (rows C + R apart) times the latent rows (c rows then pe rows, `ld` apart):
// register tiles of 4 query rows x 4 vectors of columns (outer products, no stores inside the k loop)
void scores_tile(const float* q, int64_t C, int64_t R, const float* src_c, const float* src_pe, int64_t ld,
                 int64_t rows, int64_t width, float* z) {
  const int64_t K = C + R;
  int64_t cb = 0;
  for (; cb + 4 * kW <= width; cb += 4 * kW) {
    int64_t r0 = 0;
    for (; r0 + 4 <= rows; r0 += 4) {
      vf acc[4][4] = {};
      for (int64_t k = 0; k < K; ++k) {
        const float* seg = (k < C ? src_c + k * ld : src_pe + (k - C) * ld) + cb;
        const vf s0 = load(seg), s1 = load(seg + kW), s2 = load(seg + 2 * kW), s3 = load(seg + 3 * kW);
        for (int rr = 0; rr < 4; ++rr) {
          const vf a = splat(q[(r0 + rr) * K + k]);
          acc[rr][0] += a * s0;
          acc[rr][1] += a * s1;
          acc[rr][2] += a * s2;
          acc[rr][3] += a * s3;
        }
      }
      for (int rr = 0; rr < 4; ++rr)
        for (int v = 0; v < 4; ++v) store(z + (r0 + rr) * width + cb + v * kW, acc[rr][v]);
    }
    for (; r0 < rows; ++r0)
      for (int64_t k = 0; k < K; ++k)
        axpy(z + r0 * width + cb, q[r0 * K + k], (k < C ? src_c + k * ld : src_pe + (k - C) * ld) + cb, 4 * kW);
  }
  if (cb < width)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k)
        axpy(z + r * width + cb, q[r * K + k], (k < C ? src_c + k * ld : src_pe + (k - C) * ld) + cb, width - cb);
}

// ol [rows, C] = z [rows, width] times lat [width, C] (rows C apart): tiles of 4 query rows x 4 vectors of C
void latent_rows_product(const float* z, int64_t rows, int64_t width, const float* lat, int64_t C, float* ol) {
  std::fill(ol, ol + rows * C, 0.f);
  int64_t cb = 0;
  for (; cb + 4 * kW <= C; cb += 4 * kW) {
    int64_t r0 = 0;
    for (; r0 + 4 <= rows; r0 += 4) {
      vf acc[4][4] = {};
      for (int64_t t = 0; t < width; ++t) {
        const float* l = lat + t * C + cb;
        const vf l0 = load(l), l1 = load(l + kW), l2 = load(l + 2 * kW), l3 = load(l + 3 * kW);
        for (int rr = 0; rr < 4; ++rr) {
          const vf p = splat(z[(r0 + rr) * width + t]);
          acc[rr][0] += p * l0;
          acc[rr][1] += p * l1;
          acc[rr][2] += p * l2;
          acc[rr][3] += p * l3;
        }
      }
      for (int rr = 0; rr < 4; ++rr)
        for (int v = 0; v < 4; ++v) store(ol + (r0 + rr) * C + cb + v * kW, acc[rr][v]);
    }
    for (; r0 < rows; ++r0)
      for (int64_t t = 0; t < width; ++t) axpy(ol + r0 * C + cb, z[r0 * width + t], lat + t * C + cb, 4 * kW);
  }
  if (cb < C)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < width; ++t) axpy(ol + r * C + cb, z[r * width + t], lat + t * C + cb, C - cb);
}

thread_local std::vector<float> chunk_scores;

// phase 2, one unit per (b, block of sb query tokens, chunk of columns), every head: the chunk's scores, their
// max m and sum of exponentials l per query row, and ol = sum_t exp(z_t - m) latent_t (cache read once here)
void chunk_unit(void* data, size_t unit) {
  const AttnJob& j = *static_cast<const AttnJob*>(data);
  const int64_t u = static_cast<int64_t>(unit), ch = u % j.chunks, sbi = u / j.chunks % j.nsb, b = u / j.chunks / j.nsb;
  const int64_t C = j.C, R = j.R, N = j.N, P = j.P, S = j.S;
  const int64_t s0 = sbi * j.sb, s1 = std::min(S, s0 + j.sb), rows = (s1 - s0) * N;
  const bool past = ch < j.past_chunks;
  const int64_t c0 = past ? ch * kChunk : (ch - j.past_chunks) * kChunk;
  int64_t width = std::min(kChunk, (past ? P : S) - c0);
  {  // columns past the last one any row of the block sees are skipped (the future of a causal prefill)
    int64_t seen = 0;
    for (int64_t r = 0; r < rows && seen < width; ++r) {
      const int64_t i = (s0 + r / N) * N + r % N;
      for (int64_t t = width - 1; t >= seen; --t)
        if (past ? j.past_valid.at(b, i, c0 + t) : j.new_valid.at(b, i, c0 + t)) {
          seen = t + 1;
          break;
        }
    }
    width = seen;
  }
  const float* src_c = past ? j.past_c + b * C * P + c0 : j.kt + b * (C + R) * S + c0;  // rows of stride `ld`
  const float* src_pe = past ? j.past_pe + b * R * P + c0 : j.kt + b * (C + R) * S + C * S + c0;
  const int64_t ld = past ? P : S;
  std::vector<float>& z = chunk_scores;
  release_if_oversized(z, static_cast<size_t>(rows * kChunk));
  z.assign(static_cast<size_t>(rows * width), 0.f);
  const float* q0 = j.q + (b * S + s0) * N * (C + R);  // rows (s, n) of this block, consecutive
  scores_tile(q0, C, R, src_c, src_pe, ld, rows, width, z.data());
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
    latent_rows_product(z.data(), rows, width, j.c_new + (b * S + c0) * C, C, ol);
    return;
  }
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {  // four latent rows at a time: each z load feeds four products
    const float* g[4] = {src_c + c * ld, src_c + (c + 1) * ld, src_c + (c + 2) * ld, src_c + (c + 3) * ld};
    for (int64_t r = 0; r < rows; ++r) {
      const float* zr = z.data() + r * width;
      vf a0{}, a1{}, a2{}, a3{};
      int64_t t = 0;
      for (; t + kW <= width; t += kW) {
        const vf p = load(zr + t);
        a0 += p * load(g[0] + t);
        a1 += p * load(g[1] + t);
        a2 += p * load(g[2] + t);
        a3 += p * load(g[3] + t);
      }
      float o[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (; t < width; ++t)
        for (int e = 0; e < 4; ++e) o[e] += zr[t] * g[e][t];
      for (int e = 0; e < 4; ++e) ol[r * C + c + e] = o[e];
    }
  }
  for (; c < C; ++c) {
    const float* seg = src_c + c * ld;
    for (int64_t r = 0; r < rows; ++r) ol[r * C + c] = dot(z.data() + r * width, seg, width);
  }
}

thread_local std::vector<float> combined;

// phase 3, one unit per (b, s, n): the chunks combined (each scaled by exp(m - max m)), divided by the total sum,
// times W_UV[n]
void output_unit(void* data, size_t unit) {
  const AttnJob& j = *static_cast<const AttnJob*>(data);
  const int64_t bsn = static_cast<int64_t>(unit), n = bsn % j.N, s = bsn / j.N % j.S, b = bsn / j.N / j.S;
  const int64_t C = j.C, sbi = s / j.sb, r = (s - sbi * j.sb) * j.N + n;
  const int64_t u0 = (b * j.nsb + sbi) * j.chunks;
  float mx = -INFINITY;
  for (int64_t ch = 0; ch < j.chunks; ++ch) mx = std::max(mx, j.part_m[(u0 + ch) * j.sb * j.N + r]);
  std::vector<float>& ol = combined;
  ol.assign(static_cast<size_t>(C), 0.f);
  float total = 0.f;
  for (int64_t ch = 0; ch < j.chunks; ++ch) {
    const int64_t u = u0 + ch;
    const float m = j.part_m[u * j.sb * j.N + r];
    if (m == -INFINITY) continue;
    const float w = std::exp(m - mx);
    total += w * j.part_l[u * j.sb * j.N + r];
    axpy(ol.data(), w, j.part_ol + (u * j.sb * j.N + r) * C, C);
  }
  const float inv = 1.f / total;  // no visible column at all: 1 / 0 and NaN, as softmax over all -inf
  float* o = j.out + bsn * j.Vd;
  std::fill(o, o + j.Vd, 0.f);
  const float* wv = j.w_uv + n * C * j.Vd;
  for (int64_t k = 0; k < C; ++k) axpy(o, ol[k] * inv, wv + k * j.Vd, j.Vd);
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
    if (!error_.empty()) return Ort::Status(error_.c_str(), ORT_INVALID_ARGUMENT);
    try {
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
      if (B * S * N == 0) return Ort::Status{nullptr};
      const int64_t sb = std::max<int64_t>(1, kBlockRows / N), nsb = (S + sb - 1) / sb;
      const int64_t past_chunks = (P + kChunk - 1) / kChunk, chunks = past_chunks + (S + kChunk - 1) / kChunk;
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
                  scale_, y, B, S, N, D, R, C, P, Vd, sb, nsb, past_chunks, chunks, s.q.data(), s.kt.data(),
                  s.part_ol.data(), s.part_m.data(), s.part_l.data()};
      Ort::KernelContext ctx(context);
      ctx.ParallelFor(query_unit, static_cast<size_t>(B * S * N), 0, &job);
      ctx.ParallelFor(chunk_unit, static_cast<size_t>(units), 0, &job);
      ctx.ParallelFor(output_unit, static_cast<size_t>(B * S * N), 0, &job);
    } catch (const Ort::Exception& e) {
      return Ort::Status(e.what(), e.GetOrtErrorCode());
    } catch (const std::exception& e) {
      return Ort::Status((std::string("r1c.cpu::MLAAttention: ") + e.what()).c_str(), ORT_FAIL);
    }
    return Ort::Status{nullptr};
  }
};

}  // namespace

Ort::Custom::OrtLiteCustomOp* make_attention_op() {
  return Ort::Custom::CreateLiteCustomOp<AttentionKernel>("MLAAttention", "CPUExecutionProvider");
}

}  // namespace r1c_cpu
