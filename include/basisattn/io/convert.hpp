// basisattn/io/convert.hpp - convert a checkpoint to BD once, save it as safetensors, load it back.
//
//   io::checkpoint c = io::open_checkpoint(path);           // llama2.c .bin, GGUF (llama), or
//                                                           // safetensors (HF BERT / Llama names,
//                                                           // config.json beside it or given)
//   io::convert_options o;  o.type = io::tensor_type::f16;  o.prepare.select = bd::strategy::shared_pivot;
//   io::conversion out = io::convert_to_bd(c, o);           // every tensor, attention sides BD'd
//   io::write_conversion("model.bd.safetensors", out);      // safetensors + metadata
//   bd::mha_layer<Eigen::half> L = io::load_bd_layer<Eigen::half>(io::read_safetensors(p), 3, cfg);
//
// The BD checkpoint (format "bd/1"): every tensor of the source, in the source's order and names,
// stored in the chosen float type (quantized GGUF blocks are dequantized; integer tensors are kept
// as they are), except that for each BD'd side of layer l
//   <W_K or W_V name>.bd_coeff   (d_model - d) x (n_kv_heads d), y = x W form: head g owns columns
//                                [g d, (g + 1) d), rows follow the input channels not in the basis,
//                                ascending (bd::bd_projection::coeff)
//   <W_K or W_V name>.bd_basis   I32 [d]: the basis input channels, ascending
// replace the K or V weight, and the tensors BD rewrites keep their names and shapes with new
// values: W_O (rows A_S W_O^h) for V/O; W_Q and b_Q (A_S^T applied) for Q/K; b_K and b_V
// (b A_S^-1). Metadata (strings): "basisattn.format" = "bd/1", "basisattn.config" (JSON: shapes,
// dtype, strategy, rounding, source) and "basisattn.layers" (JSON array, one object per layer: the
// tensor names, and per side whether it is BD, its basis, min rcond, max |C|, estimated error
// growth, and the measured product error with the dense-rounding reference; bd/measure.hpp).
// Errors: errc::io for files that are not what they claim, errc::unsupported for architectures the
// converter does not know, errc::invalid_argument for bad options.
#pragma once

