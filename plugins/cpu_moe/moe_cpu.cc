// r1c's CPU kernel library for ONNX Runtime: `r1c.cpu::MoE`, routed experts for decode and prefill.
//
// The op computes ONNX Runtime's com.microsoft.MoE in the form r1c's lowering emits it
// (passes/lower_moe_to_ort.py: SwiGLU with gate/up rows interleaved, silu, no biases), on the same weights
// repacked once by the build (r1c/plugins/cpu_moe/spec.py, the op's definition: `pack_fc1`, `pack_fc2`). What
// differs is how the work is shared and read: ORT's kernel gives each thread a contiguous range of expert indices,
// so the k experts a decoding token picks rarely split evenly, and its per-expert GEMM packs the weights on every
// call. Here the weights are stored in panels of 32 rows (below), the panels of all selected experts are shared
// among ORT's intra-op threads (KernelContext_ParallelFor; r1c's own `Team` in the native decode step,
// decode_cpu.cc, which calls `moe_experts` with its own routing), and each panel is read once, front to back, against
// every token routed to that expert (outer-product register tiles: 32 rows x up to 12 tokens on AVX-512).
// fc2 runs per output panel over all touched experts (summing into the output as it goes), or, for a step of at
// most kFewSlots (token, expert) assignments (decode), per run of one expert's consecutive panels into a row per
// assignment, summed per token after (`fc2_slot_block`): one longer stream per unit; a decode step of the issue-11
// benchmark model, both libraries reading the same physical weights, 1.04x (1 thread) / 1.02x (2).
// Measured on a 2-core Zen 4 VM, small preset (H 512, I 256, 64 experts top-8), 1 thread, 5 MoE layers: 32 tokens
// 39.8 -> 19.8 ms (about the read bandwidth: every expert is touched), 128-token prefill 86.6 -> 48.9 ms
// (~82 GFLOP/s), against the previous kernel's dot-product tiles over unpacked rows.
//
// Legend: T tokens, H hidden size, E experts, I expert intermediate size, k experts per token,
// A = T*k (token, expert) assignments, P1 = ceil(I / 16), I16 = 16 P1, P2 = ceil(H / 32).
// Shapes: input [.., H] float32; router_probs [T, E] float32; fc1 [E, P1, H, 32] float32, panel p = for each
// input index k, gate_e[16p .. 16p+15][k] then up_e[16p .. 16p+15][k]; fc2 [E, P2, I16, 32] float32, panel q = for
// each intermediate j, down_e[32q .. 32q+31][j]; rows past I or H are zero. Output like input. With gate_e, up_e
// [I, H] and down_e [H, I] the unpacked matrices (ORT's fc1 rows 2j and 2j+1, its fc2):
//   weights  normalize_routing_weights=1: softmax over the k largest router_probs of a token (ties: the higher
//            expert index first, as ORT's MoE); =0: softmax over all E, taken at those k.
//   h[a, j]  silu(gate_e[j] . x_t) * (up_e[j] . x_t)          a = (t, e)
//   y[t, n]  sum over the token's k experts of weight_a * (down_e[n] . h[a])
//
// Built by r1c (r1c/plugins/cpu_moe/library.py: g++ -O3 for x86-64-v3 and -v4, against ONNX Runtime's C/C++ API
// headers) and registered per session with SessionOptions.register_custom_ops_library.
//
// No C++ exception leaves this library: ORT calls it through C function pointers. The kernel's constructor
// keeps a bad attribute's message and Compute returns it, and Compute returns every error as an Ort::Status
// (the lite API's KernelComputeV2), so a bad shape or a failed allocation is an ORT error, never a crash.
#include "kernels.h"

#include <numeric>

