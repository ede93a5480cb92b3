// basisattn/bd/factorize.hpp - shared-basis BD factorization of a group of heads (CPU, double).
//
//   bd::shared_basis bd::factorize<TS>(heads, options, pair_grams = {})
//     heads: G matrices A_g (m x r, any storage type, any strides) that will share one basis S.
//     TS:    the storage type the results will be rounded to (used by strategy::residual_min).
//     pair_grams: optional, G matrices B_g B_g^T (r x r, double, positive semidefinite;
//            bd::pair_gram forms them) of the factors the heads are paired with (A_g B_g is what the
//            model uses). Given, shared_pivot's error refinement (refine_error) weighs each basis
//            row j by ||A_g[j, :] B_g||^2, the row of the product B' = A_S B_g it becomes, so the
//            basis is chosen by the estimated rounded product error (bd/options.hpp), whatever
//            options.weigh_by_product says (that flag tells the prepared layers and factorize_pair
//            to form the Grams); without, by sum_g ||C_g||_F^2 alone. Other strategies, or
//            refine_error off, check and ignore them.
//   Picks S (bd/options.hpp explains the strategies), then computes, in double, for each head
//   A_S = A_g[S, :], its LU factorization and condition estimate, and C_g = A_g[~S, :] A_S^-1.
//   It never forms an m x n product. A singular or near-singular basis (rcond < min_rcond, or an
//   estimated error growth above max_error_growth) raises errc::singular_basis, a head whose A_g has
//   rank < r at the input's precision raises errc::rank_deficient, NaN/Inf raises
//   errc::non_finite, r >= m or mismatched heads raise invalid_argument / shape_mismatch.
//
//   The result transforms the matrices paired with each head, in double (float for a 16-bit TO from
//   non-double weights: detail::absorb_t), rounding once to TO:
//     absorb_rows<TO>(g, B)   = A_S B      (B: r x n; e.g. W_O^h for the V/O pair)
//     absorb_cols<TO>(g, W)   = W A_S^T    (W: n x r; e.g. W_Q^h in y = x W form for the Q/K pair)
//     inverse_bias<TO>(g, b)  = b A_S^-1   (b: length r; a K or V bias)
//     coefficients<TO>(g)     = C_g        ((m - r) x r, rows in the order of rest())
//
//   bd::factorize_pair<TS>(A, B, options) is the single-head convenience: it returns C and B' already
//   rounded to TS, with the basis and the report.
//
//   Basis selection helpers are in <basisattn/bd/selection.hpp>, the error-aware rounding's lattice
//   tools in <basisattn/bd/rounding.hpp>.
#pragma once

#include <basisattn/bd/options.hpp>
#include <basisattn/bd/rounding.hpp>
#include <basisattn/bd/selection.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/parallel.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

namespace detail {  // (dmat, lu_t, concat and raise: see bd/selection.hpp)

/// Per-head factor data for a fixed basis.
struct head_factor {
  Eigen::MatrixXd a_s;  ///< r x r
  lu_t lu;
  Eigen::MatrixXd coeff;  ///< (m - r) x r, rows follow `rest`
  double rcond = 0;
  double log_abs_det = 0;
};

/// Factor one head for a basis. With `coeff` (coefficients obtained by updates), C is taken from it
/// unless a probe shows C A_S differing from A_rest by more than `probe_tol` relative; then, or
/// without `coeff`, C is computed from the LU factors.
inline head_factor factor_head(const dmat& a, const std::vector<index_t>& basis, const std::vector<index_t>& rest,
                               const Eigen::MatrixXd* coeff = nullptr, double probe_tol = 0) {
  head_factor f;
  f.a_s = gather_rows(a, basis);
  f.lu.compute(f.a_s);
  f.rcond = f.lu.rcond();
  const auto& lu = f.lu.matrixLU();
  f.log_abs_det = 0;
  for (index_t i = 0; i < lu.rows(); ++i) f.log_abs_det += std::log(std::abs(lu(i, i)));
  if (!(f.rcond > 0) || !std::isfinite(f.log_abs_det)) {
    f.rcond = 0;
    return f;
  }
  Eigen::MatrixXd y = gather_rows(a, rest);
  if (coeff) {
    Eigen::VectorXd z(a.cols());
    for (index_t i = 0; i < z.size(); ++i) z(i) = std::cos(1.0 + 0.7 * double(i));  // fixed probe
    const Eigen::VectorXd want = y * z, sz = f.a_s * z;
    const double scale = want.norm() + coeff->norm() * sz.norm();
    if ((*coeff * sz - want).norm() <= probe_tol * scale) {
      f.coeff = *coeff;
      return f;
    }
  }
  // P A_S = L U, so C = A_N A_S^-1 = A_N U^-1 L^-1 P: two triangular solves from the right.
  lu.template triangularView<Eigen::Upper>().solveInPlace<Eigen::OnTheRight>(y);
  lu.template triangularView<Eigen::UnitLower>().solveInPlace<Eigen::OnTheRight>(y);
  f.coeff.noalias() = y * f.lu.permutationP();
  return f;
}

/// Whether the prepared layers and factorize_pair form the paired factors' Grams for factorize:
/// only shared_pivot's error refinement reads them, and only when weigh_by_product asks.
inline bool forms_pair_grams(const prepare_options& o) {
  return o.select == strategy::shared_pivot && o.refine_error && o.weigh_by_product;
}

template <class T>
constexpr bool is_16bit_v = std::is_same_v<T, Eigen::half> || std::is_same_v<T, Eigen::bfloat16>;
/// Working type of shared_basis's absorbing products (A_S B, W A_S^T): float for a 16-bit TO when
/// the paired weights are not double, double otherwise. Float's rounding of an r-term sum, about
/// sqrt(r) 2^-24 relative to sum |a_i||b_i|, is about three orders below the fp16 grid (four for
/// bf16): it can only move a value that close to a rounding boundary, by one step. (A_S is cast to
/// float too: exact when the heads were float or 16-bit, as in the prepared layers.)
template <class TO, class TI>
using absorb_t = std::conditional_t<is_16bit_v<TO> && !std::is_same_v<std::remove_const_t<TI>, double>, float, double>;

/// lsum += sum_g log|c_g| entrywise, taken as the logs of products of up to 8 heads' |c| (an eighth
/// of the logs); an entry whose product is not normal (a zero, an underflow, an overflow) takes its
/// logs one by one.
inline void add_log_abs_products(const std::vector<Eigen::MatrixXd>& c, Eigen::MatrixXd& lsum) {
  const std::size_t G = c.size();
  Eigen::ArrayXXd prod(lsum.rows(), lsum.cols()), lp(lsum.rows(), lsum.cols());
  for (std::size_t g0 = 0; g0 < G; g0 += 8) {
    const std::size_t g1 = std::min(G, g0 + 8);
    prod = c[g0].array().abs();
    for (std::size_t g = g0 + 1; g < g1; ++g) prod *= c[g].array().abs();
    lp = prod.log();
    for (index_t k = 0; k < lsum.cols(); ++k)
      for (index_t l = 0; l < lsum.rows(); ++l) {
        if (std::isnormal(prod(l, k))) {
          lsum(l, k) += lp(l, k);
        } else {
          for (std::size_t g = g0; g < g1; ++g) lsum(l, k) += std::log(std::abs(c[g](l, k)));
        }
      }
  }
}

}  // namespace detail

