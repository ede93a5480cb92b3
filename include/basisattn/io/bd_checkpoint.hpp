// basisattn/io/bd_checkpoint.hpp - the BD checkpoint file format ("bd/1", "bd/2"): what io::convert_to_bd
// writes (io/convert.hpp) and how it is read back (io::read_bd_info, io::load_bd_layer).
//
//   bd::mha_layer<Eigen::half> L = io::load_bd_layer<Eigen::half>(io::read_safetensors(p), 3, cfg);
//
// The BD checkpoint (format "bd/1", or "bd/2" when some side has per-kv-head bases): every tensor
// of the source, in the source's order and names, stored in the chosen float type (quantized GGUF
// blocks are dequantized; integer tensors are kept as they are), except that for each BD'd side of
// layer l
//   <W_K or W_V name>.bd_coeff   (d_model - d) x (n_kv_heads d), y = x W form: head g owns columns
//                                [g d, (g + 1) d), rows follow the input channels not in its group's
//                                basis, ascending (bd::bd_projection::coeff)
//   <W_K or W_V name>.bd_basis   I32 [d]: the basis input channels, ascending (bd/1); or (bd/2 only)
//                                I32 [groups, d]: one basis per group of n_kv_heads / groups
//                                consecutive kv heads, each ascending (bd::bd_projection::groups)
// replace the K or V weight, and the tensors BD rewrites keep their names and shapes with new
// values: W_O (rows A_S W_O^h) for V/O; W_Q and b_Q (A_S^T applied) for Q/K; b_K and b_V
// (b A_S^-1). Metadata (strings): "basisattn.format" = "bd/1" or "bd/2", "basisattn.config" (JSON:
// shapes, dtype, strategy, rounding, grouping, source) and "basisattn.layers" (JSON array, one
// object per layer: the tensor names, and per side whether it is BD, its basis (basis_groups x d
// channels) and basis_groups, min rcond, max |C|, estimated error growth, and the measured product
// error with the dense-rounding reference; bd/measure.hpp).
// Errors: errc::io for files that are not what they claim, errc::invalid_argument for a layer type
// or layer index the checkpoint does not have (or BD on Q/K with settings.use_rope),
// errc::shape_mismatch for settings whose shapes disagree with the checkpoint's.
#pragma once

#include <basisattn/bd/layers.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/io/safetensors.hpp>
#include <basisattn/io/tensor.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace io {

/// The configuration and per-layer records of a BD checkpoint ("bd/1" or "bd/2"); errc::io when absent or bad.
struct bd_checkpoint_info {
  bd::mha_config attention;
  tensor_type type = tensor_type::f16;
  int version = 1;  ///< 2: sides may have several basis groups
  nlohmann::json config, layers;
};

inline bd_checkpoint_info read_bd_info(const safetensors_file& f) {
  const auto fmt = f.metadata.find("basisattn.format");
  BASISATTN_REQUIRE(fmt != f.metadata.end() && (fmt->second == "bd/1" || fmt->second == "bd/2"), io,
                    "BD checkpoint: metadata 'basisattn.format' is not 'bd/1' or 'bd/2' (not written by "
                    "io::write_conversion)");
  bd_checkpoint_info info;
  info.version = fmt->second == "bd/2" ? 2 : 1;
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
                                const std::string& b, index_t dm, index_t heads, index_t d, int version) {
  BASISATTN_REQUIRE(side.is_object() && side.contains("bd") && side["bd"].is_boolean(), io,
                    "BD checkpoint: bad side record for '", w, "'");
  if (!side["bd"].get<bool>()) {
    bd::dense_projection<T> p;
    p.weight = load_weight<T>(f, w, heads * d, dm);
    p.bias = load_bias<T>(f, b, heads * d);
    return p;
  }
  const tensor_info& bt = f.get(w + ".bd_basis");
  const bool grouped = version >= 2 && bt.shape.size() == 2;
  const std::uint64_t Q = grouped ? bt.shape[0] : 1;
  // The rank first: a scalar tensor has no last extent.
  BASISATTN_REQUIRE(bt.type == tensor_type::i32 && bt.shape.size() == (grouped ? 2u : 1u) &&
                        bt.shape.back() == std::uint64_t(d) && Q >= 1 && std::uint64_t(heads) % Q == 0,
                    io, "BD checkpoint: '", w, ".bd_basis' must be I32 [", d, "]",
                    version >= 2 ? " or I32 [groups, d] with groups dividing the kv heads" : "", ", it is ",
                    to_string(bt.type), " ", nlohmann::json(bt.shape).dump());
  bd::bd_projection<T> p;
  p.in_dim = dm, p.rank = d, p.heads = heads, p.groups = static_cast<index_t>(Q);
  for (index_t q = 0; q < p.groups; ++q) {
    std::vector<bool> used(static_cast<std::size_t>(dm), false);
    for (index_t i = 0; i < d; ++i) {
      std::int32_t v;
      std::memcpy(&v, f.bytes.data() + bt.offset + 4 * std::uint64_t(q * d + i), 4);
      BASISATTN_REQUIRE(v >= 0 && v < dm && !used[std::size_t(v)] && (i == 0 || v > p.basis.back()), io,
                        "BD checkpoint: '", w, ".bd_basis' group ", q, " entry ", i, " = ", v,
                        " is out of range, repeated or not ascending");
      used[std::size_t(v)] = true;
      p.basis.push_back(v);
    }
    for (index_t i = 0; i < dm; ++i)
      if (!used[std::size_t(i)]) p.rest.push_back(i);
  }
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
  L.k = detail::load_side<T>(f, r["qk"], name("wk"), name("bk"), dm, a.n_kv_heads, a.head_dim, info.version);
  L.v = detail::load_side<T>(f, r["vo"], name("wv"), name("bv"), dm, a.n_kv_heads, a.head_dim, info.version);
  BASISATTN_REQUIRE(!(bd::is_bd(L.k) && L.config.use_rope), invalid_argument,
                    "load_bd_layer: the checkpoint has BD on Q/K, which is not exact with RoPE (settings.use_rope)");
  return L;
}

}  // namespace io
BASISATTN_END_NAMESPACE
