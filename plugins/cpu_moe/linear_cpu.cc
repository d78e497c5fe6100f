// r1c's CPU kernel library for ONNX Runtime: `r1c.cpu::Linear`, a float32 MatMul by a constant weight packed in
// panels (spec.py `LINEAR_SPEC`, `pack_linear`; the pass passes/use_cpu_linear_kernel.py swaps it in). The same
// outer-product tiles as the experts (panels.h): every panel one sequential stream, shared among ORT's threads
// (or the native decode step's team: `linear_rows` takes either, panels.h `Parallel`).
#include "kernels.h"

namespace r1c_cpu {
namespace {

// r1c.cpu::Linear: y [.., N] = x [.., K] @ W [K, N], W packed like the experts' fc2 ([P, K, 32], P = ceil(N / 32),
// panel p = output columns 32p .. 32p + 31 for each input index; zero past N). Work unit: one panel, all tokens.
struct LinearJob {
  const float* w;
  float* y;
  int64_t tokens, k, n;
  const float* const* xs;
};

void linear_block(void* data, size_t b) {
  const LinearJob& j = *static_cast<const LinearJob*>(data);
  const int64_t n0 = static_cast<int64_t>(b) * kPanel, cols = std::min<int64_t>(kPanel, j.n - n0);
  const float* panel = j.w + static_cast<int64_t>(b) * j.k * kPanel;
  panel_times_tokens(panel, j.k, j.xs, static_cast<int>(j.tokens), [&](int t, const vf* acc) {
    float* dst = j.y + t * j.n + n0;
    if (cols == kPanel) {
      for (int v = 0; v < kNV; ++v) store(dst + v * kW, acc[v]);
    } else {
      for (int64_t i = 0; i < cols; ++i) dst[i] = acc[i / kW][i % kW];
    }
  });
}

struct LinearScratch {
  std::vector<float> xpad;
  std::vector<const float*> xs;
};
thread_local LinearScratch linear_scratch;

// The T rows of x [T, K] as the tiles read them: x itself for one token, else copied re-strided by kPad (panels.h)
// into the calling thread's scratch (valid until its next call)
const float* const* token_rows(const float* x, int64_t T, int64_t K) {
  LinearScratch& s = linear_scratch;
  s.xs.resize(T);
  if (T == 1) {
    s.xs[0] = x;
    return s.xs.data();
  }
  fit(s.xpad, static_cast<size_t>(T * (K + kPad)));
  for (int64_t t = 0; t < T; ++t) {
    std::copy(x + t * K, x + (t + 1) * K, s.xpad.data() + t * (K + kPad));
    s.xs[t] = s.xpad.data() + t * (K + kPad);
  }
  return s.xs.data();
}

struct LinearKernel {
  int64_t n_ = 0;
  std::string error_;

  LinearKernel(const OrtApi* api, const OrtKernelInfo* info) {
    (void)api;
    try {
      n_ = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("n");
    } catch (const std::exception& e) {
      error_ = std::string("r1c.cpu::Linear: ") + e.what();
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& input,
                      const Ort::Custom::Tensor<float>& weight, Ort::Custom::Tensor<float>& output) {
    return as_status("r1c.cpu::Linear", error_, [&] {
      std::vector<int64_t> shape = input.Shape();
      const std::vector<int64_t> w = weight.Shape();
      if (shape.empty() || w.size() != 3 || w[2] != kPanel || w[1] != shape.back() || n_ < 1 ||
          w[0] != panels(n_))
        ORT_CXX_API_THROW("r1c.cpu::Linear: input [.., K], packed weight [ceil(n / 32), K, 32]", ORT_INVALID_ARGUMENT);
      const int64_t K = shape.back();
      const int64_t T = K > 0 ? input.NumberOfElement() / K : 0;
      shape.back() = n_;
      float* y = output.Allocate(shape);
      linear_rows(Parallel{context}, weight.Data(), K, n_, input.Data(), T, y);
    });
  }
};

}  // namespace

void linear_rows(const Parallel& par, const float* w, int64_t K, int64_t n, const float* x, int64_t T, float* y) {
  if (T == 0) return;
  const float* const* xs = token_rows(x, T, K);
  LinearJob job{w, y, T, K, n, xs};
  par.run(linear_block, static_cast<size_t>(panels(n)), &job);
}

void linear_panel(const float* w, int64_t K, int64_t n, const float* const* xs, int64_t T, float* y, size_t b) {
  LinearJob job{w, y, T, K, n, xs};
  linear_block(&job, b);
}

void linear_rows_pair(const Parallel& par, const float* x, int64_t T, int64_t K, const float* w_a, int64_t n_a,
                      float* y_a, const float* w_b, int64_t n_b, float* y_b) {
  if (T == 0) return;
  const float* const* xs = token_rows(x, T, K);
  struct Pair {
    LinearJob a, b;
    size_t split;
  } pair{{w_a, y_a, T, K, n_a, xs}, {w_b, y_b, T, K, n_b, xs}, static_cast<size_t>(panels(n_a))};
  auto unit = [](void* data, size_t u) {
    Pair& p = *static_cast<Pair*>(data);
    if (u < p.split)
      linear_block(&p.a, u);
    else
      linear_block(&p.b, u - p.split);
  };
  par.run(unit, pair.split + static_cast<size_t>(panels(n_b)), &pair);
}

Ort::Custom::OrtLiteCustomOp* make_linear_op() {
  return Ort::Custom::CreateLiteCustomOp<LinearKernel>("Linear", "CPUExecutionProvider");
}

}  // namespace r1c_cpu
