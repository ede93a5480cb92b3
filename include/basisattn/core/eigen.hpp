// basisattn/core/eigen.hpp - Eigen interop shared by every method and backend (internal helpers in
// basisattn::detail; not a public entry point).
//
// Maps from views, conversions between storage and compute types (correctly rounded), input
// validation (finiteness) and the q/k checksums of the approximate methods' plans. Eigen's 16-bit GEMM is about 400x slower than float here, so 16-bit data are always
// converted to float (or double) before any product.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

BASISATTN_BEGIN_NAMESPACE
namespace detail {

template <class T>
using rm_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Map of a view whose rows are contiguous (col_stride == 1): vectorisable by Eigen.
template <class T>
using rm_map = Eigen::Map<
    std::conditional_t<std::is_const_v<T>, const rm_matrix<std::remove_const_t<T>>, rm_matrix<std::remove_const_t<T>>>,
    Eigen::Unaligned, Eigen::OuterStride<>>;
/// Map of an arbitrary strided view.
template <class T>
using strided_map = Eigen::Map<
    std::conditional_t<std::is_const_v<T>, const rm_matrix<std::remove_const_t<T>>, rm_matrix<std::remove_const_t<T>>>,
    Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

template <class T>
rm_map<T> map_rows(const matrix_view<T>& v) {
  BASISATTN_REQUIRE(v.rows_contiguous(), invalid_argument, "internal: view rows are not contiguous");
  return rm_map<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.rows > 1 ? v.row_stride : v.cols));
}
template <class T>
strided_map<T> map_strided(const matrix_view<T>& v) {
  return strided_map<T>(v.data, v.rows, v.cols,
                        Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(v.row_stride, v.col_stride));
}

/// Storage -> compute conversion (exact for float/double; widening for the 16-bit types).
template <class C, class T>
inline C to_compute(const T& x) {
  return static_cast<C>(x);
}
/// double -> float rounded toward zero, with the lowest bit set when inexact ("round to odd"): a
/// following round-to-nearest to a format of at most 22 significant bits then rounds the original
/// double correctly (no double-rounding error).
inline float round_to_odd_float(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) == x || !std::isfinite(f)) return f;
  if (std::abs(static_cast<double>(f)) > std::abs(x)) f = std::nextafter(f, 0.0f);
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits |= 1u;
  std::memcpy(&f, &bits, sizeof bits);
  return f;
}

/// double -> 16-bit type T, correctly rounded to nearest even. Rounding to float first is already
/// correct unless the float lands exactly on a midpoint of T (then the double's own bits decide), or
/// the value is in T's subnormal range (fewer bits kept): only those take the round-to-odd path.
template <class T>
inline T round_double_to_16(double x) {
  const float f = static_cast<float>(x);
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  constexpr bool is_half = std::is_same_v<T, Eigen::half>;
  constexpr std::uint32_t low = is_half ? 0x1FFFu : 0xFFFFu, mid = is_half ? 0x1000u : 0x8000u;
  const bool small = is_half ? std::abs(f) < 6.103515625e-05f : std::abs(f) < 1.1754943508222875e-38f;
  if ((b & low) == mid || small) return T(round_to_odd_float(x));
  return T(f);
}

/// Compute -> storage conversion, correctly rounded to nearest even (also from double to the
/// 16-bit types).
template <class T, class C>
inline T from_compute(C x) {
  if constexpr (std::is_same_v<T, C>)
    return x;
  else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
    return static_cast<T>(x);
  else if constexpr (std::is_same_v<C, double>)
    return round_double_to_16<T>(x);
  else
    return T(static_cast<float>(x));
}

/// Copy a view of any storage type into a dense compute-type matrix (vectorised when the source
/// rows are contiguous).
template <class C, class T>
rm_matrix<C> to_dense(const matrix_view<const T>& v) {
  rm_matrix<C> out(v.rows, v.cols);
  if (v.rows_contiguous()) {
    if constexpr (std::is_same_v<T, Eigen::half> || std::is_same_v<T, Eigen::bfloat16>)
      out = map_rows(v).template cast<float>().template cast<C>();
    else
      out = map_rows(v).template cast<C>();
    return out;
  }
  for (index_t i = 0; i < v.rows; ++i)
    for (index_t j = 0; j < v.cols; ++j) out(i, j) = to_compute<C>(v(i, j));
  return out;
}

