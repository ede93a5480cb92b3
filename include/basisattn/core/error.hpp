// basisattn/core/error.hpp - the library's error type.
//
// Every failure the library detects (bad shapes, non-finite values, singular bases, unsupported
// combinations, backend failures) is reported as a `basisattn::error` carrying an `errc` code and a
// message that names the offending argument. With exceptions disabled the message is printed to
// stderr and the process aborts (the library never calls exit()).
#pragma once

#include <basisattn/core/config.hpp>

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

BASISATTN_BEGIN_NAMESPACE

/// Category of a basisattn error.
enum class errc {
  invalid_argument,  ///< an argument is out of range (r >= m, k > n, bad option value, ...)
  shape_mismatch,    ///< extents of two arguments do not agree
  non_finite,        ///< NaN or Inf found in an input
  singular_basis,    ///< the selected basis rows are singular or too ill-conditioned
  rank_deficient,    ///< a weight matrix has numerical rank below what the method needs
  unsupported,       ///< valid request that this build/backend/dtype does not implement
  io,                ///< truncated, corrupt or inconsistent file
  backend,           ///< a backend call (CUDA, cuBLAS, cuFFT, ...) failed
};

/// Human-readable name of an error code.
inline const char* to_string(errc c) noexcept {
  switch (c) {
    case errc::invalid_argument:
      return "invalid_argument";
    case errc::shape_mismatch:
      return "shape_mismatch";
    case errc::non_finite:
      return "non_finite";
    case errc::singular_basis:
      return "singular_basis";
    case errc::rank_deficient:
      return "rank_deficient";
    case errc::unsupported:
      return "unsupported";
    case errc::io:
      return "io";
    case errc::backend:
      return "backend";
  }
  return "unknown";
}

/// The exception type thrown by every basisattn function. what() is "basisattn: <code>: <message>".
class error : public std::runtime_error {
 public:
  error(errc code, const std::string& message)
      : std::runtime_error("basisattn: " + std::string(to_string(code)) + ": " + message), code_(code) {}
  errc code() const noexcept { return code_; }

 private:
  errc code_;
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// Report an error: throw basisattn::error, or print and abort without exceptions.
[[noreturn]] inline void raise(errc code, const std::string& message) {
#if BASISATTN_HAS_EXCEPTIONS
  throw error(code, message);
#else
  std::fprintf(stderr, "basisattn: %s: %s\n", to_string(code), message.c_str());
  std::abort();
#endif
}

}  // namespace detail

BASISATTN_END_NAMESPACE

/// Check a condition; on failure raise `basisattn::error(code, concat(message parts...))`.
/// The message parts are only evaluated when the check fails.
#define BASISATTN_REQUIRE(cond, code, ...)                                                                      \
  do {                                                                                                          \
    if (!(cond)) ::basisattn::detail::raise(::basisattn::errc::code, ::basisattn::detail::concat(__VA_ARGS__)); \
  } while (0)
