// Layer level: the BD layer's output equals the dense layer's output up to rounding, for MHA (BD on
// Q/K and V/O), GQA and MQA with RoPE (V/O only) and MLA (joint and per-side bases); both are
// checked against a plain double reference (common/reference_layers.hpp). Shards sum to the layer.
#include <basisattn/cpu/layers.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <catch2/catch.hpp>

#include "reference_layers.hpp"
#include "test_util.hpp"
#include "expect_error.hpp"

#include <algorithm>
#include <cmath>
#include <variant>
#include <vector>

using namespace basisattn;
using test::index_t;

namespace {

/// bd::forward in a caller-owned workspace: misaligned by one byte and filled with 0xFF bytes first
/// (NaN in every floating type: the pass must write each intermediate before it reads it). One byte
/// less is refused.
template <class T, class Layer>
void forward_in_workspace(const Layer& layer, const matrix<T>& x, matrix<T>& y) {
  const std::size_t bytes = bd::workspace_bytes(cpu{}, layer, x.view().rows);
  REQUIRE(bytes > 0);
  std::vector<unsigned char> ws(bytes + 1, 0xFF);
  test::expect_error([&] { bd::forward(cpu{}, layer, x.view(), y.view(), ws.data() + 1, bytes - 1); },
                     errc::invalid_argument, "needed (workspace_bytes)");
  bd::forward(cpu{}, layer, x.view(), y.view(), ws.data() + 1, bytes);
}

template <class T>
Eigen::RowVectorXd row_of(const std::vector<T>& v) {
  Eigen::RowVectorXd r(static_cast<index_t>(v.size()));
  for (std::size_t i = 0; i < v.size(); ++i)
    r(static_cast<index_t>(i)) = static_cast<double>(detail::to_compute<compute_t<T>>(v[i]));
  return r;
}

/// Error model of a layer's output y against the double reference, normwise relative, first order.
/// Terms as in test_attention.cpp's header: u_T the storage type's unit roundoff, u_C the compute
/// type's (float for the 16-bit types, else T itself). Model: every rounding is a relative error of
/// size <= u with a random sign, independent of the others; a value stored in T carries one of size
/// u_T; a sum of k terms in the compute type carries one of root-mean-square size <= sqrt(k) u_C
/// relative to its terms (each term passes through at most k roundings: the random walk
/// test_attention.cpp uses; the worst case is k u_C); a linear map carries a relative error of its
/// input to its output at the same size (random weights); the errors of different stages add
/// (linearly: conservative against their root-sum-square). The tolerance is the root-mean-square
/// relative error this gives; the measured Frobenius norm over n x d_model entries of independent
/// errors concentrates on its own root-mean-square, which is below that (rounding errors are
/// uniform on [-u, u], rms u / sqrt(3), and few terms see k roundings).
///
/// Linear path (v -> attention average -> output projection): n_lin roundings to T and C-sums with
/// sum of sqrt(k) s_lin (with the P V sums' sqrt(n) and test_attention's 4 fixed roundings).
///
/// Score path: test_attention.cpp bounds it by kappa sqrt(d_qk) u_C with kappa = max|s| (softmax
/// gain taken as 1, every term of a score as large as |s|max). Here q and k carry u_T-sized errors
/// (they are stored), for which that worst case (kappa is 12-22 here) would sit tens of times above
/// the measured error, so the same first-order propagation is evaluated on the reference's own q, k,
/// v and p (softmax_gain):
/// do_i = sum_j p_ij ds_ij (v_j - o_i) exactly to first order (sum_j p_ij (v_j - o_i) = 0), and
///   ds_ij = scale (dq_i . k_j + q_i . dk_j) + (rounding of the d_qk-term sum),
/// with dq_ie = eps_q q_ie r, dk_je = eps_k k_je r' (r, r' independent, |r| <= 1) and the sum's rounding
/// of size sqrt(d_qk) u_C w_ij, w_ij = scale sqrt(sum_e q_ie^2 k_je^2) (its terms' size). The q errors
/// are shared by all keys of a query, the others independent per pair, so the root-mean-square of
/// ||do||_F / ||o||_F is at most eps_q g_q + (eps_k + sqrt(d_qk) u_C) g_k with
///   g_q^2 = sum_(i,e') sum_e q_ie^2 M_i(e, e')^2 / ||o||^2,  M_i = scale sum_j p_ij k_j^T (v_j - o_i),
///   g_k^2 = sum_(i,e) sum_j p_ij^2 w_ij^2 (v_je - o_ie)^2 / ||o||^2,
/// sums over heads and visible pairs. eps_q = n_q u_T + s_q u_C from q's roundings and sums, eps_k
/// likewise.
///
/// BD adds, per transformed weight (its C, and the absorbed W_Q A_S^T or A_S W_O), a rounding to T
/// and the double arithmetic that computed it: C solves C A_S = A_rest by LU (residual up to
/// gamma_3r |C| |L||U|) and the absorbed weight is an r-term product, so in the same model
/// e_w = u_T + sqrt(3 r) (1 + max|C|) u_64 (the second term matters for T = double only). With
/// error-aware rounding of the pair (round_pair) the pair's product error is about that of two
/// roundings (test_bd_factorize.cpp): the pair counts as two e_w, one on each side.
///   tol = u_T n_lin + u_C s_lin + n_bd_lin e_w
///       + g_q (u_T n_q + u_C s_q + n_bd_q e_w) + g_k (u_T n_k + u_C (s_k + sqrt(d_qk)) + n_bd_k e_w).
struct softmax_gain {
  double kappa = 1, g_q = 0, g_k = 0;  // kappa = max(1, max |s|): reported only (test_attention's gain)
  double num_q = 0, num_k = 0, den = 0;
  /// One head: q (n x dq), k (n x dq), v (n x dv), causal, scale.
  void add(const Eigen::MatrixXd& q, const Eigen::MatrixXd& k, const Eigen::MatrixXd& v, double scale) {
    const Eigen::MatrixXd sc = scale * q * k.transpose();
    const Eigen::MatrixXd q2 = q.cwiseAbs2(), k2 = k.cwiseAbs2();
    for (index_t i = 0; i < q.rows(); ++i) {
      double mx = -INFINITY;
      for (index_t j = 0; j <= i; ++j) mx = std::max(mx, sc(i, j)), kappa = std::max(kappa, std::abs(sc(i, j)));
      Eigen::VectorXd p(i + 1);
      for (index_t j = 0; j <= i; ++j) p(j) = std::exp(sc(i, j) - mx);
      p /= p.sum();
      Eigen::RowVectorXd o = Eigen::RowVectorXd::Zero(v.cols());
      for (index_t j = 0; j <= i; ++j) o += p(j) * v.row(j);
      Eigen::MatrixXd m = Eigen::MatrixXd::Zero(q.cols(), v.cols());
      for (index_t j = 0; j <= i; ++j) {
        const Eigen::RowVectorXd dv = v.row(j) - o;
        m.noalias() += (scale * p(j)) * k.row(j).transpose() * dv;
        const double w2 = scale * scale * q2.row(i).dot(k2.row(j));
        num_k += p(j) * p(j) * w2 * dv.squaredNorm();
      }
      num_q += q2.row(i) * m.rowwise().squaredNorm();
      den += o.squaredNorm();
    }
    g_q = std::sqrt(num_q / den);
    g_k = std::sqrt(num_k / den);
  }
};

struct layer_error_model {
  double n_lin = 0, s_lin = 0, n_q = 0, s_q = 0, n_k = 0, s_k = 0, d_qk = 0;
  double n_bd_lin = 0, n_bd_q = 0, n_bd_k = 0;
  template <class T>
  double tol(const softmax_gain& sg, double e_w) const {
    const double ut = test::u<T>(), uc = test::u<compute_t<T>>();
    return ut * n_lin + uc * s_lin + n_bd_lin * e_w + sg.g_q * (ut * n_q + uc * s_q + n_bd_q * e_w) +
           sg.g_k * (ut * n_k + uc * (s_k + std::sqrt(d_qk)) + n_bd_k * e_w);
  }
};

/// e_w of a BD projection (see layer_error_model).
template <class T>
double bd_weight_error(const bd::any_projection<T>& p) {
  const auto& b = std::get<bd::bd_projection<T>>(p);
  return test::u<T>() + std::sqrt(3.0 * double(b.rank)) * (1 + b.report.max_abs_coeff) * test::u<double>();
}

/// Rounding each shard's output to T and summing them in double: the final rounding is u_T per shard
/// output, sum_s u_T ||y_s||_F <= u_T (sum_s ||y_s||_F / ||y||_F) ||y||_F, which replaces the layer's one
/// final rounding u_T (one of n_lin; counted again here, conservatively).
double shard_rounding(const std::vector<Eigen::MatrixXd>& parts, const Eigen::MatrixXd& want, double ut) {
  double s = 0;
  for (const auto& y : parts) s += y.norm();
  return ut * s / want.norm();
}

template <class T>
void mha_case(index_t H, index_t Hkv, bool rope, bool interleaved,
              bd::basis_grouping grouping = bd::basis_grouping::automatic, bool weigh_by_product = false) {
  test::seed(1000 + 10 * H + Hkv + 100 * rope);
  const index_t dm = 64, d = 16, n = 37;
  const double s = 0.25;
  auto wq = test::random_matrix<T>(dm, H * d, s), wk = test::random_matrix<T>(dm, Hkv * d, s),
       wv = test::random_matrix<T>(dm, Hkv * d, s), wo = test::random_matrix<T>(H * d, dm, s);
  auto bq = test::random_vector<T>(H * d, 0.1), bk = test::random_vector<T>(Hkv * d, 0.1),
       bv = test::random_vector<T>(Hkv * d, 0.1), bo = test::random_vector<T>(dm, 0.1);
  const auto x = test::random_matrix<T>(n, dm);
  bd::mha_weights<T> w{wq.view(), wk.view(), wv.view(), wo.view(), bq.data(), bk.data(), bv.data(), bo.data()};
  bd::mha_config cfg{dm, H, Hkv, d};
  cfg.use_rope = rope;
  cfg.rope.style = interleaved ? rope_style::interleaved : rope_style::half;

  ref::mha_params rp;
  rp.wq = test::to_double(wq), rp.wk = test::to_double(wk), rp.wv = test::to_double(wv), rp.wo = test::to_double(wo);
  rp.bq = row_of(bq), rp.bk = row_of(bk), rp.bv = row_of(bv), rp.bo = row_of(bo);
  rp.heads = H, rp.kv_heads = Hkv, rp.d = d, rp.rope = rope, rp.interleaved = interleaved;
  const Eigen::MatrixXd want = ref::mha(rp, test::to_double(x));
  // Softmax gain from the reference's q, k, v (the same steps as ref::mha).
  softmax_gain sg;
  {
    const Eigen::MatrixXd xd = test::to_double(x);
    Eigen::MatrixXd q = (xd * rp.wq).rowwise() + rp.bq, k = (xd * rp.wk).rowwise() + rp.bk,
                    v = (xd * rp.wv).rowwise() + rp.bv;
    if (rope) ref::rope(q, H, d, 10000, interleaved, 0), ref::rope(k, Hkv, d, 10000, interleaved, 0);
    for (index_t h = 0; h < H; ++h) {
      const index_t g = h / (H / Hkv);
      sg.add(q.middleCols(h * d, d), k.middleCols(g * d, d), v.middleCols(g * d, d), 1.0 / std::sqrt(double(d)));
    }
  }

  bd::mha_options dense_opt;
  dense_opt.bd_qk = dense_opt.bd_vo = false;
  bd::mha_options bd_opt;
  bd_opt.bd_qk = !rope;
  bd_opt.grouping = grouping;
  bd_opt.prepare.weigh_by_product = weigh_by_product;
  const auto Ld = bd::prepare_mha<T>(w, cfg, dense_opt);
  const auto Lb = bd::prepare_mha<T>(w, cfg, bd_opt);
  CHECK(bd::is_bd(Lb.k) == !rope);
  CHECK(bd::is_bd(Lb.v));
  if (grouping != bd::basis_grouping::automatic) {
    const index_t want_groups = grouping == bd::basis_grouping::shared ? 1 : Hkv;
    CHECK(std::get<bd::bd_projection<T>>(Lb.v).groups == want_groups);
    if (!rope) CHECK(std::get<bd::bd_projection<T>>(Lb.k).groups == want_groups);
  }
  matrix<T> yd(n, dm), yb(n, dm);
  test::poison(yd);
  test::poison(yb);
  bd::forward(cpu{}, Ld, x.view(), yd.view());  // allocating its workspace
  forward_in_workspace(Lb, x, yb);              // in the caller's
  // Error model (layer_error_model): q and k are each a d_model-term sum (+ bias) stored in T, and
  // again after RoPE (rounded through float: + 1 u_C); the scores sum d terms. Linear path: v
  // (d_model terms, stored), the P V sums over up to n keys and the attention's 4 fixed roundings,
  // the attention output stored, the output projection (H d terms) stored.
  // BD: Q/K adds W_Q A_S^T (q side) and C (k side), V/O adds C (v side) and A_S W_O.
  layer_error_model em;
  em.n_lin = 3;
  em.s_lin = std::sqrt(double(dm)) + std::sqrt(double(n)) + std::sqrt(double(H * d)) + 4;
  em.n_q = em.n_k = rope ? 2 : 1;
  em.s_q = em.s_k = std::sqrt(double(dm)) + (rope ? 1 : 0);
  em.d_qk = double(d);
  const double tol_d = em.tol<T>(sg, 0);
  layer_error_model eb_model = em;
  eb_model.n_bd_lin = 2;
  eb_model.n_bd_q = eb_model.n_bd_k = rope ? 0 : 1;
  const double e_w = std::max(bd_weight_error(Lb.v), rope ? 0.0 : bd_weight_error(Lb.k));
  const double tol_b = eb_model.tol<T>(sg, e_w);
  const double ed = test::rel_error(test::to_double(yd), want), eb = test::rel_error(test::to_double(yb), want);
  INFO(to_string(dtype_of_v<T>) << " H " << H << "/" << Hkv << " rope " << rope << " bases " << bd::to_string(grouping)
                                << ": kappa " << sg.kappa << ", g_q " << sg.g_q << ", g_k " << sg.g_k
                                << "; dense error " << ed / test::u<T>() << " u of " << tol_d / test::u<T>()
                                << " u (margin " << tol_d / ed << "), BD error " << eb / test::u<T>() << " u of "
                                << tol_b / test::u<T>() << " u (margin " << tol_b / eb << ")");
  CHECK(ed <= tol_d);
  CHECK(eb <= tol_b);
  // Size: K/V projections lose r rows per kv head; nothing else changes.
  CHECK(Ld.bytes() == Ld.dense_bytes());
  const std::size_t saved = std::size_t(d * Hkv * d) * ((rope ? 0 : 1) + 1) * sizeof(T);
  CHECK(Lb.bytes() + saved == Lb.dense_bytes());

  // Tensor-parallel shards (whole kv groups) sum to the layer's output.
  const index_t grp = H / Hkv;
  Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(n, dm);
  std::vector<Eigen::MatrixXd> parts;
  index_t shards = 0;
  for (index_t h0 = 0; h0 < H; h0 += grp, ++shards) {
    const auto S = Lb.shard(h0, grp);
    CHECK(S.config.n_heads == grp);
    matrix<T> ys(n, dm);
    test::poison(ys);
    bd::forward(cpu{}, S, x.view(), ys.view());
    parts.push_back(test::to_double(ys));
    sum += parts.back();
  }
  CHECK(shards == Hkv);
  // The shards compute the BD layer's sums (the output projection split by rows), each output rounded
  // to T before the double sum: the BD bound plus shard_rounding.
  const double tol_s = tol_b + shard_rounding(parts, want, test::u<T>()), es = test::rel_error(sum, want);
  INFO("shard sum error " << es / test::u<T>() << " u of " << tol_s / test::u<T>() << " u (margin " << tol_s / es
                          << ")");
  CHECK(es <= tol_s);
}

template <class T>
void mla_case(bd::basis_sharing sharing, bool weigh_by_product = false) {
  test::seed(2000 + static_cast<int>(sharing));
  const index_t dm = 96, H = 4, Lr = 48, dn = 16, dr = 8, dv = 16, n = 29;
  const double s = 0.2;
  auto wq = test::random_matrix<T>(dm, H * (dn + dr), s), wa = test::random_matrix<T>(dm, Lr + dr, s),
       wb = test::random_matrix<T>(Lr, H * (dn + dv), s), wo = test::random_matrix<T>(H * dv, dm, s);
  std::vector<T> g(static_cast<std::size_t>(Lr));
  for (auto& v : g) v = detail::from_compute<T>(1.0 + 0.2 * test::normal());
  const auto x = test::random_matrix<T>(n, dm);
  bd::mla_weights<T> w{wq.view(), wa.view(), g.data(), wb.view(), wo.view()};
  bd::mla_config cfg{dm, H, Lr, dn, dr, dv};

  ref::mla_params rp;
  rp.wq = test::to_double(wq), rp.wkv_a = test::to_double(wa), rp.wkv_b = test::to_double(wb),
  rp.wo = test::to_double(wo);
  rp.norm = row_of(g);
  rp.heads = H, rp.lora = Lr, rp.nope = dn, rp.rope_dim = dr, rp.vdim = dv;
  const Eigen::MatrixXd want = ref::mla(rp, test::to_double(x));
  // Softmax gain from the reference's q, k, v (the same steps as ref::mla).
  softmax_gain sg;
  {
    const index_t qd = dn + dr;
    const Eigen::MatrixXd xd = test::to_double(x);
    Eigen::MatrixXd q = xd * rp.wq, kva = xd * rp.wkv_a;
    Eigen::MatrixXd c = kva.leftCols(Lr);
    for (index_t t = 0; t < n; ++t) {
      const double inv = 1.0 / std::sqrt(c.row(t).squaredNorm() / double(Lr) + rp.eps);
      c.row(t) = (c.row(t) * inv).cwiseProduct(rp.norm);
    }
    Eigen::MatrixXd kpe = kva.rightCols(dr);
    ref::rope(q, H, dr, rp.theta, true, 0, dn, qd);
    ref::rope(kpe, 1, dr, rp.theta, true, 0);
    const Eigen::MatrixXd kv = c * rp.wkv_b;
    for (index_t h = 0; h < H; ++h) {
      Eigen::MatrixXd kh(n, qd);
      kh.leftCols(dn) = kv.middleCols(h * (dn + dv), dn);
      kh.rightCols(dr) = kpe;
      sg.add(q.middleCols(h * qd, qd), kh, kv.middleCols(h * (dn + dv) + dn, dv), 1.0 / std::sqrt(double(qd)));
    }
  }

  bd::mla_options dense_opt;
  dense_opt.bd = false;
  bd::mla_options bd_opt;
  bd_opt.sharing = sharing;
  bd_opt.prepare.weigh_by_product = weigh_by_product;
  const auto Ld = bd::prepare_mla<T>(w, cfg, dense_opt);
  const auto Lb = bd::prepare_mla<T>(w, cfg, bd_opt);
  REQUIRE(bd::is_bd(Lb.k_up));
  CHECK(std::get<bd::bd_projection<T>>(Lb.k_up).basis_leading());
  CHECK(std::get<bd::bd_projection<T>>(Lb.v_up).basis_leading() == (sharing == bd::basis_sharing::joint));
  matrix<T> yd(n, dm), yb(n, dm);
  test::poison(yd);
  test::poison(yb);
  bd::forward(cpu{}, Ld, x.view(), yd.view());  // allocating its workspace
  forward_in_workspace(Lb, x, yb);              // in the caller's
  // Error model (layer_error_model). q: a d_model-term sum stored in T, again after RoPE (through
  // float: + 1 u_C). k: the latent (d_model terms, stored), its RMSNorm (a sum of L squares: sqrt(L)/2
  // relative in the norm, 4 fixed roundings (divide, sqrt, two multiplies), stored), the
  // up-projection (L terms, stored); its rope part (the latent stored, roped through float and
  // stored) has fewer. Scores: qd = dn + dr terms. Linear path: the latent and RMSNorm as for k, the
  // up-projection (L terms, stored), P V over up to n keys and the attention's 4 fixed roundings, the
  // attention output stored, the output projection (H dv terms) stored.
  // BD: W_Q A_S^T (q side) and C of k_up (k side), C of v_up and A_S W_O (linear path).
  layer_error_model em;
  em.n_lin = 5;
  em.s_lin =
      std::sqrt(double(dm)) + 1.5 * std::sqrt(double(Lr)) + 4 + std::sqrt(double(n)) + std::sqrt(double(H * dv)) + 4;
  em.n_q = 2;
  em.s_q = std::sqrt(double(dm)) + 1;
  em.n_k = 3;
  em.s_k = std::sqrt(double(dm)) + 1.5 * std::sqrt(double(Lr)) + 4 + 1;
  em.d_qk = double(dn + dr);
  const double tol_d = em.tol<T>(sg, 0);
  layer_error_model eb_model = em;
  eb_model.n_bd_lin = 2;
  eb_model.n_bd_q = eb_model.n_bd_k = 1;
  const double tol_b = eb_model.tol<T>(sg, std::max(bd_weight_error(Lb.k_up), bd_weight_error(Lb.v_up)));
  const double ed = test::rel_error(test::to_double(yd), want), eb = test::rel_error(test::to_double(yb), want);
  INFO(to_string(dtype_of_v<T>) << " MLA sharing " << static_cast<int>(sharing) << ": kappa " << sg.kappa << ", g_q "
                                << sg.g_q << ", g_k " << sg.g_k << "; dense error " << ed / test::u<T>() << " u of "
                                << tol_d / test::u<T>() << " u (margin " << tol_d / ed << "), BD error "
                                << eb / test::u<T>() << " u of " << tol_b / test::u<T>() << " u (margin " << tol_b / eb
                                << ")");
  CHECK(ed <= tol_d);
  CHECK(eb <= tol_b);
  CHECK(Ld.bytes() == Ld.dense_bytes());
  CHECK(Lb.bytes() + std::size_t(H * (dn * dn + dv * dv)) * sizeof(T) == Lb.dense_bytes());
  Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(n, dm);
  std::vector<Eigen::MatrixXd> parts;
  for (index_t h0 = 0; h0 < H; h0 += 2) {
    matrix<T> ys(n, dm);
    bd::forward(cpu{}, Lb.shard(h0, 2), x.view(), ys.view());
    parts.push_back(test::to_double(ys));
    sum += parts.back();
  }
  // As for MHA: the BD bound plus the rounding of each shard's output (shard_rounding).
  const double tol_s = tol_b + shard_rounding(parts, want, test::u<T>()), es = test::rel_error(sum, want);
  INFO("shard sum error " << es / test::u<T>() << " u of " << tol_s / test::u<T>() << " u (margin " << tol_s / es
                          << ")");
  CHECK(es <= tol_s);
}

}  // namespace

