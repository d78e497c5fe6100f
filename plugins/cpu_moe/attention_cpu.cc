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
// W_UV[n] (read once). The new tokens' columns come after, in chunks of up to 512; in a decode step (one new token a
// row) the new column is merged into each row's last cache chunk instead, and where the caller knows how far any
// row's cache is filled (`extent`: the native decode step) only those columns are cut into chunks, as many as
// give each of the team's threads one (decode_chunk_columns).
// Scratch is the calling thread's and each worker's, kept across calls (released when far larger than needed).
// `MLAAttentionInt8` (spec.py ATTENTION_INT8_SPEC) is the same function with W_UK and W_UV stored as int8 with one
// float scale per head and output column (quantize_weights' per-column form): w_uk = w_uk_q * w_uk_scale[n, c],
// w_uv_t = w_uv_t_q * w_uv_t_scale[n, v]; the int8 values are widened to float in registers as they are read (a
// step reads 1 byte per weight) and the column scales applied to the sums; activations stay float32.
// Legend: B rows, S new tokens, N heads, D nope head dim, R rope dim, C kv_lora_rank, P cache columns, Vd v dim.
#include "kernels.h"

#include <immintrin.h>

namespace r1c_cpu {
namespace {

constexpr int64_t kBlockRows = 128;  // query rows (tokens x heads) per unit, at least one token

#if defined(__AVX512F__)
// 16 int8 lanes widened to float (sign-extend, convert: 2 instructions); the zero-masking forms: the plain ones
// start from _mm512_undefined, which GCC 12 flags as maybe-uninitialized
inline vf widen(__m128i b) {
  return reinterpret_cast<vf>(_mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_maskz_cvtepi8_epi32(0xFFFF, b)));
}
#endif

inline vf load_w(const float* p) { return load(p); }
inline vf load_w(const int8_t* p) {  // kW int8 weights widened to float (GCC 12 scalarizes __builtin_convertvector
                                     // from int8 lanes, measured 2x slower than these intrinsics)
#if defined(__AVX512F__)
  return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
      reinterpret_cast<const __m128i*>(p)))));
#else
  vf v;
  for (int i = 0; i < kW; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// The first n < kW values at p as a vector (the other lanes zero), without reading past p + n; store_part writes
// only the first n lanes
inline vf load_part(const float* p, int n) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p));
#else
  vf v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}
inline vf load_w_part(const float* p, int n) { return load_part(p, n); }
inline vf load_w_part(const int8_t* p, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return widen(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), p));
#else
  int8_t t[kW] = {};
  for (int i = 0; i < n; ++i) t[i] = p[i];
  return load_w(t);
#endif
}
inline void store_part(float* p, vf v, int n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), reinterpret_cast<__m512>(v));
#else
  for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// sum over i < n of a[i] * b[i]: two vectors of partial sums, then the lanes
