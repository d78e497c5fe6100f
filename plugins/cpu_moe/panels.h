// r1c's CPU kernels: what the kernels share (r1c/plugins/cpu_moe: moe_cpu.cc, linear_cpu.cc, register.cc, built
// into one library by library.py). The packed panel layout, the register tiles over it, a vector exp, scratch
// handling. Everything here is inline / internal to the library (hidden visibility).
#pragma once
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace r1c_cpu {


// The packed layout (r1c/plugins/cpu_moe/spec.py `pack_experts`, written once by the build's pass): every weight
// matrix is cut into panels of kPanel output rows, each panel stored k-major ([K][kPanel]: for each input index k
// the panel's kPanel weights side by side). A panel is one sequential stream, and a tile is an outer product: per
// k, kPanel / kW weight vectors times one broadcast activation per token, with no horizontal reduction. fc1's
// panel p holds gate rows 16p .. 16p + 15 in its first half and the up rows of the same intermediates in its
// second, so SwiGLU is applied to whole vectors as the tile ends. Rows past the matrix's end are zero.
constexpr int kPanel = 32;  // rows per panel; the layout is the same for every instruction-set level
constexpr int kHalf = kPanel / 2;
#if defined(__AVX512F__)
constexpr int kW = 16;  // floats per vector register
#define R1C_TILE_TOKENS 12  // 24 accumulators + 2 weight vectors + 1 broadcast of the 32 registers
#elif defined(__AVX__)
constexpr int kW = 8;
#define R1C_TILE_TOKENS 3   // 12 accumulators + 3 broadcasts + 1 weight vector of the 16 registers
#else
constexpr int kW = 4;
#define R1C_TILE_TOKENS 1
#endif
constexpr int kTileTokens = R1C_TILE_TOKENS;  // tokens per register tile
constexpr int kNV = kPanel / kW;               // vectors per panel row
// Activation rows (the input's, the SwiGLU outputs) are re-strided by kPad floats so that a tile's rows, H or I
// floats apart (4 KiB for H = 1024), do not all fall into one L1 set (measured +25% for 4 and 32 tokens).
constexpr int64_t kPad = 16;

typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// every lane = s: one broadcast (vbroadcastss, or folded into the FMA that uses it). Not `vf{} + s`, which GCC
// must compile as an addition to zero and then a broadcast (0 + -0 is +0, so it cannot drop the addition without
// -fno-signed-zeros): two dependent instructions per broadcast in every tile's inner loop.
inline vf splat(float s) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_set1_ps(s));
#elif defined(__AVX__)
  return reinterpret_cast<vf>(_mm256_set1_ps(s));
#else
  vf v;
  for (int i = 0; i < kW; ++i) v[i] = s;
  return v;
#endif
}

// exp on every lane: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its Taylor series to r^7
// (relative error below 2e-7 on that interval), x clamped to [-87.3, 88.7] (float's normal range). NaN stays NaN.
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.7f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (x * splat(1.44269504f) + magic) - magic;
  const vf r = (x - n * splat(0.693359375f)) + n * splat(2.12194440e-4f);  // ln 2 in two parts (Cody-Waite)
  vf p = splat(1.f / 5040.f);
  p = p * r + splat(1.f / 720.f);
  p = p * r + splat(1.f / 120.f);
  p = p * r + splat(1.f / 24.f);
  p = p * r + splat(1.f / 6.f);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.f);
  p = p * r + splat(1.f);
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline vf vsilu(vf g) { return g / (splat(1.f) + vexp(-g)); }

// acc[c][v] = sum over k < K of panel[k][v * kW .. v * kW + kW) * xs[c][k], for C tokens: an outer-product tile
// over one panel ([K][kPanel], read once from start to end).
template <int C>
inline void panel_tile(const float* panel, int64_t K, const float* const* xs, vf (&acc)[C][kNV]) {
  const float* x[C];  // held in registers: loads through `xs` inside the loop would be re-read after every store
  for (int c = 0; c < C; ++c) x[c] = xs[c];
  for (int c = 0; c < C; ++c)
    for (int v = 0; v < kNV; ++v) acc[c][v] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = panel + k * kPanel;
    if constexpr (kNV > 2) {  // 16 registers: the C broadcasts held, one weight vector at a time
      vf b[C];
      for (int c = 0; c < C; ++c) b[c] = splat(x[c][k]);
      for (int v = 0; v < kNV; ++v) {
        const vf w = load(wk + v * kW);
        for (int c = 0; c < C; ++c) acc[c][v] += w * b[c];
      }
    } else {  // 32 registers: the panel row's weight vectors held, one broadcast at a time
      vf w[kNV];
      for (int v = 0; v < kNV; ++v) w[v] = load(wk + v * kW);
      for (int c = 0; c < C; ++c) {
        const vf b = splat(x[c][k]);
        for (int v = 0; v < kNV; ++v) acc[c][v] += w[v] * b;
      }
    }
  }
}

// fn(c, acc) for the `cols` tokens xs[0 .. cols) against one panel, in tiles of at most kTileTokens tokens
// (each tile's token count a compile-time constant).
template <int C, typename Fn>
inline void tile_then(const float* panel, int64_t K, const float* const* xs, int c0, Fn& fn) {
  vf acc[C][kNV];
  panel_tile<C>(panel, K, xs + c0, acc);
  for (int c = 0; c < C; ++c) fn(c0 + c, acc[c]);
}

