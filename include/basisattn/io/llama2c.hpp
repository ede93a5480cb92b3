// basisattn/io/llama2c.hpp - llama2.c checkpoints (legacy "run.c" format) and their tokenizer.
//
//   io::llama2c_checkpoint c = io::read_llama2c(path);   // or io::parse_llama2c(bytes)
//     c.config (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, shared_classifier)
//     c.tensors: token_embedding [vocab, dim], rms_att [L, dim], wq [L, dim, dim], wk/wv [L, kv_dim, dim],
//                wo [L, dim, dim], rms_ffn [L, dim], w1/w3 [L, hidden, dim], w2 [L, dim, hidden],
//                rms_final [dim], wcls [vocab, dim] (only when not shared); matrices stored (out, in)
//     c.layer_matrix(name, layer) -> matrix<float> (out x in); c.vector(name [, layer])
//   io::llama2c_tokenizer t = io::read_llama2c_tokenizer(path, vocab_size);   // tok*.bin
//     t.encode(text, bos) -> token ids, exactly as llama2.c's run.c (dummy " " prefix, UTF-8 code
//     points or byte fallback id = byte + 3, then greedy best-score pair merges); t.decode(id)
//     t.encode(text, bos, false) -> the same with every multi-byte code point split into bytes
// Validation (errc::io): positive dimensions, heads dividing dim, kv heads dividing heads, sizes
// without overflow, and a file length equal to the header's promise (with or without the legacy
// RoPE tables); the versioned "ak42" format is refused as unsupported. Tokenizer: lengths and
// counts within the file.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/tensor.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <unordered_map>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace io {

struct llama2c_config {
  index_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  bool shared_classifier = true;
  index_t head_dim() const { return dim / n_heads; }
  index_t kv_dim() const { return n_kv_heads * head_dim(); }
};

struct llama2c_checkpoint {
  llama2c_config config;
  std::vector<unsigned char> bytes;
  std::vector<tensor_info> tensors;

  const tensor_info& get(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t;
    ::basisattn::detail::raise(errc::io, "llama2.c checkpoint: no tensor named '" + name + "'");
  }
  /// Layer `layer` of a stacked [L, out, in] tensor, as an out x in matrix.
  matrix<float> layer_matrix(const std::string& name, index_t layer) const {
    const tensor_info& t = get(name);
    BASISATTN_REQUIRE(t.shape.size() == 3 && layer >= 0 && static_cast<std::uint64_t>(layer) < t.shape[0],
                      invalid_argument, "llama2.c checkpoint: '", name, "' has no layer ", layer);
    const index_t rows = static_cast<index_t>(t.shape[1]), cols = static_cast<index_t>(t.shape[2]);
    matrix<float> m(rows, cols);
    decode_to_float(tensor_type::f32, bytes.data() + t.offset + std::uint64_t(layer) * rows * cols * 4,
                    std::uint64_t(rows * cols), m.data());
    return m;
  }
  /// A 2-D tensor (token_embedding, wcls) or row `layer` of a stacked [L, n] vector tensor.
  matrix<float> matrix_of(const std::string& name) const { return as_matrix(get(name), bytes); }
  std::vector<float> vector(const std::string& name, index_t layer = -1) const {
    const tensor_info& t = get(name);
    const std::vector<float> all = to_float(t, bytes);
    if (layer < 0) return all;
    BASISATTN_REQUIRE(t.shape.size() == 2 && static_cast<std::uint64_t>(layer) < t.shape[0], invalid_argument,
                      "llama2.c checkpoint: '", name, "' has no layer ", layer);
    const std::size_t n = static_cast<std::size_t>(t.shape[1]);
    return std::vector<float>(all.begin() + layer * n, all.begin() + (layer + 1) * n);
  }
};