/// C_g and B'_g = A_S B of one head rounded jointly (shared_basis::round_pair).
template <class TO>
struct rounded_pair {
  matrix<TO> coeff;    ///< (m - r) x r, rows follow rest()
  matrix<TO> b_prime;  ///< r x n
  /// ||M' B' - A B||_F / ||A B||_F with the rounded values (M' = rows I on the basis, C elsewhere).
  double product_error = 0;
};

class shared_basis;
/// Choose a basis shared by all heads and factor every head (see the top of this header).
template <class TS, class TI>
shared_basis factorize(const std::vector<matrix_view<const TI>>& heads, const prepare_options& opt = {},
                       const std::vector<Eigen::MatrixXd>& pair_grams = {});

/// sum_k B_k B_k^T over the blocks B_k (each r x n_k, any storage type and strides): the Gram of the
/// factor B = [B_1 | B_2 | ...] paired with one head, as factorize's pair_grams take it (in double).
template <class TI>
Eigen::MatrixXd pair_gram(const std::vector<matrix_view<const TI>>& blocks) {
  BASISATTN_REQUIRE(!blocks.empty(), invalid_argument, "pair_gram: no blocks given");
  const index_t r = blocks[0].rows;
  Eigen::MatrixXd g = Eigen::MatrixXd::Zero(r, r);
  for (const auto& b : blocks) {
    BASISATTN_REQUIRE(b.data != nullptr, invalid_argument, "pair_gram: a block has no data");
    BASISATTN_REQUIRE(b.rows == r, shape_mismatch, "pair_gram: a block has ", b.rows, " rows, the first has ", r);
    if (b.rows_contiguous() || b.row_stride != 1) {
      const auto bd = ::basisattn::detail::to_dense<double>(b);
      g.noalias() += bd * bd.transpose();
    } else {  // a transposed view of contiguous rows: copy it as stored
      const auto xd = ::basisattn::detail::to_dense<double>(b.t());
      g.noalias() += xd.transpose() * xd;
    }
  }
  g.triangularView<Eigen::StrictlyUpper>() = g.transpose();  // exactly symmetric
  return g;
}

/// The shared basis of a group of heads and everything needed to transform their paired weights.
class shared_basis {
 public:
  shared_basis() = default;

  index_t in_dim() const { return m_; }  ///< m: rows of each A_g (input channels)
  index_t rank() const { return r_; }    ///< r: basis size = columns of each A_g
  index_t heads() const { return static_cast<index_t>(f_.size()); }
  const std::vector<index_t>& basis() const { return basis_; }  ///< S, ascending
  const std::vector<index_t>& rest() const { return rest_; }    ///< complement of S, ascending
  const basis_report& report() const { return report_; }
  /// A_S of head g in double.
  const Eigen::MatrixXd& basis_block(index_t g) const { return at(g).a_s; }
  /// C_g in double: (m - r) x r, rows in the order of rest().
  const Eigen::MatrixXd& coefficients_double(index_t g) const { return at(g).coeff; }