inline float dot(const float* a, const float* b, int64_t n) {
  vf s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    s0 += load(a + i) * load(b + i);
    s1 += load(a + i + kW) * load(b + i + kW);
  }
  for (; i + kW <= n; i += kW) s0 += load(a + i) * load(b + i);
  if (i < n) s0 += load_part(a + i, static_cast<int>(n - i)) * load_part(b + i, static_cast<int>(n - i));
  s0 += s1;
  float t = 0.f;
  for (int l = 0; l < kW; ++l) t += s0[l];
  return t;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {  // y += a * x
  const vf va = splat(a);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) store(y + i, load(y + i) + va * load(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

template <class W>  // W: the type W_UK and W_UV are stored in (float, or int8 with column scales)
struct AttnJob {
  const float *q_nope, *q_pe, *c_new, *pe_new, *past_c, *past_pe;
  const W *w_uk, *w_uv;
  const float *uk_scale, *uv_scale;  // int8: [N, C] and [N, Vd]; float: null
  Mask past_valid, new_valid;
  float scale;
  float* out;
  int64_t B, S, N, D, R, C, P, Vd;
  int64_t sb, nsb, chunk, past_chunks, chunks;  // tokens per unit, token blocks, columns per cache chunk, chunks
  int64_t extent;  // cache columns visited: [0, extent)
  bool fold;       // one new token a row (S = 1), merged into the row's last cache chunk: no chunk of its own
  float *q, *kt, *part_ol, *part_m, *part_l;  // the caller's scratch (see Compute)
};

constexpr int64_t kChunk = 512;  // at most, cache columns per unit
// The cache's columns per unit: a multiple of 64 from 64 to kChunk, P / 8 rounded down, so that a row's cache of
// 512 columns or more is at least 8 units (one decode row keeps every thread busy).
inline int64_t chunk_columns(int64_t P) { return std::min(kChunk, std::max<int64_t>(64, P / (8 * 64) * 64)); }

// A decode step's cache columns per unit (one new token a row, the thread count known: r1c's team): each row's
// `extent` columns cut into k nearly equal chunks (a multiple of 16 columns, at most kChunk), k the fewest that give
// every thread a unit. The phase is compute-bound (2 N (2 C + R) flops a cached column: ~18 us for 80 columns of
// the issue-11 benchmark model, data in cache, on this project's Zen 4 VM), so 140 columns on 2 threads are 80 + 60,
// not chunk_columns' 64 + 64 + 12 with one thread doing 128.
inline int64_t decode_chunk_columns(int64_t extent, int64_t B, int threads) {
  const int64_t k = std::max<int64_t>((threads + B - 1) / B, (extent + kChunk - 1) / kChunk);
  return std::min(kChunk, std::max<int64_t>(16, ((extent + k - 1) / k + 15) / 16 * 16));
}

// o[c .. c + V kW) (+)= sum over k < K of a[k] * Bm[k, c .. c + V kW): V vectors of accumulators held over all k
template <int V, class W>
inline void row_tile(const float* a, const W* Bm, int64_t ldb, float* o, int64_t K, int64_t c, bool accumulate) {
  vf acc[V];
  for (int v = 0; v < V; ++v) acc[v] = accumulate ? load(o + c + v * kW) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    const W* w = Bm + k * ldb + c;
    const vf x = splat(a[k]);
    for (int v = 0; v < V; ++v) acc[v] += x * load_w(w + v * kW);
  }
  for (int v = 0; v < V; ++v) store(o + c + v * kW, acc[v]);
}

// Vectors of accumulators in a one-row tile: a whole 256-column row of W_UK (C = 256) per pass on AVX-512 (16 of
// its 32 registers), 64 columns on AVX2 (8 of 16); wider tiles read each weight row in fewer, longer runs
constexpr int kRowVecs = kW >= 16 ? 16 : 8;

// o[c0 .. Nc) (+)= sum over k < K of a[k] * Bm[k, c0 .. Nc) (rows ldb apart): one row (a decode step's query or
// latent sum) in register tiles of kRowVecs, 4, then 1 vector, then the columns under a vector; Bm read once, o
// written once
template <class W>
void row_times(const float* a, const W* Bm, int64_t ldb, float* o, int64_t K, int64_t c0, int64_t Nc,
               bool accumulate) {
  int64_t c = c0;
  for (; c + kRowVecs * kW <= Nc; c += kRowVecs * kW) row_tile<kRowVecs>(a, Bm, ldb, o, K, c, accumulate);
  for (; c + 4 * kW <= Nc; c += 4 * kW) row_tile<4>(a, Bm, ldb, o, K, c, accumulate);
  for (; c + kW <= Nc; c += kW) row_tile<1>(a, Bm, ldb, o, K, c, accumulate);
  if (c == Nc) return;
  // under a vector of columns left (a cache chunk's last few columns, or a single new token's): one vector of
  // accumulators over all k as above, each k's n columns read by a masked load (zeros past n), n lanes stored
  const int n = static_cast<int>(Nc - c);
  vf acc = accumulate ? load_part(o + c, n) : vf{};
  for (int64_t k = 0; k < K; ++k) acc += splat(a[k]) * load_w_part(Bm + k * ldb + c, n);
  store_part(o + c, acc, n);
}

// O [M, Nc] (+)= A [M, K] (rows lda apart) times Bm [K, Nc] (rows ldb apart), O's rows ldo apart (`accumulate`:
// added to what O holds): register tiles of 4 rows x 4 vectors, then 4 rows x 1 vector (outer products over k, Bm
// read once per tile); rows left over (a decode step's one row) read Bm in order, row by row
template <class W>
void gemm_rows(const float* A, int64_t lda, const W* Bm, int64_t ldb, float* O, int64_t ldo, int64_t M,
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
        const W* w = Bm + k * ldb + cb;
        const vf b0 = load_w(w), b1 = load_w(w + kW), b2 = load_w(w + 2 * kW), b3 = load_w(w + 3 * kW);
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
        const vf w = load_w(Bm + k * ldb + cb);
        for (int rr = 0; rr < 4; ++rr) acc[rr] += splat(A[(m0 + rr) * lda + k]) * w;
      }
      for (int rr = 0; rr < 4; ++rr) store(O + (m0 + rr) * ldo + cb, acc[rr]);
    }
  for (int64_t m = 0; m < M; ++m)  // the tiles' last columns (under a vector), and the rows left over, whole
    row_times(A + m * lda, Bm, ldb, O + m * ldo, K, m < M4 ? cb : 0, Nc, accumulate);
}

