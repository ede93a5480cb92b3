// The double-precision reference of a prepared (stored) attention layer, with the softmax gains of its
// own q, k, v, and the per-run error model of a backend's forward pass against it. Used by
// tests/cuda/test_cuda_layers.cpp, where the GPU layer and the CPU layer are each checked against it.
//
//   layerref::reference(L, x, position_offset, gains)   L a bd::mha_layer<T> or bd::mla_layer<T>: the
//        layer's own stored weights (dense or BD, transformed Q / O, permuted MLA latent) applied in
//        double, step for step as bd::forward(cpu{}, ...) computes them (ref::rope, explicit softmax),
//        with the layer's config (causal, scale, RoPE style and offset) and position_offset added to
//        the RoPE positions. No rounding to T anywhere: the exact result of the stored layer. The
//        softmax gains (head_with_gains) of every head are accumulated into `gains`.
//   layerref::error_model(L, n, backend)                the terms of the normwise error model (below) of
//        that layer's forward on n tokens, for the CPU backend or the CUDA backend.
//   model.tol<T>(gains)                                 the bound on ||y - reference||_F / ||reference||_F.
//
// Error model: the one of tests/test_bd_layers.cpp (layer_error_model; its header derives it), here
// against the stored layer, so the BD weight rounding and factorization (e_w there) drop out. Every
// rounding is a relative error <= u with a random sign, independent of the others; a value stored in T
// carries u_T; a sum of k terms in the compute type C (float for the 16-bit types) carries sqrt(k) u_C
// (root mean square; the worst case is k u_C); a linear map carries a relative error of its input to
// its output; the stages add linearly. With g_q, g_k the first-order gains of the scores' q and k
// errors through each head's softmax (head_with_gains, evaluated on the reference's own q, k, v):
//   tol = u_T n_lin + u_C s_lin + g_q (u_T n_q + u_C s_q) + g_k (u_T n_k + u_C (s_k + sqrt(d_qk))).
// A projection's output element is a sum of terms(p) terms: in_dim (+ 1 for a bias) dense, in_dim - r
// + 1 (the copied basis channel) (+ 1) BD; stored once in T, twice on the GPU when a BD projection runs
// the prefill epilogue (x_basis + b stored in T, then the GEMM's beta = 1 sum stored again; the
// automatic epilogue may fall back to it, so the CUDA model always counts it). The attention adds
// sqrt(n) (the P V sums over up to n keys) and its fixed roundings per element: 4 on the CPU (scale
// multiply, exp, rescale, 1/l), 8 on the GPU (expf within 2 ulp, for the weight and for the rescale:
// cudatest::exact_attention_tolerance). RoPE is computed in double and rounded through float to T:
// + 1 u_C + 1 u_T. The MLA RMSNorm: an L-term sum of squares (sqrt(L) / 2 relative in the norm) and 6
// fixed roundings (divide by L, add eps, sqrt, reciprocal, two multiplies), stored in T.
//   MHA: q: n_q = 1 + rope, s_q = sqrt(terms(q)) + rope; k likewise (+ 1 u_T BD on the GPU);
//        d_qk = head_dim; linear path: v stored (+ 1 BD on the GPU), the attention output stored, y
//        stored: n_lin = 3, s_lin = sqrt(terms(v)) + sqrt(n) + c_att + sqrt(terms(o)).
//   MLA: q: n_q = 1 + (rope part), s_q = sqrt(terms(q)) + (rope part); k: the latent, its RMSNorm and
//        the up-projection stored, n_k = 3 (+ 1 BD on the GPU), s_k = sqrt(terms(kv_a)) + sqrt(L) / 2 + 6
//        + sqrt(terms(k_up)) + 1 (the rope part's rotation); d_qk = nope + rope; linear path: the
//        latent and its norm, v, the attention output and y stored: n_lin = 5 (+ 1 BD on the GPU),
//        s_lin = sqrt(terms(kv_a)) + sqrt(L) / 2 + 6 + sqrt(terms(v_up)) + sqrt(n) + c_att + sqrt(terms(o)).
// It is a root-mean-square, first-order model: compare Frobenius norms over many outputs with it,
// never single entries. The CPU backend's margin on the test's own shapes is measured (see
// tests/cuda/test_cuda_layers.cpp's header); both backends run the same roundings to T at the same
// points and differ by summation order, which the sqrt(k) terms cover for any order.
#pragma once

#include <basisattn/bd/layers.hpp>
#include <basisattn/core/dtype.hpp>

#include "reference_layers.hpp"
#include "test_util.hpp"

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <variant>
#include <vector>