  /// C_g rounded to TO.
  template <class TO>
  matrix<TO> coefficients(index_t g) const {
    matrix<TO> out(m_ - r_, r_);
    round_into(at(g).coeff, out.view());
    return out;
  }
  /// A_S B for head g (B: r x n), computed in double (in float for 16-bit TO from 16-bit or float
  /// weights: absorb_t) and rounded once to TO.
  template <class TO, class TI>
  matrix<TO> absorb_rows(index_t g, matrix_view<TI> b) const {
    matrix<TO> out(r_, b.cols);
    absorb_rows_into(g, b, out.view());
    return out;
  }
  /// As absorb_rows, written into dst (r x n, contiguous rows).
  template <class TO, class TI>
  void absorb_rows_into(index_t g, matrix_view<TI> b, matrix_view<TO> dst) const {
    BASISATTN_REQUIRE(b.rows == r_, shape_mismatch, "absorb_rows: B has ", b.rows, " rows, the basis has rank ", r_);
    BASISATTN_REQUIRE(dst.rows == r_ && dst.cols == b.cols, shape_mismatch, "absorb_rows: destination is ", dst.rows,
                      "x", dst.cols, ", expected ", r_, "x", b.cols);
    using W = detail::absorb_t<TO, TI>;
    const auto bw = ::basisattn::detail::to_dense<W>(matrix_view<const std::remove_const_t<TI>>(b));
    ::basisattn::detail::rm_matrix<W> prod(r_, b.cols);
    prod.noalias() = at(g).a_s.template cast<W>() * bw;
    round_into(prod, dst);
  }
  /// W A_S^T for head g (W: n x r), computed like absorb_rows and rounded once to TO.
  template <class TO, class TI>
  matrix<TO> absorb_cols(index_t g, matrix_view<TI> w) const {
    matrix<TO> out(w.rows, r_);
    absorb_cols_into(g, w, out.view());
    return out;
  }
  /// As absorb_cols, written into dst (n x r, contiguous rows; may be a block of a wider matrix).
  template <class TO, class TI>
  void absorb_cols_into(index_t g, matrix_view<TI> w, matrix_view<TO> dst) const {
    BASISATTN_REQUIRE(w.cols == r_, shape_mismatch, "absorb_cols: W has ", w.cols, " columns, the basis has rank ", r_);
    BASISATTN_REQUIRE(dst.rows == w.rows && dst.cols == r_, shape_mismatch, "absorb_cols: destination is ", dst.rows,
                      "x", dst.cols, ", expected ", w.rows, "x", r_);
    using W = detail::absorb_t<TO, TI>;
    const auto ww = ::basisattn::detail::to_dense<W>(matrix_view<const std::remove_const_t<TI>>(w));
    ::basisattn::detail::rm_matrix<W> prod(w.rows, r_);
    prod.noalias() = ww * at(g).a_s.transpose().template cast<W>();
    round_into(prod, dst);
  }
  /// b A_S^-1 for head g (b: length r), computed in double and rounded once to TO.
  template <class TO, class TI>
  std::vector<TO> inverse_bias(index_t g, const TI* b) const {
    Eigen::VectorXd bv(r_);
    for (index_t i = 0; i < r_; ++i) bv(i) = static_cast<double>(::basisattn::detail::to_compute<compute_t<TI>>(b[i]));
    const Eigen::VectorXd x = at(g).lu.transpose().solve(bv);
    std::vector<TO> out(static_cast<std::size_t>(r_));
    round_into(x.transpose(), matrix_view<TO>(out.data(), 1, r_));
    return out;
  }

  /// C_g and A_S B (B: r x n, float or double) rounded to TO together, so that their product stays as
  /// close as the grid of TO allows to A_g B, the product the model uses: error-aware rounding.
  /// Rounding each of C and A_S B to nearest makes the product error 3-5x that of rounding the dense
  /// A and B on real weights; this makes it about 2x. B' starts from Babai's nearest plane for
  /// M = [I; C] (min ||M (B' - A_S B)|| column by column), C from the nearest plane for the
  /// rounded B' (min ||C_j B' - (A B)_j|| row by row); then `alternations` rounds of grid
  /// coordinate descent, on B' with C fixed and on C with B' fixed, each lowering ||M' B' - A B||_F.
  /// The work runs in float for the 16-bit types (in double when the coefficients are too large
  /// for float's precision, detail::float_work_suffices) and in double for float; the gradients
  /// are formed from the small differences B' - A_S B and C' - C, never as differences of large
  /// products. With `with_error` the product error is computed (in double) into
  /// product_error; without, it is left 0 (preparation does not need it).
  /// TO = double returns the exact values. A value that would overflow TO raises singular_basis.
  template <class TO, class BM>
  rounded_pair<TO> round_pair(index_t g, const Eigen::MatrixBase<BM>& b, int alternations = 2,
                              bool with_error = true) const {
    BASISATTN_REQUIRE(b.rows() == r_, shape_mismatch, "round_pair: B has ", b.rows(), " rows, the basis has rank ", r_);
    const auto& f = at(g);
    const index_t n = b.cols(), k = m_ - r_;
    rounded_pair<TO> out;
    out.coeff = matrix<TO>(k, r_);
    out.b_prime = matrix<TO>(r_, n);
    if constexpr (std::is_same_v<TO, double>) {
      const Eigen::MatrixXd ps = f.a_s * b.template cast<double>();
      round_into(f.coeff, out.coeff.view());
      round_into(ps, out.b_prime.view());
    } else {
      // M^T M = I + C^T C for M = [I; C]: its Cholesky factor is the R of M = Q R (eigenvalues >= 1;
      // its error, about u_64 ||M||^2, is far below any storage grid, for one r x r product instead
      // of a QR of M), and its norm says whether float is precise enough
      // (detail::float_work_suffices).
      Eigen::MatrixXd mtm = Eigen::MatrixXd::Identity(r_, r_);
      mtm.selfadjointView<Eigen::Lower>().rankUpdate(f.coeff.transpose());
      mtm.triangularView<Eigen::StrictlyUpper>() = mtm.transpose();
      if constexpr (std::is_same_v<detail::work_t<TO>, float>) {
        if (detail::float_work_suffices<TO>(mtm)) {
          round_pair_in<float>(f, b, mtm, alternations, with_error, out);
          return out;
        }
      }
      round_pair_in<double>(f, b, mtm, alternations, with_error, out);
    }
    return out;
  }

