// r1c's CPU kernels: the entry points one kernel calls in another (r1c/plugins/cpu_moe). `MLABlock`
// (mla_block_cpu.cc) runs the Linear kernel's panels (linear_cpu.cc) and the MLA attention's three phases
// (attention_cpu.cc) on raw buffers, inside one ONNX Runtime node; the native decode step (decode_cpu.cc) runs
// `mla_block`, `linear_rows` and `moe_experts` outside ONNX Runtime. Each takes a `Parallel` (panels.h): ONNX
// Runtime's intra-op threads inside a node, r1c's `Team` in the native step. Legend as in attention_cpu.cc.
#pragma once
#include "panels.h"

namespace r1c_cpu {

// A bool tensor broadcast to [B, S*N, cols] (its shape left-padded with 1s to rank 3): at(b, i, col)
struct Mask {
  const bool* data = nullptr;
  int64_t b_stride = 0, i_stride = 0;
  bool at(int64_t b, int64_t i, int64_t col) const { return data[b * b_stride + i * i_stride + col]; }
};

// The mask of `t` for B rows, `rows` = S*N query rows and `cols` columns; throws ORT_INVALID_ARGUMENT (naming
// `op` and `name`) when its shape does not broadcast
Mask make_mask(const Ort::Custom::Tensor<bool>& t, int64_t B, int64_t rows, int64_t cols, const char* op,
               const char* name);

// One layer's absorbed MLA attention over float32 W_UK / W_UV (attention_cpu.cc's formulas): q_nope [B, S, N, D],
// q_pe [B, S, N, R] (rotated), c_new [B, S, C], pe_new [B, S, R], past_c [B, C, P], past_pe [B, R, P], w_uk
// [N, D, C], w_uv_t [N, C, Vd] -> out [B, S, N*Vd]. Shapes are the caller's to check. `extent`: where the caller
// knows it (the native decode step: the longest row's cached length), the columns [extent, P) are invisible to
// every row and are not visited (-1: unknown, all P columns are looked at).
struct AttentionArgs {
  const float *q_nope, *q_pe, *c_new, *pe_new, *past_c, *past_pe, *w_uk, *w_uv_t;
  Mask past_valid, new_valid;
  float scale;
  int64_t B, S, N, D, R, C, P, Vd;
  float* out;
  int64_t extent = -1;
};
void mla_attention(const Parallel& par, const AttentionArgs& a);

// y [T, n] = x [T, K] (rows K apart) @ W, W packed [ceil(n / 32), K, 32] (spec.py pack_linear): the Linear
// kernel's panels shared among ONNX Runtime's threads
void linear_rows(const Parallel& par, const float* w, int64_t K, int64_t n, const float* x, int64_t T, float* y);

// Output panel b (columns 32b .. 32b + 31, within n) of y [T, n] = x @ W, W packed as linear_rows', for the T rows
// xs[t] (K floats each): one unit of linear_rows' loop, for a loop that shares its units with other work (the
// shared expert's down projection in moe_experts' fc2 loop)
void linear_panel(const float* w, int64_t K, int64_t n, const float* const* xs, int64_t T, float* y, size_t b);

// y_a [T, n_a] = x @ W_a and y_b [T, n_b] = x @ W_b (both packed, both K rows) in one ParallelFor: the panels of
// both matrices shared among the threads (one fork and join, balanced over their sum)
void linear_rows_pair(const Parallel& par, const float* x, int64_t T, int64_t K, const float* w_a, int64_t n_a,
                      float* y_a, const float* w_b, int64_t n_b, float* y_b);

// One layer's MLA attention block (mla_block_cpu.cc's formulas) for T = B*S tokens: x [T, H] the normalized
// input; q_a, q_b, kv_a, o packed (pack_linear) for H -> QL, QL -> N*(D+R), H -> C+R, N*Vd -> H; q_norm [QL],
// kv_norm [C]; cos / sin [*, R/2] read at row pos[t] for token t; past_c [B, C, P], past_pe [B, R, P], the masks,
// w_uk [N, D, C], w_uv_t [N, C, Vd] -> y [T, H], c_new [T, C], pe_new [T, R]. Shapes are the caller's to check.
struct BlockArgs {
  const float *x, *q_a, *q_norm, *q_b, *kv_a, *kv_norm, *cos, *sin, *past_c, *past_pe, *w_uk, *w_uv_t, *o;
  const int64_t* pos;
  Mask past_valid, new_valid;
  float scale, q_eps, kv_eps;
  int64_t B, S, H, QL, N, D, R, C, P, Vd;
  float *y, *c_new, *pe_new;
  int64_t extent = -1;  // as AttentionArgs' (-1: unknown)
};
void mla_block(const Parallel& par, const BlockArgs& a);

// The routed experts of T tokens (moe_cpu.cc's formulas) given each token's K experts and weights: chosen [T, K]
// expert ids (distinct within a token, < E), weight [T, K]; x [T, H]; fc1 [E, P1, H, 32], fc2 [E, ceil(H / 32),
// 16 P1, 32] packed (pack_fc1, pack_fc2) -> y [T, H] (written, not added to). Optionally a shared expert's down
// projection added to y in the same loop as fc2: shared_down packed Is -> H (pack_linear), shared_h [T, Is] its
// SwiGLU activations (the native decode step's shared experts). Shapes are the caller's to check.
struct ExpertsArgs {
  const float* x;
  const int64_t* chosen;
  const float* weight;
  const float *fc1, *fc2;
  int64_t T, H, E, P1, K;
  float* y;
  const float *shared_down = nullptr, *shared_h = nullptr;
  int64_t shared_inter = 0;
};
void moe_experts(const Parallel& par, const ExpertsArgs& a);

}  // namespace r1c_cpu
