// basisattn/io/safetensors.hpp - safetensors read and write (the header is JSON, parsed with
// nlohmann::json; link basisattn::io).
//
//   io::safetensors_file f = io::read_safetensors(path);    // or io::parse_safetensors(bytes)
//   f.tensors (in header order), f.find(name), f.get(name), f.metadata ("__metadata__" strings)
//   io::to_float(f.get(name), f.bytes) / io::as_matrix(...)  // values as float
//   io::write_safetensors(path, tensors, metadata)            // io::safetensors_tensor: name, type,
//                                                             // shape, raw little-endian bytes
// Validation (errc::io, naming the tensor or field): header length within the file and at most
// 100 MB, valid JSON object, known dtype, non-negative integer shape, data_offsets [begin, end]
// within the data section with end - begin equal to the bytes the dtype and shape need, no two
// tensors overlapping, no duplicate names. Nothing is read outside the buffer.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/tensor.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/eigen.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace io {

/// A parsed safetensors file; tensor offsets are absolute positions in `bytes`.
struct safetensors_file {
  std::vector<unsigned char> bytes;
  std::vector<tensor_info> tensors;
  std::map<std::string, std::string> metadata;

  const tensor_info* find(const std::string& name) const { return find_tensor(tensors, name); }
  const tensor_info& get(const std::string& name) const { return get_tensor(tensors, name, "safetensors"); }
};

namespace detail {
inline bool safetensors_dtype(const std::string& s, tensor_type& t) {
  static const std::pair<const char*, tensor_type> table[] = {
      {"F64", tensor_type::f64}, {"F32", tensor_type::f32},     {"F16", tensor_type::f16}, {"BF16", tensor_type::bf16},
      {"I64", tensor_type::i64}, {"I32", tensor_type::i32},     {"I16", tensor_type::i16}, {"I8", tensor_type::i8},
      {"U8", tensor_type::u8},   {"BOOL", tensor_type::boolean}};
  for (const auto& [name, type] : table)
    if (s == name) return t = type, true;
  return false;
}
inline std::uint64_t json_u64(const nlohmann::json& j, const std::string& where) {
  BASISATTN_REQUIRE(j.is_number_unsigned() || (j.is_number_integer() && j.get<std::int64_t>() >= 0), io,
                    "safetensors: ", where, " must be a non-negative integer, got ", j.dump());
  return j.get<std::uint64_t>();
}
/// A positive integer below 2^31 under `key` of the JSON object `j` (a config.json, a BD checkpoint's
/// config); errc::io naming `where` otherwise.
inline index_t json_dim(const nlohmann::json& j, const char* key, const std::string& where) {
  BASISATTN_REQUIRE(j.contains(key) && j[key].is_number_integer() && j[key].get<std::int64_t>() > 0 &&
                        j[key].get<std::int64_t>() < (std::int64_t(1) << 31),
                    io, where, ": '", key, "' missing or not a positive integer");
  return static_cast<index_t>(j[key].get<std::int64_t>());
}
}  // namespace detail