  template <class TS, class TI>
  friend shared_basis factorize(const std::vector<matrix_view<const TI>>& heads, const prepare_options& opt,
                                const std::vector<Eigen::MatrixXd>& pair_grams);

 private:
  /// The work of round_pair for 16-bit and float TO, in working precision W.
  template <class W, class TO, class BM>
  void round_pair_in(const detail::head_factor& f, const Eigen::MatrixBase<BM>& b, const Eigen::MatrixXd& mtm,
                     int alternations, bool with_error, rounded_pair<TO>& out) const {
    using wm = detail::wmat<W>;
    using wr = detail::wrmat<W>;
    // B' = rows S of A B (rows rest are C ps, never formed): in double, rounded once to W. (In
    // float the target moves by ~1e-7 relative: the product error stays, but the descent lands on
    // another of its near-equal optima, an equally likely rounding realization; stories260K's fp16
    // perplexity change moved from -0.0026% to +0.015%, within its spread over realizations, SD
    // 0.0067%. Double keeps the documented figures reproducible.)
    const wr ps = (f.a_s * b.template cast<double>()).template cast<W>();
    round_into(f.coeff, out.coeff.view());  // the overflow checks
    round_into(ps, out.b_prime.view());
    const Eigen::MatrixXd& c = f.coeff;           // k x r
    const wr cT = c.transpose().cast<W>();        // C^T
    const Eigen::LLT<Eigen::MatrixXd> mllt(mtm);  // R of M = [I; C] = Q R
    const Eigen::MatrixXd rmd = mllt.matrixU();
    const wm rm = rmd.cast<W>();
    wr bh = detail::nearest_plane<TO, W>(rm, ps);  // B' on the grid
    wr db = bh - ps;                               // its rounding error
    wr ct;                                         // rounded C^T: r x k
    wm kk(r_, r_), kd(r_, r_);                     // B' B'^T and B' dB^T of the current B'
    // C step: rows j of C minimise ||C_j B' - C_j ps||, Hessian K = B' B'^T; the gradient in C^T
    // is K (C'^T - C^T) + (B' dB^T) C^T (K C^T minus the right-hand side (B' ps^T) C^T).
    auto c_step = [&](bool start) {
      kk.setZero();
      kk.template selfadjointView<Eigen::Lower>().rankUpdate(bh);           // half the products of bh bh^T
      kk.template triangularView<Eigen::StrictlyUpper>() = kk.transpose();  // exactly symmetric
      kd.noalias() = bh * db.transpose();
      wr kdc = kd * cT;
      if (start) {
        const Eigen::LLT<Eigen::MatrixXd> llt(kk.template cast<double>());
        if (llt.info() != Eigen::Success) {  // rounded B' lost rank: C rounded to nearest
          ct = c.transpose().unaryExpr([](double v) { return detail::round_to<TO>(v); }).template cast<W>();
          return;
        }
        // The least-squares C^T for the rounded B' is C^T - K^-1 (B' dB^T) C^T.
        const wr target = cT - llt.solve(kdc.template cast<double>()).template cast<W>();
        const Eigen::MatrixXd rcd = llt.matrixU();
        const wm rc = rcd.cast<W>();
        ct = detail::nearest_plane<TO, W>(rc, target);
        return;
      }
      wr z = kdc;
      z.noalias() += kk * (ct - cT);
      detail::grid_descent<TO, W>(kk, ct, z, 2);
    };
    c_step(true);
    for (int a = 0; a < alternations; ++a) {
      // B step: columns of B' minimise ||M' B'_k - M ps_k|| with M' = [I; C'], M = [I; C]: Hessian
      // I + C'^T C', gradient (I + C'^T C') dB + C'^T (C' - C) ps.
      wm gm = ct * ct.transpose();
      gm.diagonal().array() += W(1);
      gm.template triangularView<Eigen::StrictlyUpper>() = gm.transpose();  // exactly symmetric
      const wm e = ct * (ct - cT).transpose();
      wr z = gm * db;
      z.noalias() += e * ps;
      detail::grid_descent<TO, W>(gm, bh, z, 2);
      db = bh - ps;
      c_step(false);
    }
    if (with_error) {
      // ||M' B' - M ps||^2 = ||dB||^2 + ||dC B' + C dB||^2 with dB = B' - ps, dC = C' - C, from
      // r x r Gram matrices in double (the small differences are formed first: no cancellation).
      const Eigen::MatrixXd bd = bh.template cast<double>(), psd = f.a_s * b.template cast<double>();
      const Eigen::MatrixXd dbd = bd - psd;
      const Eigen::MatrixXd dc = ct.transpose().template cast<double>() - c;
      const Eigen::MatrixXd kkd = bd * bd.transpose(), kb = bd * dbd.transpose(), dd = dbd * dbd.transpose(),
                            pp = psd * psd.transpose();
      const double e2 = dd.trace() + ((dc * kkd).cwiseProduct(dc)).sum() + 2.0 * ((dc * kb).cwiseProduct(c)).sum() +
                        ((c * dd).cwiseProduct(c)).sum();
      const double norm2 = pp.trace() + ((c * pp).cwiseProduct(c)).sum();
      out.product_error = norm2 > 0 ? std::sqrt(std::max(e2, 0.0) / norm2) : 0.0;
    }
    round_into(ct.transpose(), out.coeff.view());  // on the grid already: exact
    round_into(bh, out.b_prime.view());
  }

