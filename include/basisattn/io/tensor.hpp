// basisattn/io/tensor.hpp - tensor records shared by the checkpoint readers, and dequantization.
//
//   io::tensor_type            element encodings found in checkpoints: plain floats and integers,
//                              and GGML's Q4_0 / Q4_1 / Q8_0 blocks of 32 values
//   io::tensor_info            name, type, shape (outermost first, as PyTorch), bytes inside the file
//   io::to_float(info, file)   the tensor's values as float (f64 rounded, f16/bf16 widened, blocks
//                              dequantized); errc::unsupported for types without a float meaning
//   io::as_matrix(info, file)  the same as a rows x cols matrix<float> (2-D tensors, or 1-D as 1 x n)
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/io/bytes.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace io {

enum class tensor_type { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean, q4_0, q4_1, q8_0 };

inline const char* to_string(tensor_type t) noexcept {
  switch (t) {
    case tensor_type::f64:
      return "F64";
    case tensor_type::f32:
      return "F32";
    case tensor_type::f16:
      return "F16";
    case tensor_type::bf16:
      return "BF16";
    case tensor_type::i64:
      return "I64";
    case tensor_type::i32:
      return "I32";
    case tensor_type::i16:
      return "I16";
    case tensor_type::i8:
      return "I8";
    case tensor_type::u8:
      return "U8";
    case tensor_type::boolean:
      return "BOOL";
    case tensor_type::q4_0:
      return "Q4_0";
    case tensor_type::q4_1:
      return "Q4_1";
    case tensor_type::q8_0:
      return "Q8_0";
  }
  return "?";
}

/// Values per block and bytes per block of a type (1 value per "block" for plain types).
struct type_layout {
  std::uint64_t block_values, block_bytes;
};
inline type_layout layout_of(tensor_type t) noexcept {
  switch (t) {
    case tensor_type::f64:
    case tensor_type::i64:
      return {1, 8};
    case tensor_type::f32:
    case tensor_type::i32:
      return {1, 4};
    case tensor_type::f16:
    case tensor_type::bf16:
    case tensor_type::i16:
      return {1, 2};
    case tensor_type::i8:
    case tensor_type::u8:
    case tensor_type::boolean:
      return {1, 1};
    case tensor_type::q4_0:
      return {32, 18};  // fp16 scale + 16 bytes of nibbles
    case tensor_type::q4_1:
      return {32, 20};  // fp16 scale + fp16 min + 16 bytes of nibbles
    case tensor_type::q8_0:
      return {32, 34};  // fp16 scale + 32 int8
  }
  return {1, 1};
}

/// One tensor of a checkpoint: where its bytes are in the file's buffer.
struct tensor_info {
  std::string name;
  tensor_type type = tensor_type::f32;
  std::vector<std::uint64_t> shape;  ///< outermost first (PyTorch order)
  std::uint64_t offset = 0;          ///< absolute byte offset in the file
  std::uint64_t bytes = 0;

  std::uint64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : shape) n = checked_mul(n, d, "tensor element count");
    return n;
  }
};

/// The tensor called `name` in a directory, or nullptr.
inline const tensor_info* find_tensor(const std::vector<tensor_info>& tensors, const std::string& name) {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}
/// The tensor called `name`; errc::io naming the format when there is none.
inline const tensor_info& get_tensor(const std::vector<tensor_info>& tensors, const std::string& name,
                                     const char* format) {
  const tensor_info* t = find_tensor(tensors, name);
  BASISATTN_REQUIRE(t != nullptr, io, format, ": no tensor named '", name, "'");
  return *t;
}

/// Bytes a tensor of `count` values of type t occupies (errc::io when count does not fill whole blocks).
inline std::uint64_t bytes_for(tensor_type t, std::uint64_t count, const std::string& name) {
  const type_layout l = layout_of(t);
  BASISATTN_REQUIRE(count % l.block_values == 0, io, "tensor '", name, "' of type ", to_string(t), " has ", count,
                    " values, not a multiple of its block size ", l.block_values);
  return checked_mul(count / l.block_values, l.block_bytes, "tensor byte size");
}