/// Parse a llama2.c checkpoint held in memory.
inline llama2c_checkpoint parse_llama2c(std::vector<unsigned char> bytes,
                                        const std::string& source = "llama2.c checkpoint") {
  detail::require_little_endian();
  llama2c_checkpoint c;
  c.bytes = std::move(bytes);
  byte_reader r(c.bytes.data(), c.bytes.size(), source);
  BASISATTN_REQUIRE(!(c.bytes.size() >= 4 && std::memcmp(c.bytes.data(), "ak42", 4) == 0), unsupported, source,
                    ": versioned llama2.c export ('ak42' magic) is not supported; use the legacy run.c format");
  std::int32_t h[7];
  for (auto& v : h) v = r.i32("header");
  auto& k = c.config;
  k.dim = h[0], k.hidden_dim = h[1], k.n_layers = h[2], k.n_heads = h[3], k.n_kv_heads = h[4];
  k.shared_classifier = h[5] > 0;
  k.vocab_size = h[5] > 0 ? h[5] : -static_cast<index_t>(h[5]);
  k.seq_len = h[6];
  BASISATTN_REQUIRE(k.dim > 0 && k.hidden_dim > 0 && k.n_layers > 0 && k.n_heads > 0 && k.n_kv_heads > 0 &&
                        k.vocab_size > 0 && k.seq_len > 0,
                    io, source, ": header has a non-positive field (dim ", k.dim, ", hidden ", k.hidden_dim,
                    ", layers ", k.n_layers, ", heads ", k.n_heads, ", kv heads ", k.n_kv_heads, ", vocab ",
                    k.vocab_size, ", seq_len ", k.seq_len, ")");
  BASISATTN_REQUIRE(k.dim % k.n_heads == 0 && k.n_heads % k.n_kv_heads == 0 && k.head_dim() % 2 == 0, io, source,
                    ": inconsistent heads (dim ", k.dim, ", heads ", k.n_heads, ", kv heads ", k.n_kv_heads, ")");
  const std::uint64_t D = std::uint64_t(k.dim), H = std::uint64_t(k.hidden_dim), L = std::uint64_t(k.n_layers),
                      V = std::uint64_t(k.vocab_size), KV = std::uint64_t(k.kv_dim()), S = std::uint64_t(k.seq_len);
  std::uint64_t off = r.offset();
  auto add = [&](const std::string& name, std::vector<std::uint64_t> shape) {
    tensor_info t;
    t.name = name;
    t.type = tensor_type::f32;
    t.shape = std::move(shape);
    t.offset = off;
    t.bytes = checked_mul(t.numel(), 4, "llama2.c tensor size");
    off = checked_add(off, t.bytes, "llama2.c file size");
    c.tensors.push_back(std::move(t));
  };
  add("token_embedding", {V, D});
  add("rms_att", {L, D});
  add("wq", {L, D, D});
  add("wk", {L, KV, D});
  add("wv", {L, KV, D});
  add("wo", {L, D, D});
  add("rms_ffn", {L, D});
  add("w1", {L, H, D});
  add("w2", {L, D, H});
  add("w3", {L, H, D});
  add("rms_final", {D});
  const std::uint64_t rope_bytes =
      checked_mul(checked_mul(S, D / std::uint64_t(k.n_heads) / 2, "rope table"), 8, "rope tables");
  std::uint64_t expect = off;
  if (!k.shared_classifier) {
    const std::uint64_t cls_off = checked_add(off, rope_bytes, "llama2.c file size");
    off = cls_off;
    add("wcls", {V, D});
    expect = off;
  } else {
    expect = checked_add(off, rope_bytes, "llama2.c file size");
  }
  // The legacy format keeps two RoPE tables between rms_final and wcls; some exports omit them
  // when the classifier is shared.
  const bool ok = c.bytes.size() == expect || (k.shared_classifier && c.bytes.size() == expect - rope_bytes);
  BASISATTN_REQUIRE(ok, io, source, ": file has ", c.bytes.size(), " bytes, the header promises ", expect, " (dim ",
                    k.dim, ", hidden ", k.hidden_dim, ", layers ", k.n_layers, ", vocab ", k.vocab_size,
                    "): truncated, padded, or not a legacy llama2.c checkpoint");
  return c;
}

inline llama2c_checkpoint read_llama2c(const std::string& path) { return parse_llama2c(read_file(path), path); }

