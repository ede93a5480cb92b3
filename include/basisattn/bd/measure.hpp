// basisattn/bd/measure.hpp - how much precision a prepared MHA layer lost, measured against the
// dense weights it came from.
//
//   bd::product_errors e = bd::measure_product_errors(w, layer);
//
// BD is exact in exact arithmetic: for every kv group g and query head h of the group it keeps the
// products A_g B_h unchanged, where
//   V/O side: A_g = W_V^g (d_model x d), B_h = W_O^h (d x d_model);
//   Q/K side: A_g = W_K^g, B_h = [W_Q^h | b_Q^h]^T (d x (d_model + 1)), since q.k = x W_Q^h (x W_K^g)^T.
// What the stored layer actually computes is A'_g B'_h, with A'_g = identity rows on the basis and
// the stored coefficients elsewhere (or the stored dense W_V^g / W_K^g when that side is dense) and
// B'_h the stored W_O / W_Q rows. The relative error of a side is
//   sqrt(sum_h ||A'_g B'_h - A_g B_h||_F^2) / sqrt(sum_h ||A_g B_h||_F^2),
// computed in double from the stored values, and the reference beside it is the same measure for
// the dense weights rounded once to the layer's storage type ("what storing the model in T already
// costs"). K and V biases are not part of it: b_K cancels in softmax, and b_V A_S^-1 reaches the
// output through the same exact identity. Cost: O(n_heads d d_model^2) per side.
#pragma once

#include <basisattn/bd/layers.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/eigen.hpp>

#include <Eigen/Core>

#include <cmath>
#include <limits>
#include <variant>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

/// Relative product errors of the two sides of a prepared MHA layer (see the top of this header).
struct product_errors {
  double qk = 0, vo = 0;              ///< the stored layer
  double qk_dense = 0, vo_dense = 0;  ///< the dense weights rounded once to the storage type
  double qk_norm2 = 0, vo_norm2 = 0;  ///< sum_h ||A_g B_h||_F^2 (to combine errors of several layers)
  double qk_ratio() const {
    return qk_dense > 0 ? qk / qk_dense : (qk > 0 ? std::numeric_limits<double>::infinity() : 1.0);
  }
  double vo_ratio() const {
    return vo_dense > 0 ? vo / vo_dense : (vo > 0 ? std::numeric_limits<double>::infinity() : 1.0);
  }
};

namespace detail {
template <class T>
Eigen::MatrixXd to_double(matrix_view<const T> v) {
  Eigen::MatrixXd m(v.rows, v.cols);
  for (index_t i = 0; i < v.rows; ++i)
    for (index_t j = 0; j < v.cols; ++j) m(i, j) = ::basisattn::detail::to_compute<double>(v(i, j));
  return m;
}
/// Every entry rounded once to T and back (the dense model stored in T).
template <class T>
Eigen::MatrixXd rounded_to(const Eigen::MatrixXd& m) {
  return m.unaryExpr(
      [](double v) { return ::basisattn::detail::to_compute<double>(::basisattn::detail::from_compute<T>(v)); });
}
/// A'_g of a stored K or V projection (d_model x d) in double.
template <class T>
Eigen::MatrixXd stored_a(const any_projection<T>& p, index_t g, index_t dm, index_t d) {
  if (const auto* dp = std::get_if<dense_projection<T>>(&p))
    return to_double(matrix_view<const T>(dp->weight.view()).block(0, g * d, dm, d));
  const auto& b = std::get<bd_projection<T>>(p);
  Eigen::MatrixXd a = Eigen::MatrixXd::Zero(dm, d);
  const index_t *basis = b.basis_of(g), *rest = b.rest_of(g);
  for (index_t j = 0; j < d; ++j) a(basis[j], j) = 1.0;
  for (index_t i = 0; i < dm - d; ++i)
    for (index_t j = 0; j < d; ++j) a(rest[i], j) = ::basisattn::detail::to_compute<double>(b.coeff(i, g * d + j));
  return a;
}
}  // namespace detail