#include <basisattn/bd/layers.hpp>
#include <basisattn/bd/measure.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/gguf.hpp>
#include <basisattn/io/llama2c.hpp>
#include <basisattn/io/safetensors.hpp>
#include <basisattn/io/tensor.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
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
inline index_t json_dim(const nlohmann::json& j, const char* key, const std::string& where) {
  BASISATTN_REQUIRE(j.contains(key) && j[key].is_number_integer() && j[key].get<std::int64_t>() > 0 &&
                        j[key].get<std::int64_t>() < (std::int64_t(1) << 31),
                    io, where, ": '", key, "' missing or not a positive integer");
  return static_cast<index_t>(j[key].get<std::int64_t>());
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

// ------------------------------------------------------------------------------------------------
// conversion

struct convert_options {
  tensor_type type = tensor_type::f16;  ///< F32, F16 or BF16: storage of every float tensor
  bool bd_qk = true;                    ///< BD on Q/K where it is exact (not with RoPE)
  bool bd_vo = true;                    ///< BD on V/O
  bd::prepare_options prepare = {};
  /// Called after each layer: (layers done, layers in all).
  std::function<void(index_t, index_t)> progress;
};

/// What happened to one side (Q/K or V/O) of one layer.
struct side_report {
  bool bd = false;
  std::string why_dense;  ///< "RoPE", "disabled" when not BD
  std::vector<index_t> basis;
  double min_rcond = 0, max_abs_coeff = 0, error_growth = 0;
  double error = 0, dense_error = 0;  ///< relative product errors (bd/measure.hpp)
};
struct layer_report {
  attention_names names;
  side_report qk, vo;
  double seconds = 0;
};
struct conversion {
  std::vector<safetensors_tensor> tensors;
  std::map<std::string, std::string> metadata;
  std::vector<layer_report> layers;
  std::uint64_t source_bytes = 0;      ///< tensor bytes of the source checkpoint
  std::uint64_t dense_bytes = 0;       ///< the same tensors stored dense in the output type
  std::uint64_t output_bytes = 0;      ///< tensor bytes of the BD checkpoint
  std::uint64_t attention_dense = 0;   ///< attention weights + biases, dense in the output type
  std::uint64_t attention_output = 0;  ///< the same in the BD checkpoint
  double seconds = 0;
};

namespace detail {
inline safetensors_tensor float_tensor(const std::string& name, const float* v, std::vector<std::uint64_t> shape,
                                       tensor_type t) {
  std::uint64_t n = 1;
  for (auto d : shape) n = checked_mul(n, d, name.c_str());
  safetensors_tensor out = make_tensor(name, matrix_view<const float>(v, 1, static_cast<index_t>(n)), t);
  out.shape = std::move(shape);
  return out;
}
template <class T>
safetensors_tensor typed_tensor(const std::string& name, matrix_view<const T> m, tensor_type t, bool vector = false) {
  safetensors_tensor out = make_tensor(name, m, t);
  if (vector) out.shape = {out.shape[0] * out.shape[1]};
  return out;
}
inline nlohmann::json side_json(const side_report& s) {
  nlohmann::json j;
  j["bd"] = s.bd;
  if (!s.bd) j["why_dense"] = s.why_dense;
  if (s.bd) {
    j["basis"] = s.basis;
    j["min_rcond"] = s.min_rcond;
    j["max_abs_coeff"] = s.max_abs_coeff;
    j["error_growth"] = s.error_growth;
  }
  j["product_error"] = s.error;
  j["dense_rounding_error"] = s.dense_error;
  return j;
}

template <class T>
void convert_layer(const checkpoint& c, const attention_names& n, const convert_options& o, layer_report& rep,
                   std::map<std::string, std::vector<safetensors_tensor>>& out) {
  const bd::mha_config& a = c.attention;
  const index_t dm = a.d_model, kd = a.n_kv_heads * a.head_dim, d = a.head_dim;
  const matrix<float> wq = c.values(n.wq), wk = c.values(n.wk), wv = c.values(n.wv), wo = c.values(n.wo);
  std::vector<float> b[4];
  const std::string* bn[4] = {&n.bq, &n.bk, &n.bv, &n.bo};
  for (int i = 0; i < 4; ++i)
    if (!bn[i]->empty()) b[i] = to_float(c.get(*bn[i]), c.bytes);
  auto ptr = [&](int i) { return b[i].empty() ? nullptr : b[i].data(); };
  bd::mha_weights<float> w{wq.view().t(), wk.view().t(), wv.view().t(), wo.view().t(), ptr(0), ptr(1), ptr(2), ptr(3)};
  bd::mha_options mo;
  mo.bd_qk = o.bd_qk && !a.use_rope;
  mo.bd_vo = o.bd_vo;
  mo.prepare = o.prepare;
  const bd::mha_layer<T> L = bd::prepare_mha<T>(w, a, mo);
  const bd::product_errors e = bd::measure_product_errors(w, L);
  rep.names = n;
  auto side = [&](const bd::any_projection<T>& p, bool wanted, side_report& s, const std::string& wname,
                  const std::string& bname, double err, double dense) {
    s.error = err, s.dense_error = dense;
    std::vector<safetensors_tensor> wt;
    if (const auto* bp = std::get_if<bd::bd_projection<T>>(&p)) {
      s.bd = true;
      s.basis = bp->basis;
      s.min_rcond = bp->report.min_rcond, s.max_abs_coeff = bp->report.max_abs_coeff,
      s.error_growth = bp->report.error_growth;
      wt.push_back(typed_tensor<T>(wname + ".bd_coeff", bp->coeff.view(), o.type));
      safetensors_tensor bt;
      bt.name = wname + ".bd_basis", bt.type = tensor_type::i32, bt.shape = {std::uint64_t(d)};
      for (index_t i : bp->basis)
        for (int k = 0; k < 4; ++k) bt.data.push_back(static_cast<unsigned char>(std::uint32_t(i) >> (8 * k)));
      wt.push_back(std::move(bt));
      if (!bname.empty())
        out[bname] = {typed_tensor<T>(bname, matrix_view<const T>(bp->bias.data(), 1, kd), o.type, true)};
    } else {
      s.why_dense = !wanted ? "disabled" : "RoPE";
      const auto& dp = std::get<bd::dense_projection<T>>(p);
      wt.push_back(typed_tensor<T>(wname, dp.weight.view().t(), o.type));
      if (!bname.empty())
        out[bname] = {typed_tensor<T>(bname, matrix_view<const T>(dp.bias.data(), 1, kd), o.type, true)};
    }
    out[wname] = std::move(wt);
  };
  side(L.k, o.bd_qk, rep.qk, n.wk, n.bk, e.qk, e.qk_dense);
  side(L.v, o.bd_vo, rep.vo, n.wv, n.bv, e.vo, e.vo_dense);
  const index_t qd = a.n_heads * a.head_dim;
  out[n.wq] = {typed_tensor<T>(n.wq, L.q.weight.view().t(), o.type)};
  if (!n.bq.empty()) out[n.bq] = {typed_tensor<T>(n.bq, matrix_view<const T>(L.q.bias.data(), 1, qd), o.type, true)};
  out[n.wo] = {typed_tensor<T>(n.wo, L.o.weight.view().t(), o.type)};
  if (!n.bo.empty()) out[n.bo] = {typed_tensor<T>(n.bo, matrix_view<const T>(L.o.bias.data(), 1, dm), o.type, true)};
}

template <class T>
conversion convert_as(const checkpoint& c, const convert_options& o) {
  const auto t0 = std::chrono::steady_clock::now();
  conversion cv;
  std::map<std::string, std::vector<safetensors_tensor>> replaced;
  const index_t nl = static_cast<index_t>(c.layers.size());
  for (index_t l = 0; l < nl; ++l) {
    const auto tl = std::chrono::steady_clock::now();
    layer_report rep;
    convert_layer<T>(c, c.layers[static_cast<std::size_t>(l)], o, rep, replaced);
    rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - tl).count();
    cv.layers.push_back(std::move(rep));
    if (o.progress) o.progress(l + 1, nl);
  }
  std::set<std::string> attention;
  for (const auto& n : c.layers)
    for (const std::string* s : {&n.wq, &n.wk, &n.wv, &n.wo, &n.bq, &n.bk, &n.bv, &n.bo})
      if (!s->empty()) attention.insert(*s);
  const std::uint64_t elem = layout_of(o.type).block_bytes;
  for (const tensor_info& t : c.tensors) {
    cv.source_bytes += t.bytes;
    const bool is_float = t.type == tensor_type::f64 || t.type == tensor_type::f32 || t.type == tensor_type::f16 ||
                          t.type == tensor_type::bf16 || t.type == tensor_type::q4_0 || t.type == tensor_type::q4_1 ||
                          t.type == tensor_type::q8_0;
    cv.dense_bytes += is_float ? t.numel() * elem : t.bytes;
    if (attention.count(t.name)) {
      cv.attention_dense += t.numel() * elem;
      for (auto& r : replaced.at(t.name)) {
        cv.attention_output += r.data.size();
        cv.tensors.push_back(std::move(r));
      }
      continue;
    }
    if (is_float) {
      const std::vector<float> v = to_float(t, c.bytes);
      cv.tensors.push_back(float_tensor(t.name, v.data(), t.shape, o.type));
    } else {
      safetensors_tensor r;
      r.name = t.name, r.type = t.type, r.shape = t.shape;
      r.data.assign(c.bytes.begin() + std::ptrdiff_t(t.offset), c.bytes.begin() + std::ptrdiff_t(t.offset + t.bytes));
      cv.tensors.push_back(std::move(r));
    }
  }
  for (const auto& t : cv.tensors) cv.output_bytes += t.data.size();
  const bd::mha_config& a = c.attention;
  nlohmann::json cfg = {{"source", c.source},
                        {"source_format", c.format},
                        {"architecture", c.architecture},
                        {"d_model", a.d_model},
                        {"n_heads", a.n_heads},
                        {"n_kv_heads", a.n_kv_heads},
                        {"head_dim", a.head_dim},
                        {"rope", a.use_rope},
                        {"dtype", to_string(o.type)},
                        {"strategy", bd::to_string(o.prepare.select)},
                        {"rounding", bd::to_string(o.prepare.round)}};
  nlohmann::json layers = nlohmann::json::array();
  for (const auto& r : cv.layers)
    layers.push_back({{"wq", r.names.wq},
                      {"wk", r.names.wk},
                      {"wv", r.names.wv},
                      {"wo", r.names.wo},
                      {"bq", r.names.bq},
                      {"bk", r.names.bk},
                      {"bv", r.names.bv},
                      {"bo", r.names.bo},
                      {"qk", side_json(r.qk)},
                      {"vo", side_json(r.vo)}});
  cv.metadata["basisattn.format"] = "bd/1";
  cv.metadata["basisattn.config"] = cfg.dump();
  cv.metadata["basisattn.layers"] = layers.dump();
  cv.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return cv;
}
}  // namespace detail