  const detail::head_factor& at(index_t g) const {
    BASISATTN_REQUIRE(g >= 0 && g < heads(), invalid_argument, "head ", g, " out of range [0, ", heads(), ")");
    return f_[static_cast<std::size_t>(g)];
  }
  /// Round a double or float matrix once into dst (raising singular_basis if a value overflows TO).
  template <class TO, class X>
  static void round_into(const Eigen::MatrixBase<X>& x, matrix_view<TO> dst) {
    const double mx = x.size() ? x.cwiseAbs().maxCoeff() : 0.0;
    if (!(mx < ::basisattn::detail::rounds_finite_below<TO>()))
      detail::raise(errc::singular_basis, detail::concat("a transformed weight (|value| up to ", mx,
                                                         ") does not fit in ", to_string(dtype_of_v<TO>),
                                                         ": the basis is too ill-conditioned for this storage type"));
    if constexpr (std::is_same_v<TO, double> || std::is_same_v<TO, float>) {
      ::basisattn::detail::map_rows(dst) = x.template cast<TO>();
    } else {
      for (index_t i = 0; i < x.rows(); ++i) {
        TO* row = dst.data + i * dst.row_stride;
        for (index_t j = 0; j < x.cols(); ++j) row[j] = ::basisattn::detail::from_compute<TO>(x(i, j));
      }
    }
  }

  index_t m_ = 0, r_ = 0;
  std::vector<index_t> basis_, rest_;
  std::vector<detail::head_factor> f_;
  basis_report report_;
};

