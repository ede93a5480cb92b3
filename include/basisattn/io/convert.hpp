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
// The output is a BD checkpoint ("bd/1", or "bd/2" with per-kv-head bases): the format, and
// io::read_bd_info / io::load_bd_layer that read it back, are in io/bd_checkpoint.hpp;
// io::checkpoint and the open_* readers of the sources are in io/architectures.hpp. This header
// includes both.
// Errors: errc::io for files that are not what they claim, errc::unsupported for architectures the
// converter does not know, errc::invalid_argument for bad options.
#pragma once

#include <basisattn/bd/layers.hpp>
#include <basisattn/bd/measure.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/io/architectures.hpp>
#include <basisattn/io/bd_checkpoint.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/safetensors.hpp>
#include <basisattn/io/tensor.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace io {

// ------------------------------------------------------------------------------------------------
// conversion

struct convert_options {
  tensor_type type = tensor_type::f16;  ///< F32, F16 or BF16: storage of every float tensor
  bool bd_qk = true;                    ///< BD on Q/K where it is exact (not with RoPE)
  bool bd_vo = true;                    ///< BD on V/O
  bd::prepare_options prepare = {};
  /// Shared or per-kv-head bases per side (bd::mha_options::grouping; automatic by default).
  bd::basis_grouping grouping = bd::basis_grouping::automatic;
  /// Called after each layer: (layers done, layers in all).
  std::function<void(index_t, index_t)> progress;
};

/// What happened to one side (Q/K or V/O) of one layer.
struct side_report {
  bool bd = false;
  std::string why_dense;       ///< "RoPE", "disabled" when not BD
  std::vector<index_t> basis;  ///< groups x head_dim: each basis group's channels
  index_t groups = 1;          ///< basis groups (1: shared by all kv heads; n_kv_heads: one per kv head)
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
    j["basis_groups"] = s.groups;
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
  mo.grouping = o.grouping;
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
      s.groups = bp->groups;
      s.min_rcond = bp->report.min_rcond, s.max_abs_coeff = bp->report.max_abs_coeff,
      s.error_growth = bp->report.error_growth;
      wt.push_back(typed_tensor<T>(wname + ".bd_coeff", bp->coeff.view(), o.type));
      safetensors_tensor bt;
      bt.name = wname + ".bd_basis", bt.type = tensor_type::i32;
      bt.shape = bp->groups == 1 ? std::vector<std::uint64_t>{std::uint64_t(d)}
                                 : std::vector<std::uint64_t>{std::uint64_t(bp->groups), std::uint64_t(d)};
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
                        {"rounding", bd::to_string(o.prepare.round)},
                        {"grouping", bd::to_string(o.grouping)}};
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
  // bd/2 only where a side has several basis groups, so that files bd/1 readers can read stay bd/1.
  bool grouped = false;
  for (const auto& r : cv.layers) grouped = grouped || r.qk.groups > 1 || r.vo.groups > 1;
  cv.metadata["basisattn.format"] = grouped ? "bd/2" : "bd/1";
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

}  // namespace io
BASISATTN_END_NAMESPACE
