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
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {
namespace detail {
/// Working precision of error-aware rounding to TS: float for the 16-bit types (float's unit
/// roundoff is 2^-13 of fp16's and 2^-16 of bf16's), double for float and double; the 16-bit
/// types fall back to double when float_work_suffices says no.
template <class TS>
using work_t =
    std::conditional_t<std::is_same_v<TS, Eigen::half> || std::is_same_v<TS, Eigen::bfloat16>, float, double>;
template <class W>
using wmat = Eigen::Matrix<W, Eigen::Dynamic, Eigen::Dynamic>;  ///< column-major
template <class W>
using wrmat = Eigen::Matrix<W, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Whether float is precise enough for error-aware rounding to TS with M^T M = I + C^T C (r x r,
/// both triangles). The target A_S B is computed in double and rounded once to float; that
/// rounding reaches the product through M = [I; C]: relative to the product it is up to
/// u_float ||M||_2, and it must stay far below TS's own unit roundoff (the gradients' own float
/// errors grow with ||M||_2 as well, M^T M being positive definite): float is used while u_float ||M||_2 <= u_TS / 16 (||M||_2 <= 512 for fp16, 4096 for
/// bf16), with ||M||_2^2 bounded above by the largest row sum of |M^T M|. Larger coefficients (a
/// poorly chosen basis: first_r on real weights) are rounded in double.
template <class TS>
bool float_work_suffices(const Eigen::MatrixXd& mtm) {
  const double row_sum = mtm.cwiseAbs().colwise().sum().maxCoeff();  // symmetric: columns = rows
  return std::sqrt(row_sum) * unit_roundoff(dtype::f32) <= unit_roundoff(dtype_of_v<TS>) / 16;
}

/// Columns swept together by grid_descent.
constexpr index_t descent_lanes = 16;
/// Rows of a column whose moves grid_descent applies to the gradient together.
constexpr index_t descent_block = 8;

/// x rounded to the grid of TS (to nearest even), returned in x's type.
template <class TS, class W>
W round_to(W x) {
  return static_cast<W>(::basisattn::detail::to_compute<compute_t<TS>>(::basisattn::detail::from_compute<TS>(x)));
}

/// The representable value of TS next to x (which must be representable in TS) towards +inf (up)
/// or -inf; x itself when that value would not be finite in TS. Computed from the binary exponent
/// of x in W (no conversion to TS, no branch: the descent sweeps it over 16 columns at once): the
/// spacing of TS at x is 2^(max(e, e_min) - p), half that below a power of two when moving inwards.
template <class TS, class W>
W grid_step(W x, bool up) {
  static_assert(std::is_same_v<W, float> || std::is_same_v<W, double>, "working precision: float or double");
  static_assert(sizeof(TS) <= sizeof(W), "the grid of TS must be representable in W");
  using U = std::conditional_t<std::is_same_v<W, double>, std::uint64_t, std::uint32_t>;
  constexpr int wm = std::is_same_v<W, double> ? 52 : 23, bias = std::is_same_v<W, double> ? 1023 : 127;
  constexpr int p = std::is_same_v<TS, double>        ? 52
                    : std::is_same_v<TS, float>       ? 23
                    : std::is_same_v<TS, Eigen::half> ? 10
                                                      : 7;
  constexpr int emin = std::is_same_v<TS, double> ? -1022 : std::is_same_v<TS, Eigen::half> ? -14 : -126;
  U bits;
  std::memcpy(&bits, &x, sizeof x);
  const int e = static_cast<int>((bits >> wm) & U(2 * bias + 1)) - bias;
  const bool pow2 = (bits & ((U(1) << wm) - 1)) == 0;
  const bool inward = up == (x < W(0));  // towards zero (x = 0: e <= emin, no halving below)
  const int eff = e > emin ? e : emin;
  const int k = (inward && pow2 && e > emin ? eff - 1 : eff) - p;
  // 2^k in W, normal or (bf16's subnormal spacing in float) subnormal.
  const U normal = static_cast<U>(k + bias > 0 ? k + bias : 0) << wm;
  const int sub_shift = k + bias + wm - 1;  // in [0, wm - 1] exactly when 2^k is subnormal
  const U sub = U(1) << (sub_shift < 0 ? 0 : sub_shift > wm - 1 ? wm - 1 : sub_shift);
  const U sbits = k + bias > 0 ? normal : sub;
  W step;
  std::memcpy(&step, &sbits, sizeof step);
  const W y = up ? x + step : x - step;
  // Values on TS's grid are finite there up to max_finite (exact in W); y past it does not exist.
  return std::abs(y) <= static_cast<W>(::basisattn::detail::max_finite<TS>()) ? y : x;
}

/// Coordinate descent on the grid of TS: lowers sum_k 0.5 x_k^T H x_k - rhs_k^T x_k over the columns
/// x_k of X (r x n, row-major; H symmetric, r x r), moving one entry at a
/// time to the neighbouring representable value that the gradient Z = H X - rhs (row-major, kept
/// up to date) points to, when that lowers the objective. H must be exactly symmetric (both
/// triangles equal): the updates read its columns as rows. H couples only the entries of one
/// column, so columns are independent: descent_lanes of them are swept together, row by row,
/// `passes` times (fewer when a pass moves nothing), in a contiguous copy. The gradient is updated
/// once per block of descent_block rows (a rank-descent_block update); inside a block, the rows
/// see the moves of the rows before them through a correction computed on the fly, so every test
/// uses the exact current gradient, as a row-at-a-time sweep does.
template <class TS, class W>
void grid_descent(const wmat<W>& h, wrmat<W>& x, wrmat<W>& z, int passes) {
  constexpr index_t L = descent_lanes, B = descent_block;
  const index_t r = x.rows(), n = x.cols();
  std::vector<W> xb(static_cast<std::size_t>(r * L)), zb(static_cast<std::size_t>(r * L));
  using lanes = Eigen::Array<W, L, 1>;  // one row of the swept columns (a vector register for float)
  lanes dl[B];                          // the moves of the current block's rows
  for (index_t k0 = 0; k0 < n; k0 += L) {
    const index_t w = std::min(L, n - k0);  // lanes past n hold x = z = 0: nothing moves there
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < L; ++j) {
        xb[static_cast<std::size_t>(i * L + j)] = j < w ? x(i, k0 + j) : W(0);
        zb[static_cast<std::size_t>(i * L + j)] = j < w ? z(i, k0 + j) : W(0);
      }
    for (int pass = 0; pass < passes; ++pass) {
      bool moved = false;
      for (index_t i0 = 0; i0 < r; i0 += B) {
        const index_t nb = std::min(B, r - i0);
        int any = 0;
        for (index_t b = 0; b < nb; ++b) {
          const index_t i = i0 + b;
          W* xi = xb.data() + i * L;
          lanes zi = Eigen::Map<const lanes>(zb.data() + i * L);
          for (index_t c = 0; c < b; ++c) zi += h(i0 + c, i) * dl[c];  // this block's earlier rows' moves
          const W hii = h(i, i);
          for (index_t j = 0; j < L; ++j) {
            const W zj = zi[j], xj = xi[j];
            // Moving down can only help when z > 0, and up when z < 0 (z = 0: d^2 h_ii < 0 fails).
            const W d = grid_step<TS>(xj, zj < W(0)) - xj;
            const bool take = W(2) * d * zj + d * d * hii < W(0);
            dl[b][j] = take ? d : W(0);
            xi[j] = xj + dl[b][j];
            any |= take;
          }
        }
        if (!any) continue;
        moved = true;
        // Z += H[:, block] dl: row l gains sum_b H(i0 + b, l) dl[b] (H symmetric: column l, contiguous).
        for (index_t l = 0; l < r; ++l) {
          const W* hl = h.data() + l * r + i0;
          Eigen::Map<lanes> zl(zb.data() + l * L);
          lanes acc = zl;
          for (index_t b = 0; b < nb; ++b) acc += hl[b] * dl[b];
          zl = acc;
        }
      }
      if (!moved) break;
    }
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < w; ++j) {
        x(i, k0 + j) = xb[static_cast<std::size_t>(i * L + j)];
        z(i, k0 + j) = zb[static_cast<std::size_t>(i * L + j)];
      }
  }
}

/// Babai's nearest plane on the grid of TS: column by column, x ~ target minimising ||R (x - target)||
/// (R upper triangular), rounding the last coordinate first and carrying its error up. Blocked:
/// the carry from the rows below a block of 32 is one matrix product.
template <class TS, class W>
wrmat<W> nearest_plane(const wmat<W>& r, const wrmat<W>& target) {
  const index_t n = r.rows(), nb = 32;
  wrmat<W> x(target.rows(), target.cols()), err(target.rows(), target.cols());  // err = target - x
  for (index_t hi = n; hi > 0; hi -= nb) {
    const index_t lo = std::max<index_t>(0, hi - nb), w = hi - lo;
    wrmat<W> y = target.middleRows(lo, w);
    if (hi < n) {
      y.noalias() += (r.diagonal().segment(lo, w).cwiseInverse().asDiagonal() * r.block(lo, hi, w, n - hi)) *
                     err.bottomRows(n - hi);
    }
    for (index_t i = w - 1; i >= 0; --i) {
      const index_t gi = lo + i;
      if (i + 1 < w)
        y.row(i).noalias() += (r.row(gi).segment(gi + 1, w - i - 1) / r(gi, gi)) * err.middleRows(gi + 1, w - i - 1);
      x.row(gi) = y.row(i).unaryExpr([](W v) { return round_to<TS>(v); });
      err.row(gi) = target.row(gi) - x.row(gi);
    }
  }
  return x;
}

}  // namespace detail
}  // namespace bd
BASISATTN_END_NAMESPACE