/// Convert every attention layer of `c` to BD (as `o` asks) and every tensor to o.type.
inline conversion convert_to_bd(const checkpoint& c, const convert_options& o = {}) {
  switch (o.type) {
    case tensor_type::f32:
      return detail::convert_as<float>(c, o);
    case tensor_type::f16:
      return detail::convert_as<Eigen::half>(c, o);
    case tensor_type::bf16:
      return detail::convert_as<Eigen::bfloat16>(c, o);
    default:
      ::basisattn::detail::raise(errc::invalid_argument, std::string("convert_to_bd: output type ") +
                                                             to_string(o.type) + " is not F32, F16 or BF16");
  }
}

/// Write a conversion as a safetensors file.
inline void write_conversion(const std::string& path, const conversion& cv) {
  write_safetensors(path, cv.tensors, cv.metadata);
}

// ------------------------------------------------------------------------------------------------
// loading a BD checkpoint

/// The configuration and per-layer records of a BD checkpoint ("bd/1"); errc::io when absent or bad.
struct bd_checkpoint_info {
  bd::mha_config attention;
  tensor_type type = tensor_type::f16;
  nlohmann::json config, layers;
};

inline bd_checkpoint_info read_bd_info(const safetensors_file& f) {
  const auto fmt = f.metadata.find("basisattn.format");
  BASISATTN_REQUIRE(fmt != f.metadata.end() && fmt->second == "bd/1", io,
                    "BD checkpoint: metadata 'basisattn.format' is not 'bd/1' (not written by io::write_conversion)");
  bd_checkpoint_info info;
  auto parse = [&](const char* key) {
    const auto it = f.metadata.find(key);
    BASISATTN_REQUIRE(it != f.metadata.end(), io, "BD checkpoint: metadata '", key, "' is missing");
    nlohmann::json j = nlohmann::json::parse(it->second, nullptr, false);
    BASISATTN_REQUIRE(!j.is_discarded(), io, "BD checkpoint: metadata '", key, "' is not valid JSON");
    return j;
  };
  info.config = parse("basisattn.config");
  info.layers = parse("basisattn.layers");
  BASISATTN_REQUIRE(info.config.is_object() && info.layers.is_array(), io,
                    "BD checkpoint: malformed basisattn metadata");
  const std::string w = "BD checkpoint config";
  info.attention =
      bd::mha_config{detail::json_dim(info.config, "d_model", w), detail::json_dim(info.config, "n_heads", w),
                     detail::json_dim(info.config, "n_kv_heads", w), detail::json_dim(info.config, "head_dim", w)};
  BASISATTN_REQUIRE(info.config.contains("rope") && info.config["rope"].is_boolean() && info.config.contains("dtype") &&
                        info.config["dtype"].is_string(),
                    io, "BD checkpoint config: 'rope' or 'dtype' missing");
  info.attention.use_rope = info.config["rope"].get<bool>();
  const std::string dt = info.config["dtype"].get<std::string>();
  BASISATTN_REQUIRE(
      detail::safetensors_dtype(dt, info.type) &&
          (info.type == tensor_type::f32 || info.type == tensor_type::f16 || info.type == tensor_type::bf16),
      io, "BD checkpoint config: dtype '", dt, "' is not F32, F16 or BF16");
  return info;
}