thread_local std::vector<float> nt_scratch;

// gemm_nt's tile: O[m, n0 + j] for the GG vectors of rows from g0 and the nn (<= kNtCols) rows b[j] of Bt, over
// all k. kNtCols independent accumulator chains per vector of rows: an FMA's latency (4 cycles) is covered when a
// k step has at least as many independent FMAs as that (4 columns alone made the loop latency-bound)
constexpr int kNtCols = 8;

template <int GG>
inline void nt_tile(const float* at, int64_t Mp, const float* const (&b)[kNtCols], int64_t K, int64_t g0, int64_t M,
                    float* O, int64_t ldo, int64_t n0, int nn) {
  vf acc[kNtCols][GG] = {};
  const float* a0 = at + g0 * kW;
  for (int64_t k = 0; k < K; ++k) {
    vf x[GG];
    for (int g = 0; g < GG; ++g) x[g] = load(a0 + k * Mp + g * kW);
    for (int j = 0; j < kNtCols; ++j) {
      const vf bj = splat(b[j][k]);
      for (int g = 0; g < GG; ++g) acc[j][g] += bj * x[g];
    }
  }
  for (int j = 0; j < nn; ++j)
    for (int g = 0; g < GG; ++g)
      for (int l = 0; l < kW; ++l) {
        const int64_t m = (g0 + g) * kW + l;
        if (m < M) O[m * ldo + n0 + j] = acc[j][g][l];
      }
}

// O [M, Nc] = A [M, K] (rows lda apart) times Bt [Nc, K]^T (rows ldb apart), O's rows ldo apart, with Bt read as it
// lies (the cache chunk, latent-major: no transposed copy of it): A (a block's probabilities, small) is transposed
// once into at [K, Mp] (Mp: M rounded up to whole vectors, zero-filled), then for kNtCols rows of Bt at a time an
// outer product over k: broadcast Bt values times 1 vector of at (2 where 8 x 2 accumulators fit the registers:
// AVX-512), no lane sums, O written by columns
void gemm_nt(const float* A, int64_t lda, const float* Bt, int64_t ldb, float* O, int64_t ldo, int64_t M, int64_t K,
             int64_t Nc) {
  const int64_t G = (M + kW - 1) / kW, Mp = G * kW;
  std::vector<float>& at = nt_scratch;
  release_if_oversized(at, static_cast<size_t>(K * Mp));
  at.assign(static_cast<size_t>(K * Mp), 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) at[k * Mp + m] = A[m * lda + k];
  for (int64_t n0 = 0; n0 < Nc; n0 += kNtCols) {
    const int nn = static_cast<int>(std::min<int64_t>(kNtCols, Nc - n0));
    const float* b[kNtCols];
    for (int j = 0; j < kNtCols; ++j) b[j] = Bt + (n0 + std::min(j, nn - 1)) * ldb;  // past Nc: a repeat, not stored
    int64_t g0 = 0;
    if constexpr (kW >= 16)
      for (; g0 + 2 <= G; g0 += 2) nt_tile<2>(at.data(), Mp, b, K, g0, M, O, ldo, n0, nn);
    for (; g0 < G; ++g0) nt_tile<1>(at.data(), Mp, b, K, g0, M, O, ldo, n0, nn);
  }
}

