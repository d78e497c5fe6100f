// r1c's CPU kernel library for ONNX Runtime: `r1c.cpu::MoE`, routed experts for decode and prefill.
//
// The op takes what ONNX Runtime's com.microsoft.MoE takes in the form r1c's lowering emits it
// (passes/lower_moe_to_ort.py: SwiGLU with gate/up rows interleaved, silu, no biases) and computes the same
// function; its definition is r1c/plugins/cpu_moe/spec.py. What differs is how the work is shared: ORT's kernel
// gives each thread a contiguous range of expert indices, so the k experts a decoding token picks rarely split
// evenly, and its per-expert GEMM packs the weights on every call. Here every selected expert's rows are cut into
// blocks of equal size, the blocks of all selected experts are shared among ORT's intra-op threads
// (KernelContext_ParallelFor), and each block streams its weight rows once, straight from the initializer,
// against every token routed to that expert (register tiles of R weight rows x C tokens).
//
// Legend: T tokens, H hidden size, E experts, I expert intermediate size, k experts per token,
// A = T*k (token, expert) assignments. Shapes: input [.., H] float32; router_probs [T, E] float32;
// fc1 [E, 2I, H] float32, rows g0, u0, g1, u1, ... (gate row j then up row j); fc2 [E, H, I] float32;
// output like input.
//   weights  normalize_routing_weights=1: softmax over the k largest router_probs of a token (ties: the higher
//            expert index first, as ORT's MoE); =0: softmax over all E, taken at those k.
//   h[a, j]  silu(fc1_e[2j] . x_t) * (fc1_e[2j+1] . x_t)          a = (t, e)
//   y[t, n]  sum over the token's k experts of weight_a * (fc2_e[n] . h[a])
//
// Built by r1c (r1c/plugins/cpu_moe/library.py: g++ -O3 for x86-64-v3 and -v4, against ONNX Runtime's C/C++ API
// headers) and registered per session with SessionOptions.register_custom_ops_library.
//
// No C++ exception leaves this library: ORT calls it through C function pointers. The kernel's constructor
// keeps a bad attribute's message and Compute returns it, and Compute returns every error as an Ort::Status
// (the lite API's KernelComputeV2), so a bad shape or a failed allocation is an ORT error, never a crash.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#define R1C_STR2(x) #x
#define R1C_STR(x) R1C_STR2(x)

namespace {

#if defined(__AVX512F__)
constexpr int kW = 16;  // floats per vector register
constexpr int kTileRows = 4;
#define R1C_TILE_COLS 6  // 24 accumulators + 6 activations + 1 weight of the 32 registers
#define R1C_LANES(f) f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7), f(8), f(9), f(10), f(11), f(12), f(13), f(14), f(15)
#elif defined(__AVX__)
constexpr int kW = 8;
constexpr int kTileRows = 2;
#define R1C_TILE_COLS 4  // 8 accumulators + 4 activations + 1 weight of the 16 registers
#define R1C_LANES(f) f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7)
#else
constexpr int kW = 4;
constexpr int kTileRows = 1;
#define R1C_TILE_COLS 4
#define R1C_LANES(f) f(0), f(1), f(2), f(3)
#endif
constexpr int kTileCols = R1C_TILE_COLS;  // tokens per register tile (kTileRows * kTileCols accumulators)
// Measured on a 2-core Zen 4 VM (AVX-512), 64 experts, H 1024, I 256: prefetching the next tile's rows helps the
// multi-token tiles; 16 pairs per fc1 block beat 32.
constexpr int64_t kFc1Pairs = 16; // (gate, up) row pairs per fc1 work block (2 * kFc1Pairs % kW == 0)
// Activation rows (the input's, the SwiGLU outputs) are re-strided by kPad floats so that a tile's rows, H or I
// floats apart (4 KiB for H = 1024), do not all fall into one L1 set: measured +25% for 4 and 32 tokens.
constexpr int64_t kPad = 16;
constexpr int64_t kFc2Rows = 32;  // output rows per fc2 work block (a multiple of kW)

typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Lane i of the result = the sum of v[i]'s lanes, for kW vectors (a transpose-and-add tree: kW - 1 steps of two
// shuffles and an add, instead of a horizontal sum per vector).
inline vf reduce_lanes(vf* v) {
#define R1C_EVEN(i) 2 * (i)
#define R1C_ODD(i) 2 * (i) + 1
  const vi even = {R1C_LANES(R1C_EVEN)}, odd = {R1C_LANES(R1C_ODD)};
#undef R1C_EVEN
#undef R1C_ODD
  for (int n = kW; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i)
      v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], even) + __builtin_shuffle(v[2 * i], v[2 * i + 1], odd);
  return v[0];
}