namespace detail {
template <class T>
constexpr tensor_type tensor_type_of() {
  if constexpr (std::is_same_v<T, float>)
    return tensor_type::f32;
  else if constexpr (std::is_same_v<T, Eigen::half>)
    return tensor_type::f16;
  else
    return tensor_type::bf16;
}
/// A 2-D (out, in) tensor of type T as an in x out matrix<T> (y = x W form), shape checked.
template <class T>
matrix<T> load_weight(const safetensors_file& f, const std::string& name, index_t out, index_t in,
                      bool transpose = true) {
  const tensor_info& t = f.get(name);
  const std::vector<std::uint64_t> want = transpose ? std::vector<std::uint64_t>{std::uint64_t(out), std::uint64_t(in)}
                                                    : std::vector<std::uint64_t>{std::uint64_t(in), std::uint64_t(out)};
  BASISATTN_REQUIRE(t.type == tensor_type_of<T>() && t.shape == want, io, "BD checkpoint: tensor '", name, "' is ",
                    to_string(t.type), " ", nlohmann::json(t.shape).dump(), ", expected ",
                    to_string(tensor_type_of<T>()), " ", nlohmann::json(want).dump());
  const matrix<float> v = as_matrix(t, f.bytes);
  matrix<T> m(in, out);
  for (index_t i = 0; i < in; ++i)
    for (index_t j = 0; j < out; ++j) m(i, j) = ::basisattn::detail::from_compute<T>(transpose ? v(j, i) : v(i, j));
  return m;
}
template <class T>
std::vector<T> load_bias(const safetensors_file& f, const std::string& name, index_t n) {
  if (name.empty()) return {};
  const tensor_info& t = f.get(name);
  BASISATTN_REQUIRE(t.type == tensor_type_of<T>() && t.shape == std::vector<std::uint64_t>{std::uint64_t(n)}, io,
                    "BD checkpoint: bias '", name, "' is ", to_string(t.type), " ", nlohmann::json(t.shape).dump(),
                    ", expected ", to_string(tensor_type_of<T>()), " [", n, "]");
  std::vector<T> out;
  for (float x : to_float(t, f.bytes)) out.push_back(::basisattn::detail::from_compute<T>(x));
  return out;
}
template <class T>
bd::any_projection<T> load_side(const safetensors_file& f, const nlohmann::json& side, const std::string& w,
                                const std::string& b, index_t dm, index_t heads, index_t d) {
  BASISATTN_REQUIRE(side.is_object() && side.contains("bd") && side["bd"].is_boolean(), io,
                    "BD checkpoint: bad side record for '", w, "'");
  if (!side["bd"].get<bool>()) {
    bd::dense_projection<T> p;
    p.weight = load_weight<T>(f, w, heads * d, dm);
    p.bias = load_bias<T>(f, b, heads * d);
    return p;
  }
  const tensor_info& bt = f.get(w + ".bd_basis");
  BASISATTN_REQUIRE(bt.type == tensor_type::i32 && bt.shape == std::vector<std::uint64_t>{std::uint64_t(d)}, io,
                    "BD checkpoint: '", w, ".bd_basis' must be I32 [", d, "]");
  bd::bd_projection<T> p;
  p.in_dim = dm, p.rank = d, p.heads = heads;
  std::vector<bool> used(static_cast<std::size_t>(dm), false);
  for (index_t i = 0; i < d; ++i) {
    std::int32_t v;
    std::memcpy(&v, f.bytes.data() + bt.offset + 4 * std::uint64_t(i), 4);
    BASISATTN_REQUIRE(v >= 0 && v < dm && !used[std::size_t(v)] && (i == 0 || v > p.basis.back()), io,
                      "BD checkpoint: '", w, ".bd_basis' entry ", i, " = ", v,
                      " is out of range, repeated or not ascending");
    used[std::size_t(v)] = true;
    p.basis.push_back(v);
  }
  for (index_t i = 0; i < dm; ++i)
    if (!used[std::size_t(i)]) p.rest.push_back(i);
  p.coeff = load_weight<T>(f, w + ".bd_coeff", heads * d, dm - d, false);
  p.bias = load_bias<T>(f, b, heads * d);
  p.report.used = bd::strategy::shared_pivot;
  return p;
}
}  // namespace detail

