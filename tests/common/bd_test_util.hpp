// Helpers shared by the BD tests: the product error that BD's storage rounding adds.
#pragma once

#include <basisattn/bd/factorize.hpp>

#include "test_util.hpp"

#include <cmath>
#include <vector>

namespace test {

/// The m x n product BD computes for one head from stored C ((m - r) x r, rows in rest() order) and
/// B' (r x n): rows S are B', the other rows C B'.
inline Eigen::MatrixXd bd_product(const basisattn::bd::shared_basis& sb, const Eigen::MatrixXd& c,
                                  const Eigen::MatrixXd& bp) {
  Eigen::MatrixXd q(sb.in_dim(), bp.cols());
  for (index_t i = 0; i < sb.rank(); ++i) q.row(sb.basis()[static_cast<std::size_t>(i)]) = bp.row(i);
  const Eigen::MatrixXd qn = c * bp;
  for (index_t l = 0; l < qn.rows(); ++l) q.row(sb.rest()[static_cast<std::size_t>(l)]) = qn.row(l);
  return q;
}

/// ||A'B' - AB||_F / ||AB||_F over all heads of a shared basis, with C and B' = A_S B rounded to T and
/// everything else exact (double): the error BD adds by storing its weights in T. a[g] is m x r,
/// b[g] is r x n_g. With `joint`, C and B' are rounded together by shared_basis::round_pair
/// (error-aware, as the prepared layers do); otherwise each to nearest.
template <class T, class TA, class TB>
double bd_product_error(const std::vector<basisattn::matrix_view<const TA>>& a,
                        const std::vector<basisattn::matrix_view<const TB>>& b, const basisattn::bd::shared_basis& sb,
                        bool joint = false) {
  double num = 0, den = 0;
  for (index_t g = 0; g < sb.heads(); ++g) {
    const Eigen::MatrixXd p = to_double(a[g]) * to_double(b[g]);
    Eigen::MatrixXd q;
    if (joint) {
      const auto rp = sb.template round_pair<T>(g, to_double(b[g]));
      q = bd_product(sb, to_double(rp.coeff), to_double(rp.b_prime));
    } else {
      q = bd_product(sb, to_double(sb.template coefficients<T>(g)), to_double(sb.template absorb_rows<T>(g, b[g])));
    }
    if (!q.allFinite()) return INFINITY;
    num += (q - p).squaredNorm();
    den += p.squaredNorm();
  }
  return std::sqrt(num / den);
}

/// Bound of the double arithmetic in bd_product_error's measure, in the same units (relative
/// Frobenius norm over all heads). For T = double nothing is rounded to storage, so this is all of
/// the measured error; for the other types it adds to the storage rounding and is negligible.
/// Componentwise and first order in u = u_64, with gamma_k = k u / (1 - k u) (any summation order,
/// with or without FMA; Higham, Accuracy and Stability, eq. 3.13):
///  * the measure's own A B:                  |fl(A B) - A B|     <= gamma_r |A||B|        (all rows)
///  * B'^ = fl(A_S B) (absorb_rows):          |B'^ - A_S B|       <= gamma_r |A_S||B|      (rows S)
///  * C^ from the LU of A_S (P A_S = L U, partial pivoting, two triangular solves): each row solves
///    C^_l (A_S + dA_l) = A_rest,l with |dA_l| <= gamma_3r P^T|L||U| (Higham Thm 9.4), so the
///    residual |C^ A_S - A_rest| <= gamma_3r |C^| P^T|L||U|;
///  * rows rest, fl(C^ B'^) - A_rest B = [fl(C^ B'^) - C^ B'^] + C^ (B'^ - A_S B) + (C^ A_S - A_rest) B:
///      <= gamma_r |C^||A_S||B| + gamma_r |C^||A_S||B| + gamma_3r |C^| P^T|L||U| |B|
///    (|B'^| <= |A_S||B| to first order; |L||U| from the same deterministic PartialPivLU recomputed
///    here). After pivot swaps factorize keeps rank-1-updated coefficients only when a probe finds
///    C A_S = A_rest to 1e-3 of TS's unit roundoff; for TS = double that is far below the bound, for
///    the other types the storage term dominates anyway.
/// The sum E of these bounds gives ||measured numerator|| <= ||E||_F; divided by ||A B||_F (computed,
/// relative error gamma_r: second order) like the measure.
template <class TA, class TB>
double bd_product_arith_bound(const std::vector<basisattn::matrix_view<const TA>>& a,
                              const std::vector<basisattn::matrix_view<const TB>>& b,
                              const basisattn::bd::shared_basis& sb) {
  const index_t r = sb.rank();
  const double gr = gamma<double>(r), g3r = gamma<double>(3 * r);
  double num = 0, den = 0;
  for (index_t g = 0; g < sb.heads(); ++g) {
    const Eigen::MatrixXd ad = to_double(a[static_cast<std::size_t>(g)]),
                          bd = to_double(b[static_cast<std::size_t>(g)]);
    const Eigen::MatrixXd& as = sb.basis_block(g);
    const Eigen::PartialPivLU<Eigen::MatrixXd> lu(as);
    const Eigen::MatrixXd l = lu.matrixLU().triangularView<Eigen::UnitLower>(),
                          u = lu.matrixLU().triangularView<Eigen::Upper>();
    const Eigen::MatrixXd lu_abs = lu.permutationP().transpose() * (l.cwiseAbs() * u.cwiseAbs());
    const Eigen::MatrixXd ca = sb.coefficients_double(g).cwiseAbs(), bs = as.cwiseAbs() * bd.cwiseAbs();
    Eigen::MatrixXd e = gr * ad.cwiseAbs() * bd.cwiseAbs();
    for (index_t i = 0; i < r; ++i) e.row(sb.basis()[static_cast<std::size_t>(i)]) += gr * bs.row(i);
    const Eigen::MatrixXd er = 2 * gr * ca * bs + g3r * ca * (lu_abs * bd.cwiseAbs());
    for (index_t l2 = 0; l2 < er.rows(); ++l2) e.row(sb.rest()[static_cast<std::size_t>(l2)]) += er.row(l2);
    num += e.squaredNorm();
    den += (ad * bd).squaredNorm();
  }
  return std::sqrt(num / den);
}

/// bd_product_error with error-aware rounding.
template <class T, class TA, class TB>
double bd_pair_error(const std::vector<basisattn::matrix_view<const TA>>& a,
                     const std::vector<basisattn::matrix_view<const TB>>& b, const basisattn::bd::shared_basis& sb) {
  return bd_product_error<T>(a, b, sb, true);
}

/// The same measure for the dense pair stored in T: ||round(A) round(B) - AB|| / ||AB||.
template <class T, class TA, class TB>
double dense_rounding_error(const std::vector<basisattn::matrix_view<const TA>>& a,
                            const std::vector<basisattn::matrix_view<const TB>>& b) {
  double num = 0, den = 0;
  auto rounded = [](const Eigen::MatrixXd& m) {
    return m.unaryExpr([](double v) {
      return static_cast<double>(basisattn::detail::to_compute<float>(basisattn::detail::from_compute<T>(v)));
    });
  };
  for (std::size_t g = 0; g < a.size(); ++g) {
    const Eigen::MatrixXd ad = to_double(a[g]), bd = to_double(b[g]);
    const Eigen::MatrixXd p = ad * bd;
    const Eigen::MatrixXd q = std::is_same_v<T, double> ? p : Eigen::MatrixXd(rounded(ad) * rounded(bd));
    num += (q - p).squaredNorm();
    den += p.squaredNorm();
  }
  return std::sqrt(num / den);
}

}  // namespace test