// phase 1, one unit per head n, every (b, s): q[b, s, n] = [scale * q_nope W_UK[n] | scale * q_pe] ([C + R]);
// W_UK[n] is read once
template <class W>
void query_unit(void* data, size_t unit) {
  const AttnJob<W>& j = *static_cast<const AttnJob<W>*>(data);
  const int64_t n = static_cast<int64_t>(unit), C = j.C, R = j.R, N = j.N, M = j.B * j.S;
  float* q = j.q + n * (C + R);
  gemm_rows(j.q_nope + n * j.D, N * j.D, j.w_uk + n * j.D * C, C, q, N * (C + R), M, j.D, C);
  for (int64_t m = 0; m < M; ++m) {
    float* qm = q + m * N * (C + R);
    if (j.uk_scale != nullptr) {
      const float* sc = j.uk_scale + n * C;
      for (int64_t k = 0; k < C; ++k) qm[k] *= j.scale * sc[k];
    } else {
      for (int64_t k = 0; k < C; ++k) qm[k] *= j.scale;
    }
    const float* qr = j.q_pe + (m * N + n) * R;
    for (int64_t k = 0; k < R; ++k) qm[C + k] = qr[k] * j.scale;
  }
}

thread_local std::vector<float> chunk_scores;

// phase 2, one unit per (b, block of sb query tokens, chunk of columns), every head: the chunk's scores, their
// max m and sum of exponentials l per query row, and ol = sum_t exp(z_t - m) latent_t (cache read once here)
template <class W>
void chunk_unit(void* data, size_t unit) {
  const AttnJob<W>& j = *static_cast<const AttnJob<W>*>(data);
  const int64_t u = static_cast<int64_t>(unit), ch = u % j.chunks, sbi = u / j.chunks % j.nsb, b = u / j.chunks / j.nsb;
  const int64_t C = j.C, R = j.R, N = j.N, P = j.P, S = j.S;
  const int64_t s0 = sbi * j.sb, s1 = std::min(S, s0 + j.sb), rows = (s1 - s0) * N;
  const bool past = ch < j.past_chunks;
  const int64_t c0 = past ? ch * j.chunk : (ch - j.past_chunks) * kChunk;
  const int64_t full = std::min(past ? j.chunk : kChunk, (past ? j.extent : S) - c0);
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
  if (!past && width < kW) {  // a few new tokens (a decode step's one): dot products along their latent rows
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0; t < width; ++t) {
        const int64_t tok = b * S + c0 + t;
        const float* qr = q0 + r * (C + R);
        z[r * width + t] = dot(qr, j.c_new + tok * C, C) + dot(qr + C, j.pe_new + tok * R, R);
      }
  } else {
    gemm_rows(q0, C + R, src_c, ld, z.data(), width, rows, C, width);  // latents, then rope keys
    gemm_rows(q0 + C, C + R, src_pe, ld, z.data(), width, rows, R, width, true);
  }
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
  // the cache chunk [C, width] as it lies: ol[r, c] = z[r, :] . chunk[c, :]
  gemm_nt(z.data(), width, src_c, ld, ol, C, rows, width, C);
  if (!j.fold || ch != j.past_chunks - 1) return;
  // the row's new token (S = 1: rows are its N heads) merged as one more column t: m' = max(m, z_t), the chunk's
  // sums rescaled by exp(m - m'), plus exp(z_t - m') for l and exp(z_t - m') c_new for ol
  const float* cn = j.c_new + b * C;
  for (int64_t r = 0; r < rows; ++r) {
    if (!j.new_valid.at(b, r, 0)) continue;
    const float* qr = q0 + r * (C + R);
    const float zt = dot(qr, cn, C) + dot(qr + C, j.pe_new + b * R, R);
    const float mx = std::max(m[r], zt);
    const float keep = m[r] == -INFINITY ? 0.f : std::exp(m[r] - mx), e = std::exp(zt - mx);
    float* o = ol + r * C;
    for (int64_t k = 0; k < C; ++k) o[k] = o[k] * keep + e * cn[k];
    l[r] = l[r] * keep + e;
    m[r] = mx;
  }
}

