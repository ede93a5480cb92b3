// basisattn/io/gguf.hpp - GGUF (v2, v3) files: metadata, tensor directory, dequantization.
//
//   io::gguf_file f = io::read_gguf(path);      // or io::parse_gguf(bytes)
//   f.version, f.alignment, f.metadata (key -> gguf_value), f.tensors (tensor_info, shapes in
//   PyTorch order: outermost first, i.e. GGUF's ne[] reversed)
//   f.get_u64(key) / f.get_f64(key) / f.get_string(key) / f.get_strings(key) / f.get_f32s(key)
//   io::to_float(f.get(name), f.bytes), io::as_matrix(...)   // F32, F16, BF16, F64 and the Q4_0,
//                                                            // Q4_1, Q8_0 blocks, dequantized
// Validation (errc::io, naming the field): magic, version 2 or 3, counts bounded by the file length,
// strings and arrays within the file (arrays nested at most 2 deep), at most 4 dimensions, sizes
// without overflow, a power-of-two alignment, tensor offsets aligned and inside the data section,
// no duplicate names or keys. Tensor types other than those above raise errc::unsupported.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/tensor.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace io {

/// A GGUF metadata value.
struct gguf_value {
  enum class kind { u8, i8, u16, i16, u32, i32, f32, boolean, string, array, u64, i64, f64 };
  kind type = kind::u32;
  std::uint64_t u = 0;            ///< unsigned integers and bool
  std::int64_t i = 0;             ///< signed integers
  double f = 0;                   ///< floats
  std::string s;                  ///< strings
  std::vector<gguf_value> items;  ///< arrays
  kind item_type = kind::u8;      ///< arrays: element type
};

struct gguf_file {
  std::uint32_t version = 0;
  std::uint64_t alignment = 32;
  std::vector<unsigned char> bytes;
  std::map<std::string, gguf_value> metadata;
  std::vector<tensor_info> tensors;

  const tensor_info* find(const std::string& name) const { return find_tensor(tensors, name); }
  const tensor_info& get(const std::string& name) const { return get_tensor(tensors, name, "gguf"); }
  const gguf_value& value(const std::string& key) const {
    const auto it = metadata.find(key);
    BASISATTN_REQUIRE(it != metadata.end(), io, "gguf: no metadata key '", key, "'");
    return it->second;
  }
  bool has(const std::string& key) const { return metadata.count(key) != 0; }
  std::uint64_t get_u64(const std::string& key) const {
    const gguf_value& v = value(key);
    using k = gguf_value::kind;
    if (v.type == k::u8 || v.type == k::u16 || v.type == k::u32 || v.type == k::u64 || v.type == k::boolean) return v.u;
    if ((v.type == k::i8 || v.type == k::i16 || v.type == k::i32 || v.type == k::i64) && v.i >= 0)
      return std::uint64_t(v.i);
    ::basisattn::detail::raise(errc::io, "gguf: metadata '" + key + "' is not a non-negative integer");
  }
  double get_f64(const std::string& key) const {
    const gguf_value& v = value(key);
    using k = gguf_value::kind;
    if (v.type == k::f32 || v.type == k::f64) return v.f;
    ::basisattn::detail::raise(errc::io, "gguf: metadata '" + key + "' is not a float");
  }
  const std::string& get_string(const std::string& key) const {
    const gguf_value& v = value(key);
    BASISATTN_REQUIRE(v.type == gguf_value::kind::string, io, "gguf: metadata '", key, "' is not a string");
    return v.s;
  }
  std::vector<std::string> get_strings(const std::string& key) const {
    const gguf_value& v = value(key);
    BASISATTN_REQUIRE(v.type == gguf_value::kind::array && v.item_type == gguf_value::kind::string, io,
                      "gguf: metadata '", key, "' is not an array of strings");
    std::vector<std::string> out;
    out.reserve(v.items.size());
    for (const auto& x : v.items) out.push_back(x.s);
    return out;
  }
  std::vector<float> get_f32s(const std::string& key) const {
    const gguf_value& v = value(key);
    BASISATTN_REQUIRE(v.type == gguf_value::kind::array && v.item_type == gguf_value::kind::f32, io, "gguf: metadata '",
                      key, "' is not an array of f32");
    std::vector<float> out;
    out.reserve(v.items.size());
    for (const auto& x : v.items) out.push_back(static_cast<float>(x.f));
    return out;
  }
};