namespace r1c_cpu {
namespace {

// Per-call scratch, grown only when a larger call comes (one per calling thread: concurrent runs do not share).
struct Scratch {
  std::vector<int64_t> count, offset, fill;  // [E], [E + 1], [E]
  std::vector<int64_t> slot_token;           // [A] token of each slot, slots grouped by expert
  std::vector<float> slot_weight;            // [A]
  std::vector<float> h;                      // [A, I16 + kPad]
  std::vector<float> xpad;                   // [T, H + kPad] the input's rows, re-strided
  std::vector<const float*> xs;              // [A] activation row of each slot (fc1), h row of each slot (fc2)
  std::vector<const float*> hs;              // [A]
  std::vector<int64_t> touched;              // experts with at least one token
  std::vector<int64_t> slot_of;              // [A] slot of assignment t*k + i
  std::vector<float> part;                   // [A, P2 * 32] weighted fc2 output of each slot (the few-slot path)
  std::vector<float> shared;                 // [T, H] the shared expert's down projection (ExpertsArgs)
  std::vector<const float*> shared_xs;       // [T] its activation rows
};

thread_local Scratch scratch;

struct RouteScratch {  // the op's selection from router_probs
  std::vector<int64_t> order;   // [E] top-k selection buffer
  std::vector<int64_t> chosen;  // [A] expert of assignment t*k + i
  std::vector<float> weight;    // [A]
};
thread_local RouteScratch route_scratch;

// Shapes in the packed layout: fc1 [E, P1, H, kPanel], fc2 [E, P2, I16, kPanel] (I16 = P1 * kHalf intermediates,
// zero past I; P2 = ceil(H / kPanel) output panels, zero rows past H).
struct Job {
  const float* fc1;
  const float* fc2;
  float* y;
  int64_t tokens, hidden, inter16, p1, p2;
  Scratch* s;
  const float* shared_down;  // null: none; else packed Is -> H, run after the experts' units (fc2_slot_block)
  int64_t shared_inter;
  size_t expert_units;
};

// The few-slot fc2 path (a decode step: at most kFewSlots (token, expert) slots): work unit u is a run of up to
// kFc2Run consecutive output panels of one touched expert (4 x I16 x 32 floats, 128 KiB at I16 = 256, read front to
// back as one stream; per output panel over all experts, as below, a unit reads one 32 KiB piece of each expert in
// turn), each slot's weighted output written to its own row of `part`; the rows are summed per token afterwards.
constexpr int64_t kFewSlots = 64;
constexpr int64_t kFc2Run = 4;

// Work unit b: fc1 panel b % P1 of touched expert b / P1, against every token routed to that expert.
void fc1_block(void* data, size_t b) {
  const Job& j = *static_cast<const Job*>(data);
  Scratch& s = *j.s;
  const int64_t e = s.touched[static_cast<int64_t>(b) / j.p1], p = static_cast<int64_t>(b) % j.p1;
  const int64_t first = s.offset[e], cols = s.offset[e + 1] - first;
  const float* panel = j.fc1 + (e * j.p1 + p) * j.hidden * kPanel;
  float* h = s.h.data() + p * kHalf;
  const int64_t ldh = j.inter16 + kPad;
  panel_times_tokens(panel, j.hidden, s.xs.data() + first, static_cast<int>(cols), [&](int c, const vf* acc) {
    float* dst = h + (first + c) * ldh;
    for (int v = 0; v < kNV / 2; ++v) store(dst + v * kW, vsilu(acc[v]) * acc[v + kNV / 2]);
  });
}

// Work unit b: output panel b (rows kPanel b .. of H) for every token, summed over the touched experts.
void fc2_block(void* data, size_t b) {
  const Job& j = *static_cast<const Job*>(data);
  Scratch& s = *j.s;
  const int64_t n0 = static_cast<int64_t>(b) * kPanel, rows = std::min<int64_t>(kPanel, j.hidden - n0);
  for (int64_t t = 0; t < j.tokens; ++t) std::fill(j.y + t * j.hidden + n0, j.y + t * j.hidden + n0 + rows, 0.f);
  for (const int64_t e : s.touched) {
    const int64_t first = s.offset[e], cols = s.offset[e + 1] - first;
    const float* panel = j.fc2 + (e * j.p2 + static_cast<int64_t>(b)) * j.inter16 * kPanel;
    panel_times_tokens(panel, j.inter16, s.hs.data() + first, static_cast<int>(cols), [&](int c, const vf* acc) {
      const int64_t slot = first + c;
      const float wt = s.slot_weight[slot];
      float* dst = j.y + s.slot_token[slot] * j.hidden + n0;
      if (rows == kPanel) {
        for (int v = 0; v < kNV; ++v) store(dst + v * kW, load(dst + v * kW) + acc[v] * wt);
      } else {
        for (int64_t i = 0; i < rows; ++i) dst[i] += wt * acc[i / kW][i % kW];
      }
    });
  }
}

void fc2_slot_block(void* data, size_t u) {
  const Job& j = *static_cast<const Job*>(data);
  Scratch& s = *j.s;
  const int64_t runs = (j.p2 + kFc2Run - 1) / kFc2Run, ldp = j.p2 * kPanel;
  if (u >= j.expert_units) {  // a run of the shared expert's down panels (the Linear kernel's), every token
    const int64_t b0 = static_cast<int64_t>(u - j.expert_units) * kFc2Run;
    for (int64_t b = b0; b < std::min(j.p2, b0 + kFc2Run); ++b)
      linear_panel(j.shared_down, j.shared_inter, j.hidden, s.shared_xs.data(), j.tokens, s.shared.data(),
                   static_cast<size_t>(b));
    return;
  }
  const int64_t e = s.touched[static_cast<int64_t>(u) / runs], b0 = static_cast<int64_t>(u) % runs * kFc2Run;
  const int64_t first = s.offset[e], cols = s.offset[e + 1] - first;
  for (int64_t b = b0; b < std::min(j.p2, b0 + kFc2Run); ++b) {
    const float* panel = j.fc2 + (e * j.p2 + b) * j.inter16 * kPanel;
    panel_times_tokens(panel, j.inter16, s.hs.data() + first, static_cast<int>(cols), [&](int c, const vf* acc) {
      const int64_t slot = first + c;
      float* dst = s.part.data() + slot * ldp + b * kPanel;  // rows past H are the panel's zero rows
      for (int v = 0; v < kNV; ++v) store(dst + v * kW, acc[v] * splat(s.slot_weight[slot]));
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
    return as_status("r1c.cpu::MoE", error_, [&] { Run(context, input, router_probs, fc1, fc2, output); });
  }

  void Run(OrtKernelContext* context, const Ort::Custom::Tensor<float>& input,
           const Ort::Custom::Tensor<float>& router_probs, const Ort::Custom::Tensor<float>& fc1,
           const Ort::Custom::Tensor<float>& fc2, Ort::Custom::Tensor<float>& output) {
    const std::vector<int64_t> xshape = input.Shape();
    const std::vector<int64_t> pshape = router_probs.Shape();
    const std::vector<int64_t> w1 = fc1.Shape();
    const std::vector<int64_t> w2 = fc2.Shape();
    if (xshape.empty() || pshape.size() != 2 || w1.size() != 4 || w2.size() != 4)
      ORT_CXX_API_THROW("r1c.cpu::MoE: input [.., H], router_probs [T, E], packed fc1 [E, P1, H, 32], packed fc2 "
                        "[E, P2, I16, 32]", ORT_INVALID_ARGUMENT);
    const int64_t H = xshape.back();
    const int64_t T = H > 0 ? input.NumberOfElement() / H : 0;
    const int64_t E = pshape[1], P1 = w1[1], I16 = P1 * kHalf, P2 = panels(H);
    if (pshape[0] != T || w1[0] != E || w1[2] != H || w1[3] != kPanel || w2[0] != E || w2[1] != P2 ||
        w2[2] != I16 || w2[3] != kPanel)
      ORT_CXX_API_THROW("r1c.cpu::MoE: shapes disagree (input [T, H], router_probs [T, E], packed fc1 [E, P1, H, 32], "
                        "packed fc2 [E, ceil(H / 32), 16 P1, 32])", ORT_INVALID_ARGUMENT);
    if (k_ < 1 || k_ > E) ORT_CXX_API_THROW("r1c.cpu::MoE: k must be in [1, E]", ORT_INVALID_ARGUMENT);
    float* y = output.Allocate(xshape);
    if (T == 0 || H == 0) return;

    const int64_t K = k_;
    const float* probs = router_probs.Data();
    std::vector<int64_t>& chosen = route_scratch.chosen;
    std::vector<float>& weight = route_scratch.weight;
    std::vector<int64_t>& order = route_scratch.order;
    chosen.resize(T * K);
    weight.resize(T * K);
    order.resize(E);
    for (int64_t t = 0; t < T; ++t) {
      const float* p = probs + t * E;
      std::iota(order.begin(), order.end(), 0);
      // A NaN score ranks below every number (a comparison with NaN would break the sort's ordering); with
      // normalize_routing_weights=0 it also makes the token's weights NaN (the softmax over all E includes it).
      // Ties: the higher expert index first, as ORT's MoE.
      const auto score = [p](int64_t e) { return std::isnan(p[e]) ? -INFINITY : p[e]; };
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&score](int64_t a, int64_t b) {
        const float sa = score(a), sb = score(b);
        return sa > sb || (sa == sb && a > b);
      });
      const float top = p[order[0]];
      double sum = 0.0;
      if (normalize_) {
        for (int64_t i = 0; i < K; ++i) sum += std::exp(static_cast<double>(p[order[i]]) - top);
      } else {
        for (int64_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(p[e]) - top);
      }
      for (int64_t i = 0; i < K; ++i) {
        const int64_t e = order[i];
        chosen[t * K + i] = e;
        weight[t * K + i] = static_cast<float>(std::exp(static_cast<double>(p[e]) - top) / sum);
      }
    }
    moe_experts(Parallel{context}, ExpertsArgs{input.Data(), chosen.data(), weight.data(), fc1.Data(), fc2.Data(),
                                               T, H, E, P1, K, y});
  }
};


}  // namespace

void moe_experts(const Parallel& par, const ExpertsArgs& a) {
  Scratch& s = scratch;
  const int64_t T = a.T, H = a.H, E = a.E, K = a.K, A = T * K, P1 = a.P1, I16 = P1 * kHalf, P2 = panels(H);
  float* y = a.y;
  if (T == 0 || H == 0) return;
  s.count.assign(E, 0);
  for (int64_t i = 0; i < A; ++i) ++s.count[a.chosen[i]];
  s.offset.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) s.offset[e + 1] = s.offset[e] + s.count[e];
  s.fill.assign(s.offset.begin(), s.offset.end() - 1);
  s.slot_token.resize(A);
  s.slot_weight.resize(A);
  s.xs.resize(A);
  s.hs.resize(A);
  fit(s.h, static_cast<size_t>(A * (I16 + kPad)));
  fit(s.xpad, static_cast<size_t>(T * (H + kPad)));
  for (int64_t t = 0; t < T; ++t) std::copy(a.x + t * H, a.x + (t + 1) * H, s.xpad.data() + t * (H + kPad));
  s.slot_of.resize(A);
  for (int64_t i = 0; i < A; ++i) {
    const int64_t slot = s.slot_of[i] = s.fill[a.chosen[i]]++;
    s.slot_token[slot] = i / K;
    s.slot_weight[slot] = a.weight[i];
    s.xs[slot] = s.xpad.data() + (i / K) * (H + kPad);
    s.hs[slot] = s.h.data() + slot * (I16 + kPad);
  }
  s.touched.clear();
  for (int64_t e = 0; e < E; ++e)
    if (s.count[e]) s.touched.push_back(e);
  const int64_t runs = (P2 + kFc2Run - 1) / kFc2Run, ldp = P2 * kPanel;
  Job job{a.fc1, a.fc2, y, T, H, I16, P1, P2, &s, a.shared_down, a.shared_inter,
          s.touched.size() * static_cast<size_t>(runs)};
  if (a.shared_down != nullptr) {
    fit(s.shared, static_cast<size_t>(T * H));
    s.shared_xs.resize(T);
    for (int64_t t = 0; t < T; ++t) s.shared_xs[t] = a.shared_h + t * a.shared_inter;
  }
  par.run(fc1_block, s.touched.size() * static_cast<size_t>(P1), &job);
  if (A > kFewSlots) {
    par.run(fc2_block, static_cast<size_t>(P2), &job);
    if (a.shared_down != nullptr) {
      linear_rows(par, a.shared_down, a.shared_inter, H, a.shared_h, T, s.shared.data());
      for (int64_t i = 0; i < T * H; ++i) y[i] += s.shared[i];
    }
    return;
  }
  s.part.resize(static_cast<size_t>(A * ldp));
  par.run(fc2_slot_block, job.expert_units + (a.shared_down != nullptr ? static_cast<size_t>(runs) : 0), &job);
  for (int64_t t = 0; t < T; ++t) {  // each token's k slots summed in the order it chose its experts, then shared
    float* yt = y + t * H;
    const float* p0 = s.part.data() + s.slot_of[t * K] * ldp;
    std::copy(p0, p0 + H, yt);
    for (int64_t i = 1; i < K; ++i) {
      const float* pi = s.part.data() + s.slot_of[t * K + i] * ldp;
      for (int64_t n = 0; n < H; ++n) yt[n] += pi[n];
    }
    if (a.shared_down != nullptr) {
      const float* sh = s.shared.data() + t * H;
      for (int64_t n = 0; n < H; ++n) yt[n] += sh[n];
    }
  }
}

Ort::Custom::OrtLiteCustomOp* make_moe_op() {
  return Ort::Custom::CreateLiteCustomOp<MoEKernel>("MoE", "CPUExecutionProvider");
}

}  // namespace r1c_cpu
