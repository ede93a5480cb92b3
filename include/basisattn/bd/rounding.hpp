// basisattn/bd/rounding.hpp - the lattice tools of BD's error-aware rounding (internal, bd::detail):
// rounding to a storage type's grid, its neighbours, the grid descent and Babai's nearest plane used
// by shared_basis::round_pair (bd/factorize.hpp) to round C_g and A_S B jointly.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/view.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

BASISATTN_BEGIN_NAMESPACE
namespace bd {
namespace detail {
template <class TS>
double round_to(double x) {
  return static_cast<double>(::basisattn::detail::to_compute<compute_t<TS>>(::basisattn::detail::from_compute<TS>(x)));
}

/// The representable value of TS next to x (which must be representable in TS) towards +inf
/// (dir > 0) or -inf; NaN when that value would not be finite. Computed from x's
/// binary exponent (no conversion to TS): the spacing of TS at x is 2^(max(e, e_min) - p).
template <class TS>
double grid_neighbor(double x, int dir) {
  constexpr int p = std::is_same_v<TS, double>        ? 52
                    : std::is_same_v<TS, float>       ? 23
                    : std::is_same_v<TS, Eigen::half> ? 10
                                                      : 7;
  constexpr int emin = std::is_same_v<TS, double> ? -1022 : std::is_same_v<TS, Eigen::half> ? -14 : -126;
  std::uint64_t bits;
  std::memcpy(&bits, &x, 8);
  const int e = static_cast<int>((bits >> 52) & 0x7ffu) - 1023;
  const bool pow2 = (bits & ((std::uint64_t(1) << 52) - 1)) == 0;
  auto pow2_of = [](int k) {  // 2^k for the normal range of double, by its bit pattern
    if constexpr (std::is_same_v<TS, double>) {
      return std::ldexp(1.0, k);
    } else {
      const std::uint64_t b = static_cast<std::uint64_t>(k + 1023) << 52;
      double v;
      std::memcpy(&v, &b, 8);
      return v;
    }
  };
  if (x == 0) return dir > 0 ? pow2_of(emin - p) : -pow2_of(emin - p);
  const bool away = (dir > 0) == (x > 0);
  const int eff = std::max(e, emin);
  const double step = pow2_of((!away && pow2 && e > emin ? eff - 1 : eff) - p);
  const double y = x + (dir > 0 ? step : -step);
  return std::abs(y) < ::basisattn::detail::rounds_finite_below<TS>() ? y : std::numeric_limits<double>::quiet_NaN();
}

/// Coordinate descent on the grid of TS: lowers 0.5 x^T H x - rhs^T x column by column, moving one
/// entry of X to a neighbouring representable value at a time (in the direction that the gradient
/// Z = H X - rhs, kept up to date, says can help).
template <class TS>
void grid_descent(const Eigen::MatrixXd& h, Eigen::MatrixXd& x, Eigen::MatrixXd& z, int passes) {
  for (int pass = 0; pass < passes; ++pass) {
    index_t moved = 0;
    for (index_t k = 0; k < x.cols(); ++k)
      for (index_t i = 0; i < x.rows(); ++i) {
        const double zi = z(i, k), xi = x(i, k);
        if (zi == 0) continue;
        // Moving down (dl < 0) can only help when z > 0, and up when z < 0.
        const double y = grid_neighbor<TS>(xi, zi > 0 ? -1 : 1);
        if (!std::isfinite(y)) continue;
        const double dl = y - xi;
        if (2.0 * dl * zi + dl * dl * h(i, i) < 0) {
          x(i, k) = y;
          z.col(k) += h.col(i) * dl;
          ++moved;
        }
      }
    if (moved == 0) break;
  }
}

/// Babai's nearest plane on the grid of TS: column by column, x ~ target minimising ||R (x - target)||
/// (R upper triangular), rounding the last coordinate first and carrying its error up. Blocked:
/// the carry from the rows below a block of 32 is one matrix product.
template <class TS>
Eigen::MatrixXd nearest_plane(const Eigen::MatrixXd& r, const Eigen::MatrixXd& target) {
  const index_t n = r.rows(), nb = 32;
  Eigen::MatrixXd x(target.rows(), target.cols()), err(target.rows(), target.cols());  // err = target - x
  for (index_t hi = n; hi > 0; hi -= nb) {
    const index_t lo = std::max<index_t>(0, hi - nb), w = hi - lo;
    Eigen::MatrixXd y = target.middleRows(lo, w);
    if (hi < n) {
      y.noalias() += (r.diagonal().segment(lo, w).cwiseInverse().asDiagonal() * r.block(lo, hi, w, n - hi)) *
                     err.bottomRows(n - hi);
    }
    for (index_t i = w - 1; i >= 0; --i) {
      const index_t gi = lo + i;
      if (i + 1 < w)
        y.row(i).noalias() += (r.row(gi).segment(gi + 1, w - i - 1) / r(gi, gi)) * err.middleRows(gi + 1, w - i - 1);
      for (index_t k = 0; k < y.cols(); ++k) x(gi, k) = round_to<TS>(y(i, k));
      err.row(gi) = target.row(gi) - x.row(gi);
    }
  }
  return x;
}

}  // namespace detail
}  // namespace bd
BASISATTN_END_NAMESPACE