/// Copy (with conversion, round to nearest) src into dst; extents must match.
template <class TD, class TS>
void convert_into(const matrix_view<TD>& dst, const matrix_view<const TS>& src) {
  if (src.rows_contiguous() && dst.rows_contiguous()) {
    constexpr bool narrowing_from_double =
        std::is_same_v<TS, double> && (std::is_same_v<TD, Eigen::half> || std::is_same_v<TD, Eigen::bfloat16>);
    if constexpr (!narrowing_from_double) {  // one rounding at most: Eigen's vectorised casts
      auto d = map_rows(dst);
      if constexpr (std::is_same_v<TD, TS>)
        d = map_rows(src);
      else if constexpr (std::is_same_v<TS, Eigen::half> || std::is_same_v<TS, Eigen::bfloat16>)
        d = map_rows(src).template cast<float>().template cast<TD>();
      else
        d = map_rows(src).template cast<TD>();
      return;
    }
  }
  for (index_t i = 0; i < src.rows; ++i)
    for (index_t j = 0; j < src.cols; ++j) dst(i, j) = from_compute<TD>(to_compute<compute_t<TD>>(src(i, j)));
}

/// Largest finite value of a storage type and the bound below which rounding to it stays finite.
template <class T>
constexpr double max_finite() {
  return std::is_same_v<T, double>        ? 1.7976931348623157e308
         : std::is_same_v<T, float>       ? 3.4028234663852886e38
         : std::is_same_v<T, Eigen::half> ? 65504.0
                                          : 3.3895313892515355e38;
}
/// Rounding to nearest even sends max_finite plus half a unit in the last place there, and
/// everything above, to infinity: the bound is that midpoint (any finite double for double).
template <class T>
constexpr double rounds_finite_below() {
  return std::is_same_v<T, double>        ? std::numeric_limits<double>::infinity()
         : std::is_same_v<T, float>       ? 3.4028235677973366e38  // (2 - 2^-24) 2^127
         : std::is_same_v<T, Eigen::half> ? 65520.0                // 65504 + 16
                                          : 3.39617752923046e38;   // bf16: (2 - 2^-8) 2^127
}

template <class T>
inline bool is_finite_value(const T& x) {
  return std::isfinite(static_cast<double>(static_cast<float>(to_compute<compute_t<T>>(x))));
}
template <>
inline bool is_finite_value<double>(const double& x) {
  return std::isfinite(x);
}

/// Raise errc::non_finite naming `what` and the first bad element if v holds NaN or Inf.
template <class T>
void require_finite(const matrix_view<const T>& v, const char* what) {
  for (index_t i = 0; i < v.rows; ++i)
    for (index_t j = 0; j < v.cols; ++j)
      if (!is_finite_value(v(i, j)))
        raise(errc::non_finite, concat(what, " has a non-finite value at (", i, ", ", j, ")"));
}
template <class T>
void require_finite(const T* p, index_t n, const char* what) {
  if (p) require_finite(matrix_view<const T>(p, 1, n), what);
}
template <class T>
void require_finite(const tensor3_view<const T>& t, const char* what) {
  for (index_t j = 0; j < t.extent[1]; ++j) {
    auto m = t.slice1(j);
    for (index_t i = 0; i < m.rows; ++i)
      for (index_t k = 0; k < m.cols; ++k)
        if (!is_finite_value(m(i, k)))
          raise(errc::non_finite, concat(what, " has a non-finite value at (", i, ", ", j, ", ", k, ")"));
  }
}

/// A checksum of head h of x (an index-weighted sum of its entries, in double). The plan/run pairs of
/// the approximate methods (conv-basis, support-basis) keep it from their plan, so a run on q or k
/// other than those the plan was made from is refused instead of silently using stale supports.
template <class T>
double head_checksum(const tensor3_view<const T>& x, index_t h) {
  double s = 0;
  for (index_t i = 0; i < x.extent[0]; ++i)
    for (index_t c = 0; c < x.extent[2]; ++c) {
      const std::uint64_t hsh =
          (std::uint64_t(i) * 0x9E3779B97F4A7C15ull) ^ (std::uint64_t(c + 1) * 0xC2B2AE3D27D4EB4Full);
      s += static_cast<double>(to_compute<compute_t<T>>(x(i, h, c))) * (0.5 + double(hsh >> 40) / double(1ull << 24));
    }
  return s;
}
/// Whether two checksums agree (NaN agrees with NaN: data with NaN planned with check_finite = false).
inline bool same_checksum(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

}  // namespace detail
BASISATTN_END_NAMESPACE
