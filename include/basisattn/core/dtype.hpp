// basisattn/core/dtype.hpp - storage types and their properties.
//
// Storage types: float, double, Eigen::half (IEEE binary16) and Eigen::bfloat16. Arithmetic is
// never done in the 16-bit types: `compute_t<T>` is double for double storage and float otherwise.
// This header only forward-declares Eigen's 16-bit types, so it is usable from nvcc-compiled files
// that must not include Eigen; the bits of Eigen::half / Eigen::bfloat16 equal CUDA's __half /
// __nv_bfloat16, so device code may reinterpret them.
#pragma once

#include <basisattn/core/config.hpp>

#include <type_traits>

namespace Eigen {
struct half;
struct bfloat16;
}  // namespace Eigen

BASISATTN_BEGIN_NAMESPACE

/// Runtime tag of a storage type.
enum class dtype { f64, f32, f16, bf16 };

/// Name of a dtype ("f32", ...).
inline const char* to_string(dtype t) noexcept {
  switch (t) {
    case dtype::f64:
      return "f64";
    case dtype::f32:
      return "f32";
    case dtype::f16:
      return "f16";
    case dtype::bf16:
      return "bf16";
  }
  return "?";
}

/// Unit roundoff (half an ulp of 1) of a dtype: 2^-53, 2^-24, 2^-11, 2^-8.
constexpr double unit_roundoff(dtype t) noexcept {
  return t == dtype::f64   ? 1.1102230246251565e-16
         : t == dtype::f32 ? 5.9604644775390625e-08
         : t == dtype::f16 ? 4.8828125e-04
                           : 3.90625e-03;
}

namespace detail {
template <class T>
struct dtype_of_impl {};
template <>
struct dtype_of_impl<double> {
  static constexpr dtype value = dtype::f64;
};
template <>
struct dtype_of_impl<float> {
  static constexpr dtype value = dtype::f32;
};
template <>
struct dtype_of_impl<Eigen::half> {
  static constexpr dtype value = dtype::f16;
};
template <>
struct dtype_of_impl<Eigen::bfloat16> {
  static constexpr dtype value = dtype::bf16;
};
template <class T, class = void>
struct is_storage : std::false_type {};
template <class T>
struct is_storage<T, std::void_t<decltype(dtype_of_impl<T>::value)>> : std::true_type {};
}  // namespace detail

/// True for the four supported storage types (cv-qualifiers ignored).
template <class T>
inline constexpr bool is_storage_type_v = detail::is_storage<std::remove_cv_t<T>>::value;

/// dtype tag of a storage type.
template <class T>
inline constexpr dtype dtype_of_v = detail::dtype_of_impl<std::remove_cv_t<T>>::value;

/// Arithmetic type used for a storage type: double for double, float for everything else.
template <class T>
using compute_t = std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>;

BASISATTN_END_NAMESPACE
