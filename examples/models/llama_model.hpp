// A Llama-architecture language model (pre-RMSNorm, RoPE attention with GQA, SwiGLU MLP, shared or
// separate classifier), built from basisattn's prepared layers so that the attention blocks can run
// dense or with BD on V/O. Kept small: this is a reference forward pass for fidelity checks, not a
// serving engine.
//
//   auto m = llama_model<T>::from_llama2c(checkpoint, use_bd, prepare_options);  // llama2.c .bin
//   auto m = llama_model<T>::from_gguf(gguf_file, use_bd, prepare_options);       // llama.cpp GGUF
//   m.logits(ids)            -> tokens x vocab logits (float) for a whole sequence (positions 0..n-1)
//   m.sequence_nll(ids)      -> sum of -log p(ids[t+1] | ids[..t]) over t = 0..n-2 (double)
//   m.logits(ids, observe)   -> the same, calling observe(layer, h, a) after each attention block
//                               (h: its normed input, a: its output before the residual add)
// Weights are stored in T (float, Eigen::half or Eigen::bfloat16); the residual stream is float and
// each block's input is rounded to T, as a T engine would see it.
// GGUF (general.architecture "llama"): shapes, RoPE base and RMSNorm eps come from the llama.*
// metadata; quantized tensors (Q4_0, Q4_1, Q8_0, F16, ...) are dequantized to float, then rounded
// to T. llama.cpp's converter permutes the Q/K rows of Hugging Face checkpoints so that RoPE
// rotates adjacent pairs (2i, 2i+1) ("normal" RoPE), the same convention as llama2.c: both loaders
// use rope_style::interleaved. The classifier is output.weight when present, else token_embd (tied).
#pragma once

#include <basisattn/basisattn.hpp>
#include <basisattn/io/gguf.hpp>
#include <basisattn/io/llama2c.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
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

/// Optional observer of a forward pass: called after the attention block of layer `layer` with the
/// block's input h (normed, tokens x d_model) and its output a (tokens x d_model, before the
/// residual add); both are valid during the call only. It changes nothing in the forward pass.
template <class T>
using attention_observer = std::function<void(std::size_t layer, const matrix<T>& h, const matrix<T>& a)>;

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

/// The matrix of a GGUF tensor (PyTorch (out, in) order), dequantized; errc::io when its shape is
/// not rows x cols.
inline matrix<float> gguf_matrix(const io::gguf_file& f, const std::string& name, index_t rows, index_t cols) {
  const io::tensor_info& t = f.get(name);
  const bool ok = (t.shape.size() == 2 && t.shape[0] == std::uint64_t(rows) && t.shape[1] == std::uint64_t(cols)) ||
                  (rows == 1 && t.shape.size() == 1 && t.shape[0] == std::uint64_t(cols));
  BASISATTN_REQUIRE(ok, io, "gguf: tensor '", name, "' is not ", rows, " x ", cols);
  return io::as_matrix(t, f.bytes);
}

/// A GGUF vector of n floats (RMSNorm weights).
inline std::vector<float> gguf_vector(const io::gguf_file& f, const std::string& name, index_t n) {
  const matrix<float> m = gguf_matrix(f, name, 1, n);
  return std::vector<float>(m.data(), m.data() + n);
}

/// A positive integer from GGUF metadata, as index_t (errc::io when 0 or huge).
inline index_t gguf_dim(const io::gguf_file& f, const std::string& key) {
  const std::uint64_t v = f.get_u64(key);
  BASISATTN_REQUIRE(v > 0 && v < (std::uint64_t(1) << 31), io, "gguf: metadata '", key, "' = ", v,
                    " is not a usable size");
  return static_cast<index_t>(v);
}

/// The llama.* shape metadata of a GGUF file, in llama2.c's config form (seq_len = context_length,
/// shared_classifier = no output.weight). errc::io when inconsistent.
inline io::llama2c_config gguf_llama_config(const io::gguf_file& f) {
  const std::string& arch = f.get_string("general.architecture");
  BASISATTN_REQUIRE(arch == "llama", unsupported, "gguf: architecture '", arch, "'; llama_model reads 'llama'");
  io::llama2c_config k;
  k.dim = gguf_dim(f, "llama.embedding_length");
  k.hidden_dim = gguf_dim(f, "llama.feed_forward_length");
  k.n_layers = gguf_dim(f, "llama.block_count");
  k.n_heads = gguf_dim(f, "llama.attention.head_count");
  k.n_kv_heads = f.has("llama.attention.head_count_kv") ? gguf_dim(f, "llama.attention.head_count_kv") : k.n_heads;
  k.seq_len = gguf_dim(f, "llama.context_length");
  const io::tensor_info& emb = f.get("token_embd.weight");
  BASISATTN_REQUIRE(emb.shape.size() == 2 && emb.shape[1] == std::uint64_t(k.dim) && emb.shape[0] > 0 &&
                        emb.shape[0] < (std::uint64_t(1) << 31),
                    io, "gguf: token_embd.weight is not vocab x ", k.dim);
  k.vocab_size = static_cast<index_t>(emb.shape[0]);
  k.shared_classifier = f.find("output.weight") == nullptr;
  BASISATTN_REQUIRE(k.dim % k.n_heads == 0 && k.n_heads % k.n_kv_heads == 0 && k.head_dim() % 2 == 0, io,
                    "gguf: ", k.n_heads, " heads, ", k.n_kv_heads, " kv heads do not divide dim ", k.dim,
                    " into even head dims");
  if (f.has("llama.rope.dimension_count"))
    BASISATTN_REQUIRE(f.get_u64("llama.rope.dimension_count") == std::uint64_t(k.head_dim()), unsupported,
                      "gguf: partial RoPE (llama.rope.dimension_count ", f.get_u64("llama.rope.dimension_count"),
                      " < head dim ", k.head_dim(), ") is not implemented");
  return k;
}

