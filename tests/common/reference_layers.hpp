// Plain double-precision reference attention layers for the tests: written directly from the
// definitions (explicit scores, explicit mask, explicit softmax), sharing no code with the library.
#pragma once

#include <Eigen/Dense>

#include <cmath>
#include <vector>

namespace ref {

using mat = Eigen::MatrixXd;
using Eigen::Index;

/// Rotate x[t, h*d : (h+1)*d] of a [tokens, heads*d] matrix; pairs (2i, 2i+1) or (i, i+d/2).
inline void rope(mat& x, Index heads, Index d, double theta, bool interleaved, Index offset, Index col0 = 0,
                 Index stride = -1) {
  if (stride < 0) stride = d;
  for (Index t = 0; t < x.rows(); ++t)
    for (Index h = 0; h < heads; ++h)
      for (Index i = 0; i < d / 2; ++i) {
        const double ang = double(t + offset) * std::pow(theta, -2.0 * double(i) / double(d));
        const Index a = col0 + h * stride + (interleaved ? 2 * i : i), b = interleaved ? a + 1 : a + d / 2;
        const double x0 = x(t, a), x1 = x(t, b);
        x(t, a) = x0 * std::cos(ang) - x1 * std::sin(ang);
        x(t, b) = x0 * std::sin(ang) + x1 * std::cos(ang);
      }
}

/// Softmax attention of one head: q (n x dq), k (n x dq), v (n x dv), causal, scale.
inline mat attend(const mat& q, const mat& k, const mat& v, double scale, bool causal) {
  mat s = scale * q * k.transpose();
  mat out(q.rows(), v.cols());
  for (Index i = 0; i < q.rows(); ++i) {
    const Index last = causal ? i : k.rows() - 1;
    double mx = -INFINITY;
    for (Index j = 0; j <= last; ++j) mx = std::max(mx, s(i, j));
    Eigen::RowVectorXd acc = Eigen::RowVectorXd::Zero(v.cols());
    double sum = 0;
    for (Index j = 0; j <= last; ++j) {
      const double p = std::exp(s(i, j) - mx);
      sum += p;
      acc += p * v.row(j);
    }
    out.row(i) = acc / sum;
  }
  return out;
}

struct mha_params {
  mat wq, wk, wv, wo;  // y = x W
  Eigen::RowVectorXd bq, bk, bv, bo;
  Index heads, kv_heads, d;
  bool causal = true, rope = false, interleaved = true;
  double theta = 10000, scale = 0;
};

inline mat mha(const mha_params& p, const mat& x) {
  mat q = x * p.wq, k = x * p.wk, v = x * p.wv;
  if (p.bq.size()) q.rowwise() += p.bq;
  if (p.bk.size()) k.rowwise() += p.bk;
  if (p.bv.size()) v.rowwise() += p.bv;
  if (p.rope) {
    rope(q, p.heads, p.d, p.theta, p.interleaved, 0);
    rope(k, p.kv_heads, p.d, p.theta, p.interleaved, 0);
  }
  const double scale = p.scale > 0 ? p.scale : 1.0 / std::sqrt(double(p.d));
  mat a(x.rows(), p.heads * p.d);
  const Index grp = p.heads / p.kv_heads;
  for (Index h = 0; h < p.heads; ++h) {
    const Index g = h / grp;
    a.middleCols(h * p.d, p.d) =
        attend(q.middleCols(h * p.d, p.d), k.middleCols(g * p.d, p.d), v.middleCols(g * p.d, p.d), scale, p.causal);
  }
  mat out = a * p.wo;
  if (p.bo.size()) out.rowwise() += p.bo;
  return out;
}

struct mla_params {
  mat wq, wkv_a, wkv_b, wo;
  Eigen::RowVectorXd norm;
  Index heads, lora, nope, rope_dim, vdim;
  double eps = 1e-6, theta = 10000;
  bool causal = true;
};

inline mat mla(const mla_params& p, const mat& x) {
  const Index qd = p.nope + p.rope_dim, n = x.rows();
  mat q = x * p.wq, kva = x * p.wkv_a;
  mat c = kva.leftCols(p.lora);
  for (Index t = 0; t < n; ++t) {
    const double inv = 1.0 / std::sqrt(c.row(t).squaredNorm() / double(p.lora) + p.eps);
    c.row(t) = (c.row(t) * inv).cwiseProduct(p.norm);
  }
  mat kpe = kva.rightCols(p.rope_dim);
  rope(q, p.heads, p.rope_dim, p.theta, true, 0, p.nope, qd);
  rope(kpe, 1, p.rope_dim, p.theta, true, 0);
  const mat kv = c * p.wkv_b;
  mat a(n, p.heads * p.vdim);
  const double scale = 1.0 / std::sqrt(double(qd));
  for (Index h = 0; h < p.heads; ++h) {
    mat kh(n, qd);
    kh.leftCols(p.nope) = kv.middleCols(h * (p.nope + p.vdim), p.nope);
    kh.rightCols(p.rope_dim) = kpe;
    a.middleCols(h * p.vdim, p.vdim) =
        attend(q.middleCols(h * qd, qd), kh, kv.middleCols(h * (p.nope + p.vdim) + p.nope, p.vdim), scale, p.causal);
  }
  return a * p.wo;
}

}  // namespace ref
