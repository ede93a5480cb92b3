// A BERT-architecture encoder (post-LayerNorm, learned absolute positions, token-type embeddings,
// biases on every linear layer, GELU MLP, non-causal attention) with sentence-transformers
// pooling, built from basisattn's prepared layers so that attention can run dense or with BD on
// Q/K and V/O (both exact: no RoPE). Written for all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads
// of 32, intermediate 1536); any BertModel checkpoint with absolute positions and erf GELU fits.
//
//   const auto cfg = bert_config::from_json_file(".../config.json");
//   auto m = bert_model<T>::from_safetensors(io::read_safetensors(".../model.safetensors"), cfg, use_bd, prep);
//   m.hidden(ids) -> tokens x hidden (float): the last layer's output (HF last_hidden_state)
//   m.embed(ids)  -> hidden floats: mean of hidden(ids) over the tokens, L2-normalised (the
//                    sentence-transformers recipe of all-MiniLM-L6-v2)
// ids is one unpadded sequence ([CLS] ... [SEP], e.g. from wordpiece_tokenizer::encode), all of
// token type 0 at positions 0..n-1, so every token attends to every token and no mask is needed.
// Weights are stored in T (float, Eigen::half or Eigen::bfloat16); the embeddings, the residual
// stream and the LayerNorms are float, and each block's input is rounded to T, as a T engine would
// see it. Tensor names are Hugging Face's BertModel names, with or without a "bert." prefix; the
// pooler is not used.
#pragma once

#include <basisattn/basisattn.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/safetensors.hpp>
#include <basisattn/io/tensor.hpp>

#include <nlohmann/json.hpp>

#include "gpt2_model.hpp"  // layer_norm, add_into

#include <functional>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace models {

/// The fields of a Hugging Face BertModel config.json that the forward pass needs.
struct bert_config {
  index_t vocab_size = 30522, hidden_size = 384, n_layers = 6, n_heads = 12, intermediate_size = 1536;
  index_t max_positions = 512, type_vocab_size = 2;
  double layer_norm_eps = 1e-12;

  /// Reads config.json; errc::io for a missing or mistyped field, errc::unsupported for an
  /// activation other than "gelu" (erf form) or a position embedding other than "absolute".
  static bert_config from_json_file(const std::string& path) {
    const std::vector<unsigned char> bytes = io::read_file(path);
    const nlohmann::json j = nlohmann::json::parse(bytes.begin(), bytes.end(), nullptr, /*allow_exceptions=*/false);
    BASISATTN_REQUIRE(!j.is_discarded() && j.is_object(), io, path, ": not a JSON object");
    auto count = [&](const char* key) {
      BASISATTN_REQUIRE(j.contains(key) && j[key].is_number_integer() && j[key].get<std::int64_t>() > 0, io, path,
                        ": '", key, "' must be a positive integer");
      return static_cast<index_t>(j[key].get<std::int64_t>());
    };
    auto text = [&](const char* key, const char* fallback) {
      if (!j.contains(key)) return std::string(fallback);
      BASISATTN_REQUIRE(j[key].is_string(), io, path, ": '", key, "' must be a string");
      return j[key].get<std::string>();
    };
    bert_config c;
    c.vocab_size = count("vocab_size");
    c.hidden_size = count("hidden_size");
    c.n_layers = count("num_hidden_layers");
    c.n_heads = count("num_attention_heads");
    c.intermediate_size = count("intermediate_size");
    c.max_positions = count("max_position_embeddings");
    c.type_vocab_size = count("type_vocab_size");
    BASISATTN_REQUIRE(
        j.contains("layer_norm_eps") && j["layer_norm_eps"].is_number() && j["layer_norm_eps"].get<double>() > 0, io,
        path, ": 'layer_norm_eps' must be a positive number");
    c.layer_norm_eps = j["layer_norm_eps"].get<double>();
    BASISATTN_REQUIRE(c.hidden_size % c.n_heads == 0, io, path, ": hidden_size ", c.hidden_size,
                      " is not a multiple of num_attention_heads ", c.n_heads);
    const std::string act = text("hidden_act", "gelu"), pos = text("position_embedding_type", "absolute");
    BASISATTN_REQUIRE(act == "gelu", unsupported, path, ": hidden_act '", act,
                      "' (only the erf GELU, \"gelu\", is implemented)");
    BASISATTN_REQUIRE(pos == "absolute", unsupported, path, ": position_embedding_type '", pos,
                      "' (only \"absolute\")");
    return c;
  }
};

