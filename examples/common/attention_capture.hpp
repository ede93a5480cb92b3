// Real attention inputs, captured from the example models' own forward passes, for accuracy reports
// of approximate attention methods (conv-basis, support-basis, ...).
//
// For a model and a token sequence of length n, every layer l gives
//   q   [n, H_q,  d]    float, row-major contiguous (usable as basisattn::tensor3_view<const float>)
//   k   [n, H_kv, d]
//   v   [n, H_kv, d_v]
//   out [n, H_q,  d_v]  the layer's attention output (per head, before the output projection)
//   scale, causal       the softmax scale the model uses (1/sqrt(d) for all three models here) and its
//                       mask; the scale is NOT folded into q.
// exactly as they enter the model's softmax attention: after the Q/K/V projections (with their
// biases), after RoPE at the real positions 0..n-1 with the model's own pairing and base. So
//   basisattn::attention_reference(q, k, v, out', {causal, scale})
// reproduces `out` (to float rounding: out comes from the blocked float kernel the model runs).
//
// How: the example models call an attention_observer (examples/models/llama_model.hpp) after each
// attention block with the block's normed input h and its output a. capture_attention() runs the
// layer's own prepared projections on h (bd::project, the same calls and types as bd::forward),
// RoPE (apply_rope with the layer's rope_params), and basisattn::attention with the layer's
// options; then it projects `out` with the layer's W_O and compares with the model's a:
// layer_capture::forward_check is that relative Frobenius difference (0 when the capture is the
// model's forward bit for bit). The model must be dense (use_bd = false): with BD the K/V values
// live in another basis. Weights in T (float, half, bfloat16) are captured as their float values.
//
// Models, text and positions (every capture is deterministic: fixed text, no sampling):
//   stories260K (llama2.c, ../shared/models/stories260K): 5 layers, H_q 8, H_kv 4, d 8, RoPE on
//     adjacent pairs (2i, 2i+1), base 10000, context 512 (n <= 512). Text: the non-blank lines of
//     ../shared/data/tinystories/tinystories_train_head.txt, each as [BOS] + run.c's encode(line),
//     concatenated (as llama2.c trains on concatenated stories), tokens [offset, offset + n).
//   SmolLM2-135M-Instruct (GGUF Q4_1, <model_cache>/smollm2, from scripts/fetch-models.sh): 30
//     layers, H_q 9, H_kv 3, d 64, RoPE base 1e5, n <= llama.context_length of the file (8192;
//     the accuracy reports use n <= 2048). Text: WikiText-2 raw test split
//     (../shared/data/wikitext-2-raw/wiki.test.raw) from its first byte, byte-level BPE, no BOS (as
//     tests/test_smollm2.cpp), tokens [offset, offset + n). RoPE pairing: llama.cpp's converter
//     permutes the Q/K rows of each head so that RoPE rotates adjacent pairs; the captured q and k
//     are in that (GGUF) coordinate order. Hugging Face's order differs by one fixed permutation of
//     the d coordinates of every head, the same for q and k, so every q.k (and |entry| statistic)
//     is the same.
//   slm4096 (GPT-2 architecture, ../shared/models/slm4096): 4 layers, H 4 (= H_kv), d 16, biases on
//     Q/K/V/O, learned absolute positions (no RoPE; they enter through h), block 128 (n <= 128).
//     Text: the characters of corpus.txt (its training text), ids [offset, offset + n).
// A missing model or text file is not an error: load_*_capture returns std::nullopt and says why.
//
// API (namespace capture):
//   struct layer_capture { layer, n, h_q, h_kv, d, d_v, scale, causal, q, k, v, out, forward_check;
//                          q_view(), k_view(), v_view(), out_view(), options() }
//   struct model_capture { model, text, positions, ids, layers }
//   capture_attention(model, ids, layers = {})   -> std::vector<layer_capture>
//       model: models::llama_model<T> or models::gpt2_model<T> (dense); layers: indices to keep
//       (empty = all; the forward pass always runs through every layer).
//   load_stories260k_capture(shared_dir, n, why, offset = 0)                -> optional<model_capture>
//   load_smollm2_capture(model_cache, shared_dir, n, why, offset = 0)       -> optional<model_capture>
//   load_slm4096_capture(shared_dir, n, why, offset = 0)                    -> optional<model_capture>
//   Pieces: stories260k_paths / smollm2_paths / slm4096_paths, stories260k_tokens, wikitext_tokens,
//   slm4096_tokens. Statistics: max_abs(x), rows_above(view, threshold) (fraction of the [token,
//   head] rows with some |entry| > threshold), rel_frobenius(a, b), head_error(got, want, n, H, d_v, h),
//   quantile(x, q); uniform_causal(layer) (the uniform-attention baseline of a layer).
// Memory: 4 (n H_q (d + d_v) + n H_kv (d + d_v)) bytes per layer: SmolLM2 at n = 2048 is 12.6 MB a
// layer, 377 MB for all 30 (pass `layers` to keep fewer).
#pragma once