// out[r * C + c] = w[r, :K] . xs[c][:K] for an R x C tile (R * C <= 2 kW); weight rows `ldw` floats apart.
template <int R, int C>
inline void dot_tile(const float* w, int64_t ldw, const float* const* xs, int64_t K, float* out) {
  static_assert(R * C <= 2 * kW, "one accumulator per lane of two reduced vectors");
  const float* x[C];  // held in registers: loads through `xs` inside the loop would be re-read after every store
  for (int c = 0; c < C; ++c) x[c] = xs[c];
  vf acc[2 * kW];
  for (int i = 0; i < 2 * kW; ++i) acc[i] = vf{};
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    vf xv[C];
    for (int c = 0; c < C; ++c) xv[c] = load(x[c] + k);
    for (int r = 0; r < R; ++r) {
      // Several tokens reuse a tile of weight rows from L1 while the next tile's rows are fetched.
      __builtin_prefetch(w + (r + R) * ldw + k);
      const vf wv = load(w + r * ldw + k);
      for (int c = 0; c < C; ++c) acc[r * C + c] += wv * xv[c];
    }
  }
  vf sums[2];
  sums[0] = reduce_lanes(acc);
  if (R * C > kW) sums[1] = reduce_lanes(acc + kW);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = sums[(r * C + c) / kW][(r * C + c) % kW];
      for (int64_t t = k; t < K; ++t) s += w[r * ldw + t] * x[c][t];
      out[r * C + c] = s;
    }
}

// out[i * C + c] = w[i, :K] . xs[c][:K] for kSeqRows<C> consecutive rows, read one row after the other: one
// sequential stream, which the hardware prefetchers follow best (measured: 20-25% more bandwidth than rows read
// side by side), with kSeqChains<C> independent accumulators per (row, vector) to cover the FMA latency. For the
// one or two tokens an expert gets at decode (C <= 2).
template <int C>
constexpr int kSeqRows = kW / C;
template <int C>
constexpr int kSeqChains = C == 1 ? 8 : 4;

template <int C>
inline void seq_tile(const float* w, int64_t ldw, const float* const* xs, int64_t K, float* out) {
  constexpr int R = kSeqRows<C>, A = kSeqChains<C>;
  const float* x[C];
  for (int c = 0; c < C; ++c) x[c] = xs[c];
  vf sums[kW];
  for (int i = 0; i < kW; ++i) sums[i] = vf{};
  for (int i = 0; i < R; ++i) {
    const float* row = w + i * ldw;
    vf acc[C][A];
    for (int c = 0; c < C; ++c)
      for (int a = 0; a < A; ++a) acc[c][a] = vf{};
    int64_t k = 0;
    for (; k + A * kW <= K; k += A * kW)
      for (int a = 0; a < A; ++a) {
        const vf wv = load(row + k + a * kW);
        for (int c = 0; c < C; ++c) acc[c][a] += wv * load(x[c] + k + a * kW);
      }
    for (; k + kW <= K; k += kW) {
      const vf wv = load(row + k);
      for (int c = 0; c < C; ++c) acc[c][0] += wv * load(x[c] + k);
    }
    for (int c = 0; c < C; ++c) {
      vf sum = acc[c][0];
      for (int a = 1; a < A; ++a) sum += acc[c][a];
      float tail = 0.f;
      for (int64_t t = k; t < K; ++t) tail += row[t] * x[c][t];
      sum[0] += tail;
      sums[i * C + c] = sum;
    }
  }
  const vf reduced = reduce_lanes(sums);
  for (int i = 0; i < R * C; ++i) out[i] = reduced[i];
}

// Rows [r0, r1) against `cols` <= kTileCols vectors with seq_tile<C>: fn(r, c, value); returns the first row left.
template <int C, typename Fn>
inline int64_t seq_rows(const float* w, int64_t ldw, int64_t r0, int64_t r1, const float* const* xs, int64_t K,
                        Fn&& fn) {
  constexpr int R = kSeqRows<C>;
  float out[kW];
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    seq_tile<C>(w + r * ldw, ldw, xs, K, out);
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < R; ++i) fn(r + i, c, out[i * C + c]);
  }
  return r;
}