/// Layer `layer` of a BD checkpoint as a prepared layer in T (T must be the checkpoint's dtype).
/// The shapes come from the checkpoint; causal, scale and RoPE settings from `settings` (whose
/// shape fields, when non-zero, must agree: errc::shape_mismatch otherwise).
template <class T>
bd::mha_layer<T> load_bd_layer(const safetensors_file& f, index_t layer, bd::mha_config settings = {}) {
  const bd_checkpoint_info info = read_bd_info(f);
  BASISATTN_REQUIRE(info.type == detail::tensor_type_of<T>(), invalid_argument, "load_bd_layer: the checkpoint stores ",
                    to_string(info.type), ", the layer type is ", to_string(detail::tensor_type_of<T>()));
  BASISATTN_REQUIRE(layer >= 0 && layer < static_cast<index_t>(info.layers.size()), invalid_argument,
                    "load_bd_layer: layer ", layer, " outside [0, ", info.layers.size(), ")");
  const bd::mha_config& a = info.attention;
  auto agree = [](index_t want, index_t have) { return want == 0 || want == have; };
  BASISATTN_REQUIRE(agree(settings.d_model, a.d_model) && agree(settings.n_heads, a.n_heads) &&
                        agree(settings.n_kv_heads, a.n_kv_heads) && agree(settings.head_dim, a.head_dim),
                    shape_mismatch, "load_bd_layer: settings ask for d_model ", settings.d_model, ", ",
                    settings.n_heads, "/", settings.n_kv_heads, " heads of ", settings.head_dim,
                    "; the checkpoint has ", a.d_model, ", ", a.n_heads, "/", a.n_kv_heads, " heads of ", a.head_dim);
  const nlohmann::json& r = info.layers[static_cast<std::size_t>(layer)];
  auto name = [&](const char* k) {
    BASISATTN_REQUIRE(r.is_object() && r.contains(k) && r[k].is_string(), io, "BD checkpoint: layer ", layer,
                      " has no '", k, "' name");
    return r[k].get<std::string>();
  };
  BASISATTN_REQUIRE(r.contains("qk") && r.contains("vo"), io, "BD checkpoint: layer ", layer, " has no side records");
  bd::mha_layer<T> L;
  L.config = settings;
  L.config.d_model = a.d_model, L.config.n_heads = a.n_heads, L.config.n_kv_heads = a.n_kv_heads,
  L.config.head_dim = a.head_dim;
  const index_t dm = a.d_model, qd = a.n_heads * a.head_dim;
  L.q.weight = detail::load_weight<T>(f, name("wq"), qd, dm);
  L.q.bias = detail::load_bias<T>(f, name("bq"), qd);
  L.o.weight = detail::load_weight<T>(f, name("wo"), dm, qd);
  L.o.bias = detail::load_bias<T>(f, name("bo"), dm);
  L.k = detail::load_side<T>(f, r["qk"], name("wk"), name("bk"), dm, a.n_kv_heads, a.head_dim);
  L.v = detail::load_side<T>(f, r["vo"], name("wv"), name("bv"), dm, a.n_kv_heads, a.head_dim);
  BASISATTN_REQUIRE(!(bd::is_bd(L.k) && L.config.use_rope), invalid_argument,
                    "load_bd_layer: the checkpoint has BD on Q/K, which is not exact with RoPE (settings.use_rope)");
  return L;
}

}  // namespace io
BASISATTN_END_NAMESPACE