#include <basisattn/basisattn.hpp>
#include <basisattn/cpu/layers.hpp>
#include <basisattn/io/gguf.hpp>
#include <basisattn/io/llama2c.hpp>

#include "bpe_tokenizer.hpp"
#include "gpt2_model.hpp"
#include "llama_model.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

namespace capture {

using basisattn::index_t;
using basisattn::matrix;
using basisattn::tensor3_view;
namespace bd = basisattn::bd;
namespace io = basisattn::io;

/// One layer's attention problem as the model computes it (see the top of the file).
struct layer_capture {
  index_t layer = 0;
  index_t n = 0, h_q = 0, h_kv = 0, d = 0, d_v = 0;
  double scale = 0;                 ///< the softmax scale the model applies to q.k (not folded into q)
  bool causal = true;               ///< query i sees keys 0..i
  std::vector<float> q, k, v, out;  ///< [n, h_q, d], [n, h_kv, d], [n, h_kv, d_v], [n, h_q, d_v]
  /// ||W_O out - a|| / ||a|| (Frobenius) with a the model's attention block output: 0 when the
  /// capture reproduces the model's forward exactly.
  double forward_check = 0;

  tensor3_view<const float> q_view() const { return {q.data(), n, h_q, d}; }
  tensor3_view<const float> k_view() const { return {k.data(), n, h_kv, d}; }
  tensor3_view<const float> v_view() const { return {v.data(), n, h_kv, d_v}; }
  tensor3_view<const float> out_view() const { return {out.data(), n, h_q, d_v}; }
  /// The model's attention options: causal mask and scale (finite checks left on).
  basisattn::attention_options options() const {
    basisattn::attention_options o;
    o.causal = causal;
    o.scale = scale;
    return o;
  }
};

/// The captures of one model on one token sequence.
struct model_capture {
  std::string model;      ///< "stories260K", "SmolLM2-135M", "slm4096"
  std::string text;       ///< where the tokens come from
  std::string positions;  ///< the positional scheme, in words
  std::vector<std::int32_t> ids;
  std::vector<layer_capture> layers;
};

namespace detail {
inline bool exists(const std::string& p) { return std::ifstream(p).good(); }
inline std::string fmt_g(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}
inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  BASISATTN_REQUIRE(f.good(), io, "cannot open ", path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
template <class T>
std::vector<float> to_float(const matrix<T>& m) {
  std::vector<float> out(static_cast<std::size_t>(m.size()));
  for (index_t i = 0; i < m.size(); ++i) out[static_cast<std::size_t>(i)] = static_cast<float>(m.data()[i]);
  return out;
}
/// Missing files among `paths`, listed in `why`; true when all are present.
inline bool all_present(const std::vector<std::string>& paths, const std::string& hint, std::string& why) {
  why.clear();
  for (const auto& p : paths)
    if (!exists(p)) why += (why.empty() ? "" : ", ") + p;
  if (why.empty()) return true;
  why += " not found" + hint;
  return false;
}
}  // namespace detail

/// ||a - b||_F / ||b||_F in double (0 when both are 0).
inline double rel_frobenius(const std::vector<float>& a, const std::vector<float>& b) {
  BASISATTN_REQUIRE(a.size() == b.size(), shape_mismatch, "rel_frobenius: sizes ", a.size(), " and ", b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = double(a[i]) - double(b[i]);
    num += e * e;
    den += double(b[i]) * double(b[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

/// Relative Frobenius error of head h of got against want (both [n, H, d_v]); Inf when not finite.
inline double head_error(const std::vector<float>& got, const std::vector<float>& want, index_t n, index_t H,
                         index_t dv, index_t h) {
  double num = 0, den = 0;
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < dv; ++c) {
      const std::size_t j = std::size_t((i * H + h) * dv + c);
      num += (double(got[j]) - double(want[j])) * (double(got[j]) - double(want[j]));
      den += double(want[j]) * double(want[j]);
    }
  const double e = std::sqrt(num / den);
  return std::isfinite(e) ? e : std::numeric_limits<double>::infinity();
}

/// The q-quantile of x (nearest rank; NaN when x is empty).
inline double quantile(std::vector<double> x, double q) {
  if (x.empty()) return std::nan("");
  std::sort(x.begin(), x.end());
  const std::size_t i = std::min(x.size() - 1, static_cast<std::size_t>(q * double(x.size() - 1) + 0.5));
  return x[i];
}

/// max |x_i|.
inline double max_abs(const std::vector<float>& x) {
  double m = 0;
  for (const float e : x) m = std::max(m, double(std::abs(e)));
  return m;
}

/// Fraction of the rows x(t, h, :) (one per token and head) with some |entry| > threshold.
inline double rows_above(tensor3_view<const float> x, double threshold) {
  const index_t rows = x.extent[0] * x.extent[1];
  if (rows == 0) return 0;
  index_t count = 0;
  for (index_t t = 0; t < x.extent[0]; ++t)
    for (index_t h = 0; h < x.extent[1]; ++h) {
      bool above = false;
      for (index_t c = 0; c < x.extent[2] && !above; ++c) above = std::abs(double(x(t, h, c))) > threshold;
      count += above ? 1 : 0;
    }
  return double(count) / double(rows);
}

/// Run the model's forward pass on ids (positions 0..n-1) and capture every layer's attention
/// problem (or those in `layers`). Model: models::llama_model<T> or models::gpt2_model<T>, dense.
template <template <class> class Model, class T>
std::vector<layer_capture> capture_attention(const Model<T>& model, const std::vector<std::int32_t>& ids,
                                             const std::vector<index_t>& layers = {}) {
  const index_t n = static_cast<index_t>(ids.size());
  BASISATTN_REQUIRE(n >= 1, invalid_argument, "capture_attention: no tokens");
  std::vector<layer_capture> out;
  auto observe = [&](std::size_t l, const matrix<T>& h, const matrix<T>& a) {
    const index_t li = static_cast<index_t>(l);
    if (!layers.empty() && std::find(layers.begin(), layers.end(), li) == layers.end()) return;
    const bd::mha_layer<T>& L = model.attn[l];
    const bd::mha_config& cfg = L.config;
    BASISATTN_REQUIRE(!bd::is_bd(L.k) && !bd::is_bd(L.v), invalid_argument, "capture_attention: layer ", li,
                      " is BD; capture from the dense model (use_bd = false)");
    const index_t H = cfg.n_heads, Hkv = cfg.n_kv_heads, d = cfg.head_dim;
    // The steps of bd::forward (cpu/layers.hpp), with the same calls and storage type.
    bd::project_options po;
    matrix<T> q(n, H * d), k(n, Hkv * d), v(n, Hkv * d), att(n, H * d), y(n, cfg.d_model);
    bd::project(basisattn::cpu{}, L.q, h.view(), q.view(), po);
    po.check_finite = false;
    bd::project(basisattn::cpu{}, L.k, h.view(), k.view(), po);
    bd::project(basisattn::cpu{}, L.v, h.view(), v.view(), po);
    auto tq = tensor3_view<T>::from_matrix(q.view(), H);
    auto tk = tensor3_view<T>::from_matrix(k.view(), Hkv);
    if (cfg.use_rope) {
      basisattn::apply_rope(tq, cfg.rope);  // positions cfg.rope.position_offset + t, as the model's forward
      basisattn::apply_rope(tk, cfg.rope);
    }
    basisattn::attention_options ao;
    ao.causal = cfg.causal;
    ao.scale = cfg.scale;
    ao.check_finite = false;
    basisattn::attention(basisattn::cpu{}, tensor3_view<const T>(tq), tensor3_view<const T>(tk),
                         tensor3_view<const T>(tensor3_view<T>::from_matrix(v.view(), Hkv)),
                         tensor3_view<T>::from_matrix(att.view(), H), ao);
    const matrix<T>& catt = att;
    bd::project(basisattn::cpu{}, L.o, catt.view(), y.view(), po);
    layer_capture c;
    c.layer = li;
    c.n = n, c.h_q = H, c.h_kv = Hkv, c.d = d, c.d_v = d;
    c.scale = cfg.scale > 0 ? cfg.scale : 1.0 / std::sqrt(static_cast<double>(d));
    c.causal = cfg.causal;
    c.q = detail::to_float(q), c.k = detail::to_float(k), c.v = detail::to_float(v), c.out = detail::to_float(att);
    c.forward_check = rel_frobenius(detail::to_float(y), detail::to_float(a));
    out.push_back(std::move(c));
  };
  (void)model.logits(ids, models::attention_observer<T>(observe));
  return out;
}

// ------------------------------------------------------------------------------------------------
// stories260K (llama2.c)

struct stories260k_paths {
  std::string model, tokenizer, text;
  explicit stories260k_paths(const std::string& shared_dir)
      : model(shared_dir + "/models/stories260K/stories260K.bin"),
        tokenizer(shared_dir + "/models/stories260K/tok512.bin"),
        text(shared_dir + "/data/tinystories/tinystories_train_head.txt") {}
};

/// Tokens [offset, offset + n) of the TinyStories sample: each non-blank (trimmed) line as
/// [BOS] + run.c's encode(line), concatenated. errc::invalid_argument when the text is too short.
inline std::vector<std::int32_t> stories260k_tokens(const io::llama2c_tokenizer& tok, const std::string& text_path,
                                                    index_t n, index_t offset = 0) {
  BASISATTN_REQUIRE(n >= 1 && offset >= 0, invalid_argument, "stories260k_tokens: n ", n, ", offset ", offset);
  std::ifstream f(text_path);
  BASISATTN_REQUIRE(f.good(), io, "cannot open ", text_path);
  std::vector<std::int32_t> ids;
  for (std::string line; static_cast<index_t>(ids.size()) < offset + n && std::getline(f, line);) {
    const auto b = line.find_first_not_of(" \t\r\n"), e = line.find_last_not_of(" \t\r\n");
    if (b == std::string::npos) continue;
    const std::vector<std::int32_t> doc = tok.encode(line.substr(b, e - b + 1), true);
    ids.insert(ids.end(), doc.begin(), doc.end());
  }
  BASISATTN_REQUIRE(static_cast<index_t>(ids.size()) >= offset + n, invalid_argument, "stories260k_tokens: ", text_path,
                    " has ", ids.size(), " tokens, fewer than offset + n = ", offset + n);
  return std::vector<std::int32_t>(ids.begin() + offset, ids.begin() + offset + n);
}

/// stories260K's captures on n TinyStories tokens (n <= 512, its context), or nothing (why says
/// which file is missing).
inline std::optional<model_capture> load_stories260k_capture(const std::string& shared_dir, index_t n, std::string& why,
                                                             index_t offset = 0,
                                                             const std::vector<index_t>& layers = {}) {
  const stories260k_paths p(shared_dir);
  if (!detail::all_present({p.model, p.tokenizer, p.text}, " (set the shared folder holding models/ and data/)", why))
    return std::nullopt;
  const io::llama2c_checkpoint ck = io::read_llama2c(p.model);
  BASISATTN_REQUIRE(n >= 1 && n <= ck.config.seq_len, invalid_argument, "stories260K: n = ", n,
                    " outside its context 1..", ck.config.seq_len);
  const io::llama2c_tokenizer tok = io::read_llama2c_tokenizer(p.tokenizer, ck.config.vocab_size);
  const auto m = models::llama_model<float>::from_llama2c(ck, false);
  model_capture c;
  c.model = "stories260K";
  c.text = "TinyStories sample, [BOS]+line concatenated, tokens " + std::to_string(offset) + ".." +
           std::to_string(offset + n - 1);
  c.positions =
      "RoPE, adjacent pairs (2i, 2i+1), base " + detail::fmt_g(m.attn.front().config.rope.theta) + ", positions 0..n-1";
  c.ids = stories260k_tokens(tok, p.text, n, offset);
  c.layers = capture_attention(m, c.ids, layers);
  return c;
}

// ------------------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct (GGUF)

struct smollm2_paths {
  std::string model, text;
  smollm2_paths(const std::string& model_cache, const std::string& shared_dir)
      : model(model_cache + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        text(shared_dir + "/data/wikitext-2-raw/wiki.test.raw") {}
};

/// Tokens [offset, offset + n) of wiki.test.raw from its first byte (bytes as stored), no BOS.
inline std::vector<std::int32_t> wikitext_tokens(const models::bpe_tokenizer& tok, const std::string& text_path,
                                                 index_t n, index_t offset = 0) {
  BASISATTN_REQUIRE(n >= 1 && offset >= 0, invalid_argument, "wikitext_tokens: n ", n, ", offset ", offset);
  const std::string text = detail::read_text(text_path);
  // Encode a prefix long enough (BPE of a prefix can differ from the whole text only in its last
  // pre-tokenized piece: drop a margin of tokens beyond the ones kept).
  const std::size_t want = static_cast<std::size_t>(offset + n), margin = 64;
  for (std::size_t bytes = 8 * (want + margin);; bytes *= 2) {
    const bool whole = bytes >= text.size();
    std::vector<std::int32_t> ids = tok.encode(whole ? text : text.substr(0, bytes));
    if (ids.size() >= want + (whole ? 0 : margin))
      return std::vector<std::int32_t>(ids.begin() + offset, ids.begin() + offset + n);
    BASISATTN_REQUIRE(!whole, invalid_argument, "wikitext_tokens: ", text_path, " has ", ids.size(),
                      " tokens, fewer than offset + n = ", want);
  }
}

/// SmolLM2-135M's captures on n WikiText-2 test tokens (n <= the file's context length), or nothing.
inline std::optional<model_capture> load_smollm2_capture(const std::string& model_cache, const std::string& shared_dir,
                                                         index_t n, std::string& why, index_t offset = 0,
                                                         const std::vector<index_t>& layers = {}) {
  const smollm2_paths p(model_cache, shared_dir);
  if (!detail::all_present({p.model, p.text}, " (the GGUF comes from scripts/fetch-models.sh)", why))
    return std::nullopt;
  const io::gguf_file f = io::read_gguf(p.model);
  const auto m = models::llama_model<float>::from_gguf(f, false);
  BASISATTN_REQUIRE(n >= 1 && n <= m.cfg.seq_len, invalid_argument, "SmolLM2: n = ", n, " outside its context 1..",
                    m.cfg.seq_len);
  const models::bpe_tokenizer tok = models::bpe_tokenizer::from_gguf(f);
  model_capture c;
  c.model = "SmolLM2-135M";
  c.text = "WikiText-2 raw test, byte-level BPE, no BOS, tokens " + std::to_string(offset) + ".." +
           std::to_string(offset + n - 1);
  c.positions = "RoPE, adjacent pairs of the GGUF-permuted heads (= HF rotate-half), base " +
                detail::fmt_g(m.attn.front().config.rope.theta) + ", positions 0..n-1";
  c.ids = wikitext_tokens(tok, p.text, n, offset);
  c.layers = capture_attention(m, c.ids, layers);
  return c;
}

// ------------------------------------------------------------------------------------------------
// slm4096 (GPT-2 architecture, character level)

struct slm4096_paths {
  std::string model, text;
  explicit slm4096_paths(const std::string& shared_dir)
      : model(shared_dir + "/models/slm4096/slm4096.f32.bin"), text(shared_dir + "/models/slm4096/corpus.txt") {}
};

/// Character ids [offset, offset + n) of corpus.txt (vocabulary: SOURCE.txt).
inline std::vector<std::int32_t> slm4096_tokens(const std::string& corpus_path, index_t n, index_t offset = 0) {
  const std::string vocab = "\n ,-.026:?ABCDEFGHILMOPQRSTWabcdefghijklmnopqrstuvwxyz";
  const std::string text = detail::read_text(corpus_path);
  BASISATTN_REQUIRE(n >= 1 && offset >= 0 && static_cast<std::size_t>(offset + n) <= text.size(), invalid_argument,
                    "slm4096_tokens: characters [", offset, ", ", offset + n, ") outside the ", text.size(), " of ",
                    corpus_path);
  std::vector<std::int32_t> ids;
  for (index_t i = offset; i < offset + n; ++i) {
    const auto id = vocab.find(text[static_cast<std::size_t>(i)]);
    BASISATTN_REQUIRE(id != std::string::npos, io, corpus_path, ": character ", i, " outside slm4096's vocabulary");
    ids.push_back(static_cast<std::int32_t>(id));
  }
  return ids;
}

/// slm4096's captures on n characters of its corpus (n <= 128, its block size), or nothing.
inline std::optional<model_capture> load_slm4096_capture(const std::string& shared_dir, index_t n, std::string& why,
                                                         index_t offset = 0, const std::vector<index_t>& layers = {}) {
  const slm4096_paths p(shared_dir);
  if (!detail::all_present({p.model, p.text}, " (set the shared folder holding models/)", why)) return std::nullopt;
  const auto m = models::gpt2_model<float>::from_flat_file(p.model, false);
  BASISATTN_REQUIRE(n >= 1 && n <= m.block, invalid_argument, "slm4096: n = ", n, " outside its context 1..", m.block);
  model_capture c;
  c.model = "slm4096";
  c.text = "corpus.txt characters " + std::to_string(offset) + ".." + std::to_string(offset + n - 1);
  c.positions = "learned absolute positions 0..n-1 (added to the embeddings; no RoPE)";
  c.ids = slm4096_tokens(p.text, n, offset);
  c.layers = capture_attention(m, c.ids, layers);
  return c;
}

/// Uniform causal attention of a captured layer ([n, h_q, d_v]: row i of head h is the mean of the
/// visible values v_0..v_i of its kv head), the baseline an approximate attention must beat.
inline std::vector<float> uniform_causal(const layer_capture& L) {
  std::vector<float> uni(L.out.size());
  const index_t group = L.h_q / L.h_kv;
  for (index_t h = 0; h < L.h_q; ++h) {
    std::vector<double> sum(std::size_t(L.d_v), 0.0);
    for (index_t i = 0; i < L.n; ++i)
      for (index_t c = 0; c < L.d_v; ++c) {
        sum[std::size_t(c)] += L.v[std::size_t((i * L.h_kv + h / group) * L.d_v + c)];
        uni[std::size_t((i * L.h_q + h) * L.d_v + c)] = float(sum[std::size_t(c)] / double(i + 1));
      }
  }
  return uni;
}

}  // namespace capture
