// basisattn/io/architectures.hpp - the checkpoints the converter knows: formats, architectures and
// where their attention tensors are (io::checkpoint, io::open_checkpoint).
//
//   io::checkpoint c = io::open_checkpoint(path);  // llama2.c .bin, GGUF (llama, mistral, qwen2), or
//                                                  // safetensors (HF BERT / Llama names, config.json
//                                                  // beside it or given)
//   c.attention (shapes, RoPE, causal), c.layers[l] (the tensor names of layer l), c.values(name)
// Errors: errc::io for files that are not what they claim (tensor shapes that disagree with the
// configuration included), errc::unsupported for architectures the converter does not know.
#pragma once

#include <basisattn/bd/layers.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/gguf.hpp>
#include <basisattn/io/llama2c.hpp>
#include <basisattn/io/safetensors.hpp>
#include <basisattn/io/tensor.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace io {

/// Names of the attention tensors of one layer (PyTorch (out, in) weights); "" for an absent bias.
struct attention_names {
  std::string wq, wk, wv, wo, bq, bk, bv, bo;
};

/// A checkpoint as the converter sees it: its tensors (one entry per layer for llama2.c's stacked
/// tensors) and where the attention weights are.
struct checkpoint {
  std::string source;        ///< path
  std::string format;        ///< "llama2c", "gguf" or "safetensors"
  std::string architecture;  ///< "llama", "bert"
  std::vector<unsigned char> bytes;
  std::vector<tensor_info> tensors;
  bd::mha_config attention;  ///< shapes; use_rope marks RoPE models (Q/K is then not eligible)
  std::vector<attention_names> layers;

  const tensor_info& get(const std::string& name) const { return get_tensor(tensors, name, format.c_str()); }
  /// A tensor's values as a matrix (2-D: rows x cols; 1-D: 1 x n).
  matrix<float> values(const std::string& name) const { return as_matrix(get(name), bytes); }
};

namespace detail {
inline void check_attention_shapes(const checkpoint& c) {
  const bd::mha_config& a = c.attention;
  BASISATTN_REQUIRE(
      a.d_model > 0 && a.n_heads > 0 && a.n_kv_heads > 0 && a.head_dim > 0 && a.n_heads % a.n_kv_heads == 0, io,
      c.source, ": bad attention shape (d_model ", a.d_model, ", ", a.n_heads, " heads, ", a.n_kv_heads,
      " kv heads, head dim ", a.head_dim, ")");
  BASISATTN_REQUIRE(!c.layers.empty(), io, c.source, ": no attention layers found");
  const std::uint64_t dm = std::uint64_t(a.d_model), q = std::uint64_t(a.n_heads * a.head_dim),
                      kv = std::uint64_t(a.n_kv_heads * a.head_dim);
  auto expect = [&](const std::string& name, std::vector<std::uint64_t> shape) {
    if (name.empty()) return;
    const tensor_info& t = c.get(name);
    BASISATTN_REQUIRE(t.shape == shape, io, c.source, ": tensor '", name, "' has shape ",
                      nlohmann::json(t.shape).dump(), ", the model's configuration needs ",
                      nlohmann::json(shape).dump());
  };
  for (const auto& l : c.layers) {
    expect(l.wq, {q, dm}), expect(l.wk, {kv, dm}), expect(l.wv, {kv, dm}), expect(l.wo, {dm, q});
    expect(l.bq, {q}), expect(l.bk, {kv}), expect(l.bv, {kv}), expect(l.bo, {dm});
  }
}
inline std::string optional_name(const checkpoint& c, const std::string& name) {
  return find_tensor(c.tensors, name) ? name : std::string();
}
}  // namespace detail

/// A llama2.c checkpoint: the stacked [L, ...] tensors become one tensor per layer, named
/// "layers.<l>.<name>" (wq, wk, wv, wo, w1, w2, w3, rms_att, rms_ffn).
inline checkpoint open_llama2c(const std::string& path) {
  llama2c_checkpoint l = read_llama2c(path);
  checkpoint c;
  c.source = path, c.format = "llama2c", c.architecture = "llama";
  const auto& k = l.config;
  c.attention = bd::mha_config{k.dim, k.n_heads, k.n_kv_heads, k.head_dim()};
  c.attention.use_rope = true;
  for (const tensor_info& t : l.tensors) {
    if (t.shape.size() == 1 || t.name == "token_embedding" || t.name == "wcls" || t.name == "rms_final" ||
        (t.shape.size() == 2 && t.name.rfind("freq_cis", 0) == 0)) {
      c.tensors.push_back(t);
      continue;
    }
    const std::uint64_t layers = t.shape[0], per = t.numel() / layers;
    for (std::uint64_t i = 0; i < layers; ++i) {
      tensor_info s = t;
      s.name = "layers." + std::to_string(i) + "." + t.name;
      s.shape.erase(s.shape.begin());
      s.offset = t.offset + i * per * 4;
      s.bytes = per * 4;
      c.tensors.push_back(std::move(s));
    }
  }
  for (index_t i = 0; i < k.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    c.layers.push_back({p + "wq", p + "wk", p + "wv", p + "wo", "", "", "", ""});
  }
  c.bytes = std::move(l.bytes);
  detail::check_attention_shapes(c);
  return c;
}