/// Product errors of `layer` (prepared in T from `w` by prepare_mha, dense or BD on either side)
/// against the dense weights `w`. errc::shape_mismatch when w does not have the layer's shapes.
template <class T, class TI>
product_errors measure_product_errors(const mha_weights<TI>& w, const mha_layer<T>& layer) {
  const mha_config& c = layer.config;
  const index_t dm = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads, d = c.head_dim, grp = H / Hkv;
  BASISATTN_REQUIRE(w.wq.rows == dm && w.wq.cols == H * d && w.wk.rows == dm && w.wk.cols == Hkv * d &&
                        w.wv.rows == dm && w.wv.cols == Hkv * d && w.wo.rows == H * d && w.wo.cols == dm,
                    shape_mismatch,
                    "measure_product_errors: the dense weights do not have the layer's shapes (d_model ", dm, ", ", H,
                    " heads, ", Hkv, " kv heads of ", d, ")");
  BASISATTN_REQUIRE(layer.q.weight.rows() == dm && layer.o.weight.cols() == dm, shape_mismatch,
                    "measure_product_errors: the layer's q/o weights do not match d_model ", dm);
  const bool bq = w.bq != nullptr && !layer.q.bias.empty();
  struct acc {
    double num = 0, den = 0, num_dense = 0;
  } qk, vo;
  for (index_t g = 0; g < Hkv; ++g) {
    const Eigen::MatrixXd ak = detail::to_double(w.wk.block(0, g * d, dm, d));
    const Eigen::MatrixXd av = detail::to_double(w.wv.block(0, g * d, dm, d));
    const Eigen::MatrixXd ak_s = detail::stored_a(layer.k, g, dm, d), av_s = detail::stored_a(layer.v, g, dm, d);
    const Eigen::MatrixXd ak_r = detail::rounded_to<T>(ak), av_r = detail::rounded_to<T>(av);
    for (index_t h = g * grp; h < (g + 1) * grp; ++h) {
      // Q/K: B_h = [W_Q^h | b_Q^h]^T.
      Eigen::MatrixXd bqh(d, dm + (bq ? 1 : 0)), bqh_s(d, dm + (bq ? 1 : 0));
      bqh.leftCols(dm) = detail::to_double(w.wq.block(0, h * d, dm, d)).transpose();
      bqh_s.leftCols(dm) =
          detail::to_double(matrix_view<const T>(layer.q.weight.view()).block(0, h * d, dm, d)).transpose();
      if (bq) {
        for (index_t j = 0; j < d; ++j) {
          bqh(j, dm) = ::basisattn::detail::to_compute<double>(w.bq[h * d + j]);
          bqh_s(j, dm) = ::basisattn::detail::to_compute<double>(layer.q.bias[static_cast<std::size_t>(h * d + j)]);
        }
      }
      const Eigen::MatrixXd pk = ak * bqh;
      qk.den += pk.squaredNorm();
      qk.num += (ak_s * bqh_s - pk).squaredNorm();
      qk.num_dense += (ak_r * detail::rounded_to<T>(bqh) - pk).squaredNorm();
      // V/O: B_h = W_O^h.
      const Eigen::MatrixXd boh = detail::to_double(w.wo.block(h * d, 0, d, dm));
      const Eigen::MatrixXd boh_s =
          detail::to_double(matrix_view<const T>(layer.o.weight.view()).block(h * d, 0, d, dm));
      const Eigen::MatrixXd pv = av * boh;
      vo.den += pv.squaredNorm();
      vo.num += (av_s * boh_s - pv).squaredNorm();
      vo.num_dense += (av_r * detail::rounded_to<T>(boh) - pv).squaredNorm();
    }
  }
  auto rel = [](double num, double den) { return den > 0 ? std::sqrt(num / den) : std::sqrt(num); };
  product_errors e;
  e.qk = rel(qk.num, qk.den);
  e.qk_dense = rel(qk.num_dense, qk.den);
  e.vo = rel(vo.num, vo.den);
  e.vo_dense = rel(vo.num_dense, vo.den);
  e.qk_norm2 = qk.den, e.vo_norm2 = vo.den;
  return e;
}

}  // namespace bd
BASISATTN_END_NAMESPACE