namespace detail {

inline std::string gguf_string(byte_reader& r, const char* what) {
  const std::uint64_t n = r.u64(what);
  return r.str(n, what);  // bounded by the remaining bytes
}

inline void gguf_read_value(byte_reader& r, gguf_value& v, std::uint32_t type, int depth) {
  using k = gguf_value::kind;
  BASISATTN_REQUIRE(type <= 12, io, r.source(), ": metadata value type ", type, " is unknown (byte ", r.offset(), ")");
  v.type = static_cast<k>(type);
  switch (v.type) {
    case k::u8:
      v.u = r.u8("u8 value");
      break;
    case k::i8:
      v.i = static_cast<std::int8_t>(r.u8("i8 value"));
      break;
    case k::u16:
      v.u = r.u16("u16 value");
      break;
    case k::i16:
      v.i = static_cast<std::int16_t>(r.u16("i16 value"));
      break;
    case k::u32:
      v.u = r.u32("u32 value");
      break;
    case k::i32:
      v.i = r.i32("i32 value");
      break;
    case k::f32:
      v.f = r.f32("f32 value");
      break;
    case k::boolean:
      v.u = r.u8("bool value");
      BASISATTN_REQUIRE(v.u <= 1, io, r.source(), ": bool value ", v.u);
      break;
    case k::string:
      v.s = gguf_string(r, "string value");
      break;
    case k::u64:
      v.u = r.u64("u64 value");
      break;
    case k::i64:
      v.i = static_cast<std::int64_t>(r.u64("i64 value"));
      break;
    case k::f64:
      v.f = r.read<double>("f64 value");
      break;
    case k::array: {
      BASISATTN_REQUIRE(depth < 2, io, r.source(), ": arrays nested more than 2 deep (byte ", r.offset(), ")");
      const std::uint32_t et = r.u32("array element type");
      BASISATTN_REQUIRE(et <= 12, io, r.source(), ": array element type ", et, " is unknown");
      const std::uint64_t n = r.u64("array length");
      // Every element takes at least one byte (strings 8, nested arrays 12): bound n by the file.
      const std::uint64_t min_size = et == 8                              ? 8
                                     : et == 9                            ? 12
                                     : (et == 0 || et == 1 || et == 7)    ? 1
                                     : (et == 2 || et == 3)               ? 2
                                     : (et == 10 || et == 11 || et == 12) ? 8
                                                                          : 4;
      BASISATTN_REQUIRE(n <= r.remaining() / min_size, io, r.source(), ": array of ", n, " elements cannot fit in the ",
                        r.remaining(), " bytes left");
      BASISATTN_REQUIRE(n <= (std::uint64_t(1) << 22), io, r.source(), ": array of ", n,
                        " elements (more than 4M: refused to bound memory)");
      v.item_type = static_cast<k>(et);
      v.items.resize(static_cast<std::size_t>(n));
      for (auto& x : v.items) gguf_read_value(r, x, et, depth + 1);
      break;
    }
  }
}

/// GGML type id -> tensor_type (false when unsupported).
inline bool ggml_type(std::uint32_t id, tensor_type& t) {
  switch (id) {
    case 0:
      t = tensor_type::f32;
      return true;
    case 1:
      t = tensor_type::f16;
      return true;
    case 2:
      t = tensor_type::q4_0;
      return true;
    case 3:
      t = tensor_type::q4_1;
      return true;
    case 8:
      t = tensor_type::q8_0;
      return true;
    case 24:
      t = tensor_type::i8;
      return true;
    case 25:
      t = tensor_type::i16;
      return true;
    case 26:
      t = tensor_type::i32;
      return true;
    case 27:
      t = tensor_type::i64;
      return true;
    case 28:
      t = tensor_type::f64;
      return true;
    case 30:
      t = tensor_type::bf16;
      return true;
    default:
      return false;
  }
}

}  // namespace detail

