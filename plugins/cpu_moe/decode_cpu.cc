// r1c's CPU kernel library: the native decode step. One decode step of an fp32 ONNX Runtime bundle (every row one
// new token) run as one C call, outside ONNX Runtime's executor: the same kernels as the bundle's r1c.cpu nodes
// (mla_block, linear_rows, moe_experts), the small steps between them (embedding rows, residual adds, RMSNorms,
// SwiGLU, the router) inline, every parallel loop on r1c's spinning `Team`. After a step's weights have streamed
// through the caches each graph node and each ORT run starts cold (~1-3 us a node, ~0.1 ms a run on this
// project's VM), so a step of ~110 nodes pays ~0.3 ms that this path does not (the closing notes of issue 11).
//
// What it computes is the graph r1c's passes leave for an fp32 onnxruntime bundle, and nothing else: Python
// (r1c/runtime/native_decode.py) reads the weights' addresses and attributes off that graph, node by node, and
// refuses any graph that differs; tests/test_native_decode.py holds the two paths' logits and latents equal. Per
// row b (token id, cached length p = past_lengths[b]), with x the residual stream:
//   x = embed[id];  h = rmsnorm(x, in_norm_0)
//   per layer l: a, c_new[l], pe_new[l] = mla_block(h; position p, cache rows [0, p))      (MLABlock)
//                x = x + a;  h = rmsnorm(x, post_norm_l)                            (SkipSimplifiedLayerNormalization)
//                m = down(silu(g) * u), [g | u] = h @ gate_up                 dense layer (Linear, QuickGelu, Mul)
//                  | experts(h; top_k of sigmoid(h @ W_router) by group) + shared(h)    (MoEGroupRouter, MoE)
//                x = x + m;  h = rmsnorm(x, in_norm_{l+1} or the final norm)
//   logits = h @ lm_head
// cos / sin at p: cos(p * inv_freq[i]) * rope_scale in float, as the graph's Mul, Cos and Mul. The router (ONNX
// Runtime's MoEGroupRouter, then the MoE's softmax over the chosen log-scores): s = sigmoid(z), c = s + bias; a
// group's score is the sum of its group_topk largest c; the topk_group best groups kept (ties: the lower group);
// the top_k largest c among their experts (ties: the lower expert); weights s_e / sum of the chosen s (the routed
// scaling factor is in fc2, as the bundle has it).
// Legend: B rows, H hidden, V vocabulary, L layers, C kv_lora_rank, R rope dim, P cache capacity (columns), E
// experts, K top_k, I an MLP's intermediate size.
#include "kernels.h"

#include <cstdio>
#include <memory>

extern "C" {

// One layer's weights (addresses into the bundle's memory; the caller keeps them alive) and attributes.
struct r1c_decode_layer {
  const float *in_norm, *q_a, *q_norm, *q_b, *kv_a, *kv_norm, *w_uk, *w_uv_t, *o, *post_norm;
  float in_eps, q_eps, kv_eps, post_eps, scale;
  // a dense SwiGLU MLP (router null) or the shared experts (null: none): gate_up packed H -> 2I (gate then up),
  // down packed I -> H
  const float *gate_up, *down;
  int64_t inter;
  // routed experts (router null: a dense layer): router packed H -> E, bias [E], fc1 / fc2 packed (pack_fc1 /
  // pack_fc2, p1 = ceil(I / 16) panels of fc1)
  const float *router, *bias, *fc1, *fc2;
  int64_t experts, p1, top_k, n_group, topk_group, group_topk;
};

struct r1c_decode_model {
  int64_t layers, hidden, vocab, q_lora, heads, nope, rope, kv_lora, v_head;
  const float *embed, *inv_freq, *final_norm, *lm_head;  // embed [V, H], inv_freq [R/2], lm_head packed H -> V
  float final_eps, rope_scale;  // rope_scale: the cos / sin tables' factor (YaRN's attention factor; 1: none)
  const r1c_decode_layer* layer;  // [layers]
};

}  // extern "C"