thread_local std::vector<float> combined;

// phase 3, one unit per head n, every (b, s): the chunks combined (each scaled by exp(m - max m)) and divided by
// the total sum, then times W_UV[n] (read once)
template <class W>
void output_unit(void* data, size_t unit) {
  const AttnJob<W>& j = *static_cast<const AttnJob<W>*>(data);
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
  if (j.uv_scale != nullptr) {
    const float* sc = j.uv_scale + n * j.Vd;
    for (int64_t m = 0; m < M; ++m) {
      float* o = j.out + m * N * j.Vd + n * j.Vd;
      for (int64_t v = 0; v < j.Vd; ++v) o[v] *= sc[v];
    }
  }
}

struct AttnScratch {  // the calling thread's, kept across calls
  std::vector<float> q, kt, part_ol, part_m, part_l;
};
thread_local AttnScratch attn_scratch;

// The three phases on raw buffers (shapes checked by the caller): `a`'s pointers and sizes, W_UK / W_UV as `W`
// (`uk_scale` / `uv_scale`: int8 weights' column scales, N*C and N*Vd values; null for float weights)
template <class W>
void attention_core(const Parallel& par, const AttentionArgs& a, const W* w_uk, const W* w_uv,
                    const float* uk_scale, const float* uv_scale) {
  const int64_t B = a.B, S = a.S, N = a.N, C = a.C, R = a.R, P = a.P;
  if (B * S * N == 0) return;
  const int64_t sb = std::max<int64_t>(1, kBlockRows / N), nsb = (S + sb - 1) / sb;
  const int64_t extent = a.extent < 0 ? P : std::min(P, a.extent);
  const int64_t chunk = S == 1 && par.threads() > 0 ? decode_chunk_columns(extent, B, par.threads())
                                                    : chunk_columns(extent);
  const int64_t past_chunks = (extent + chunk - 1) / chunk;
  const bool fold = S == 1 && past_chunks > 0;
  const int64_t chunks = past_chunks + (fold ? 0 : (S + kChunk - 1) / kChunk);
  AttnScratch& s = attn_scratch;
  fit(s.q, static_cast<size_t>(B * S * N * (C + R)));
  fit(s.kt, static_cast<size_t>(B * (C + R) * S));
  const bool columns = S >= kW;  // fewer new tokens are scored by dot products from their rows (chunk_unit)
  const int64_t units = B * nsb * chunks;
  fit(s.part_m, static_cast<size_t>(units * sb * N));
  fit(s.part_l, static_cast<size_t>(units * sb * N));
  fit(s.part_ol, static_cast<size_t>(units * sb * N * C));
  const float *cn = a.c_new, *pn = a.pe_new;
  for (int64_t b = 0; columns && b < B; ++b)  // the new tokens' latents as columns, [C + R, S] per row
    for (int64_t t = 0; t < S; ++t) {
      float* kt = s.kt.data() + b * (C + R) * S + t;
      for (int64_t k = 0; k < C; ++k) kt[k * S] = cn[(b * S + t) * C + k];
      for (int64_t k = 0; k < R; ++k) kt[(C + k) * S] = pn[(b * S + t) * R + k];
    }
  AttnJob<W> job{a.q_nope, a.q_pe, cn, pn, a.past_c, a.past_pe, w_uk, w_uv, uk_scale, uv_scale, a.past_valid,
                 a.new_valid, a.scale, a.out, B, S, N, a.D, R, C, P, a.Vd, sb, nsb, chunk, past_chunks, chunks,
                 extent, fold, s.q.data(), s.kt.data(), s.part_ol.data(), s.part_m.data(), s.part_l.data()};
  par.run(query_unit<W>, static_cast<size_t>(N), &job);
  par.run(chunk_unit<W>, static_cast<size_t>(units), &job);
  par.run(output_unit<W>, static_cast<size_t>(N), &job);
}

