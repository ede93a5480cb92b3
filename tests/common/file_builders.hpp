// Builders of small checkpoint files (GGUF, llama2.c, llama2.c tokenizer) for the reader tests, the
// fuzz corpus and the converter tests. Written from the format descriptions; little-endian.
#pragma once

#include <basisattn/io/tensor.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace build {

struct bytes {
  std::vector<unsigned char> v;
  template <class T>
  bytes& put(T x) {
    unsigned char b[sizeof(T)];
    std::memcpy(b, &x, sizeof(T));
    v.insert(v.end(), b, b + sizeof(T));
    return *this;
  }
  bytes& str64(const std::string& s) {  // GGUF string: u64 length + bytes
    put<std::uint64_t>(s.size());
    v.insert(v.end(), s.begin(), s.end());
    return *this;
  }
  bytes& raw(const std::vector<unsigned char>& d) {
    v.insert(v.end(), d.begin(), d.end());
    return *this;
  }
  void pad_to(std::size_t align) {
    while (v.size() % align) v.push_back(0);
  }
};

inline std::uint16_t half_bits(float f) {
  const Eigen::half h(f);
  return h.x;
}

/// Quantise 32 floats into one GGML block (scale d = max|x| / 7 for Q4_0 etc.); returns the block.
inline std::vector<unsigned char> q4_0_block(const float* x) {
  float amax = 0, maxv = 0;
  for (int i = 0; i < 32; ++i)
    if (std::abs(x[i]) > amax) amax = std::abs(x[i]), maxv = x[i];
  const float d = maxv / -8.0f, id = d != 0 ? 1.0f / d : 0.0f;
  bytes b;
  b.put(half_bits(d));
  for (int j = 0; j < 16; ++j) {
    const int a = std::min(15, int(x[j] * id + 8.5f)), c = std::min(15, int(x[j + 16] * id + 8.5f));
    b.v.push_back(static_cast<unsigned char>(a | (c << 4)));
  }
  return b.v;
}
inline std::vector<unsigned char> q4_1_block(const float* x) {
  float mn = x[0], mx = x[0];
  for (int i = 1; i < 32; ++i) mn = std::min(mn, x[i]), mx = std::max(mx, x[i]);
  const float d = (mx - mn) / 15.0f, id = d != 0 ? 1.0f / d : 0.0f;
  bytes b;
  b.put(half_bits(d)).put(half_bits(mn));
  for (int j = 0; j < 16; ++j) {
    const int a = std::min(15, int((x[j] - mn) * id + 0.5f)), c = std::min(15, int((x[j + 16] - mn) * id + 0.5f));
    b.v.push_back(static_cast<unsigned char>(a | (c << 4)));
  }
  return b.v;
}
inline std::vector<unsigned char> q8_0_block(const float* x) {
  float amax = 0;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(x[i]));
  const float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
  bytes b;
  b.put(half_bits(d));
  for (int j = 0; j < 32; ++j)
    b.v.push_back(static_cast<unsigned char>(static_cast<std::int8_t>(std::lround(x[j] * id))));
  return b.v;
}

/// A GGUF tensor to write: GGML type id, ne[] (fastest first), encoded data.
struct gguf_tensor {
  std::string name;
  std::uint32_t ggml_type;
  std::vector<std::uint64_t> ne;
  std::vector<unsigned char> data;
};

/// A GGUF v3 file with a few metadata entries of several types and the given tensors.
inline std::vector<unsigned char> gguf(const std::vector<gguf_tensor>& tensors, std::uint32_t alignment = 32) {
  bytes b;
  b.v = {'G', 'G', 'U', 'F'};
  b.put<std::uint32_t>(3).put<std::uint64_t>(tensors.size()).put<std::uint64_t>(5);
  b.str64("general.architecture").put<std::uint32_t>(8).str64("llama");
  b.str64("general.alignment").put<std::uint32_t>(4).put<std::uint32_t>(alignment);
  b.str64("llama.block_count").put<std::uint32_t>(10).put<std::uint64_t>(2);
  b.str64("llama.rope.freq_base").put<std::uint32_t>(6).put<float>(10000.0f);
  b.str64("tokenizer.ggml.tokens").put<std::uint32_t>(9).put<std::uint32_t>(8).put<std::uint64_t>(3);
  b.str64("<s>").str64("a").str64("b");
  std::uint64_t off = 0;
  std::vector<std::uint64_t> offsets;
  for (const auto& t : tensors) {
    off = (off + alignment - 1) / alignment * alignment;
    offsets.push_back(off);
    off += t.data.size();
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    b.str64(t.name).put<std::uint32_t>(static_cast<std::uint32_t>(t.ne.size()));
    for (auto d : t.ne) b.put<std::uint64_t>(d);
    b.put<std::uint32_t>(t.ggml_type).put<std::uint64_t>(offsets[i]);
  }
  b.pad_to(alignment);
  const std::size_t data_start = b.v.size();
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    while (b.v.size() < data_start + offsets[i]) b.v.push_back(0);
    b.raw(tensors[i].data);
  }
  return b.v;
}

/// Value number i of the checkpoints written by llama2c() below (exact in float, so no libm or
/// vectorisation difference can change it).
inline float llama2c_value(std::size_t i) { return float(i % 1021) / 1024.0f - 0.5f; }

/// A legacy llama2.c checkpoint with the given shape; value number i is llama2c_value(i).
inline std::vector<unsigned char> llama2c(int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int seq,
                                          bool shared = true) {
  bytes b;
  for (int x : {dim, hidden, layers, heads, kv_heads, shared ? vocab : -vocab, seq}) b.put<std::int32_t>(x);
  const int kv_dim = kv_heads * (dim / heads);
  const std::size_t n = std::size_t(vocab) * dim +
                        std::size_t(layers) * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim) + dim +
                        std::size_t(seq) * (dim / heads);  // + rope tables (two halves)
  const std::size_t total = n + (shared ? 0 : std::size_t(vocab) * dim);
  for (std::size_t i = 0; i < total; ++i) b.put<float>(llama2c_value(i));
  return b.v;
}

/// A llama2.c tokenizer file: max length, then (score, length, bytes) per piece.
inline std::vector<unsigned char> llama2c_tokenizer(const std::vector<std::string>& pieces,
                                                    const std::vector<float>& scores) {
  bytes b;
  std::uint32_t mx = 0;
  for (const auto& p : pieces) mx = std::max<std::uint32_t>(mx, static_cast<std::uint32_t>(p.size()));
  b.put<std::uint32_t>(mx);
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    b.put<float>(scores[i]).put<std::int32_t>(static_cast<std::int32_t>(pieces[i].size()));
    b.v.insert(b.v.end(), pieces[i].begin(), pieces[i].end());
  }
  return b.v;
}

}  // namespace build