/// Parse a GGUF file held in memory.
inline gguf_file parse_gguf(std::vector<unsigned char> bytes, const std::string& source = "gguf") {
  detail::require_little_endian();
  gguf_file f;
  f.bytes = std::move(bytes);
  byte_reader r(f.bytes.data(), f.bytes.size(), source);
  const unsigned char* magic = r.take(4, "magic");
  BASISATTN_REQUIRE(std::memcmp(magic, "GGUF", 4) == 0, io, source, ": not a GGUF file (bad magic)");
  f.version = r.u32("version");
  BASISATTN_REQUIRE(f.version == 2 || f.version == 3, unsupported, source, ": GGUF version ", f.version,
                    " (versions 2 and 3 are supported)");
  const std::uint64_t n_tensors = r.u64("tensor count"), n_kv = r.u64("metadata count");
  // A key-value pair takes at least 8 + 4 + 1 bytes, a tensor info at least 8 + 4 + 4 + 8.
  BASISATTN_REQUIRE(n_kv <= r.remaining() / 13, io, source, ": ", n_kv, " metadata entries cannot fit in the file");
  BASISATTN_REQUIRE(n_tensors <= r.remaining() / 24, io, source, ": ", n_tensors, " tensors cannot fit in the file");
  for (std::uint64_t i = 0; i < n_kv; ++i) {
    std::string key = detail::gguf_string(r, "metadata key");
    BASISATTN_REQUIRE(f.metadata.count(key) == 0, io, source, ": metadata key '", key, "' appears twice");
    gguf_value v;
    detail::gguf_read_value(r, v, r.u32("metadata value type"), 0);
    f.metadata.emplace(std::move(key), std::move(v));
  }
  if (f.has("general.alignment")) {
    f.alignment = f.get_u64("general.alignment");
    BASISATTN_REQUIRE(f.alignment > 0 && f.alignment <= 65536 && (f.alignment & (f.alignment - 1)) == 0, io, source,
                      ": general.alignment ", f.alignment, " is not a power of two up to 65536");
  }
  struct raw {
    std::uint64_t offset;
  };
  std::vector<raw> offs;
  for (std::uint64_t i = 0; i < n_tensors; ++i) {
    tensor_info t;
    t.name = detail::gguf_string(r, "tensor name");
    BASISATTN_REQUIRE(t.name.size() <= 65535, io, source, ": tensor name of ", t.name.size(), " bytes");
    const std::uint32_t nd = r.u32("tensor dimension count");
    BASISATTN_REQUIRE(nd >= 1 && nd <= 4, io, source, ": tensor '", t.name, "' has ", nd,
                      " dimensions (1 to 4 allowed)");
    std::vector<std::uint64_t> ne(nd);
    for (auto& d : ne) d = r.u64("tensor dimension");
    t.shape.assign(ne.rbegin(), ne.rend());
    const std::uint32_t type = r.u32("tensor type");
    BASISATTN_REQUIRE(detail::ggml_type(type, t.type), unsupported, source, ": tensor '", t.name, "' has GGML type ",
                      type, ", which is not supported (F32, F16, BF16, F64, I8-I64, Q4_0, Q4_1, Q8_0 are)");
    const std::uint64_t off = r.u64("tensor offset");
    BASISATTN_REQUIRE(off % f.alignment == 0, io, source, ": tensor '", t.name, "' offset ", off, " is not aligned to ",
                      f.alignment);
    t.bytes = bytes_for(t.type, t.numel(), t.name);
    BASISATTN_REQUIRE(f.find(t.name) == nullptr, io, source, ": tensor '", t.name, "' appears twice");
    offs.push_back({off});
    f.tensors.push_back(std::move(t));
  }
  const std::uint64_t data_start = (std::uint64_t(r.offset()) + f.alignment - 1) / f.alignment * f.alignment;
  BASISATTN_REQUIRE(data_start <= f.bytes.size(), io, source, ": data section starts at ", data_start,
                    " beyond the end (", f.bytes.size(), " bytes)");
  const std::uint64_t data_size = f.bytes.size() - data_start;
  for (std::size_t i = 0; i < f.tensors.size(); ++i) {
    tensor_info& t = f.tensors[i];
    BASISATTN_REQUIRE(offs[i].offset <= data_size && t.bytes <= data_size - offs[i].offset, io, source, ": tensor '",
                      t.name, "' (", t.bytes, " bytes at data offset ", offs[i].offset,
                      ") lies outside the data section of ", data_size, " bytes");
    t.offset = data_start + offs[i].offset;
  }
  return f;
}

inline gguf_file read_gguf(const std::string& path) { return parse_gguf(read_file(path), path); }

}  // namespace io
BASISATTN_END_NAMESPACE
