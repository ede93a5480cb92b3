// DeepSeek-V2-Lite attention shapes and random weights of those shapes, shared by the benchmarks
// and the demo. (hidden 2048, 16 heads, kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128,
// 27 layers; config.json of deepseek-ai/DeepSeek-V2-Lite.)
#pragma once

#include <basisattn/bd/layers.hpp>
#include <basisattn/core/view.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace deepseek_v2_lite {

constexpr basisattn::index_t hidden = 2048, heads = 16, kv_lora_rank = 512, qk_nope = 128, qk_rope = 64, v_head = 128,
                             layers = 27;

inline basisattn::bd::mla_config config() {
  basisattn::bd::mla_config c;
  c.d_model = hidden, c.n_heads = heads, c.kv_lora_rank = kv_lora_rank;
  c.qk_nope_dim = qk_nope, c.qk_rope_dim = qk_rope, c.v_head_dim = v_head;
  return c;
}

/// Random MLA weights with the model's shapes (Gaussian, scaled like a trained init: 1/sqrt(fan_in)).
struct weights {
  std::vector<float> wq, wkv_a, norm, wkv_b, wo;
  explicit weights(std::uint64_t seed) {
    std::mt19937_64 g(seed);
    auto fill = [&](std::vector<float>& v, std::size_t n, double fan_in) {
      std::normal_distribution<float> d(0.0f, float(1.0 / std::sqrt(fan_in)));
      v.resize(n);
      for (auto& x : v) x = d(g);
    };
    fill(wq, std::size_t(hidden) * heads * (qk_nope + qk_rope), hidden);
    fill(wkv_a, std::size_t(hidden) * (kv_lora_rank + qk_rope), hidden);
    fill(wkv_b, std::size_t(kv_lora_rank) * heads * (qk_nope + v_head), kv_lora_rank);
    fill(wo, std::size_t(heads) * v_head * hidden, heads * v_head);
    std::normal_distribution<float> nd(1.0f, 0.1f);
    norm.resize(kv_lora_rank);
    for (auto& x : norm) x = nd(g);
  }
  /// The dense K-nope up-projection of all heads (latent -> heads x qk_nope), cut out of wkv_b.
  basisattn::matrix<float> k_up_weight() const {
    using basisattn::index_t;
    basisattn::matrix<float> wk(kv_lora_rank, heads * qk_nope);
    for (index_t i = 0; i < kv_lora_rank; ++i)
      for (index_t h = 0; h < heads; ++h)
        for (index_t j = 0; j < qk_nope; ++j)
          wk(i, h * qk_nope + j) = wkv_b[std::size_t(i * heads * (qk_nope + v_head) + h * (qk_nope + v_head) + j)];
    return wk;
  }
  basisattn::bd::mla_weights<float> views() const {
    using basisattn::matrix_view;
    return {matrix_view<const float>(wq.data(), hidden, heads * (qk_nope + qk_rope)),
            matrix_view<const float>(wkv_a.data(), hidden, kv_lora_rank + qk_rope), norm.data(),
            matrix_view<const float>(wkv_b.data(), kv_lora_rank, heads * (qk_nope + v_head)),
            matrix_view<const float>(wo.data(), heads * v_head, hidden)};
  }
};

}  // namespace deepseek_v2_lite