template <class T>
struct bert_model {
  bert_config cfg;
  matrix<float> word, pos, type;  // vocab x E, max_positions x E, type_vocab x E
  std::vector<float> emb_ln_w, emb_ln_b;
  std::vector<bd::mha_layer<T>> attn;
  std::vector<std::vector<float>> attn_ln_w, attn_ln_b, out_ln_w, out_ln_b;
  std::vector<bd::dense_projection<T>> fc, proj;  // intermediate.dense, output.dense (y = x W + b)

  /// Builds the model from a BertModel safetensors file; use_bd: BD on the Q/K and V/O pairs of
  /// every layer (bd::prepare_mha with `prep`). Every tensor's shape is checked against cfg.
  static bert_model from_safetensors(const io::safetensors_file& f, const bert_config& cfg, bool use_bd,
                                     const bd::prepare_options& prep = {}) {
    const std::string pre = f.find("embeddings.word_embeddings.weight") == nullptr &&
                                    f.find("bert.embeddings.word_embeddings.weight") != nullptr
                                ? "bert."
                                : "";
    const index_t E = cfg.hidden_size, F = cfg.intermediate_size;
    auto mat = [&](const std::string& name, index_t rows, index_t cols) {
      const io::tensor_info& t = f.get(pre + name);
      BASISATTN_REQUIRE(t.shape.size() == 2 && t.shape[0] == std::uint64_t(rows) && t.shape[1] == std::uint64_t(cols),
                        io, "bert: tensor '", t.name, "' should be ", rows, "x", cols);
      return io::as_matrix(t, f.bytes);
    };
    auto vec = [&](const std::string& name, index_t n) {
      const io::tensor_info& t = f.get(pre + name);
      BASISATTN_REQUIRE(t.shape.size() == 1 && t.shape[0] == std::uint64_t(n), io, "bert: tensor '", t.name,
                        "' should have ", n, " values");
      return io::to_float(t, f.bytes);
    };
    bert_model m;
    m.cfg = cfg;
    m.word = mat("embeddings.word_embeddings.weight", cfg.vocab_size, E);
    m.pos = mat("embeddings.position_embeddings.weight", cfg.max_positions, E);
    m.type = mat("embeddings.token_type_embeddings.weight", cfg.type_vocab_size, E);
    m.emb_ln_w = vec("embeddings.LayerNorm.weight", E);
    m.emb_ln_b = vec("embeddings.LayerNorm.bias", E);
    bd::mha_config ac{E, cfg.n_heads, cfg.n_heads, E / cfg.n_heads};
    ac.causal = false;  // an encoder: every token sees every token
    bd::mha_options ao;
    ao.bd_qk = ao.bd_vo = use_bd;
    ao.prepare = prep;
    for (index_t l = 0; l < cfg.n_layers; ++l) {
      const std::string p = "encoder.layer." + std::to_string(l) + ".";
      // PyTorch Linear weights are (out, in); the layers want y = x W, i.e. the transposes.
      const matrix<float> wq = mat(p + "attention.self.query.weight", E, E),
                          wk = mat(p + "attention.self.key.weight", E, E),
                          wv = mat(p + "attention.self.value.weight", E, E),
                          wo = mat(p + "attention.output.dense.weight", E, E);
      const std::vector<float> bq = vec(p + "attention.self.query.bias", E), bk = vec(p + "attention.self.key.bias", E),
                               bv = vec(p + "attention.self.value.bias", E),
                               bo = vec(p + "attention.output.dense.bias", E);
      // With BD on Q/K, b_K is carried through the basis change by prepare_mha (b_K A_S^-1); its
      // contribution q . b_K is the same for every key and cancels in the softmax either way.
      bd::mha_weights<float> w{wq.view().t(), wk.view().t(), wv.view().t(), wo.view().t(),
                               bq.data(),     bk.data(),     bv.data(),     bo.data()};
      m.attn.push_back(bd::prepare_mha<T>(w, ac, ao));
      m.attn_ln_w.push_back(vec(p + "attention.output.LayerNorm.weight", E));
      m.attn_ln_b.push_back(vec(p + "attention.output.LayerNorm.bias", E));
      const matrix<float> w1 = mat(p + "intermediate.dense.weight", F, E), w2 = mat(p + "output.dense.weight", E, F);
      const std::vector<float> b1 = vec(p + "intermediate.dense.bias", F), b2 = vec(p + "output.dense.bias", E);
      m.fc.push_back(bd::make_dense_projection<T>(w1.view().t(), b1.data()));
      m.proj.push_back(bd::make_dense_projection<T>(w2.view().t(), b2.data()));
      m.out_ln_w.push_back(vec(p + "output.LayerNorm.weight", E));
      m.out_ln_b.push_back(vec(p + "output.LayerNorm.bias", E));
    }
    return m;
  }

