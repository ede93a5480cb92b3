// basisattn/io/bytes.hpp - reading files and parsing bytes without ever reading out of bounds.
//
//   io::read_file(path)               whole file into memory (errc::io if it cannot be read)
//   io::byte_reader r(data, size)     sequential little-endian reads (u8 ... u64, i32, f32, f64,
//                                     strings, raw spans); every read checks the remaining length
//                                     and raises errc::io naming `what` and the offset
//   io::checked_mul / checked_add     size arithmetic that raises errc::io on overflow
// The checkpoint readers (safetensors, llama2.c, GGUF) are built on these, so a truncated, corrupt
// or lying file gives a clear error instead of a crash.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace io {

/// a * b for sizes, raising errc::io (naming `what`) on overflow.
inline std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a)
    ::basisattn::detail::raise(errc::io, ::basisattn::detail::concat(what, ": size overflows (", a, " x ", b, ")"));
  return a * b;
}
/// a + b for sizes, raising errc::io (naming `what`) on overflow.
inline std::uint64_t checked_add(std::uint64_t a, std::uint64_t b, const char* what) {
  if (b > std::numeric_limits<std::uint64_t>::max() - a)
    ::basisattn::detail::raise(errc::io, ::basisattn::detail::concat(what, ": size overflows (", a, " + ", b, ")"));
  return a + b;
}

/// The whole content of a file.
inline std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  BASISATTN_REQUIRE(f.good(), io, "cannot open '", path, "'");
  const std::streamoff size = f.tellg();
  BASISATTN_REQUIRE(size >= 0, io, "cannot determine the size of '", path, "'");
  std::vector<unsigned char> data(static_cast<std::size_t>(size));
  f.seekg(0);
  if (size > 0) f.read(reinterpret_cast<char*>(data.data()), size);
  BASISATTN_REQUIRE(f.good() || (size == 0), io, "cannot read all ", size, " bytes of '", path, "'");
  return data;
}

/// Write bytes to a file (errc::io on failure).
inline void write_file(const std::string& path, const std::vector<unsigned char>& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  BASISATTN_REQUIRE(f.good(), io, "cannot create '", path, "'");
  if (!data.empty()) f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  f.flush();
  BASISATTN_REQUIRE(f.good(), io, "cannot write ", data.size(), " bytes to '", path, "'");
}

/// Sequential, bounds-checked little-endian reader over a byte range.
class byte_reader {
 public:
  byte_reader(const unsigned char* data, std::size_t size, std::string source = "input")
      : data_(data), size_(size), source_(std::move(source)) {}

  std::size_t offset() const { return pos_; }
  std::size_t size() const { return size_; }
  std::size_t remaining() const { return size_ - pos_; }
  const unsigned char* data() const { return data_; }

  /// Pointer to the next n bytes, advancing past them.
  const unsigned char* take(std::uint64_t n, const char* what) {
    if (n > remaining())
      ::basisattn::detail::raise(
          errc::io, ::basisattn::detail::concat(source_, ": truncated reading ", what, " at byte ", pos_, " (needs ", n,
                                                " bytes, ", remaining(), " left)"));
    const unsigned char* p = data_ + pos_;
    pos_ += static_cast<std::size_t>(n);
    return p;
  }
  void skip(std::uint64_t n, const char* what) { take(n, what); }
  /// Move to an absolute offset <= size.
  void seek(std::uint64_t off, const char* what) {
    if (off > size_)
      ::basisattn::detail::raise(errc::io, ::basisattn::detail::concat(source_, ": ", what, " points to byte ", off,
                                                                       " beyond the end (", size_, " bytes)"));
    pos_ = static_cast<std::size_t>(off);
  }

  template <class T>
  T read(const char* what) {
    static_assert(std::is_trivially_copyable_v<T>, "read<T> needs a trivially copyable T");
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));  // little-endian hosts only (checked below)
    return v;
  }
  std::uint8_t u8(const char* what) { return read<std::uint8_t>(what); }
  std::uint16_t u16(const char* what) { return read<std::uint16_t>(what); }
  std::uint32_t u32(const char* what) { return read<std::uint32_t>(what); }
  std::uint64_t u64(const char* what) { return read<std::uint64_t>(what); }
  std::int32_t i32(const char* what) { return read<std::int32_t>(what); }
  float f32(const char* what) { return read<float>(what); }
  /// A string of n bytes.
  std::string str(std::uint64_t n, const char* what) {
    const unsigned char* p = take(n, what);
    return std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n));
  }
  const std::string& source() const { return source_; }

 private:
  const unsigned char* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  std::string source_;
};

namespace detail {
inline bool host_is_little_endian() {
  const std::uint16_t one = 1;
  unsigned char b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}
inline void require_little_endian() {
  BASISATTN_REQUIRE(host_is_little_endian(), unsupported, "the checkpoint readers need a little-endian host");
}
}  // namespace detail

}  // namespace io
BASISATTN_END_NAMESPACE