template <class TS, class TI>
shared_basis factorize(const std::vector<matrix_view<const TI>>& heads, const prepare_options& opt,
                       const std::vector<Eigen::MatrixXd>& pair_grams) {
  static_assert(is_storage_type_v<TS> && is_storage_type_v<TI>,
                "storage types: float, double, Eigen::half, Eigen::bfloat16");
  using detail::dmat;
  BASISATTN_REQUIRE(!heads.empty(), invalid_argument, "factorize: no heads given");
  const index_t m = heads[0].rows, r = heads[0].cols;
  BASISATTN_REQUIRE(r >= 1 && m >= 1, invalid_argument, "factorize: A is ", m, "x", r, "; both extents must be >= 1");
  BASISATTN_REQUIRE(r < m, invalid_argument, "factorize: r = ", r, " must be smaller than m = ", m,
                    " (BD removes r of the m input channels; with r >= m there is nothing to save)");
  BASISATTN_REQUIRE(opt.min_rcond >= 0 && opt.swap_gain > 1.0 && opt.max_error_growth > 0, invalid_argument,
                    "factorize: min_rcond must be >= 0, swap_gain > 1 and max_error_growth > 0 (got ", opt.min_rcond,
                    ", ", opt.swap_gain, ", ", opt.max_error_growth, ")");
  const index_t G = static_cast<index_t>(heads.size());
  BASISATTN_REQUIRE(pair_grams.empty() || static_cast<index_t>(pair_grams.size()) == G, shape_mismatch,
                    "factorize: ", pair_grams.size(), " pair Gram matrices for ", G,
                    " heads (give one per head or none)");
  for (std::size_t g = 0; g < pair_grams.size(); ++g) {
    BASISATTN_REQUIRE(pair_grams[g].rows() == r && pair_grams[g].cols() == r, shape_mismatch, "factorize: pair Gram ",
                      g, " is ", pair_grams[g].rows(), "x", pair_grams[g].cols(), ", expected ", r, "x", r);
    BASISATTN_REQUIRE(pair_grams[g].allFinite(), non_finite, "factorize: pair Gram ", g, " has NaN or Inf");
    BASISATTN_REQUIRE(pair_grams[g].diagonal().minCoeff() >= 0, invalid_argument, "factorize: pair Gram ", g,
                      " has a negative diagonal entry (a Gram B B^T is positive semidefinite)");
  }
  std::vector<dmat> a(static_cast<std::size_t>(G));
  for (index_t g = 0; g < G; ++g) {
    const auto& h = heads[static_cast<std::size_t>(g)];
    BASISATTN_REQUIRE(h.rows == m && h.cols == r, shape_mismatch, "factorize: head ", g, " is ", h.rows, "x", h.cols,
                      ", head 0 is ", m, "x", r, " (heads sharing a basis must have equal shapes)");
    BASISATTN_REQUIRE(h.data != nullptr, invalid_argument, "factorize: head ", g, " has no data");
    if (opt.check_finite) ::basisattn::detail::require_finite(h, detail::concat("A of head ", g).c_str());
    a[static_cast<std::size_t>(g)] = ::basisattn::detail::to_dense<double>(h);
  }

  shared_basis out;
  out.m_ = m;
  out.r_ = r;
  out.report_.used = opt.select;

  auto set_basis = [&](std::vector<index_t> s) {
    std::sort(s.begin(), s.end());
    out.basis_ = std::move(s);
    out.rest_ = detail::complement(m, out.basis_);
  };
  auto factor_all = [&]() {
    out.f_.assign(static_cast<std::size_t>(G), detail::head_factor{});
    ::basisattn::detail::parallel_for(G, [&](index_t g) {
      out.f_[static_cast<std::size_t>(g)] = detail::factor_head(a[static_cast<std::size_t>(g)], out.basis_, out.rest_);
    });
  };
  auto first_r = [&]() {
    std::vector<index_t> s(static_cast<std::size_t>(r));
    std::iota(s.begin(), s.end(), 0);
    return s;
  };

  switch (opt.select) {
    case strategy::first_r:
      set_basis(first_r());
      factor_all();
      break;
    case strategy::residual_min: {
      std::vector<index_t> last(static_cast<std::size_t>(r));
      std::iota(last.begin(), last.end(), m - r);
      double best = std::numeric_limits<double>::infinity();
      std::vector<index_t> best_s;
      for (const auto& cand : {first_r(), last}) {
        set_basis(cand);
        factor_all();
        double res = 0;
        bool ok = true;
        for (index_t g = 0; g < G && ok; ++g) {
          const auto& f = out.f_[static_cast<std::size_t>(g)];
          if (f.rcond < opt.min_rcond || f.rcond == 0) {
            ok = false;
            break;
          }
          Eigen::MatrixXd cr = f.coeff.unaryExpr([](double x) { return detail::round_to<TS>(x); });
          const Eigen::MatrixXd an = detail::gather_rows(a[static_cast<std::size_t>(g)], out.rest_);
          const double na = a[static_cast<std::size_t>(g)].norm();
          res += (an - cr * f.a_s).norm() / (na > 0 ? na : 1.0);
        }
        if (ok && res < best) best = res, best_s = out.basis_;
      }
      // No usable candidate: keep first-r so that the checks below report the singular basis.
      set_basis(best_s.empty() ? first_r() : best_s);
      factor_all();
      break;
    }
    case strategy::shared_pivot: {
      {
        std::vector<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> af(
            static_cast<std::size_t>(G));
        for (index_t g = 0; g < G; ++g)
          af[static_cast<std::size_t>(g)] = a[static_cast<std::size_t>(g)].template cast<float>();
        set_basis(detail::greedy_joint_volume<float>(af));
      }
      factor_all();
      bool all_ok = true;
      for (const auto& f : out.f_) all_ok = all_ok && f.rcond > 0;
      if (!all_ok) break;  // reported below
      // Max-volume swaps on the joint objective, with rank-1 updates of every C_g.
      std::vector<index_t> basis = out.basis_, rest = out.rest_;
      std::vector<Eigen::MatrixXd> c(static_cast<std::size_t>(G));
      for (index_t g = 0; g < G; ++g) c[static_cast<std::size_t>(g)] = out.f_[static_cast<std::size_t>(g)].coeff;
      const index_t max_swaps = opt.max_swaps < 0 ? 4 * r : opt.max_swaps;
      const double log_gain = std::log(opt.swap_gain);
      Eigen::MatrixXd lsum(m - r, r);
      index_t swaps = 0;
      // Exchange basis position i with rest row j, updating every C_g by a rank-1 step.
      auto swap_rows = [&](index_t j, index_t i) {
        for (index_t g = 0; g < G; ++g) {
          Eigen::MatrixXd& cg = c[static_cast<std::size_t>(g)];
          const double piv = cg(j, i);
          const Eigen::VectorXd col = cg.col(i);
          Eigen::RowVectorXd row = cg.row(j);
          // Rows l != j: C[l,k] -= C[l,i] C[j,k] / piv (k != i) and C[l,i] /= piv; the (piv - 1) in
          // entry i of the row makes the same rank-1 update produce the latter.
          row(i) = piv - 1.0;
          cg.noalias() -= (col / piv) * row;
          // Row j now holds the old basis row: a_old = (a_j - sum_{k != i} C[j,k] a_k) / piv.
          cg.row(j) = -row / piv;
          cg(j, i) = 1.0 / piv;
        }
        std::swap(basis[static_cast<std::size_t>(i)], rest[static_cast<std::size_t>(j)]);
      };
      bool converged = false;
      while (true) {
        lsum.setZero();
        detail::add_log_abs_products(c, lsum);
        index_t j = 0, i = 0;
        const double best = lsum.maxCoeff(&j, &i);
        if (!(best > log_gain)) {
          converged = true;
          break;
        }
        if (swaps >= max_swaps) break;
        swap_rows(j, i);
        ++swaps;
      }
      // Step 3: swaps that lower the estimated rounded product error, A-optimal rather than
      // D-optimal exchanges. With M_g = A_g A_S^-1 = [I; C_g] and B'_g = A_S B_g, whose row k is the
      // product row w_k = ||A_g[s_k, :] B_g||^2 of basis row s_k, rounding B' costs
      // sum_k ||M_:k||^2 w_k and rounding C costs sum_k ||C_:k||^2 w_k (relative rounding, in units
      // of u^2 / 3): E = sum_g sum_k w_k (2 G_kk - 1), G = M^T M = I + C^T C. For a swap of basis
      // position i with rest row j, M' = M - M e_i (M_j - e_i)^T / C_ji: column i becomes
      // M_:i / C_ji and column k loses (C_jk / C_ji) M_:i. So with W = diag(w over the basis),
      // P = C W G, n_j = sum_k w_k C_jk^2 and the rest row's weight v_j, the change of E is
      // 2 (G_ii (n_j + v_j) - 2 C_ji P_ji) / C_ji^2 - (v_j - w_i) per head. Without pair Grams every
      // w is 1 and E falls with sum_g ||M_g||_F^2 = sum_g (r + ||C_g||_F^2), whose change is
      // (G_ii (n_j + 1) - 2 C_ji (C G)_ji) / C_ji^2 (n_j = ||C_j||^2): that objective is used then.
      index_t refine_swaps = 0;
      if (opt.refine_error && converged) {
        Eigen::MatrixXd delta(m - r, r), gram(r, r), p(m - r, r);
        Eigen::VectorXd n2(m - r), wb(r), wn(m - r);
        // Row weights w_g[j] = ||A_g[j, :] B_g||^2.
        const bool weighted = !pair_grams.empty();
        std::vector<Eigen::VectorXd> wrow(weighted ? static_cast<std::size_t>(G) : 0);
        for (std::size_t g = 0; g < wrow.size(); ++g)
          wrow[g] = (a[g] * pair_grams[g]).cwiseProduct(a[g]).rowwise().sum().cwiseMax(0.0);
        while (refine_swaps < max_swaps) {
          delta.setZero();
          double total = 0;
          for (index_t g = 0; g < G; ++g) {
            const Eigen::MatrixXd& cg = c[static_cast<std::size_t>(g)];
            gram.setIdentity();
            gram.selfadjointView<Eigen::Lower>().rankUpdate(cg.transpose());
            gram.triangularView<Eigen::StrictlyUpper>() = gram.transpose();
            if (!weighted) {
              p.noalias() = cg * gram;
              n2 = cg.rowwise().squaredNorm();
              total += double(r) + n2.sum();
              for (index_t k = 0; k < r; ++k)
                for (index_t l = 0; l < m - r; ++l) {
                  const double piv = cg(l, k);
                  delta(l, k) += (gram(k, k) * (n2(l) + 1.0) - 2.0 * piv * p(l, k)) / (piv * piv);
                }
              continue;
            }
            const Eigen::VectorXd& wg = wrow[static_cast<std::size_t>(g)];
            for (index_t k = 0; k < r; ++k) wb(k) = wg(basis[static_cast<std::size_t>(k)]);
            for (index_t l = 0; l < m - r; ++l) wn(l) = wg(rest[static_cast<std::size_t>(l)]);
            p.noalias() = cg * (wb.asDiagonal() * gram);
            n2.noalias() = cg.cwiseAbs2() * wb;
            total += (wb.array() * (2.0 * gram.diagonal().array() - 1.0)).sum();
            for (index_t k = 0; k < r; ++k)
              for (index_t l = 0; l < m - r; ++l) {
                const double piv = cg(l, k);
                const double d =
                    2.0 * (gram(k, k) * (n2(l) + wn(l)) - 2.0 * piv * p(l, k)) / (piv * piv) - (wn(l) - wb(k));
                delta(l, k) += std::isnan(d) ? std::numeric_limits<double>::infinity() : d;  // 0/0: no swap
              }
          }
          index_t j = 0, i = 0;
          const double best = delta.minCoeff(&j, &i);
          // Stop when no swap lowers the estimate by 0.1% (or when rounding made it non-finite).
          if (!(best < -1e-3 * total)) break;
          swap_rows(j, i);
          ++refine_swaps;
        }
      }
      swaps += refine_swaps;
      out.report_.swaps = swaps;
      out.report_.swap_limit_hit = !converged;
      if (swaps > 0) {
        // Keep the updated coefficients (reordered to an ascending basis and rest) and refactor A_S,
        // which is cheap; a head whose updated C fails a probe of C A_S = A_rest is recomputed.
        std::vector<index_t> ob(static_cast<std::size_t>(r)), orr(static_cast<std::size_t>(m - r));
        std::iota(ob.begin(), ob.end(), 0);
        std::iota(orr.begin(), orr.end(), 0);
        std::sort(ob.begin(), ob.end(), [&](index_t x, index_t y) {
          return basis[static_cast<std::size_t>(x)] < basis[static_cast<std::size_t>(y)];
        });
        std::sort(orr.begin(), orr.end(), [&](index_t x, index_t y) {
          return rest[static_cast<std::size_t>(x)] < rest[static_cast<std::size_t>(y)];
        });
        set_basis(basis);
        out.f_.assign(static_cast<std::size_t>(G), detail::head_factor{});
        ::basisattn::detail::parallel_for(G, [&](index_t g) {
          const Eigen::MatrixXd& cg = c[static_cast<std::size_t>(g)];
          Eigen::MatrixXd sorted(m - r, r);
          for (index_t l = 0; l < m - r; ++l)
            for (index_t k = 0; k < r; ++k)
              sorted(l, k) = cg(orr[static_cast<std::size_t>(l)], ob[static_cast<std::size_t>(k)]);
          // Updated coefficients are kept when they are accurate to 1e-3 of TS's rounding.
          out.f_[static_cast<std::size_t>(g)] = detail::factor_head(
              a[static_cast<std::size_t>(g)], out.basis_, out.rest_, &sorted, 1e-3 * unit_roundoff(dtype_of_v<TS>));
        });
      }
      break;
    }
  }

  // Diagnostics and the singular / rank-deficient checks.
  out.report_.heads.resize(static_cast<std::size_t>(G));
  out.report_.log_volume = 0;
  for (index_t g = 0; g < G; ++g) {
    const auto& f = out.f_[static_cast<std::size_t>(g)];
    const double growth = f.rcond > 0 ? std::sqrt((double(r) + 2.0 * f.coeff.squaredNorm()) / (2.0 * double(m)))
                                      : std::numeric_limits<double>::infinity();
    if (!(f.rcond >= opt.min_rcond) || f.rcond == 0 || !(growth <= opt.max_error_growth)) {
      // Values stored in TI carry relative noise of its unit roundoff: rank is judged at that level.
      const double tol = std::max(1e-13, 16.0 * unit_roundoff(dtype_of_v<TI>) * std::sqrt(double(m)));
      const index_t rk = detail::numerical_rank(a[static_cast<std::size_t>(g)], tol);
      if (rk < r)
        detail::raise(errc::rank_deficient,
                      detail::concat("head ", g, ": A (", m, "x", r, ") has numerical rank ", rk, " < r = ", r,
                                     "; no basis of r rows exists (remove the redundant head dimensions first)"));
      detail::raise(errc::singular_basis,
                    detail::concat(
                        "head ", g, ": the basis rows chosen by ", to_string(opt.select),
                        " are singular or too ill-conditioned (estimated rcond ", f.rcond, ", min_rcond ",
                        opt.min_rcond, "; error growth ", growth, ", max_error_growth ", opt.max_error_growth, ")",
                        opt.select == strategy::shared_pivot ? "" : "; strategy shared_pivot may find a better basis"));
    }
    head_diagnostics d;
    d.rcond = f.rcond;
    d.max_abs_coeff = f.coeff.size() ? f.coeff.cwiseAbs().maxCoeff() : 0.0;
    d.error_growth = growth;
    out.report_.error_growth = std::max(out.report_.error_growth, growth);
    out.report_.heads[static_cast<std::size_t>(g)] = d;
    out.report_.min_rcond = std::min(out.report_.min_rcond, d.rcond);
    out.report_.max_abs_coeff = std::max(out.report_.max_abs_coeff, d.max_abs_coeff);
    out.report_.log_volume += f.log_abs_det;
  }
  return out;
}