  /// Last hidden states, tokens x hidden (float), of one unpadded sequence of token type 0.
  /// on_attention_input, when given, sees each layer's attention input (layer index, tokens x hidden).
  matrix<float> hidden(const std::vector<std::int32_t>& ids,
                       const std::function<void(std::size_t, const matrix<T>&)>& on_attention_input = {}) const {
    const index_t n = static_cast<index_t>(ids.size()), E = cfg.hidden_size, F = cfg.intermediate_size;
    BASISATTN_REQUIRE(n >= 1 && n <= cfg.max_positions, invalid_argument, "bert: ", n, " tokens, the model takes 1 to ",
                      cfg.max_positions);
    matrix<float> x(n, E);
    for (index_t t = 0; t < n; ++t) {
      const std::int32_t id = ids[std::size_t(t)];
      BASISATTN_REQUIRE(id >= 0 && id < cfg.vocab_size, invalid_argument, "bert: token id ", id,
                        " outside the vocabulary of ", cfg.vocab_size);
      for (index_t j = 0; j < E; ++j) x(t, j) = word(id, j) + pos(t, j) + type(0, j);
    }
    x = layer_norm<float>(x, emb_ln_w, emb_ln_b, cfg.layer_norm_eps);
    matrix<T> h(n, E), a(n, E), f(n, F), o(n, E);
    for (std::size_t l = 0; l < attn.size(); ++l) {
      round_into(x, h);
      if (on_attention_input) on_attention_input(l, h);
      bd::forward(basisattn::cpu{}, attn[l], std::as_const(h).view(), a.view());
      add_into(x, a);
      x = layer_norm<float>(x, attn_ln_w[l], attn_ln_b[l], cfg.layer_norm_eps);
      round_into(x, h);
      bd::project(basisattn::cpu{}, fc[l], std::as_const(h).view(), f.view());
      for (index_t i = 0; i < f.size(); ++i) {  // GELU, exact erf form
        const double z = static_cast<float>(f.data()[i]);
        f.data()[i] = T(float(0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)))));
      }
      bd::project(basisattn::cpu{}, proj[l], std::as_const(f).view(), o.view());
      add_into(x, o);
      x = layer_norm<float>(x, out_ln_w[l], out_ln_b[l], cfg.layer_norm_eps);
    }
    return x;
  }

  /// Sentence embedding: mean of the last hidden states over all tokens (the attention mask of an
  /// unpadded sequence is all ones), divided by its L2 norm.
  std::vector<float> embed(const std::vector<std::int32_t>& ids) const {
    const matrix<float> x = hidden(ids);
    std::vector<double> mean(std::size_t(x.cols()), 0.0);
    for (index_t t = 0; t < x.rows(); ++t)
      for (index_t j = 0; j < x.cols(); ++j) mean[std::size_t(j)] += x(t, j);
    double norm = 0;
    for (double& v : mean) v /= double(x.rows()), norm += v * v;
    norm = std::max(std::sqrt(norm), 1e-12);  // sentence-transformers' Normalize clamps the norm likewise
    std::vector<float> out(mean.size());
    for (std::size_t j = 0; j < mean.size(); ++j) out[j] = float(mean[j] / norm);
    return out;
  }

  static void round_into(const matrix<float>& x, matrix<T>& h) {
    for (index_t i = 0; i < x.size(); ++i) h.data()[i] = T(x.data()[i]);
  }
};

}  // namespace models