TEMPLATE_TEST_CASE("MHA layer: BD on Q/K and V/O equals dense and the double reference", "", float, double, Eigen::half,
                   Eigen::bfloat16) {
  mha_case<TestType>(4, 4, false, true);
  mha_case<TestType>(4, 4, false, true, bd::basis_grouping::shared);
  mha_case<TestType>(4, 4, false, true, bd::basis_grouping::per_kv_head);
  mha_case<TestType>(4, 4, false, true, bd::basis_grouping::automatic, true);  // weighed by W_Q / W_O
}

TEMPLATE_TEST_CASE("GQA and MQA layers with RoPE: BD on V/O equals dense and the double reference", "", float, double,
                   Eigen::half, Eigen::bfloat16) {
  mha_case<TestType>(8, 2, true, true);
  mha_case<TestType>(4, 1, true, false);
  mha_case<TestType>(6, 3, false, true);
  mha_case<TestType>(8, 2, true, true, bd::basis_grouping::per_kv_head);
  mha_case<TestType>(6, 3, false, true, bd::basis_grouping::per_kv_head);
  mha_case<TestType>(6, 3, false, true, bd::basis_grouping::shared, true);
}

TEMPLATE_TEST_CASE("MLA layer: BD on K-nope and V equals dense and the double reference", "", float, double,
                   Eigen::half, Eigen::bfloat16) {
  mla_case<TestType>(bd::basis_sharing::joint);
  mla_case<TestType>(bd::basis_sharing::per_side);
  mla_case<TestType>(bd::basis_sharing::joint, true);
  mla_case<TestType>(bd::basis_sharing::per_side, true);
}