template <int C, typename Fn>
inline void remainder_tile(const float* panel, int64_t K, const float* const* xs, int c0, int n, Fn& fn) {
  if constexpr (C > 0) {
    if (n == C) return tile_then<C>(panel, K, xs, c0, fn);
    remainder_tile<C - 1>(panel, K, xs, c0, n, fn);
  }
}

template <typename Fn>
inline void panel_times_tokens(const float* panel, int64_t K, const float* const* xs, int cols, Fn&& fn) {
  int c0 = 0;
  for (; c0 + kTileTokens <= cols; c0 += kTileTokens) tile_then<kTileTokens>(panel, K, xs, c0, fn);
  if (c0 < cols) remainder_tile<kTileTokens - 1>(panel, K, xs, c0, cols - c0, fn);
}

// Scratch kept after a long prefill would stay with the thread for good (4096 tokens x 8 experts x I 2048 floats
// is 270 MB); past kKeepBytes, a buffer four times larger than the call needs is let go and allocated anew.
constexpr size_t kKeepBytes = size_t{64} << 20;

template <typename T>
void release_if_oversized(std::vector<T>& v, size_t needed) {
  if (v.capacity() * sizeof(T) > kKeepBytes && v.capacity() > 4 * needed) std::vector<T>().swap(v);
}

// v sized to n elements for this call (kept across calls, let go first when far larger: release_if_oversized)
template <typename T>
void fit(std::vector<T>& v, size_t n) {
  release_if_oversized(v, n);
  v.resize(n);
}

// panels of kPanel rows that n output rows (columns of a packed matrix) take
inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

// r1c's own thread team (team.cc), for the native decode step (decode_cpu.cc), which runs outside ONNX Runtime's
// executor: `threads` - 1 workers started once, each spinning on the team's generation counter for `kSpinUs`
// after its last unit and then sleeping on a condition variable, so a parallel loop between two others costs a
// store and a few cache-line transfers rather than a wake-up. A loop's units are dealt in contiguous ranges, one
// per thread, each thread taking its own from the front and, when done, the others' from the back; the caller
// waits for units done, not for workers, so a worker the OS has not scheduled costs nothing (team.cc). One caller
// at a time (the decoder's lock).
class Team {
 public:
  explicit Team(int threads);
  ~Team();
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;
  int threads() const { return static_cast<int>(workers_.size()) + 1; }
  // fn(data, u) for every u < n (n < 2^22) on the caller and the workers; returns when all have run
  void run(void (*fn)(void*, size_t), size_t n, void* data);

 private:
  struct alignas(64) Range {  // units [begin, end) of one thread in loop `tag` (team.cc pack)
    std::atomic<uint64_t> units{0};
  };
  void work(int slot);
  size_t drain(int slot, uint64_t tag);
  std::vector<std::thread> workers_;
  std::vector<Range> ranges_;  // [threads]: slot 0 the caller's
  // each on its own cache line: the idle workers poll generation_ while the others take units
  alignas(64) std::atomic<uint64_t> generation_{0};
  alignas(64) std::atomic<size_t> done_{0};  // units of the current loop run to the end
  void (*fn_)(void*, size_t) = nullptr;
  void* data_ = nullptr;
  std::mutex mutex_;
  std::condition_variable wake_;
  int sleeping_ = 0;
  std::atomic<bool> stop_{false};
  int forks_;  // the process's fork count when the team was made (team.cc: a forked child runs loops alone)
};

// Where a kernel's parallel loops run: ONNX Runtime's intra-op threads (inside a node: KernelContext_ParallelFor)
// or r1c's `Team` (the native decode step). fn(data, u) for every u < n, then return.
struct Parallel {
  OrtKernelContext* context = nullptr;
  Team* team = nullptr;
  // the threads a loop is shared among: the team's; 0 inside an ONNX Runtime node (its C API does not say)
  int threads() const { return team != nullptr ? team->threads() : 0; }
  void run(void (*fn)(void*, size_t), size_t n, void* data) const {
    if (team != nullptr)
      team->run(fn, n, data);
    else
      Ort::KernelContext(context).ParallelFor(fn, n, 0, data);
  }
};

// y[0 .. n) = x * (1 / sqrt(mean(x^2) + eps)) * w, the mean in double (ONNX SimplifiedLayerNormalization; times
// the reciprocal, the form closest to ONNX Runtime 1.32's CPU kernel: within 2e-7). y may be x.
inline void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * w[i];
}

// What every kernel's Compute returns: `body` run as an Ort::Status (no exception leaves the library: ORT calls
// it through C function pointers). `error`, a constructor's message (a bad attribute), is returned first; ORT's
// exceptions keep their code; any other becomes ORT_FAIL named after `op`.
template <class Body>
Ort::Status as_status(const char* op, const std::string& error, Body&& body) {
  if (!error.empty()) return Ort::Status(error.c_str(), ORT_INVALID_ARGUMENT);
  try {
    body();
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return Ort::Status((std::string(op) + ": " + e.what()).c_str(), ORT_FAIL);
  }
  return Ort::Status{nullptr};
}

}  // namespace r1c_cpu