namespace detail {
inline float half_to_float(std::uint16_t h) {
  Eigen::half x;
  x.x = h;
  return static_cast<float>(x);
}
inline float bf16_to_float(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <class T>
T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
}  // namespace detail

/// Decode `count` values of type t starting at p (which must hold bytes_for(t, count) bytes).
inline void decode_to_float(tensor_type t, const unsigned char* p, std::uint64_t count, float* out) {
  using detail::load;
  if (count == 0) return;
  switch (t) {
    case tensor_type::f32:
      std::memcpy(out, p, count * 4);
      return;
    case tensor_type::f64:
      for (std::uint64_t i = 0; i < count; ++i) out[i] = static_cast<float>(load<double>(p + 8 * i));
      return;
    case tensor_type::f16:
      for (std::uint64_t i = 0; i < count; ++i) out[i] = detail::half_to_float(load<std::uint16_t>(p + 2 * i));
      return;
    case tensor_type::bf16:
      for (std::uint64_t i = 0; i < count; ++i) out[i] = detail::bf16_to_float(load<std::uint16_t>(p + 2 * i));
      return;
    case tensor_type::q4_0:
      for (std::uint64_t b = 0; b < count / 32; ++b) {
        const unsigned char* blk = p + 18 * b;
        const float d = detail::half_to_float(load<std::uint16_t>(blk));
        for (int j = 0; j < 16; ++j) {
          out[32 * b + j] = float(int(blk[2 + j] & 0x0F) - 8) * d;
          out[32 * b + j + 16] = float(int(blk[2 + j] >> 4) - 8) * d;
        }
      }
      return;
    case tensor_type::q4_1:
      for (std::uint64_t b = 0; b < count / 32; ++b) {
        const unsigned char* blk = p + 20 * b;
        const float d = detail::half_to_float(load<std::uint16_t>(blk));
        const float m = detail::half_to_float(load<std::uint16_t>(blk + 2));
        for (int j = 0; j < 16; ++j) {
          out[32 * b + j] = float(blk[4 + j] & 0x0F) * d + m;
          out[32 * b + j + 16] = float(blk[4 + j] >> 4) * d + m;
        }
      }
      return;
    case tensor_type::q8_0:
      for (std::uint64_t b = 0; b < count / 32; ++b) {
        const unsigned char* blk = p + 34 * b;
        const float d = detail::half_to_float(load<std::uint16_t>(blk));
        for (int j = 0; j < 32; ++j) out[32 * b + j] = float(static_cast<std::int8_t>(blk[2 + j])) * d;
      }
      return;
    default:
      ::basisattn::detail::raise(errc::unsupported, ::basisattn::detail::concat("tensors of type ", to_string(t),
                                                                                " have no float meaning here"));
  }
}

/// The values of a tensor as float. `file` is the buffer the info's offsets refer to.
inline std::vector<float> to_float(const tensor_info& t, const std::vector<unsigned char>& file) {
  const std::uint64_t n = t.numel();
  BASISATTN_REQUIRE(bytes_for(t.type, n, t.name) == t.bytes, io, "tensor '", t.name, "': ", t.bytes, " bytes for ", n,
                    " values of type ", to_string(t.type));
  BASISATTN_REQUIRE(t.offset <= file.size() && t.bytes <= file.size() - t.offset, io, "tensor '", t.name, "' (bytes ",
                    t.offset, "..", t.offset + t.bytes, ") lies outside the file (", file.size(), " bytes)");
  std::vector<float> out(static_cast<std::size_t>(n));
  decode_to_float(t.type, file.data() + t.offset, n, out.data());
  return out;
}

/// A 2-D tensor (or a 1-D one as a single row) as a matrix<float>, rows = shape[0].
inline matrix<float> as_matrix(const tensor_info& t, const std::vector<unsigned char>& file) {
  BASISATTN_REQUIRE(t.shape.size() == 1 || t.shape.size() == 2, shape_mismatch, "tensor '", t.name, "' has ",
                    t.shape.size(), " dimensions; a matrix needs 1 or 2");
  const std::uint64_t rows = t.shape.size() == 2 ? t.shape[0] : 1, cols = t.shape.back();
  const std::vector<float> v = to_float(t, file);
  matrix<float> m(static_cast<index_t>(rows), static_cast<index_t>(cols));
  if (!v.empty()) std::memcpy(m.data(), v.data(), v.size() * sizeof(float));
  return m;
}

}  // namespace io
BASISATTN_END_NAMESPACE