TEST_CASE("bd::basis_block maps a BD V projection's basis coordinates back to the dense head output") {
  test::seed(91);
  const index_t dm = 48, H = 4, Hkv = 2, d = 8, n = 7;
  const auto wq = test::random_matrix<float>(dm, H * d), wk = test::random_matrix<float>(dm, Hkv * d),
             wv = test::random_matrix<float>(dm, Hkv * d), wo = test::random_matrix<float>(H * d, dm);
  bd::mha_weights<float> w{wq.view(), wk.view(), wv.view(), wo.view()};
  for (const bd::basis_grouping grouping : {bd::basis_grouping::shared, bd::basis_grouping::per_kv_head}) {
    CAPTURE(bd::to_string(grouping));
    bd::mha_options o;
    o.bd_qk = false;
    o.grouping = grouping;
    const auto L = bd::prepare_mha<float>(w, bd::mha_config{dm, H, Hkv, d}, o);
    const auto& pv = std::get<bd::bd_projection<float>>(L.v);
    CHECK(pv.groups == (grouping == bd::basis_grouping::shared ? 1 : Hkv));
    const auto x = test::random_matrix<float>(n, dm);
    matrix<float> y(n, Hkv * d);
    bd::project(cpu{}, pv, x.view(), y.view());
    // y_g = fl(x_S + x_rest C~_g), a float sum of m - r + 1 terms with the stored C~_g = C_g (1 + delta),
    // |delta| <= u: elementwise |y_g - x W_g A_S^-1| <= gamma_{m-r+1} (|x_S| + |x_rest| |C~_g|) +
    // u (1 + u) |x_rest| |C~_g|, hence |y_g A_S - x W_g| <= that times |A_S| (all in double), plus 1e-12
    // relative to |x| |W_g| for the double factorization's and this check's own arithmetic.
    const double u = test::u<float>(), g = test::gamma<float>(dm - d + 1);
    for (index_t hk = 0; hk < Hkv; ++hk) {
      const matrix<double> a = bd::basis_block(pv, wv.view().block(0, hk * d, dm, d), hk);
      index_t wrong = 0;
      for (index_t t = 0; t < n; ++t)
        for (index_t j = 0; j < d; ++j) {
          double got = 0, want = 0, bound = 0, scale = 0;
          for (index_t c = 0; c < dm; ++c) {
            want += double(x(t, c)) * double(wv(c, hk * d + j));
            scale += std::abs(double(x(t, c)) * double(wv(c, hk * d + j)));
          }
          for (index_t i = 0; i < d; ++i) {
            const double yi = double(y(t, hk * d + i));
            double xc = 0;  // |x_rest| |C_g| of coordinate i
            for (index_t l = 0; l < dm - d; ++l)
              xc += std::abs(double(x(t, pv.rest_of(hk)[l])) * double(pv.coeff(l, hk * d + i)));
            const double xs = std::abs(double(x(t, pv.basis_of(hk)[i])));
            got += yi * a(i, j);
            bound += (g * (xs + xc) + u * (1 + u) * xc) * std::abs(a(i, j));
          }
          wrong += !(std::abs(got - want) <= bound + 1e-12 * scale);
        }
      CHECK(wrong == 0);
    }
    // Without mapping back, the coordinates are not the dense output (the test can fail).
    double diff = 0;
    for (index_t t = 0; t < n; ++t)
      for (index_t j = 0; j < d; ++j) {
        double want = 0;
        for (index_t c = 0; c < dm; ++c) want += double(x(t, c)) * double(wv(c, j));
        diff = std::max(diff, std::abs(double(y(t, j)) - want));
      }
    CHECK(diff > 1e-3);
    CHECK_THROWS_AS(bd::basis_block(pv, wv.view()), basisattn::error);
    CHECK_THROWS_AS(bd::basis_block(pv, wv.view().block(0, 0, dm, d), Hkv), basisattn::error);
  }
}