// One call of either kernel: shapes checked, scratch fitted, the three phases run. `uk_scale` / `uv_scale`
// (int8 weights: the column scales, N*C and N*Vd values) are null for float weights.
template <class W>
void run_attention(OrtKernelContext* context, float scale, const Ort::Custom::Tensor<float>& q_nope,
                   const Ort::Custom::Tensor<float>& q_pe, const Ort::Custom::Tensor<float>& c_new,
                   const Ort::Custom::Tensor<float>& pe_new, const Ort::Custom::Tensor<float>& past_c,
                   const Ort::Custom::Tensor<float>& past_pe, const Ort::Custom::Tensor<bool>& past_valid,
                   const Ort::Custom::Tensor<bool>& new_valid, const Ort::Custom::Tensor<W>& w_uk,
                   const Ort::Custom::Tensor<float>* uk_scale, const Ort::Custom::Tensor<W>& w_uv_t,
                   const Ort::Custom::Tensor<float>* uv_scale, Ort::Custom::Tensor<float>& output) {
  const std::vector<int64_t> qs = q_nope.Shape(), cs = c_new.Shape(), ps = pe_new.Shape(), pcs = past_c.Shape(),
                             pps = past_pe.Shape(), ks = w_uk.Shape(), vs = w_uv_t.Shape();
  if (qs.size() != 4 || cs.size() != 3 || ps.size() != 3 || pcs.size() != 3 || pps.size() != 3 || ks.size() != 3 ||
      vs.size() != 3)
    ORT_CXX_API_THROW("r1c.cpu::MLAAttention: ranks: q_nope 4, c_new/pe_new/past_c/past_pe/w_uk/w_uv_t 3",
                      ORT_INVALID_ARGUMENT);
  const int64_t B = qs[0], S = qs[1], N = qs[2], D = qs[3], C = cs[2], R = ps[2], P = pcs[2], Vd = vs[2];
  if (cs[0] != B || cs[1] != S || ps[0] != B || ps[1] != S || pcs[0] != B || pcs[1] != C || pps[0] != B ||
      pps[1] != R || pps[2] != P || ks[0] != N || ks[1] != D || ks[2] != C || vs[0] != N || vs[1] != C ||
      q_pe.NumberOfElement() != B * S * N * R)
    ORT_CXX_API_THROW("r1c.cpu::MLAAttention: shapes disagree (q_nope [B, S, N, D], q_pe B*S*N*R, c_new "
                      "[B, S, C], pe_new [B, S, R], past_c [B, C, P], past_pe [B, R, P], w_uk [N, D, C], "
                      "w_uv_t [N, C, Vd])", ORT_INVALID_ARGUMENT);
  if ((uk_scale != nullptr && uk_scale->NumberOfElement() != N * C) ||
      (uv_scale != nullptr && uv_scale->NumberOfElement() != N * Vd))
    ORT_CXX_API_THROW("r1c.cpu::MLAAttentionInt8: w_uk_scale needs N*C values and w_uv_t_scale N*Vd ([N, 1, C], "
                      "[N, 1, Vd])", ORT_INVALID_ARGUMENT);
  float* y = output.Allocate({B, S, N * Vd});
  AttentionArgs args{q_nope.Data(), q_pe.Data(), c_new.Data(), pe_new.Data(), past_c.Data(), past_pe.Data(),
                     nullptr, nullptr,
                     make_mask(past_valid, B, S * N, P, "r1c.cpu::MLAAttention", "past_valid"),
                     make_mask(new_valid, B, S * N, S, "r1c.cpu::MLAAttention", "new_valid"),
                     scale, B, S, N, D, R, C, P, Vd, y};
  attention_core<W>(Parallel{context}, args, w_uk.Data(), w_uv_t.Data(),
                    uk_scale != nullptr ? uk_scale->Data() : nullptr, uv_scale != nullptr ? uv_scale->Data() : nullptr);
}

struct ScaleAttr {  // the `scale` attribute, or the constructor's error (returned by Compute)
  float scale_ = 1.f;
  std::string error_;

  ScaleAttr(const OrtKernelInfo* info, const char* op) {
    try {
      scale_ = Ort::ConstKernelInfo(info).GetAttribute<float>("scale");
    } catch (const std::exception& e) {
      error_ = std::string(op) + ": " + e.what();
    }
  }
};