/// Parse a safetensors file held in memory (takes ownership of the bytes).
inline safetensors_file parse_safetensors(std::vector<unsigned char> bytes, const std::string& source = "safetensors") {
  detail::require_little_endian();
  safetensors_file f;
  f.bytes = std::move(bytes);
  byte_reader r(f.bytes.data(), f.bytes.size(), source);
  const std::uint64_t header_len = r.u64("header length");
  BASISATTN_REQUIRE(header_len <= 100000000ull, io, source, ": header length ", header_len, " exceeds 100 MB");
  const std::string header = r.str(header_len, "JSON header");
  const std::uint64_t data_begin = r.offset(), data_size = r.remaining();
  nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  BASISATTN_REQUIRE(!j.is_discarded(), io, source, ": the header is not valid JSON");
  BASISATTN_REQUIRE(j.is_object(), io, source, ": the header is not a JSON object");
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      BASISATTN_REQUIRE(v.is_object(), io, source, ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        BASISATTN_REQUIRE(m.value().is_string(), io, source, ": metadata '", m.key(), "' is not a string");
        f.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    BASISATTN_REQUIRE(v.is_object(), io, source, ": entry '", name, "' is not an object");
    BASISATTN_REQUIRE(v.contains("dtype") && v["dtype"].is_string(), io, source, ": tensor '", name,
                      "' has no dtype string");
    BASISATTN_REQUIRE(v.contains("shape") && v["shape"].is_array(), io, source, ": tensor '", name,
                      "' has no shape array");
    BASISATTN_REQUIRE(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2, io,
                      source, ": tensor '", name, "' needs data_offsets [begin, end]");
    tensor_info t;
    t.name = name;
    const std::string dt = v["dtype"].get<std::string>();
    BASISATTN_REQUIRE(detail::safetensors_dtype(dt, t.type), io, source, ": tensor '", name, "' has unknown dtype '",
                      dt, "'");
    BASISATTN_REQUIRE(v["shape"].size() <= 8, io, source, ": tensor '", name, "' has ", v["shape"].size(),
                      " dimensions");
    for (const auto& d : v["shape"]) t.shape.push_back(detail::json_u64(d, "shape of '" + name + "'"));
    const std::uint64_t begin = detail::json_u64(v["data_offsets"][0], "data_offsets of '" + name + "'");
    const std::uint64_t end = detail::json_u64(v["data_offsets"][1], "data_offsets of '" + name + "'");
    BASISATTN_REQUIRE(begin <= end && end <= data_size, io, source, ": tensor '", name, "' data_offsets [", begin, ", ",
                      end, "] outside the data section of ", data_size, " bytes");
    const std::uint64_t need = bytes_for(t.type, t.numel(), name);
    BASISATTN_REQUIRE(end - begin == need, io, source, ": tensor '", name, "' has ", end - begin, " bytes but dtype ",
                      dt, " and its shape need ", need);
    BASISATTN_REQUIRE(f.find(name) == nullptr, io, source, ": tensor '", name, "' appears twice");
    t.offset = data_begin + begin;
    t.bytes = need;
    if (end > begin) ranges.push_back({begin, end});
    f.tensors.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (std::size_t i = 1; i < ranges.size(); ++i)
    BASISATTN_REQUIRE(ranges[i].first >= ranges[i - 1].second, io, source,
                      ": two tensors overlap in the data section (bytes ", ranges[i].first, "..", ranges[i - 1].second,
                      ")");
  return f;
}

/// Read and parse a safetensors file.
inline safetensors_file read_safetensors(const std::string& path) { return parse_safetensors(read_file(path), path); }

/// A tensor to write: raw little-endian bytes of `type` with `shape`.
struct safetensors_tensor {
  std::string name;
  tensor_type type = tensor_type::f32;
  std::vector<std::uint64_t> shape;
  std::vector<unsigned char> data;
};

/// Serialise tensors (and string metadata) in the safetensors format. Names must be unique and
/// data sizes must match dtype and shape (errc::invalid_argument otherwise).
inline std::vector<unsigned char> serialize_safetensors(const std::vector<safetensors_tensor>& tensors,
                                                        const std::map<std::string, std::string>& metadata = {}) {
  detail::require_little_endian();
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = m;
  }
  std::uint64_t off = 0;
  for (const auto& t : tensors) {
    BASISATTN_REQUIRE(!t.name.empty() && t.name != "__metadata__" && !h.contains(t.name), invalid_argument,
                      "safetensors: tensor name '", t.name, "' is empty, reserved or repeated");
    BASISATTN_REQUIRE(t.type != tensor_type::q4_0 && t.type != tensor_type::q4_1 && t.type != tensor_type::q8_0,
                      unsupported, "safetensors has no ", to_string(t.type), " dtype");
    std::uint64_t n = 1;
    for (auto d : t.shape) n = checked_mul(n, d, "tensor element count");
    const std::uint64_t need = bytes_for(t.type, n, t.name);
    BASISATTN_REQUIRE(t.data.size() == need, invalid_argument, "safetensors: tensor '", t.name, "' has ", t.data.size(),
                      " bytes, its dtype and shape need ", need);
    h[t.name] = {{"dtype", to_string(t.type)}, {"shape", t.shape}, {"data_offsets", {off, off + need}}};
    off += need;
  }
  std::string header = h.dump();
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');  // align the data section to 8 bytes
  std::vector<unsigned char> out;
  out.reserve(8 + header.size() + off);
  const std::uint64_t len = header.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<unsigned char>(len >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  for (const auto& t : tensors) out.insert(out.end(), t.data.begin(), t.data.end());
  return out;
}

inline void write_safetensors(const std::string& path, const std::vector<safetensors_tensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  write_file(path, serialize_safetensors(tensors, metadata));
}

/// A matrix (any storage type, any strides) as a rows x cols tensor of type t (F64, F32, F16 or
/// BF16), each value rounded once to nearest even.
template <class T>
safetensors_tensor make_tensor(const std::string& name, matrix_view<T> m, tensor_type t) {
  using S = std::remove_const_t<T>;
  BASISATTN_REQUIRE(t == tensor_type::f64 || t == tensor_type::f32 || t == tensor_type::f16 || t == tensor_type::bf16,
                    unsupported, "make_tensor: type ", to_string(t), " is not a float type");
  safetensors_tensor out;
  out.name = name;
  out.type = t;
  out.shape = {static_cast<std::uint64_t>(m.rows), static_cast<std::uint64_t>(m.cols)};
  const std::size_t size = static_cast<std::size_t>(layout_of(t).block_bytes);
  out.data.resize(static_cast<std::size_t>(m.rows * m.cols) * size);
  unsigned char* p = out.data.data();
  for (index_t i = 0; i < m.rows; ++i)
    for (index_t j = 0; j < m.cols; ++j, p += size) {
      const double v = static_cast<double>(::basisattn::detail::to_compute<compute_t<S>>(m(i, j)));
      if (t == tensor_type::f64) {
        std::memcpy(p, &v, 8);
      } else if (t == tensor_type::f32) {
        const float f = static_cast<float>(v);
        std::memcpy(p, &f, 4);
      } else if (t == tensor_type::f16) {
        const Eigen::half h = ::basisattn::detail::from_compute<Eigen::half>(v);
        std::memcpy(p, &h, 2);
      } else {
        const Eigen::bfloat16 b = ::basisattn::detail::from_compute<Eigen::bfloat16>(v);
        std::memcpy(p, &b, 2);
      }
    }
  return out;
}

}  // namespace io
BASISATTN_END_NAMESPACE