/// A GGUF file of a Llama-family architecture (llama, mistral, qwen2: blk.<l>.attn_{q,k,v,output}).
inline checkpoint open_gguf(const std::string& path) {
  gguf_file f = read_gguf(path);
  checkpoint c;
  c.source = path, c.format = "gguf";
  c.architecture = f.get_string("general.architecture");
  BASISATTN_REQUIRE(c.architecture == "llama" || c.architecture == "mistral" || c.architecture == "qwen2", unsupported,
                    path, ": GGUF architecture '", c.architecture,
                    "' is not supported by the converter (llama, mistral, qwen2 are)");
  const std::string a = c.architecture + ".";
  const index_t dm = static_cast<index_t>(f.get_u64(a + "embedding_length"));
  const index_t H = static_cast<index_t>(f.get_u64(a + "attention.head_count"));
  const index_t Hkv =
      f.has(a + "attention.head_count_kv") ? static_cast<index_t>(f.get_u64(a + "attention.head_count_kv")) : H;
  const index_t L = static_cast<index_t>(f.get_u64(a + "block_count"));
  BASISATTN_REQUIRE(H > 0 && dm % H == 0 && L > 0, io, path, ": embedding_length ", dm, " and head_count ", H,
                    " do not fit");
  c.attention = bd::mha_config{dm, H, Hkv, dm / H};
  c.attention.use_rope = true;
  c.tensors = f.tensors;
  c.bytes = std::move(f.bytes);
  for (index_t i = 0; i < L; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".attn_";
    c.layers.push_back({p + "q.weight", p + "k.weight", p + "v.weight", p + "output.weight",
                        detail::optional_name(c, p + "q.bias"), detail::optional_name(c, p + "k.bias"),
                        detail::optional_name(c, p + "v.bias"), detail::optional_name(c, p + "output.bias")});
  }
  detail::check_attention_shapes(c);
  return c;
}

/// A safetensors file with Hugging Face names: BERT encoders ("[bert.]encoder.layer.<l>.attention")
/// or Llama-style decoders ("model.layers.<l>.self_attn.{q,k,v,o}_proj"); the head counts come
/// from config.json (`config_path`, default: config.json in the same folder).
inline checkpoint open_safetensors(const std::string& path, std::string config_path = "") {
  safetensors_file f = read_safetensors(path);
  if (config_path.empty()) {
    const auto slash = path.find_last_of('/');
    config_path = (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) + "config.json";
  }
  const std::vector<unsigned char> cb = read_file(config_path);
  const nlohmann::json j = nlohmann::json::parse(cb.begin(), cb.end(), nullptr, false);
  BASISATTN_REQUIRE(!j.is_discarded() && j.is_object(), io, config_path, ": not a JSON object");
  checkpoint c;
  c.source = path, c.format = "safetensors";
  c.tensors = f.tensors;
  c.bytes = std::move(f.bytes);
  const index_t dm = detail::json_dim(j, "hidden_size", config_path),
                H = detail::json_dim(j, "num_attention_heads", config_path);
  const index_t Hkv = j.contains("num_key_value_heads") ? detail::json_dim(j, "num_key_value_heads", config_path) : H;
  const index_t L = detail::json_dim(j, "num_hidden_layers", config_path);
  BASISATTN_REQUIRE(dm % H == 0, io, config_path, ": hidden_size ", dm, " is not a multiple of num_attention_heads ",
                    H);
  const index_t hd = j.contains("head_dim") ? detail::json_dim(j, "head_dim", config_path) : dm / H;
  c.attention = bd::mha_config{dm, H, Hkv, hd};
  std::string bert_prefix;
  for (const char* p : {"", "bert."})
    if (find_tensor(c.tensors, std::string(p) + "encoder.layer.0.attention.self.query.weight"))
      bert_prefix = p, c.architecture = "bert";
  if (c.architecture == "bert") {
    c.attention.causal = false;
    for (index_t i = 0; i < L; ++i) {
      const std::string p = bert_prefix + "encoder.layer." + std::to_string(i) + ".attention.";
      c.layers.push_back(
          {p + "self.query.weight", p + "self.key.weight", p + "self.value.weight", p + "output.dense.weight",
           detail::optional_name(c, p + "self.query.bias"), detail::optional_name(c, p + "self.key.bias"),
           detail::optional_name(c, p + "self.value.bias"), detail::optional_name(c, p + "output.dense.bias")});
    }
  } else if (find_tensor(c.tensors, "model.layers.0.self_attn.q_proj.weight")) {
    c.architecture = "llama";
    c.attention.use_rope = true;
    for (index_t i = 0; i < L; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".self_attn.";
      c.layers.push_back({p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight", p + "o_proj.weight",
                          detail::optional_name(c, p + "q_proj.bias"), detail::optional_name(c, p + "k_proj.bias"),
                          detail::optional_name(c, p + "v_proj.bias"), detail::optional_name(c, p + "o_proj.bias")});
    }
  } else {
    ::basisattn::detail::raise(errc::unsupported,
                               path +
                                   ": tensor names are neither HF BERT (encoder.layer.N.attention) nor HF "
                                   "Llama (model.layers.N.self_attn)");
  }
  detail::check_attention_shapes(c);
  return c;
}

/// Open any supported checkpoint: GGUF by its magic, safetensors by its ".safetensors" name,
/// anything else as a llama2.c checkpoint.
inline checkpoint open_checkpoint(const std::string& path, const std::string& config_path = "") {
  char head[4] = {};
  std::ifstream in(path, std::ios::binary);
  BASISATTN_REQUIRE(in.good(), io, path, ": cannot open");
  in.read(head, 4);
  const bool gguf = in.gcount() == 4 && std::memcmp(head, "GGUF", 4) == 0;
  if (gguf) return open_gguf(path);
  const std::string ext = ".safetensors";
  if (path.size() >= ext.size() && path.compare(path.size() - ext.size(), ext.size(), ext) == 0)
    return open_safetensors(path, config_path);
  return open_llama2c(path);
}

}  // namespace io
BASISATTN_END_NAMESPACE