struct AttentionKernel : ScaleAttr {
  AttentionKernel(const OrtApi* api, const OrtKernelInfo* info) : ScaleAttr(info, "r1c.cpu::MLAAttention") {
    (void)api;
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& q_nope,
                      const Ort::Custom::Tensor<float>& q_pe, const Ort::Custom::Tensor<float>& c_new,
                      const Ort::Custom::Tensor<float>& pe_new, const Ort::Custom::Tensor<float>& past_c,
                      const Ort::Custom::Tensor<float>& past_pe, const Ort::Custom::Tensor<bool>& past_valid,
                      const Ort::Custom::Tensor<bool>& new_valid, const Ort::Custom::Tensor<float>& w_uk,
                      const Ort::Custom::Tensor<float>& w_uv_t, Ort::Custom::Tensor<float>& output) {
    return as_status("r1c.cpu::MLAAttention", error_, [&] {
      run_attention<float>(context, scale_, q_nope, q_pe, c_new, pe_new, past_c, past_pe, past_valid, new_valid,
                           w_uk, nullptr, w_uv_t, nullptr, output);
    });
  }
};

struct AttentionInt8Kernel : ScaleAttr {
  AttentionInt8Kernel(const OrtApi* api, const OrtKernelInfo* info)
      : ScaleAttr(info, "r1c.cpu::MLAAttentionInt8") {
    (void)api;
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& q_nope,
                      const Ort::Custom::Tensor<float>& q_pe, const Ort::Custom::Tensor<float>& c_new,
                      const Ort::Custom::Tensor<float>& pe_new, const Ort::Custom::Tensor<float>& past_c,
                      const Ort::Custom::Tensor<float>& past_pe, const Ort::Custom::Tensor<bool>& past_valid,
                      const Ort::Custom::Tensor<bool>& new_valid, const Ort::Custom::Tensor<int8_t>& w_uk_q,
                      const Ort::Custom::Tensor<float>& w_uk_scale, const Ort::Custom::Tensor<int8_t>& w_uv_t_q,
                      const Ort::Custom::Tensor<float>& w_uv_t_scale, Ort::Custom::Tensor<float>& output) {
    return as_status("r1c.cpu::MLAAttentionInt8", error_, [&] {
      run_attention<int8_t>(context, scale_, q_nope, q_pe, c_new, pe_new, past_c, past_pe, past_valid, new_valid,
                            w_uk_q, &w_uk_scale, w_uv_t_q, &w_uv_t_scale, output);
    });
  }
};

}  // namespace

Mask make_mask(const Ort::Custom::Tensor<bool>& t, int64_t B, int64_t rows, int64_t cols, const char* op,
               const char* name) {
  std::vector<int64_t> s = t.Shape();
  if (s.size() > 3) ORT_CXX_API_THROW(std::string(op) + ": " + name + " has rank > 3", ORT_INVALID_ARGUMENT);
  while (s.size() < 3) s.insert(s.begin(), 1);
  if ((s[0] != 1 && s[0] != B) || (s[1] != 1 && s[1] != rows) || s[2] != cols)
    ORT_CXX_API_THROW(std::string(op) + ": " + name + " does not broadcast to [B, S*N, " + std::to_string(cols) +
                      "]", ORT_INVALID_ARGUMENT);
  Mask m;
  m.data = t.Data();
  m.i_stride = s[1] == 1 ? 0 : cols;
  m.b_stride = s[0] == 1 ? 0 : s[1] * cols;
  return m;
}

void mla_attention(const Parallel& par, const AttentionArgs& a) {
  attention_core<float>(par, a, a.w_uk, a.w_uv_t, nullptr, nullptr);
}

Ort::Custom::OrtLiteCustomOp* make_attention_op() {
  return Ort::Custom::CreateLiteCustomOp<AttentionKernel>("MLAAttention", "CPUExecutionProvider");
}

Ort::Custom::OrtLiteCustomOp* make_attention_int8_op() {
  return Ort::Custom::CreateLiteCustomOp<AttentionInt8Kernel>("MLAAttentionInt8", "CPUExecutionProvider");
}

}  // namespace r1c_cpu