// The same for any C <= kTileCols (a run-time count) with a compile-time R.
template <int R>
inline void dot_rows(const float* w, int64_t ldw, const float* const* xs, int cols, int64_t K, float* out) {
  switch (cols) {
    case 1: dot_tile<R, 1>(w, ldw, xs, K, out); break;
    case 2: dot_tile<R, 2>(w, ldw, xs, K, out); break;
    case 3: dot_tile<R, 3>(w, ldw, xs, K, out); break;
#if R1C_TILE_COLS > 4
    case 4: dot_tile<R, 4>(w, ldw, xs, K, out); break;
    case 5: dot_tile<R, 5>(w, ldw, xs, K, out); break;
    default: dot_tile<R, 6>(w, ldw, xs, K, out); break;
#else
    default: dot_tile<R, 4>(w, ldw, xs, K, out); break;
#endif
  }
}

// Rows [r0, r1) of a row-major weight against `cols` vectors: fn(r, c, value) for each, rows in order for each
// vector. A tile of weight rows meets every vector before the next tile is read (the tile stays in L1).
template <typename Fn>
inline void rows_times_vectors(const float* w, int64_t ldw, int64_t r0, int64_t r1, const float* const* xs,
                               int cols, int64_t K, Fn&& fn) {
  float out[2 * kW];
  int64_t r = r0;
  switch (cols) {  // one or two tokens of an expert (decode): rows in sequence; from 3 on the tiles below do better
    case 1: r = seq_rows<1>(w, ldw, r0, r1, xs, K, fn); break;
    case 2: r = seq_rows<2>(w, ldw, r0, r1, xs, K, fn); break;
    default: break;
  }
  for (; r + kTileRows <= r1; r += kTileRows) {
    for (int c0 = 0; c0 < cols; c0 += kTileCols) {
      const int nc = std::min(kTileCols, cols - c0);
      dot_rows<kTileRows>(w + r * ldw, ldw, xs + c0, nc, K, out);
      for (int c = 0; c < nc; ++c)
        for (int i = 0; i < kTileRows; ++i) fn(r + i, c0 + c, out[i * nc + c]);
    }
  }
  for (; r < r1; ++r) {
    for (int c0 = 0; c0 < cols; c0 += kTileCols) {
      const int nc = std::min(kTileCols, cols - c0);
      dot_rows<1>(w + r * ldw, ldw, xs + c0, nc, K, out);
      for (int c = 0; c < nc; ++c) fn(r, c0 + c, out[c]);
    }
  }
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// Per-call scratch, grown only when a larger call comes (one per calling thread: concurrent runs do not share).
struct Scratch {
  std::vector<int64_t> count, offset, fill;  // [E], [E + 1], [E]
  std::vector<int64_t> slot_token;           // [A] token of each slot, slots grouped by expert
  std::vector<float> slot_weight;            // [A]
  std::vector<int64_t> order;                // [E] top-k selection buffer
  std::vector<int64_t> chosen;               // [A] expert of assignment t*k + i
  std::vector<float> chosen_weight;          // [A]
  std::vector<float> h;                      // [A, I + kPad]
  std::vector<float> xpad;                   // [T, H + kPad] the input's rows, re-strided
  std::vector<const float*> xs;              // [A] activation row of each slot (fc1), h row of each slot (fc2)
  std::vector<const float*> hs;              // [A]
  std::vector<int64_t> touched;              // experts with at least one token
  std::vector<int64_t> block_expert, block_start;  // fc1 work blocks
};

thread_local Scratch scratch;

// Scratch kept after a long prefill would stay with the thread for good (4096 tokens x 8 experts x I 2048 floats
// is 270 MB); past kKeepBytes, a buffer four times larger than the call needs is let go and allocated anew.
constexpr size_t kKeepBytes = size_t{64} << 20;

template <typename T>
void release_if_oversized(std::vector<T>& v, size_t needed) {
  if (v.capacity() * sizeof(T) > kKeepBytes && v.capacity() > 4 * needed) std::vector<T>().swap(v);
}

struct Job {
  const float* x;
  const float* fc1;
  const float* fc2;
  float* y;
  int64_t tokens, hidden, inter;
  Scratch* s;
};

void fc1_block(void* data, size_t b) {
  const Job& j = *static_cast<const Job*>(data);
  Scratch& s = *j.s;
  const int64_t e = s.block_expert[b], p0 = s.block_start[b], p1 = std::min(p0 + kFc1Pairs, j.inter);
  const int64_t first = s.offset[e], cols = s.offset[e + 1] - first;
  const float* w = j.fc1 + e * 2 * j.inter * j.hidden;
  float* h = s.h.data();
  const int64_t ldh = j.inter + kPad;
  // rows 2*p0 .. 2*p1: gate/up pairs; a pair's two values meet in one tile (tile rows are even).
  rows_times_vectors(w, j.hidden, 2 * p0, 2 * p1, s.xs.data() + first, static_cast<int>(cols), j.hidden,
                     [&](int64_t r, int c, float v) {
                       float* dst = h + (first + c) * ldh + (r >> 1);
                       if ((r & 1) == 0) {
                         *dst = v;  // gate dot; the up dot of the same pair follows in the same tile
                       } else {
                         *dst = silu(*dst) * v;
                       }
                     });
}

void fc2_block(void* data, size_t b) {
  const Job& j = *static_cast<const Job*>(data);
  Scratch& s = *j.s;
  const int64_t n0 = static_cast<int64_t>(b) * kFc2Rows, n1 = std::min(n0 + kFc2Rows, j.hidden);
  for (int64_t t = 0; t < j.tokens; ++t) std::fill(j.y + t * j.hidden + n0, j.y + t * j.hidden + n1, 0.f);
  for (const int64_t e : s.touched) {
    const int64_t first = s.offset[e], cols = s.offset[e + 1] - first;
    const float* w = j.fc2 + e * j.hidden * j.inter;
    rows_times_vectors(w, j.inter, n0, n1, s.hs.data() + first, static_cast<int>(cols), j.inter,
                       [&](int64_t n, int c, float v) {
                         const int64_t slot = first + c;
                         j.y[s.slot_token[slot] * j.hidden + n] += s.slot_weight[slot] * v;
                       });
  }
}

struct MoEKernel {
  int64_t k_ = 0;
  int64_t normalize_ = 1;
  std::string error_;  // a constructor error, returned by Compute (the lite API's CreateKernel must not throw)

  MoEKernel(const OrtApi* api, const OrtKernelInfo* info) {
    (void)api;
    try {
      Ort::ConstKernelInfo ki(info);
      k_ = ki.GetAttribute<int64_t>("k");
      normalize_ = ki.GetAttribute<int64_t>("normalize_routing_weights");
    } catch (const std::exception& e) {
      error_ = std::string("r1c.cpu::MoE: ") + e.what();
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& input,
                      const Ort::Custom::Tensor<float>& router_probs, const Ort::Custom::Tensor<float>& fc1,
                      const Ort::Custom::Tensor<float>& fc2, Ort::Custom::Tensor<float>& output) {
    if (!error_.empty()) return Ort::Status(error_.c_str(), ORT_INVALID_ARGUMENT);
    try {
      Run(context, input, router_probs, fc1, fc2, output);
    } catch (const Ort::Exception& e) {
      return Ort::Status(e.what(), e.GetOrtErrorCode());
    } catch (const std::exception& e) {
      return Ort::Status((std::string("r1c.cpu::MoE: ") + e.what()).c_str(), ORT_FAIL);
    }
    return Ort::Status{nullptr};
  }

  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& input,
           const Ort::Custom::Tensor<float>& router_probs, const Ort::Custom::Tensor<float>& fc1,
           const Ort::Custom::Tensor<float>& fc2, Ort::Custom::Tensor<float>& output) {
    const std::vector<int64_t> xshape = input.Shape();
    const std::vector<int64_t> pshape = router_probs.Shape();
    const std::vector<int64_t> w1 = fc1.Shape();
    const std::vector<int64_t> w2 = fc2.Shape();
    if (xshape.empty() || pshape.size() != 2 || w1.size() != 3 || w2.size() != 3)
      ORT_CXX_API_THROW("r1c.cpu::MoE: input [.., H], router_probs [T, E], fc1 [E, 2I, H], fc2 [E, H, I]",
                        ORT_INVALID_ARGUMENT);
    const int64_t H = xshape.back();
    const int64_t T = H > 0 ? input.NumberOfElement() / H : 0;
    const int64_t E = pshape[1], I = w2[2];
    if (pshape[0] != T || w1[0] != E || w1[1] != 2 * I || w1[2] != H || w2[0] != E || w2[1] != H)
      ORT_CXX_API_THROW("r1c.cpu::MoE: shapes disagree (input [T, H], router_probs [T, E], fc1 [E, 2I, H], "
                        "fc2 [E, H, I])", ORT_INVALID_ARGUMENT);
    if (k_ < 1 || k_ > E) ORT_CXX_API_THROW("r1c.cpu::MoE: k must be in [1, E]", ORT_INVALID_ARGUMENT);
    float* y = output.Allocate(xshape);
    if (T == 0 || H == 0) return;

    Scratch& s = scratch;
    const int64_t K = k_, A = T * K;
    const float* probs = router_probs.Data();
    const float* x = input.Data();
    s.count.assign(E, 0);
    s.order.resize(E);
    s.chosen.resize(A);
    s.chosen_weight.resize(A);
    for (int64_t t = 0; t < T; ++t) {
      const float* p = probs + t * E;
      std::iota(s.order.begin(), s.order.end(), 0);
      // A NaN score ranks below every number (a comparison with NaN would break the sort's ordering); with
      // normalize_routing_weights=0 it also makes the token's weights NaN (the softmax over all E includes it).
      // Ties: the higher expert index first, as ORT's MoE.
      const auto score = [p](int64_t e) { return std::isnan(p[e]) ? -INFINITY : p[e]; };
      std::partial_sort(s.order.begin(), s.order.begin() + K, s.order.end(), [&score](int64_t a, int64_t b) {
        const float sa = score(a), sb = score(b);
        return sa > sb || (sa == sb && a > b);
      });
      const float top = p[s.order[0]];
      double sum = 0.0;
      if (normalize_) {
        for (int64_t i = 0; i < K; ++i) sum += std::exp(static_cast<double>(p[s.order[i]]) - top);
      } else {
        for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(p[e]) - top);
      }
      for (int64_t i = 0; i < K; ++i) {
        const int64_t e = s.order[i];
        s.chosen[t * K + i] = e;
        s.chosen_weight[t * K + i] = static_cast<float>(std::exp(static_cast<double>(p[e]) - top) / sum);
        ++s.count[e];
      }
    }
    s.offset.assign(E + 1, 0);
    for (int64_t e = 0; e < E; ++e) s.offset[e + 1] = s.offset[e] + s.count[e];
    s.fill.assign(s.offset.begin(), s.offset.end() - 1);
    s.slot_token.resize(A);
    s.slot_weight.resize(A);
    s.xs.resize(A);
    s.hs.resize(A);
    release_if_oversized(s.h, static_cast<size_t>(A * (I + kPad)));
    release_if_oversized(s.xpad, static_cast<size_t>(T * (H + kPad)));
    s.h.resize(static_cast<size_t>(A * (I + kPad)));
    s.xpad.resize(static_cast<size_t>(T * (H + kPad)));
    for (int64_t t = 0; t < T; ++t) std::copy(x + t * H, x + (t + 1) * H, s.xpad.data() + t * (H + kPad));
    for (int64_t a = 0; a < A; ++a) {
      const int64_t slot = s.fill[s.chosen[a]]++;
      s.slot_token[slot] = a / K;
      s.slot_weight[slot] = s.chosen_weight[a];
      s.xs[slot] = s.xpad.data() + (a / K) * (H + kPad);
      s.hs[slot] = s.h.data() + slot * (I + kPad);
    }
    s.touched.clear();
    s.block_expert.clear();
    s.block_start.clear();
    for (int64_t e = 0; e < E; ++e) {
      if (!s.count[e]) continue;
      s.touched.push_back(e);
      for (int64_t p0 = 0; p0 < I; p0 += kFc1Pairs) {
        s.block_expert.push_back(e);
        s.block_start.push_back(p0);
      }
    }
    Job job{x, fc1.Data(), fc2.Data(), y, T, H, I, &s};
    Ort::KernelContext ctx(context);
    ctx.ParallelFor(fc1_block, s.block_expert.size(), 0, &job);
    ctx.ParallelFor(fc2_block, static_cast<size_t>((H + kFc2Rows - 1) / kFc2Rows), 0, &job);
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)  // an ONNX Runtime older than the headers: say so through the oldest API, which every one has
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "r1c.cpu: this library needs ONNX Runtime's C API version "
                                             R1C_STR(ORT_API_VERSION) " or newer (rebuild the bundle here)");
  Ort::InitApi(api);
  static std::once_flag once;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> moe;
  try {
    std::call_once(once, [] {
      domain = std::make_unique<Ort::CustomOpDomain>("r1c.cpu");
      moe.reset(Ort::Custom::CreateLiteCustomOp<MoEKernel>("MoE", "CPUExecutionProvider"));
      domain->Add(moe.get());
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