TEST_CASE("prepare_mha chooses per-kv-head bases only where sharing one raises the error estimate") {
  test::seed(92);
  const index_t dm = 32, H = 4, Hkv = 2, d = 4;
  auto rms = [](const bd::any_projection<float>& p) {
    double s = 0;
    const auto& r = std::get<bd::bd_projection<float>>(p).report.heads;
    for (const auto& h : r) s += h.error_growth * h.error_growth;
    return std::sqrt(s / double(r.size()));
  };
  auto groups = [](const bd::any_projection<float>& p) { return std::get<bd::bd_projection<float>>(p).groups; };
  const auto wq = test::random_matrix<float>(dm, H * d), wo = test::random_matrix<float>(H * d, dm);
  bd::mha_config cfg{dm, H, Hkv, d};
  auto prepare = [&](const matrix<float>& wk, bd::basis_grouping g, double gain = 1.1) {
    bd::mha_options o;
    o.grouping = g;
    o.per_head_gain = gain;
    return bd::prepare_mha<float>(bd::mha_weights<float>{wq.view(), wk.view(), wk.view(), wo.view()}, cfg, o);
  };
  // Heads that live on different channels: kv head 0 on channels 0-7, head 1 on 8-15, 0.05 elsewhere.
  // No basis of 4 channels suits both, so the shared one has large coefficients.
  matrix<float> apart = test::random_matrix<float>(dm, Hkv * d, 0.05f);
  for (index_t g = 0; g < Hkv; ++g)
    for (index_t i = 8 * g; i < 8 * g + 8; ++i)
      for (index_t j = 0; j < d; ++j) apart(i, g * d + j) *= 20.0f;
  const auto shared = prepare(apart, bd::basis_grouping::shared);
  const auto each = prepare(apart, bd::basis_grouping::per_kv_head);
  const auto chosen = prepare(apart, bd::basis_grouping::automatic);
  INFO("estimated error growth (RMS over heads): shared " << rms(shared.k) << ", per kv head " << rms(each.k));
  CHECK(groups(shared.k) == 1);
  CHECK(groups(each.k) == Hkv);
  CHECK(rms(shared.k) > 1.1 * rms(each.k));
  CHECK(groups(chosen.k) == Hkv);
  CHECK(groups(chosen.v) == Hkv);
  // A gain above the measured ratio keeps the shared basis.
  CHECK(groups(prepare(apart, bd::basis_grouping::automatic, 1.01 * rms(shared.k) / rms(each.k)).k) == 1);
  // Identical kv heads: one basis is as good as two (equal estimates): shared.
  matrix<float> same(dm, Hkv * d);
  const auto one = test::random_matrix<float>(dm, d);
  for (index_t g = 0; g < Hkv; ++g)
    for (index_t i = 0; i < dm; ++i)
      for (index_t j = 0; j < d; ++j) same(i, g * d + j) = one(i, j);
  CHECK(groups(prepare(same, bd::basis_grouping::automatic).k) == 1);
  // MQA: one kv head, one basis whatever is asked.
  {
    const auto wk1 = test::random_matrix<float>(dm, d);
    bd::mha_options o;
    o.grouping = bd::basis_grouping::per_kv_head;
    const auto L = bd::prepare_mha<float>(bd::mha_weights<float>{wq.view(), wk1.view(), wk1.view(), wo.view()},
                                          bd::mha_config{dm, H, 1, d}, o);
    CHECK(groups(L.k) == 1);
  }
  test::expect_error([&] { prepare(apart, bd::basis_grouping::automatic, 0.5); }, errc::invalid_argument,
                     "per_head_gain");
  test::expect_error([&] { prepare(apart, bd::basis_grouping::automatic, NAN); }, errc::invalid_argument,
                     "per_head_gain");
}