namespace layerref {

using basisattn::index_t;

template <class T>
double to_double(const T& v) {
  return static_cast<double>(basisattn::detail::to_compute<basisattn::compute_t<T>>(v));
}

/// The softmax gains' sums over heads (g_q = sqrt(num_q / den), g_k = sqrt(num_k / den)).
struct gain_sums {
  double num_q = 0, num_k = 0, den = 0;
  double g_q() const { return den > 0 ? std::sqrt(num_q / den) : 0.0; }
  double g_k() const { return den > 0 ? std::sqrt(num_k / den) : 0.0; }
};

/// The softmax gains g_q, g_k of tests/test_bd_layers.cpp (softmax_gain: the first-order propagation of
/// q and k errors through one head's softmax, evaluated on the reference's own q, k, v), written with
/// GEMMs so that 4096 tokens cost O(n^2 d d_v) flops in blocks rather than scalar loops:
///   g_k: sum_(i, j visible) p_ij^2 w_ij^2 ||v_j - o_i||^2,  w_ij^2 = scale^2 (q^2 (k^2)^T)_ij,
///        ||v_j - o_i||^2 = ||v_j||^2 - 2 (o v^T)_ij + ||o_i||^2;
///   g_q: sum_(i, e, e') q_ie^2 M_i(e, e')^2,  M_i = scale ((P KV)_i - (P k)_i o_i^T),  KV_j = k_j (x) v_j.
/// Key j is visible to query i when j <= i (causal) or always. Also returns the head's output o = P v
/// (the reference attention).
inline Eigen::MatrixXd head_with_gains(const Eigen::MatrixXd& q, const Eigen::MatrixXd& k, const Eigen::MatrixXd& v,
                                       double scale, bool causal, gain_sums& gs) {
  // Everything transposed (column i belongs to query i) so that the per-query loops run down columns.
  const Eigen::Index n = q.rows(), d = q.cols(), dv = v.cols();
  Eigen::MatrixXd Pt = scale * k * q.transpose();  // Pt(j, i) = s_ij
  for (Eigen::Index i = 0; i < n; ++i) {
    const Eigen::Index last = causal ? i : n - 1;
    double mx = -INFINITY;
    for (Eigen::Index j = 0; j <= last; ++j) mx = std::max(mx, Pt(j, i));
    double sum = 0;
    for (Eigen::Index j = 0; j < n; ++j) {
      Pt(j, i) = j <= last ? std::exp(Pt(j, i) - mx) : 0.0;
      sum += Pt(j, i);
    }
    Pt.col(i) /= sum;
  }
  const Eigen::MatrixXd ot = v.transpose() * Pt;  // dv x n: o_i = column i
  const Eigen::VectorXd vn = v.rowwise().squaredNorm();
  const Eigen::RowVectorXd on = ot.colwise().squaredNorm();
  {
    const Eigen::MatrixXd W2t = (scale * scale) * (k.cwiseAbs2() * q.cwiseAbs2().transpose());
    const Eigen::MatrixXd Gt = v * ot;  // Gt(j, i) = v_j . o_i
    double acc = 0;
    for (Eigen::Index i = 0; i < n; ++i) {
      const Eigen::Index last = causal ? i : n - 1;
      for (Eigen::Index j = 0; j <= last; ++j) {
        const double dev2 = std::max(0.0, vn(j) - 2 * Gt(j, i) + on(i));
        acc += Pt(j, i) * Pt(j, i) * W2t(j, i) * dev2;
      }
    }
    gs.num_k += acc;
  }
  Eigen::MatrixXd KV(n, d * dv);
  for (Eigen::Index e = 0; e < d; ++e) KV.middleCols(e * dv, dv) = v.array().colwise() * k.col(e).array();
  const Eigen::MatrixXd At = KV.transpose() * Pt, PKt = k.transpose() * Pt;  // (d dv) x n, d x n
  double acc = 0;
  for (Eigen::Index i = 0; i < n; ++i)
    for (Eigen::Index e = 0; e < d; ++e) {
      double m2 = 0;
      for (Eigen::Index c = 0; c < dv; ++c) {
        const double M = scale * (At(e * dv + c, i) - PKt(e, i) * ot(c, i));
        m2 += M * M;
      }
      acc += q(i, e) * q(i, e) * m2;
    }
  gs.num_q += acc;
  gs.den += on.sum();
  return ot.transpose();
}

/// A stored projection applied in double: dense y = x W + b; BD y_g = x[:, basis] + x[:, rest] C_g + b_g.
template <class T>
Eigen::MatrixXd project(const basisattn::bd::dense_projection<T>& p, const Eigen::MatrixXd& x) {
  Eigen::MatrixXd w(p.weight.rows(), p.weight.cols());
  for (index_t i = 0; i < w.rows(); ++i)
    for (index_t j = 0; j < w.cols(); ++j) w(i, j) = to_double(p.weight(i, j));
  Eigen::MatrixXd y = x * w;
  for (std::size_t j = 0; j < p.bias.size(); ++j) y.col(static_cast<Eigen::Index>(j)).array() += to_double(p.bias[j]);
  return y;
}
template <class T>
Eigen::MatrixXd project(const basisattn::bd::bd_projection<T>& p, const Eigen::MatrixXd& x) {
  const index_t r = p.rank, nr = p.in_dim - p.rank, G = p.heads;
  Eigen::MatrixXd y(x.rows(), G * r), xr(x.rows(), nr), c(nr, r);
  for (index_t g = 0; g < G; ++g) {  // head by head, each with its group's channels
    const index_t *basis = p.basis_of(g), *rest = p.rest_of(g);
    for (index_t l = 0; l < nr; ++l) xr.col(l) = x.col(rest[l]);
    for (index_t i = 0; i < nr; ++i)
      for (index_t j = 0; j < r; ++j) c(i, j) = to_double(p.coeff(i, g * r + j));
    y.middleCols(g * r, r) = xr * c;
    for (index_t e = 0; e < r; ++e) {
      y.col(g * r + e) += x.col(basis[e]);
      if (!p.bias.empty()) y.col(g * r + e).array() += to_double(p.bias[static_cast<std::size_t>(g * r + e)]);
    }
  }
  return y;
}
template <class T>
Eigen::MatrixXd project(const basisattn::bd::any_projection<T>& p, const Eigen::MatrixXd& x) {
  return std::visit([&](const auto& q) { return project(q, x); }, p);
}

/// Terms of one output element's sum (see the header).
template <class T>
double terms(const basisattn::bd::dense_projection<T>& p) {
  return double(p.in_dim()) + (p.bias.empty() ? 0.0 : 1.0);
}
template <class T>
double terms(const basisattn::bd::bd_projection<T>& p) {
  return double(p.in_dim - p.rank) + 1.0 + (p.bias.empty() ? 0.0 : 1.0);
}
template <class T>
double terms(const basisattn::bd::any_projection<T>& p) {
  return std::visit([](const auto& q) { return terms(q); }, p);
}

/// The stored MHA/GQA/MQA layer in double (bd::forward(cpu{}, ...)'s steps).
template <class T>
Eigen::MatrixXd reference(const basisattn::bd::mha_layer<T>& L, const Eigen::MatrixXd& x, index_t position_offset,
                          gain_sums& gs) {
  const auto& cfg = L.config;
  const index_t H = cfg.n_heads, Hkv = cfg.n_kv_heads, d = cfg.head_dim;
  Eigen::MatrixXd q = project(L.q, x), k = project(L.k, x);
  const Eigen::MatrixXd v = project(L.v, x);
  if (cfg.use_rope) {
    const bool il = cfg.rope.style == basisattn::rope_style::interleaved;
    const index_t off = cfg.rope.position_offset + position_offset;
    ref::rope(q, H, d, cfg.rope.theta, il, off);
    ref::rope(k, Hkv, d, cfg.rope.theta, il, off);
  }
  const double scale = cfg.scale > 0 ? cfg.scale : 1.0 / std::sqrt(double(d));
  Eigen::MatrixXd a(x.rows(), H * d);
  for (index_t h = 0; h < H; ++h) {
    const index_t hk = h / (H / Hkv);
    a.middleCols(h * d, d) = head_with_gains(q.middleCols(h * d, d), k.middleCols(hk * d, d), v.middleCols(hk * d, d),
                                             scale, cfg.causal, gs);
  }
  return project(L.o, a);
}

/// The stored MLA layer in double (bd::forward(cpu{}, ...)'s steps).
template <class T>
Eigen::MatrixXd reference(const basisattn::bd::mla_layer<T>& L, const Eigen::MatrixXd& x, index_t position_offset,
                          gain_sums& gs) {
  const auto& cfg = L.config;
  const index_t n = x.rows(), H = cfg.n_heads, Lr = cfg.kv_lora_rank, dn = cfg.qk_nope_dim, dr = cfg.qk_rope_dim,
                dv = cfg.v_head_dim, qd = dn + dr;
  Eigen::MatrixXd q = project(L.q, x);
  const Eigen::MatrixXd kva = project(L.kv_a, x);
  Eigen::MatrixXd c = kva.leftCols(Lr);
  for (index_t t = 0; t < n; ++t) {
    const double inv = 1.0 / std::sqrt(c.row(t).squaredNorm() / double(Lr) + cfg.rms_eps);
    for (index_t j = 0; j < Lr; ++j) c(t, j) *= inv * to_double(L.kv_a_norm[static_cast<std::size_t>(j)]);
  }
  Eigen::MatrixXd kpe = kva.rightCols(dr);
  if (dr > 0) {
    const bool il = cfg.rope.style == basisattn::rope_style::interleaved;
    const index_t off = cfg.rope.position_offset + position_offset;
    ref::rope(q, H, dr, cfg.rope.theta, il, off, dn, qd);
    ref::rope(kpe, 1, dr, cfg.rope.theta, il, off);
  }
  const Eigen::MatrixXd knope = project(L.k_up, c), v = project(L.v_up, c);
  const double scale = cfg.scale > 0 ? cfg.scale : 1.0 / std::sqrt(double(qd));
  Eigen::MatrixXd a(n, H * dv);
  for (index_t h = 0; h < H; ++h) {
    Eigen::MatrixXd kh(n, qd);
    kh.leftCols(dn) = knope.middleCols(h * dn, dn);
    kh.rightCols(dr) = kpe;
    a.middleCols(h * dv, dv) =
        head_with_gains(q.middleCols(h * qd, qd), kh, v.middleCols(h * dv, dv), scale, cfg.causal, gs);
  }
  return project(L.o, a);
}

enum class backend { cpu, cuda };

/// The error model's terms (see the header); tol<T>(gains) is the normwise bound.
struct error_model {
  double n_lin = 0, s_lin = 0, n_q = 0, s_q = 0, n_k = 0, s_k = 0, d_qk = 0;
  template <class T>
  double tol(const gain_sums& gs) const {
    const double ut = test::u<T>(), uc = test::u<basisattn::compute_t<T>>();
    return ut * n_lin + uc * s_lin + gs.g_q() * (ut * n_q + uc * s_q) +
           gs.g_k() * (ut * n_k + uc * (s_k + std::sqrt(d_qk)));
  }
};

inline double attention_fixed_roundings(backend b) { return b == backend::cuda ? 8.0 : 4.0; }

template <class T>
error_model model_of(const basisattn::bd::mha_layer<T>& L, index_t n, backend b) {
  const auto& cfg = L.config;
  const double rope = cfg.use_rope ? 1.0 : 0.0, gpu = b == backend::cuda ? 1.0 : 0.0;
  error_model m;
  m.n_q = 1 + rope;
  m.s_q = std::sqrt(terms(L.q)) + rope;
  m.n_k = 1 + rope + (basisattn::bd::is_bd(L.k) ? gpu : 0.0);
  m.s_k = std::sqrt(terms(L.k)) + rope;
  m.d_qk = double(cfg.head_dim);
  m.n_lin = 3 + (basisattn::bd::is_bd(L.v) ? gpu : 0.0);
  m.s_lin = std::sqrt(terms(L.v)) + std::sqrt(double(n)) + attention_fixed_roundings(b) + std::sqrt(terms(L.o));
  return m;
}

template <class T>
error_model model_of(const basisattn::bd::mla_layer<T>& L, index_t n, backend b) {
  const auto& cfg = L.config;
  const double rope = cfg.qk_rope_dim > 0 ? 1.0 : 0.0, gpu = b == backend::cuda ? 1.0 : 0.0;
  const double latent = std::sqrt(terms(L.kv_a)) + 0.5 * std::sqrt(double(cfg.kv_lora_rank)) + 6;
  error_model m;
  m.n_q = 1 + rope;
  m.s_q = std::sqrt(terms(L.q)) + rope;
  m.n_k = 3 + (basisattn::bd::is_bd(L.k_up) ? gpu : 0.0);
  m.s_k = latent + std::sqrt(terms(L.k_up)) + 1;
  m.d_qk = double(cfg.qk_nope_dim + cfg.qk_rope_dim);
  m.n_lin = 5 + (basisattn::bd::is_bd(L.v_up) ? gpu : 0.0);
  m.s_lin =
      latent + std::sqrt(terms(L.v_up)) + std::sqrt(double(n)) + attention_fixed_roundings(b) + std::sqrt(terms(L.o));
  return m;
}

}  // namespace layerref