namespace r1c_cpu {
namespace {

void say(char* err, size_t n, const std::string& what) {
  if (err != nullptr && n > 0) std::snprintf(err, n, "%s", what.c_str());
}

struct Decoder {
  r1c_decode_model m;
  std::vector<r1c_decode_layer> layers;
  Team team;
  std::mutex lock;  // one step at a time (the team and the scratch are the decoder's)
  std::vector<float> x, h, a, mlp, gu, act, z, cosv, sinv, weight;
  std::vector<int64_t> pos, chosen, order, groups;
  std::vector<float> group_score, s, c, top;  // the router's, per row
  std::vector<uint8_t> kept;
  std::vector<uint8_t> past_valid;
  bool new_valid = true;

  Decoder(const r1c_decode_model& model, int threads) : m(model), layers(model.layer, model.layer + model.layers),
                                                         team(threads) {
    m.layer = nullptr;
  }

  // x [B, H] += add; h = rmsnorm(x, norm, eps), row by row (SkipSimplifiedLayerNormalization)
  void add_norm(int64_t B, const float* add, const float* norm, float eps) {
    const int64_t H = m.hidden;
    for (int64_t b = 0; b < B; ++b) {
      float* xb = x.data() + b * H;
      for (int64_t i = 0; i < H; ++i) xb[i] += add[b * H + i];
      rmsnorm(xb, norm, H, eps, h.data() + b * H);
    }
  }

  // act [B, I] = silu(g) * u of gu [B, 2I] = [g | u]
  void activate(int64_t B, int64_t I) {
    fit(act, static_cast<size_t>(B * I));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i) {
        const float g = gu[b * 2 * I + i];
        act[b * I + i] = g / (1.f + std::exp(-g)) * gu[b * 2 * I + I + i];
      }
  }

  // m_out [B, H] = SwiGLU MLP of h (a dense layer): down(silu(g) * u), [g | u] = h @ gate_up
  void swiglu(const Parallel& par, int64_t B, const float* gate_up, const float* down, int64_t I, float* out) {
    fit(gu, static_cast<size_t>(B * 2 * I));
    linear_rows(par, gate_up, m.hidden, 2 * I, h.data(), B, gu.data());
    activate(B, I);
    linear_rows(par, down, I, m.hidden, act.data(), B, out);
  }