/// llama2.c's BPE tokenizer (tok*.bin): scored pieces, greedy merges, byte fallback.
struct llama2c_tokenizer {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::unordered_map<std::string, std::int32_t> index;
  std::uint32_t max_token_length = 0;

  /// Token ids of `text` as run.c's encode(): optional BOS (1), a dummy " " prefix for non-empty
  /// text, UTF-8 code points (or their bytes + 3), then repeated merges of the adjacent pair whose
  /// concatenation is a piece with the highest score. With whole_code_points = false, multi-byte
  /// code points always fall back to their bytes (a simplification some tools use; the
  /// stories260K reference perplexity in ../shared was computed that way).
  std::vector<std::int32_t> encode(const std::string& text, bool bos = true, bool whole_code_points = true) const {
    std::vector<std::int32_t> ids;
    if (bos) ids.push_back(1);
    if (!text.empty()) {
      const auto it = index.find(" ");
      BASISATTN_REQUIRE(it != index.end(), io, "llama2.c tokenizer has no ' ' piece");
      ids.push_back(it->second);
    }
    for (std::size_t i = 0; i < text.size();) {
      std::size_t n = 1;  // length of this UTF-8 code point (continuation bytes 10xxxxxx, at most 4)
      while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
      const auto it = (n == 1 || whole_code_points) ? index.find(text.substr(i, n)) : index.end();
      if (it != index.end()) {
        ids.push_back(it->second);
      } else {
        for (std::size_t b = 0; b < n; ++b)
          ids.push_back(static_cast<std::int32_t>(static_cast<unsigned char>(text[i + b])) + 3);
      }
      i += n;
    }
    while (true) {  // run.c considers every adjacent pair, BOS included
      float best = -1e10f;
      std::int32_t best_id = -1;
      std::size_t best_at = 0;
      for (std::size_t i = 0; i + 1 < ids.size(); ++i) {
        const auto it =
            index.find(pieces[static_cast<std::size_t>(ids[i])] + pieces[static_cast<std::size_t>(ids[i + 1])]);
        if (it != index.end() && scores[static_cast<std::size_t>(it->second)] > best)
          best = scores[static_cast<std::size_t>(it->second)], best_id = it->second, best_at = i;
      }
      if (best_id < 0) break;
      ids[best_at] = best_id;
      ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
    }
    return ids;
  }
  const std::string& decode(std::int32_t id) const {
    BASISATTN_REQUIRE(id >= 0 && static_cast<std::size_t>(id) < pieces.size(), invalid_argument, "token id ", id,
                      " outside the vocabulary of ", pieces.size());
    return pieces[static_cast<std::size_t>(id)];
  }
};

inline llama2c_tokenizer parse_llama2c_tokenizer(const std::vector<unsigned char>& bytes, index_t vocab_size,
                                                 const std::string& source = "llama2.c tokenizer") {
  detail::require_little_endian();
  BASISATTN_REQUIRE(vocab_size > 0, invalid_argument, "llama2.c tokenizer: vocab_size ", vocab_size,
                    " must be positive");
  byte_reader r(bytes.data(), bytes.size(), source);
  llama2c_tokenizer t;
  t.max_token_length = r.u32("max token length");
  for (index_t i = 0; i < vocab_size; ++i) {
    const float score = r.f32("piece score");
    const std::int32_t len = r.i32("piece length");
    BASISATTN_REQUIRE(len >= 0 && static_cast<std::uint32_t>(len) <= std::max<std::uint32_t>(t.max_token_length, 64),
                      io, source, ": piece ", i, " has length ", len);
    t.pieces.push_back(r.str(static_cast<std::uint64_t>(len), "piece bytes"));
    t.scores.push_back(score);
    t.index.emplace(t.pieces.back(), static_cast<std::int32_t>(i));
  }
  BASISATTN_REQUIRE(r.remaining() == 0, io, source, ": ", r.remaining(), " bytes after the ", vocab_size, " pieces");
  return t;
}

inline llama2c_tokenizer read_llama2c_tokenizer(const std::string& path, index_t vocab_size) {
  return parse_llama2c_tokenizer(read_file(path), vocab_size, path);
}

}  // namespace io
BASISATTN_END_NAMESPACE