template <class T>
struct llama_model {
  io::llama2c_config cfg;
  double rope_theta = 10000.0;  // RoPE frequency base
  double rms_eps = 1e-5;        // RMSNorm epsilon
  matrix<float> embedding;      // vocab x dim
  std::vector<std::vector<float>> rms_att, rms_ffn;
  std::vector<float> rms_final;
  std::vector<bd::mha_layer<T>> attn;
  std::vector<bd::dense_projection<T>> w1, w3, w2;  // y = x W
  bd::dense_projection<T> classifier;               // dim -> vocab

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

  /// From a llama.cpp GGUF file (general.architecture "llama"): blk.{l}.attn_{norm,q,k,v,output},
  /// ffn_{norm,gate,up,down}, token_embd, output_norm and output (or the tied token_embd).
  static llama_model from_gguf(const io::gguf_file& f, bool use_bd, const bd::prepare_options& prep = {}) {
    llama_model m;
    m.cfg = gguf_llama_config(f);
    const auto& k = m.cfg;
    if (f.has("llama.rope.freq_base")) m.rope_theta = f.get_f64("llama.rope.freq_base");
    if (f.has("llama.attention.layer_norm_rms_epsilon"))
      m.rms_eps = f.get_f64("llama.attention.layer_norm_rms_epsilon");
    BASISATTN_REQUIRE(std::isfinite(m.rope_theta) && m.rope_theta > 0 && std::isfinite(m.rms_eps) && m.rms_eps >= 0, io,
                      "gguf: rope freq_base ", m.rope_theta, " or rms epsilon ", m.rms_eps, " out of range");
    const index_t D = k.dim, F = k.hidden_dim, QD = k.n_heads * k.head_dim(), KD = k.kv_dim();
    m.embedding = gguf_matrix(f, "token_embd.weight", k.vocab_size, D);
    m.rms_final = gguf_vector(f, "output_norm.weight", D);
    bd::mha_config ac{D, k.n_heads, k.n_kv_heads, k.head_dim()};
    ac.use_rope = true;  // GGUF Q/K rows are permuted for adjacent-pair RoPE (see the top)
    ac.rope.theta = m.rope_theta;
    bd::mha_options ao;
    ao.bd_qk = false;  // RoPE: only V/O is exact
    ao.bd_vo = use_bd;
    ao.prepare = prep;
    for (index_t l = 0; l < k.n_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      m.rms_att.push_back(gguf_vector(f, p + "attn_norm.weight", D));
      m.rms_ffn.push_back(gguf_vector(f, p + "ffn_norm.weight", D));
      const matrix<float> wq = gguf_matrix(f, p + "attn_q.weight", QD, D),
                          wk = gguf_matrix(f, p + "attn_k.weight", KD, D),
                          wv = gguf_matrix(f, p + "attn_v.weight", KD, D),
                          wo = gguf_matrix(f, p + "attn_output.weight", D, QD);
      bd::mha_weights<float> w{wq.view().t(), wk.view().t(), wv.view().t(), wo.view().t()};
      m.attn.push_back(bd::prepare_mha<T>(w, ac, ao));
      m.w1.push_back(bd::make_dense_projection<T>(gguf_matrix(f, p + "ffn_gate.weight", F, D).view().t()));
      m.w3.push_back(bd::make_dense_projection<T>(gguf_matrix(f, p + "ffn_up.weight", F, D).view().t()));
      m.w2.push_back(bd::make_dense_projection<T>(gguf_matrix(f, p + "ffn_down.weight", D, F).view().t()));
    }
    const matrix<float> cls = k.shared_classifier ? m.embedding : gguf_matrix(f, "output.weight", k.vocab_size, D);
    m.classifier = bd::make_dense_projection<T>(cls.view().t());
    return m;
  }

  matrix<float> logits(const std::vector<std::int32_t>& ids, const attention_observer<T>& observe = {}) const {
    const index_t n = static_cast<index_t>(ids.size()), D = cfg.dim, H = cfg.hidden_dim;
    matrix<float> x(n, D);
    for (index_t t = 0; t < n; ++t) {
      BASISATTN_REQUIRE(ids[std::size_t(t)] >= 0 && ids[std::size_t(t)] < cfg.vocab_size, invalid_argument,
                        "llama: token id ", ids[std::size_t(t)], " outside the vocabulary of ", cfg.vocab_size);
      for (index_t j = 0; j < D; ++j) x(t, j) = embedding(ids[std::size_t(t)], j);
    }
    for (std::size_t l = 0; l < attn.size(); ++l) {
      const matrix<T> h = rms_norm<T>(x, rms_att[l], rms_eps);
      matrix<T> a(n, D);
      bd::forward(basisattn::cpu{}, attn[l], h.view(), a.view());
      if (observe) observe(l, h, a);
      add_into(x, a);
      const matrix<T> h2 = rms_norm<T>(x, rms_ffn[l], rms_eps);
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
    const matrix<T> hf = rms_norm<T>(x, rms_final, rms_eps);
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