  // chosen / weight [B, K] of each row (the router described above) from h; with shared experts, their SwiGLU
  // activations (`act`) too: their gate / up product in the router's loop (both read h; the router's few panels,
  // E / 32: 2 of 128 KiB for the benchmark model, alone would be a loop of 2 units), their down projection in the
  // experts' fc2 loop (moe_experts)
  void route(const Parallel& par, const r1c_decode_layer& l, int64_t B) {
    const int64_t E = l.experts, K = l.top_k, G = l.n_group, per = E / G;
    fit(z, static_cast<size_t>(B * E));
    if (l.gate_up != nullptr) {
      fit(gu, static_cast<size_t>(B * 2 * l.inter));
      linear_rows_pair(par, h.data(), B, m.hidden, l.router, E, z.data(), l.gate_up, 2 * l.inter, gu.data());
      activate(B, l.inter);
    } else {
      linear_rows(par, l.router, m.hidden, E, h.data(), B, z.data());
    }
    chosen.resize(B * K);
    weight.resize(B * K);
    order.resize(E);
    groups.resize(G);
    group_score.resize(G);
    s.resize(E);
    c.resize(E);
    top.resize(l.group_topk);
    kept.resize(G);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t e = 0; e < E; ++e) {
        s[e] = 1.f / (1.f + std::exp(-z[b * E + e]));
        c[e] = s[e] + l.bias[e];
      }
      for (int64_t g = 0; g < G; ++g) {  // sum of the group's group_topk largest c
        std::partial_sort_copy(c.begin() + g * per, c.begin() + (g + 1) * per, top.begin(), top.end(),
                               std::greater<float>());
        float sum = 0.f;
        for (float v : top) sum += v;
        group_score[g] = sum;
        groups[g] = g;
      }
      std::stable_sort(groups.begin(), groups.end(),
                       [&](int64_t p, int64_t q) { return group_score[p] > group_score[q]; });
      std::fill(kept.begin(), kept.end(), 0);
      for (int64_t i = 0; i < l.topk_group; ++i) kept[groups[i]] = 1;
      int64_t n = 0;
      for (int64_t e = 0; e < E; ++e)
        if (kept[e / per]) order[n++] = e;
      std::partial_sort(order.begin(), order.begin() + K, order.begin() + n, [&](int64_t p, int64_t q) {
        return c[p] > c[q] || (c[p] == c[q] && p < q);
      });
      double total = 0.0;
      for (int64_t i = 0; i < K; ++i) total += s[order[i]];
      for (int64_t i = 0; i < K; ++i) {
        chosen[b * K + i] = order[i];
        weight[b * K + i] = static_cast<float>(s[order[i]] / total);
      }
    }
  }

  void step(int64_t B, const int64_t* ids, int64_t* lengths, int64_t P, float* const* past_c,
            float* const* past_pe, float* logits, float* new_c, float* new_pe, const int64_t* n_new) {
    const int64_t H = m.hidden, half = m.rope / 2, C = m.kv_lora, R = m.rope;
    for (int64_t b = 0; b < B; ++b) {  // checked before any work
      if (ids[b] < 0 || ids[b] >= m.vocab) throw std::invalid_argument("a token id is outside the vocabulary");
      if (lengths[b] < 0 || lengths[b] > P) throw std::invalid_argument("a row's length is outside the cache");
      if (n_new != nullptr && (n_new[b] < 0 || n_new[b] > 1 || lengths[b] + n_new[b] > P))
        throw std::invalid_argument("a row stores 0 or 1 new tokens, within the cache's capacity");
    }
    const Parallel par{nullptr, &team};
    fit(x, static_cast<size_t>(B * H));
    fit(h, static_cast<size_t>(B * H));
    fit(a, static_cast<size_t>(B * H));
    fit(mlp, static_cast<size_t>(B * H));
    fit(cosv, static_cast<size_t>(B * half));
    fit(sinv, static_cast<size_t>(B * half));
    fit(pos, static_cast<size_t>(B));
    past_valid.assign(static_cast<size_t>(B * P), 0);
    int64_t extent = 0;  // the longest row's cached length: the attention visits no column past it
    for (int64_t b = 0; b < B; ++b) {
      extent = std::max(extent, lengths[b]);
      std::copy(m.embed + ids[b] * H, m.embed + (ids[b] + 1) * H, x.data() + b * H);
      const float p = static_cast<float>(lengths[b]);
      for (int64_t i = 0; i < half; ++i) {
        const float angle = p * m.inv_freq[i];
        cosv[b * half + i] = std::cos(angle) * m.rope_scale;
        sinv[b * half + i] = std::sin(angle) * m.rope_scale;
      }
      pos[b] = b;  // row b's cos / sin row
      std::fill(past_valid.begin() + b * P, past_valid.begin() + b * P + lengths[b], 1);
    }
    static_assert(sizeof(bool) == sizeof(uint8_t), "masks are read as bytes");
    Mask past_mask{reinterpret_cast<const bool*>(past_valid.data()), P, 0};
    Mask new_mask{&new_valid, 0, 0};
    for (int64_t b = 0; b < B; ++b) rmsnorm(x.data() + b * H, layers[0].in_norm, H, layers[0].in_eps, h.data() + b * H);
    for (size_t li = 0; li < layers.size(); ++li) {
      const r1c_decode_layer& l = layers[li];
      BlockArgs args{h.data(), l.q_a, l.q_norm, l.q_b, l.kv_a, l.kv_norm, cosv.data(), sinv.data(), past_c[li],
                     past_pe[li], l.w_uk, l.w_uv_t, l.o, pos.data(), past_mask, new_mask, l.scale, l.q_eps,
                     l.kv_eps, B, 1, H, m.q_lora, m.heads, m.nope, R, C, P, m.v_head, a.data(),
                     new_c + static_cast<int64_t>(li) * B * C, new_pe + static_cast<int64_t>(li) * B * R, extent};
      mla_block(par, args);
      add_norm(B, a.data(), l.post_norm, l.post_eps);
      if (l.router == nullptr) {
        swiglu(par, B, l.gate_up, l.down, l.inter, mlp.data());
      } else {
        route(par, l, B);
        const bool sh = l.gate_up != nullptr;
        moe_experts(par, ExpertsArgs{h.data(), chosen.data(), weight.data(), l.fc1, l.fc2, B, H, l.experts, l.p1,
                                     l.top_k, mlp.data(), sh ? l.down : nullptr, sh ? act.data() : nullptr,
                                     sh ? l.inter : 0});
      }
      const bool last = li + 1 == layers.size();
      const float* norm = last ? m.final_norm : layers[li + 1].in_norm;
      const float eps = last ? m.final_eps : layers[li + 1].in_eps;
      add_norm(B, mlp.data(), norm, eps);
    }
    linear_rows(par, m.lm_head, H, m.vocab, h.data(), B, logits);
    for (int64_t b = 0; n_new != nullptr && b < B; ++b) {  // the rows' latents into the cache, lengths advanced
      if (n_new[b] == 0) continue;
      const int64_t p = lengths[b];
      for (size_t li = 0; li < layers.size(); ++li) {
        const float* c = new_c + (static_cast<int64_t>(li) * B + b) * C;
        const float* pe = new_pe + (static_cast<int64_t>(li) * B + b) * R;
        float* dc = past_c[li] + b * C * P + p;
        float* dpe = past_pe[li] + b * R * P + p;
        for (int64_t k = 0; k < C; ++k) dc[k * P] = c[k];
        for (int64_t k = 0; k < R; ++k) dpe[k * P] = pe[k];
      }
      lengths[b] = p + 1;
    }
  }
};

}  // namespace
}  // namespace r1c_cpu

