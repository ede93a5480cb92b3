// A GPT-2-architecture language model (pre-LayerNorm, learned absolute positions, biases on every
// linear layer, GELU MLP, LM head tied to the token embedding), built from basisattn's prepared
// layers so that attention can run dense or with BD on Q/K and V/O (both exact: no RoPE).
//
//   auto m = gpt2_model<T>::from_flat_file(path, use_bd, prepare_options);
//   m.logits(ids) -> tokens x vocab (float), positions 0..n-1;  m.sequence_nll(ids)
//   m.logits(ids, observe) -> the same, with an attention_observer (llama_model.hpp) per layer
// The weights come from the "GPT2" flat float32 re-encoding described in
// ../shared/models/slm4096/SOURCE.txt (magic, 7 int32 fields, then the tensors in PyTorch layout),
// read with bounds and size checks.
#pragma once

#include <basisattn/basisattn.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/tensor.hpp>

#include "llama_model.hpp"  // nll_sum, add_into

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace models {

/// LayerNorm over each row (weight and bias; GPT-2 uses eps 1e-5), result rounded to T.
template <class T>
matrix<T> layer_norm(const matrix<float>& x, const std::vector<float>& w, const std::vector<float>& b,
                     double eps = 1e-5) {
  matrix<T> out(x.rows(), x.cols());
  for (index_t t = 0; t < x.rows(); ++t) {
    double mean = 0, var = 0;
    for (index_t j = 0; j < x.cols(); ++j) mean += x(t, j);
    mean /= double(x.cols());
    for (index_t j = 0; j < x.cols(); ++j) var += (x(t, j) - mean) * (x(t, j) - mean);
    var /= double(x.cols());
    const double inv = 1.0 / std::sqrt(var + eps);
    for (index_t j = 0; j < x.cols(); ++j)
      out(t, j) = T(float((x(t, j) - mean) * inv * w[std::size_t(j)] + b[std::size_t(j)]));
  }
  return out;
}

template <class T>
struct gpt2_model {
  index_t vocab = 0, block = 0, n_layer = 0, n_head = 0, n_embd = 0, n_ff = 0;
  matrix<float> tok, pos;
  std::vector<std::vector<float>> ln1_w, ln1_b, ln2_w, ln2_b;
  std::vector<bd::mha_layer<T>> attn;
  std::vector<bd::dense_projection<T>> fc, proj;
  std::vector<float> lnf_w, lnf_b;
  bd::dense_projection<T> head;  // tied: tok^T

  static gpt2_model from_flat_file(const std::string& path, bool use_bd, const bd::prepare_options& prep = {}) {
    const std::vector<unsigned char> bytes = io::read_file(path);
    io::byte_reader r(bytes.data(), bytes.size(), path);
    BASISATTN_REQUIRE(std::memcmp(r.take(4, "magic"), "GPT2", 4) == 0, io, path, ": not a GPT2 flat file");
    gpt2_model m;
    const std::int32_t version = r.i32("version");
    m.vocab = r.i32("vocab"), m.block = r.i32("block"), m.n_layer = r.i32("n_layer"), m.n_head = r.i32("n_head");
    m.n_embd = r.i32("n_embd"), m.n_ff = r.i32("n_ff");
    BASISATTN_REQUIRE(version == 1 && m.vocab > 0 && m.block > 0 && m.n_layer > 0 && m.n_head > 0 && m.n_embd > 0 &&
                          m.n_ff > 0 && m.n_embd % m.n_head == 0,
                      io, path, ": bad header");
    auto mat = [&](index_t rows, index_t cols, const char* what) {
      matrix<float> x(rows, cols);
      std::memcpy(x.data(), r.take(io::checked_mul(std::uint64_t(rows * cols), 4, what), what),
                  std::size_t(rows * cols) * 4);
      return x;
    };
    auto vec = [&](index_t n, const char* what) {
      const matrix<float> x = mat(1, n, what);
      return std::vector<float>(x.data(), x.data() + n);
    };
    const index_t E = m.n_embd;
    m.tok = mat(m.vocab, E, "tok_emb");
    m.pos = mat(m.block, E, "pos_emb");
    bd::mha_config ac{E, m.n_head, m.n_head, E / m.n_head};
    bd::mha_options ao;
    ao.bd_qk = ao.bd_vo = use_bd;
    ao.prepare = prep;
    for (index_t l = 0; l < m.n_layer; ++l) {
      m.ln1_w.push_back(vec(E, "ln_1.w"));
      m.ln1_b.push_back(vec(E, "ln_1.b"));
      const matrix<float> c_attn = mat(3 * E, E, "c_attn.w");  // (out, in): rows Q, K, V
      const std::vector<float> c_attn_b = vec(3 * E, "c_attn.b");
      const matrix<float> c_proj = mat(E, E, "c_proj.w");
      const std::vector<float> c_proj_b = vec(E, "c_proj.b");
      const auto all = c_attn.view().t();  // E x 3E in y = x W form
      bd::mha_weights<float> w{all.block(0, 0, E, E),   all.block(0, E, E, E), all.block(0, 2 * E, E, E),
                               c_proj.view().t(),       c_attn_b.data(),       c_attn_b.data() + E,
                               c_attn_b.data() + 2 * E, c_proj_b.data()};
      m.attn.push_back(bd::prepare_mha<T>(w, ac, ao));
      m.ln2_w.push_back(vec(E, "ln_2.w"));
      m.ln2_b.push_back(vec(E, "ln_2.b"));
      const matrix<float> c_fc = mat(m.n_ff, E, "c_fc.w");
      const std::vector<float> c_fc_b = vec(m.n_ff, "c_fc.b");
      const matrix<float> mp = mat(E, m.n_ff, "mlp.c_proj.w");
      const std::vector<float> mp_b = vec(E, "mlp.c_proj.b");
      m.fc.push_back(bd::make_dense_projection<T>(c_fc.view().t(), c_fc_b.data()));
      m.proj.push_back(bd::make_dense_projection<T>(mp.view().t(), mp_b.data()));
    }
    m.lnf_w = vec(E, "ln_f.w");
    m.lnf_b = vec(E, "ln_f.b");
    BASISATTN_REQUIRE(r.remaining() == 0, io, path, ": ", r.remaining(), " unexpected bytes at the end");
    m.head = bd::make_dense_projection<T>(m.tok.view().t());
    return m;
  }

  matrix<float> logits(const std::vector<std::int32_t>& ids, const attention_observer<T>& observe = {}) const {
    const index_t n = static_cast<index_t>(ids.size()), E = n_embd;
    BASISATTN_REQUIRE(n >= 1 && n <= block, invalid_argument, "gpt2: ", n, " tokens, the model's context is ", block);
    matrix<float> x(n, E);
    for (index_t t = 0; t < n; ++t) {
      BASISATTN_REQUIRE(ids[std::size_t(t)] >= 0 && ids[std::size_t(t)] < vocab, invalid_argument, "gpt2: token id ",
                        ids[std::size_t(t)], " outside the vocabulary");
      for (index_t j = 0; j < E; ++j) x(t, j) = tok(ids[std::size_t(t)], j) + pos(t, j);
    }
    for (std::size_t l = 0; l < attn.size(); ++l) {
      const matrix<T> h = layer_norm<T>(x, ln1_w[l], ln1_b[l]);
      matrix<T> a(n, E);
      bd::forward(basisattn::cpu{}, attn[l], h.view(), a.view());
      if (observe) observe(l, h, a);
      add_into(x, a);
      const matrix<T> h2 = layer_norm<T>(x, ln2_w[l], ln2_b[l]);
      matrix<T> f(n, n_ff), o(n, E);
      bd::project(basisattn::cpu{}, fc[l], h2.view(), f.view());
      for (index_t i = 0; i < f.size(); ++i) {  // GELU, exact erf form
        const double z = static_cast<float>(f.data()[i]);
        f.data()[i] = T(float(0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)))));
      }
      bd::project(basisattn::cpu{}, proj[l], f.view(), o.view());
      add_into(x, o);
    }
    const matrix<T> hf = layer_norm<T>(x, lnf_w, lnf_b);
    matrix<T> lt(n, vocab);
    bd::project(basisattn::cpu{}, head, hf.view(), lt.view());
    matrix<float> out(n, vocab);
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
