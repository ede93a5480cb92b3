// Shared helpers for the test suite: deterministic random data and norm-based comparisons.
#pragma once

#include <basisattn/core/dtype.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <random>
#include <vector>

namespace test {

using basisattn::index_t;

/// Deterministic generator; each test seeds its own.
inline std::mt19937_64& rng(std::uint64_t seed = 0, bool reseed = false) {
  static std::mt19937_64 g(12345);
  if (reseed) g.seed(seed);
  return g;
}
inline std::normal_distribution<double>& normal_dist() {
  static std::normal_distribution<double> d(0.0, 1.0);
  return d;
}
/// Reseed: the same seed gives the same values whatever ran before (the distribution's cached
/// second value is dropped too).
inline void seed(std::uint64_t s) {
  rng(s, true);
  normal_dist().reset();
}

inline double normal() { return normal_dist()(rng()); }

/// rows x cols matrix of N(0, scale^2) values, rounded to T.
template <class T>
basisattn::matrix<T> random_matrix(index_t rows, index_t cols, double scale = 1.0) {
  basisattn::matrix<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) m(i, j) = basisattn::detail::from_compute<T>(scale * normal());
  return m;
}
template <class T>
std::vector<T> random_vector(index_t n, double scale = 1.0) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = basisattn::detail::from_compute<T>(scale * normal());
  return v;
}

/// Values of a view as a double matrix.
template <class T>
Eigen::MatrixXd to_double(const basisattn::matrix_view<const T>& v) {
  Eigen::MatrixXd m(v.rows, v.cols);
  for (index_t i = 0; i < v.rows; ++i)
    for (index_t j = 0; j < v.cols; ++j) m(i, j) = static_cast<double>(basisattn::detail::to_compute<float>(v(i, j)));
  return m;
}
inline Eigen::MatrixXd to_double(const basisattn::matrix_view<const double>& v) {
  Eigen::MatrixXd m(v.rows, v.cols);
  for (index_t i = 0; i < v.rows; ++i)
    for (index_t j = 0; j < v.cols; ++j) m(i, j) = v(i, j);
  return m;
}
template <class T>
Eigen::MatrixXd to_double(const basisattn::matrix<T>& m) {
  return to_double(m.view());
}

/// ||got - want||_F / ||want||_F; infinity if got has a non-finite entry.
inline double rel_error(const Eigen::MatrixXd& got, const Eigen::MatrixXd& want) {
  if (!got.allFinite()) return INFINITY;
  const double den = want.norm();
  return den > 0 ? (got - want).norm() / den : (got - want).norm();
}

/// Unit roundoff of a storage type.
template <class T>
constexpr double u() {
  return basisattn::unit_roundoff(basisattn::dtype_of_v<T>);
}

/// gamma_k = k u / (1 - k u): the componentwise bound of a sum of k products computed in T in any
/// order, with or without FMA: |fl(x . w) - x . w| <= gamma_k |x| . |w| (Higham, eq. 3.13).
/// Results of two code paths, shapes or blockings that compute the same sums in T differ by at most
/// twice that; compare them with it, never bitwise.
template <class T>
constexpr double gamma(index_t k) {
  return double(k) * u<T>() / (1 - double(k) * u<T>());
}

/// Underflow term of one rounding to T: fl(x) = x (1 + d) + e with |d| <= u<T>() and |e| <= eta<T>(),
/// half the smallest subnormal of T (Higham, Accuracy and Stability, eq. 2.8). Only a result in T's
/// subnormal range has e != 0; bounds of roundings to a 16-bit type add it because an output near 0
/// can land there (fp16's subnormals start at 6.1e-5). For double, 2^-1075 is not representable: the
/// smallest subnormal is returned.
template <class T>
double eta() {
  if constexpr (std::is_same_v<T, double>)
    return std::numeric_limits<double>::denorm_min();
  else if constexpr (std::is_same_v<T, float>)
    return std::ldexp(1.0, -150);
  else if constexpr (std::is_same_v<T, Eigen::half>)
    return std::ldexp(1.0, -25);
  else
    return std::ldexp(1.0, -134);  // bfloat16: float's exponent range, 7 fraction bits
}

/// max over entries of |got - want| / bound: <= 1 when every entry is within its componentwise
/// bound, and bound / error of the worst entry is the margin. An entry with got == want counts 0
/// (even where the bound is 0); a non-finite entry of got gives infinity.
inline double max_error_ratio(const Eigen::MatrixXd& got, const Eigen::MatrixXd& want, const Eigen::MatrixXd& bound) {
  if (!got.allFinite()) return INFINITY;
  double worst = 0;
  for (Eigen::Index i = 0; i < got.rows(); ++i)
    for (Eigen::Index j = 0; j < got.cols(); ++j) {
      const double e = std::abs(got(i, j) - want(i, j));
      if (e > 0) worst = std::max(worst, e / bound(i, j));  // e / 0 = inf: an exact bound was exceeded
    }
  return worst;
}

/// Fill a matrix with NaN so that unwritten outputs are caught.
template <class T>
void poison(basisattn::matrix<T>& m) {
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j) m(i, j) = basisattn::detail::from_compute<T>(std::nanf(""));
}

}  // namespace test