extern "C" {

// A decoder for `model` with `threads` threads (the caller's and threads - 1 workers), or null with the reason
// in err[0 .. n)
__attribute__((visibility("default"))) void* r1c_decode_new(const r1c_decode_model* model, int threads, char* err,
                                                            size_t n) {
  try {
    if (model == nullptr || model->layers < 1 || model->layer == nullptr || threads < 1)
      throw std::invalid_argument("a model of at least one layer and at least one thread");
    for (int64_t i = 0; i < model->layers; ++i) {
      const r1c_decode_layer& l = model->layer[i];
      if (l.router != nullptr && (l.n_group < 1 || l.experts % l.n_group != 0 || l.topk_group < 1 ||
                                  l.topk_group > l.n_group || l.group_topk < 1 ||
                                  l.group_topk > l.experts / l.n_group || l.top_k < 1 ||
                                  l.top_k > l.experts / l.n_group * l.topk_group))
        throw std::invalid_argument("layer " + std::to_string(i) + ": router attributes out of range");
    }
    return new r1c_cpu::Decoder(*model, threads);
  } catch (const std::exception& e) {
    r1c_cpu::say(err, n, std::string("r1c native decode: ") + e.what());
    return nullptr;
  }
}

// One decode step of `rows` rows (one token each): ids [rows], past_lengths [rows] (cached tokens per row, each
// row's position); past_c[l] [rows, C, P] and past_pe[l] [rows, R, P] the cache; logits [rows, V], new_c [L, rows,
// C], new_pe [L, rows, R] written. n_new: null (the cache is only read), or [rows] values 0 / 1: row b's latents
// are also stored in the cache at column past_lengths[b] and past_lengths[b] advanced by n_new[b].
// Returns 0, or 1 with the reason in err[0 .. n) (a bad id, length or n_new: nothing computed or written).
__attribute__((visibility("default"))) int r1c_decode_step(void* decoder, int64_t rows, const int64_t* ids,
                                                           int64_t* past_lengths, const int64_t* n_new,
                                                           int64_t capacity, float* const* past_c,
                                                           float* const* past_pe, float* logits, float* new_c,
                                                           float* new_pe, char* err, size_t n) {
  try {
    auto* d = static_cast<r1c_cpu::Decoder*>(decoder);
    std::lock_guard<std::mutex> hold(d->lock);
    d->step(rows, ids, past_lengths, capacity, past_c, past_pe, logits, new_c, new_pe, n_new);
    return 0;
  } catch (const std::exception& e) {
    r1c_cpu::say(err, n, std::string("r1c native decode: ") + e.what());
    return 1;
  }
}

__attribute__((visibility("default"))) void r1c_decode_free(void* decoder) {
  delete static_cast<r1c_cpu::Decoder*>(decoder);
}

}  // extern "C"
