// basisattn/cpu/eigen.hpp - Eigen interop for the CPU backend (internal helpers in basisattn::detail).
//
// Maps from views, conversions between storage and compute types, and input validation
// (finiteness). Eigen's 16-bit GEMM is about 400x slower than float here, so 16-bit data are always
// converted to float (or double) before any product.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>

#include <Eigen/Core>

#include <cmath>
#include <exception>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#endif

BASISATTN_BEGIN_NAMESPACE
namespace detail {

template <class T>
using rm_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Map of a view whose rows are contiguous (col_stride == 1): vectorisable by Eigen.
template <class T>
using rm_map = Eigen::Map<std::conditional_t<std::is_const_v<T>, const rm_matrix<std::remove_const_t<T>>,
                                             rm_matrix<std::remove_const_t<T>>>,
                          Eigen::Unaligned, Eigen::OuterStride<>>;
/// Map of an arbitrary strided view.
template <class T>
using strided_map =
    Eigen::Map<std::conditional_t<std::is_const_v<T>, const rm_matrix<std::remove_const_t<T>>,
                                  rm_matrix<std::remove_const_t<T>>>,
               Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

template <class T>
rm_map<T> map_rows(const matrix_view<T>& v) {
  BASISATTN_REQUIRE(v.rows_contiguous(), invalid_argument, "internal: view rows are not contiguous");
  return rm_map<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.rows > 1 ? v.row_stride : v.cols));
}
template <class T>
strided_map<T> map_strided(const matrix_view<T>& v) {
  return strided_map<T>(v.data, v.rows, v.cols, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(v.row_stride, v.col_stride));
}

/// Storage -> compute conversion (exact for float/double; widening for the 16-bit types).
template <class C, class T>
inline C to_compute(const T& x) {
  return static_cast<C>(x);
}
/// Compute -> storage conversion (round to nearest even).
template <class T, class C>
inline T from_compute(C x) {
  if constexpr (std::is_same_v<T, C>) return x;
  else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) return static_cast<T>(x);
  else return T(static_cast<float>(x));
}

/// Copy a view of any storage type into a dense compute-type matrix.
template <class C, class T>
rm_matrix<C> to_dense(const matrix_view<const T>& v) {
  rm_matrix<C> out(v.rows, v.cols);
  for (index_t i = 0; i < v.rows; ++i)
    for (index_t j = 0; j < v.cols; ++j) out(i, j) = to_compute<C>(v(i, j));
  return out;
}

/// Copy (with conversion) src into dst; extents must match.
template <class TD, class TS>
void convert_into(const matrix_view<TD>& dst, const matrix_view<const TS>& src) {
  for (index_t i = 0; i < src.rows; ++i) {
    const TS* s = src.data + i * src.row_stride;
    TD* d = dst.data + i * dst.row_stride;
    if (src.col_stride == 1 && dst.col_stride == 1) {
      for (index_t j = 0; j < src.cols; ++j) d[j] = from_compute<TD>(to_compute<compute_t<TD>>(s[j]));
    } else {
      for (index_t j = 0; j < src.cols; ++j)
        d[j * dst.col_stride] = from_compute<TD>(to_compute<compute_t<TD>>(s[j * src.col_stride]));
    }
  }
}

template <class T>
inline bool is_finite_value(const T& x) {
  return std::isfinite(static_cast<double>(static_cast<float>(to_compute<compute_t<T>>(x))));
}
template <>
inline bool is_finite_value<double>(const double& x) { return std::isfinite(x); }

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

/// Number of threads the CPU backend uses for its own parallel loops (OpenMP's current setting,
/// which is also what Eigen's GEMM uses unless Eigen::setNbThreads was called).
inline int cpu_threads() {
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : Eigen::nbThreads();
#else
  return 1;
#endif
}

/// for (i = 0; i < n; ++i) f(i) on detail::cpu_threads() OpenMP threads (dynamic schedule). An
/// exception thrown by f is carried out of the parallel region and rethrown (the first one wins).
template <class F>
void parallel_for(index_t n, F&& f) {
#if defined(_OPENMP)
  const int threads = cpu_threads();
  if (threads > 1 && n > 1) {
#if BASISATTN_HAS_EXCEPTIONS
    std::exception_ptr err;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (index_t i = 0; i < n; ++i) {
      try {
        f(i);
      } catch (...) {
#pragma omp critical(basisattn_parallel_for_error)
        if (!err) err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
#else
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (index_t i = 0; i < n; ++i) f(i);
#endif
    return;
  }
#endif
  for (index_t i = 0; i < n; ++i) f(i);
}

}  // namespace detail
BASISATTN_END_NAMESPACE
