// A Llama-architecture language model (llama2.c checkpoints: pre-RMSNorm, RoPE attention with GQA,
// SwiGLU MLP, shared or separate classifier), built from basisattn's prepared layers so that the
// attention blocks can run dense or with BD on V/O. Kept small: this is a reference forward pass
// for fidelity checks, not a serving engine.
//
//   auto m = llama_model<T>::from_llama2c(checkpoint, use_bd, prepare_options);
//   m.logits(ids)            -> tokens x vocab logits (float) for a whole sequence (positions 0..n-1)
//   m.sequence_nll(ids)      -> sum of -log p(ids[t+1] | ids[..t]) over t = 0..n-2 (double)
// Weights are stored in T (float, Eigen::half or Eigen::bfloat16); the residual stream is float and
// each block's input is rounded to T, as a T engine would see it.
#pragma once

#include <basisattn/basisattn.hpp>
#include <basisattn/io/llama2c.hpp>

#include <cmath>
#include <vector>

namespace models {

using basisattn::index_t;
using basisattn::matrix;
using basisattn::matrix_view;
namespace bd = basisattn::bd;
namespace io = basisattn::io;

/// x <- x * rsqrt(mean(x^2) + eps) * w, row by row; result rounded to T.
template <class T>
matrix<T> rms_norm(const matrix<float>& x, const std::vector<float>& w, double eps) {
  matrix<T> out(x.rows(), x.cols());
  for (index_t t = 0; t < x.rows(); ++t) {
    double ss = 0;
    for (index_t j = 0; j < x.cols(); ++j) ss += double(x(t, j)) * double(x(t, j));
    const double inv = 1.0 / std::sqrt(ss / double(x.cols()) + eps);
    for (index_t j = 0; j < x.cols(); ++j) out(t, j) = T(float(double(x(t, j)) * inv * double(w[std::size_t(j)])));
  }
  return out;
}

template <class T>
void add_into(matrix<float>& x, const matrix<T>& y) {
  for (index_t i = 0; i < x.size(); ++i) x.data()[i] += static_cast<float>(y.data()[i]);
}

/// Sum over t = 0..n-2 of -log softmax(logits[t])[ids[t + 1]], in double (logits has >= n - 1 rows).
inline double nll_sum(const matrix<float>& logits, const std::vector<std::int32_t>& ids) {
  double sum = 0;
  for (index_t t = 0; t + 1 < static_cast<index_t>(ids.size()); ++t) {
    double mx = -INFINITY;
    for (index_t v = 0; v < logits.cols(); ++v) mx = std::max(mx, double(logits(t, v)));
    double z = 0;
    for (index_t v = 0; v < logits.cols(); ++v) z += std::exp(double(logits(t, v)) - mx);
    sum += -(double(logits(t, ids[std::size_t(t + 1)])) - mx - std::log(z));
  }
  return sum;
}

template <class T>
struct llama_model {
  io::llama2c_config cfg;
  matrix<float> embedding;  // vocab x dim
  std::vector<std::vector<float>> rms_att, rms_ffn;
  std::vector<float> rms_final;
  std::vector<bd::mha_layer<T>> attn;
  std::vector<bd::dense_projection<T>> w1, w3, w2;  // y = x W
  bd::dense_projection<T> classifier;                // dim -> vocab

  static llama_model from_llama2c(const io::llama2c_checkpoint& c, bool use_bd, const bd::prepare_options& prep = {}) {
    llama_model m;
    m.cfg = c.config;
    const auto& k = c.config;
    m.embedding = c.matrix_of("token_embedding");
    m.rms_final = c.vector("rms_final");
    bd::mha_config ac{k.dim, k.n_heads, k.n_kv_heads, k.head_dim()};
    ac.use_rope = true;  // llama2.c: pairs (2i, 2i+1) inside each head, theta 10000
    bd::mha_options ao;
    ao.bd_qk = false;  // RoPE: only V/O is exact
    ao.bd_vo = use_bd;
    ao.prepare = prep;
    for (index_t l = 0; l < k.n_layers; ++l) {
      m.rms_att.push_back(c.vector("rms_att", l));
      m.rms_ffn.push_back(c.vector("rms_ffn", l));
      const matrix<float> wq = c.layer_matrix("wq", l), wk = c.layer_matrix("wk", l), wv = c.layer_matrix("wv", l),
                          wo = c.layer_matrix("wo", l);
      // Stored (out, in); the layer wants y = x W, i.e. the transposes.
      bd::mha_weights<float> w{wq.view().t(), wk.view().t(), wv.view().t(), wo.view().t()};
      m.attn.push_back(bd::prepare_mha<T>(w, ac, ao));
      m.w1.push_back(bd::make_dense_projection<T>(c.layer_matrix("w1", l).view().t()));
      m.w3.push_back(bd::make_dense_projection<T>(c.layer_matrix("w3", l).view().t()));
      m.w2.push_back(bd::make_dense_projection<T>(c.layer_matrix("w2", l).view().t()));
    }
    const matrix<float> cls = k.shared_classifier ? c.matrix_of("token_embedding") : c.matrix_of("wcls");
    m.classifier = bd::make_dense_projection<T>(cls.view().t());
    return m;
  }

  matrix<float> logits(const std::vector<std::int32_t>& ids) const {
    const index_t n = static_cast<index_t>(ids.size()), D = cfg.dim, H = cfg.hidden_dim;
    matrix<float> x(n, D);
    for (index_t t = 0; t < n; ++t)
      for (index_t j = 0; j < D; ++j) x(t, j) = embedding(ids[std::size_t(t)], j);
    for (std::size_t l = 0; l < attn.size(); ++l) {
      const matrix<T> h = rms_norm<T>(x, rms_att[l], 1e-5);
      matrix<T> a(n, D);
      bd::forward(basisattn::cpu{}, attn[l], h.view(), a.view());
      add_into(x, a);
      const matrix<T> h2 = rms_norm<T>(x, rms_ffn[l], 1e-5);
      matrix<T> g(n, H), u(n, H), f(n, D);
      bd::project(basisattn::cpu{}, w1[l], h2.view(), g.view());
      bd::project(basisattn::cpu{}, w3[l], h2.view(), u.view());
      for (index_t i = 0; i < g.size(); ++i) {  // SwiGLU: silu(w1 x) * (w3 x)
        const float z = static_cast<float>(g.data()[i]);
        g.data()[i] = T(z / (1.0f + std::exp(-z)) * static_cast<float>(u.data()[i]));
      }
      bd::project(basisattn::cpu{}, w2[l], g.view(), f.view());
      add_into(x, f);
    }
    const matrix<T> hf = rms_norm<T>(x, rms_final, 1e-5);
    matrix<T> lt(n, cfg.vocab_size);
    bd::project(basisattn::cpu{}, classifier, hf.view(), lt.view());
    matrix<float> out(n, cfg.vocab_size);
    for (index_t i = 0; i < out.size(); ++i) out.data()[i] = static_cast<float>(lt.data()[i]);
    return out;
  }

  /// -sum log p(ids[t+1] | ids[..t]): the logits of ids without its last token predict ids[1:].
  double sequence_nll(const std::vector<std::int32_t>& ids) const {
    if (ids.size() < 2) return 0;
    return nll_sum(logits(std::vector<std::int32_t>(ids.begin(), ids.end() - 1)), ids);
  }
};

}  // namespace models