/// Single-pair result: C and B' rounded to T.
template <class T>
struct pair_factorization {
  std::vector<index_t> basis, rest;
  matrix<T> coeff;    ///< (m - r) x r, rows follow `rest`
  matrix<T> b_prime;  ///< r x n = A_S B
  basis_report report;
};

/// BD of one pair (A: m x r, B: r x n): x A B == (x[S] + x[rest] C) B' up to rounding.
template <class T, class TA, class TB>
pair_factorization<T> factorize_pair(matrix_view<TA> a_in, matrix_view<TB> b_in, const prepare_options& opt = {}) {
  const matrix_view<const std::remove_const_t<TA>> a = a_in;
  const matrix_view<const std::remove_const_t<TB>> b = b_in;
  BASISATTN_REQUIRE(b.rows == a.cols, shape_mismatch, "factorize_pair: A is ", a.rows, "x", a.cols, " but B is ",
                    b.rows, "x", b.cols, " (B must have A's column count as rows)");
  if (opt.check_finite) ::basisattn::detail::require_finite(b, "B");
  std::vector<Eigen::MatrixXd> gram;
  if (detail::forms_pair_grams(opt))
    gram.push_back(pair_gram(std::vector<matrix_view<const std::remove_const_t<TB>>>{b}));
  shared_basis sb = factorize<T>(std::vector<matrix_view<const std::remove_const_t<TA>>>{a}, opt, gram);
  pair_factorization<T> out;
  out.basis = sb.basis();
  out.rest = sb.rest();
  out.coeff = sb.template coefficients<T>(0);
  out.b_prime = sb.template absorb_rows<T>(0, b);
  out.report = sb.report();
  return out;
}

}  // namespace bd
BASISATTN_END_NAMESPACE
