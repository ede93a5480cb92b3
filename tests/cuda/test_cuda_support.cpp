// CUDA support-basis attention vs the CPU backend and a double-precision oracle: support::run(ctx,
// plan, ...) against support::run(cpu{}, plan, ...) with the SAME plan (made by
// support::make_plan(cpu{}, ...) from the host copies), on fresh random inputs (the seed is printed at
// the start and on failure; BASISATTN_TEST_SEED reruns one): rows of small entries with a fraction of
// outlier rows (as tests/test_support_basis.cpp fills them), causal (end-aligned, n_q < n_kv) and
// non-causal, MHA / GQA / MQA, degree 1, 2 and 3, exact monomial and sketched features, single and
// multi-threshold, all-exact (threshold 0) and all-polynomial (threshold above every entry), head dims
// above one warp (d_v = 40), blocks that do not divide n. Device tensors have padded strides whose
// padding holds NaN (a kernel reading it would make the output non-finite); the output and the whole
// workspace are poisoned (all bytes 0xFF: NaN in fp32, fp16 and bf16) before each run, so an unwritten
// output element or a workspace buffer read before it is written shows up as non-finite, and the
// output's padding must keep its poison. [sanitize]: small cases reaching every kernel of the family
// (compute-sanitizer). [large]: 65536 (causal, fp16) and 32768 tokens (non-causal, bf16) against the
// double oracle on sampled rows.
//
// Reports. The row decisions (bad rows, approximated rows, the fallback) are floating-point
// comparisons (a polynomial denominator against FLT_MIN, an estimate against the tolerance) that two
// backends summing in other orders may legitimately take differently near the threshold. So they are
// required to agree only where the deciding quantity is further from the threshold than its rounding
// can move it (forecast_rows): the host evaluates each row's polynomial denominator dpoly_i in double
// from the plan (the same weights: Horner in s for the causal in-block keys, the feature products
// otherwise) together with W_i, the sum of the absolute values of its terms; an fp32 evaluation in any
// order is within gamma_N W_i of it (Higham eq. 3.13: every term passes through at most N roundings,
// N = n_kv + features + (g + 1)(d + 2) + 8: the key sums, the feature read-out, the feature products or
// Horner steps and the d-term score or sketch sums). A row is certainly bad when dpoly_i + gamma_N W_i <
// FLT_MIN, certainly not when dpoly_i - gamma_N W_i >= FLT_MIN and the later checks cannot fire (the
// exact part rescales the renormalised row by e^(m - m_new) >= e^-80, the output stays below 1e30),
// unsure otherwise. Rows in R and rows without a visible polynomial key are never bad (their
// denominator holds the largest weight, 1). Hence, on each backend: poly_rows + repaired_rows = |P| (P: rows
// not in R with a visible polynomial key), certain <= repaired_rows <= certain + unsure, checked_rows =
// min(check_rows, poly_rows), fallback = (estimated_error > tolerance, or poly_error >= 1 with a finite
// tolerance) when check_rows > 0. With no unsure row both backends estimate on the same rows
// A[floor((j + 1) |A| / s) - 1], from stored outputs that differ by exactly ||out_gpu,r - out_cpu,r||, and
// from exact rows ye_r each within dbl_r of the truth (dbl_r as in test_cuda_conv.cpp), so
//   |est_gpu - est_cpu| <= max_r (||out_gpu,r - out_cpu,r|| + 2 dbl_r (1 + est_cpu)) / (||ye_r|| - 2 dbl_r)
// (max and mean alike), and the fallbacks must agree unless est_cpu is within that of the tolerance.
// Heads whose fallbacks differ and unsure rows are left out of the output comparison.
//
// Bound on nerr = ||y_gpu - y_cpu||_F / ||y_cpu||_F (rows both backends approximated or both computed
// exactly): both backends evaluate the same approximation (same plan, same polynomials, same sign
// matrices) in fp32 and differ only in the order of the fp32 sums (cuBLAS GEMMs vs Eigen's, a warp-per-row
// exact part vs the CPU's blocks) and in where the feature products are rounded. On these inputs (scores
// |s| <~ 3, feature sums of a few hundred terms) that is a relative 1e-6 or so; 1e-4 leaves a factor
// ~100 and is still far below the approximation errors (>= 1e-3 when the polynomial part matters).
// 16-bit storage adds the final rounding of either side to T, which can differ by one unit in the last
// place: 2 u_T more. Outputs of exact fp32 attention (fallbacks, all rows bad) are compared with the
// double oracle within the normwise model of exact attention (cudatest::exact_attention_tolerance).
// Without a usable GPU the program exits 77 (CTest: Skipped).
#include "skip_main.hpp"

#include "cuda_harness.hpp"
#include "test_util.hpp"

#include <basisattn/attention.hpp>
#include <basisattn/attention/reference.hpp>
#include <basisattn/cpu/attention.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/support.hpp>
#include <basisattn/support.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace basisattn;

namespace {

using cudatest::code_of;
using cudatest::device_tensor;
using cudatest::host_tensor;
using cudatest::message_of;
using cudatest::nerr;
using cudatest::poison;
using cudatest::readback;
using cudatest::run_both;
using cudatest::to_d;
using cudatest::values_of;

template <class T>
double tolerance() {
  return 1e-4 + (std::is_same_v<T, float> ? 0.0 : 2 * unit_roundoff(dtype_of_v<T>));
}

/// The device copies' layout: head stride e2 + 1, token stride e1 (e2 + 1) + 3 (their padding holds NaN
/// for the inputs of a comparison, 0 for outputs, which are poisoned whole before each run).
constexpr cudatest::padding pad{1, 3};

struct problem {
  index_t n_q = 96, n_kv = 96, h_q = 2, h_kv = 2, d = 16, d_v = 8;
};

enum class data_kind { outliers, small, large, spread };

constexpr double u64 = 0x1p-53;

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::abs(e));
  return m == 0 ? 1 : m;
}

// ---- the double oracle ------------------------------------------------------------------------------

/// Largest move of a weighted mean whose weights' logits are each off by <= lam (the header of
/// tests/test_support_basis.cpp: eps / (1 - eps) max_j ||v_j - y|| with eps = expm1(lam)).
double wsb(double lam, double vdev) {
  const double e = std::expm1(lam);
  return e < 1 ? e / (1 - e) * vdev : INFINITY;
}

/// Exact output row i of query head h in double from the stored q, k, v ([n, H, d] layouts), and the
/// quantities of the error model: kappa' = max_j scale sum_e |q_e k_je|, the largest |s_j|, max_j
/// ||v_j - y|| over the visible keys, A = sum_j p_j c_j (||v_j|| + ||y||) with c_j the condition of the
/// weight's fp32 evaluation (1 for an exact pair; sum_t |a_t| kappa_ij^t / e^(s_ij) for a polynomial
/// pair, a_t its monomial coefficients: the sum of |terms| of sum_t a_t (sq . k)^t over the true
/// weight), and whether a polynomial pair is visible.
struct srow {
  std::vector<double> y;
  double ynorm = 0, kappa = 0, smax = 0, vdev = 0, A = 0;
  bool poly = false;
};

srow support_row(const support::plan& pl, const std::vector<double>& q, const std::vector<double>& k,
                 const std::vector<double>& v, index_t dv, index_t h, index_t i) {
  const auto& sh = pl.shape;
  const index_t hk = h / sh.group, d = sh.d_qk, L = pl.levels;
  const index_t vis = pl.options.causal ? std::min(sh.n_kv, i + sh.causal_offset + 1) : sh.n_kv;
  const int bq = pl.q_bucket[std::size_t(h)][std::size_t(i)];
  std::vector<double> s(static_cast<std::size_t>(vis)), kap(s.size()), w(s.size());
  const double* qi = &q[std::size_t((i * sh.h_q + h) * d)];
  srow o;
  o.y.assign(static_cast<std::size_t>(dv), 0.0);
  double m = -INFINITY;
  for (index_t j = 0; j < vis; ++j) {
    const double* kj = &k[std::size_t((j * sh.h_kv + hk) * d)];
    double dot = 0, ab = 0;
    for (index_t e = 0; e < d; ++e) {
      dot += qi[e] * kj[e];
      ab += std::abs(qi[e] * kj[e]);
    }
    s[std::size_t(j)] = sh.scale * dot;
    kap[std::size_t(j)] = sh.scale * ab;
    o.kappa = std::max(o.kappa, kap[std::size_t(j)]);
    o.smax = std::max(o.smax, std::abs(s[std::size_t(j)]));
    m = std::max(m, s[std::size_t(j)]);
  }
  double den = 0;
  for (index_t j = 0; j < vis; ++j) {
    w[std::size_t(j)] = std::exp(s[std::size_t(j)] - m);
    den += w[std::size_t(j)];
    const double* vj = &v[std::size_t((j * sh.h_kv + hk) * dv)];
    for (index_t c = 0; c < dv; ++c) o.y[std::size_t(c)] += w[std::size_t(j)] * vj[c];
  }
  for (auto& e : o.y) e /= den;
  for (double e : o.y) o.ynorm += e * e;
  o.ynorm = std::sqrt(o.ynorm);
  for (index_t j = 0; j < vis; ++j) {
    const double* vj = &v[std::size_t((j * sh.h_kv + hk) * dv)];
    double dd = 0, vn = 0;
    for (index_t c = 0; c < dv; ++c) {
      dd += (vj[c] - o.y[std::size_t(c)]) * (vj[c] - o.y[std::size_t(c)]);
      vn += vj[c] * vj[c];
    }
    o.vdev = std::max(o.vdev, std::sqrt(dd));
    double cj = 1;
    const int bk = pl.k_bucket[std::size_t(hk)][std::size_t(j)];
    if (bq < L && bk < L) {
      o.poly = true;
      double t = 0, pw = 1;
      for (double a : pl.pairs[std::size_t(h)][std::size_t(bq * L + bk)].poly.coef) {
        t += std::abs(a) * pw;
        pw *= kap[std::size_t(j)];
      }
      cj = t / std::exp(s[std::size_t(j)]);
    }
    o.A += w[std::size_t(j)] / den * cj * (std::sqrt(vn) + o.ynorm);
  }
  return o;
}

/// How far an exact row computed in double (by a backend's estimate or by the oracle) can be from the
/// truth: the logit of each weight is off by <= (gamma_d + 3 u) kappa' + u (the dot product, its scale,
/// the shift, exp), and the two sums of <= n terms add (2 gamma_n + u) max|v| per entry.
double dbl_slack(const srow& r, index_t n, index_t d, index_t dv, double vmax) {
  return wsb((test::gamma<double>(d) + 3 * u64) * r.kappa + u64, r.vdev) +
         std::sqrt(double(dv)) * (2 * test::gamma<double>(n) + u64) * vmax;
}

// ---- the row decisions (header comment) -------------------------------------------------------------

struct row_forecast {
  std::vector<index_t> P;          ///< rows not in R with a visible polynomial key, ascending
  std::vector<signed char> state;  ///< per row of P: 0 certainly approximated, 1 certainly bad, 2 unsure
  index_t bad = 0, unsure = 0;
  /// The approximated rows when no row is unsure, and the estimate's rows among them.
  std::vector<index_t> approximated() const {
    std::vector<index_t> a;
    for (std::size_t i = 0; i < P.size(); ++i)
      if (state[i] == 0) a.push_back(P[i]);
    return a;
  }
};

std::vector<index_t> estimate_rows(const std::vector<index_t>& A, std::int64_t check_rows) {
  std::vector<index_t> r;
  const index_t na = static_cast<index_t>(A.size()), s = std::min<index_t>(static_cast<index_t>(check_rows), na);
  for (index_t j = 0; j < s; ++j) r.push_back(A[std::size_t((j + 1) * na / s - 1)]);
  return r;
}

/// The polynomial denominator of every row of head h in double, with its fp32 rounding bound; see the
/// header comment. q, k: stored values ([n, H, d]); vmax: max |v| of the head's kv head.
row_forecast forecast_rows(const support::plan& pl, const std::vector<double>& q, const std::vector<double>& k,
                           double vmax, index_t h) {
  namespace sd = support::detail;
  const auto& sh = pl.shape;
  const support::feature_map& fm = pl.features;
  const index_t hk = h / sh.group, d = sh.d_qk, L = pl.levels, nq = sh.n_q, nk = sh.n_kv;
  const int g = fm.max_degree;
  row_forecast f;
  if (g == 0) {  // no polynomial part: every row exact
    return f;
  }
  const index_t width = fm.features(g);
  const index_t blk = std::min<index_t>(static_cast<index_t>(pl.options.block), std::max(nq, nk));
  // Features of the scaled queries and of the keys in double (sketched degrees only need them).
  sd::cm_matrix<double> X(nq, d), Y(nk, d), PX, PY;
  for (index_t i = 0; i < nq; ++i)
    for (index_t e = 0; e < d; ++e) X(i, e) = sh.scale * q[std::size_t((i * sh.h_q + h) * d + e)];
  for (index_t j = 0; j < nk; ++j)
    for (index_t e = 0; e < d; ++e) Y(j, e) = k[std::size_t((j * sh.h_kv + hk) * d + e)];
  if (fm.sketch) {
    PX.resize(nq, width);
    PY.resize(nk, width);
    std::vector<double> tmp(static_cast<std::size_t>(std::max(nq, nk) * std::max<index_t>(fm.m, 1)));
    sd::compute_features<double>(fm, width, sd::cm_map<double>(X.data(), nq, d),
                                 sd::cm_map<double>(PX.data(), nq, width), tmp.data());
    sd::compute_features<double>(fm, width, sd::cm_map<double>(Y.data(), nk, d),
                                 sd::cm_map<double>(PY.data(), nk, width), tmp.data());
  }
  const double N = double(nk + width + (g + 1) * (d + 2) + 8);
  const double gammaN = N * test::u<float>() / (1 - N * test::u<float>());
  const auto& kb = pl.k_bucket[std::size_t(hk)];
  const auto& pre = pl.k_poly_prefix[std::size_t(hk)];
  std::vector<double> Ft(static_cast<std::size_t>(g + 1)), At(Ft.size());
  for (index_t i = 0; i < nq; ++i) {
    const int bq = pl.q_bucket[std::size_t(h)][std::size_t(i)];
    if (bq >= L) continue;  // in R
    const index_t vis = pl.options.causal ? std::min(nk, i + sh.causal_offset + 1) : nk;
    if (pre[std::size_t(vis)] == 0) continue;                                        // no visible polynomial key
    const index_t k0 = pl.options.causal ? (i + sh.causal_offset) / blk * blk : nk;  // the causal in-block keys
    double dp = 0, W = 0, maxC = -INFINITY, x1 = 0;
    for (index_t e = 0; e < d; ++e) x1 += std::abs(X(i, e));
    for (index_t j = 0; j < vis; ++j) {
      double s = 0, kap = 0, y1 = 0;
      for (index_t e = 0; e < d; ++e) {
        s += X(i, e) * Y(j, e);
        kap += std::abs(X(i, e) * Y(j, e));
        y1 += std::abs(Y(j, e));
      }
      const int b = kb[std::size_t(j)];
      if (b >= L) {
        maxC = std::max(maxC, s);
        continue;
      }
      const bool horner = j >= k0 || !fm.sketch;  // exact powers of s (Horner, or exact monomials)
      Ft[0] = At[0] = 1;
      for (int t = 1; t <= g; ++t) {
        if (horner || t == 1) {
          Ft[std::size_t(t)] = Ft[std::size_t(t - 1)] * s;
          At[std::size_t(t)] = At[std::size_t(t - 1)] * kap;
        } else {
          double dot = 0;
          for (index_t c = fm.offset[std::size_t(t)]; c < fm.offset[std::size_t(t + 1)]; ++c)
            dot += PX(i, c) * PY(j, c);
          Ft[std::size_t(t)] = dot;
          At[std::size_t(t)] = std::pow(x1 * y1, t);
        }
      }
      const auto& coef = pl.pairs[std::size_t(h)][std::size_t(bq * L + b)].coef;  // e^(-M_bq) included
      for (int t = 0; t <= g && std::size_t(t) < coef.size(); ++t) {
        dp += coef[std::size_t(t)] * Ft[std::size_t(t)];
        W += std::abs(coef[std::size_t(t)]) * At[std::size_t(t)];
      }
    }
    const double err = gammaN * W, lo = dp - err, M = pl.shift[std::size_t(h)][std::size_t(bq)];
    signed char st = 2;
    if (dp + err < FLT_MIN)
      st = 1;
    else if (lo >= FLT_MIN && (maxC == -INFINITY || maxC - (M + std::log(lo)) <= 80) && (W + err) * vmax / lo < 1e30)
      st = 0;
    f.P.push_back(i);
    f.state.push_back(st);
    f.bad += st == 1;
    f.unsure += st == 2;
  }
  return f;
}

/// kappa' of exact attention on the stored values of query head h: max over the visible pairs of scale
/// sum_e |q_e k_e| (the tolerance of cudatest::exact_attention_tolerance).
double kappa_of(const support::plan& pl, const std::vector<double>& q, const std::vector<double>& k, index_t h) {
  const auto& sh = pl.shape;
  const index_t hk = h / sh.group, d = sh.d_qk;
  double m = 0;
  for (index_t i = 0; i < sh.n_q; ++i) {
    const index_t vis = pl.options.causal ? std::min(sh.n_kv, i + sh.causal_offset + 1) : sh.n_kv;
    for (index_t j = 0; j < vis; ++j) {
      double ab = 0;
      for (index_t e = 0; e < d; ++e)
        ab += std::abs(q[std::size_t((i * sh.h_q + h) * d + e)] * k[std::size_t((j * sh.h_kv + hk) * d + e)]);
      m = std::max(m, sh.scale * ab);
    }
  }
  return m;
}

/// Exact attention outputs of every head against the double oracle, normwise per head, within the
/// exact-attention model (cuda_kernel: the GPU's fp32 kernel, else the CPU's); heads where `which`
/// is false are skipped.
template <class T>
void check_exact_heads(const support::plan& pl, const host_tensor<T>& q, const host_tensor<T>& k,
                       const host_tensor<T>& v, const host_tensor<T>& out, const std::vector<bool>& which,
                       bool cuda_kernel, const char* what) {
  host_tensor<double> ref(out.e0, out.e1, out.e2);
  attention_options ao;
  ao.causal = pl.options.causal;
  ao.scale = pl.shape.scale;
  attention_reference<T, double>(q.cview(), k.cview(), v.cview(), ref.view(), ao);
  const std::vector<double> qd = values_of(q), kd = values_of(k);
  for (index_t h = 0; h < out.e1; ++h) {
    if (!which[std::size_t(h)]) continue;
    double e2 = 0, y2 = 0;
    for (index_t i = 0; i < out.e0; ++i)
      for (index_t c = 0; c < out.e2; ++c) {
        const double a = to_d(out.at(i, h, c)), b = ref.at(i, h, c);
        e2 += (a - b) * (a - b);
        y2 += b * b;
      }
    const double err = std::sqrt(e2 / y2),
                 tol = cudatest::exact_attention_tolerance(test::u<T>(), kappa_of(pl, qd, kd, h), pl.shape.d_qk,
                                                           pl.shape.n_kv, cuda_kernel);
    INFO(what << ", head " << h << ": exact attention against the oracle, error " << err << " (bound " << tol << ")");
    CHECK(err <= tol);
  }
}

/// One backend's report against its own stored outputs: estimated_error / mean_estimated_error lie within what
/// the rows' errors against the oracle allow (each backend's exact rows are within dbl_r of ours).
struct est_range {
  double max_lo = 0, max_hi = 0, mean_lo = 0, mean_hi = 0;
};
template <class T>
est_range own_estimate(const support::plan& pl, const std::vector<double>& qd, const std::vector<double>& kd,
                       const std::vector<double>& vd, const host_tensor<T>& out, index_t h,
                       const std::vector<index_t>& rows, double vmax) {
  est_range r;
  const index_t dv = out.e2;
  for (index_t i : rows) {
    const srow ye = support_row(pl, qd, kd, vd, dv, h, i);
    const double dbl = dbl_slack(ye, pl.shape.n_kv, pl.shape.d_qk, dv, vmax);
    double e2 = 0;
    for (index_t c = 0; c < dv; ++c) {
      const double x = to_d(out.at(i, h, c)) - ye.y[std::size_t(c)];
      e2 += x * x;
    }
    const double e = std::sqrt(e2);
    const double lo = std::max(0.0, e - dbl) / (ye.ynorm + dbl), hi = (e + dbl) / std::max(ye.ynorm - dbl, 1e-300);
    r.max_lo = std::max(r.max_lo, lo);
    r.max_hi = std::max(r.max_hi, hi);
    r.mean_lo += lo / double(rows.size());
    r.mean_hi += hi / double(rows.size());
  }
  return r;
}

/// support::run of `plan` on the CPU backend (q, k, v into want) and on the CUDA backend (their device
/// copies dq, dk, dv into dout, poisoned first, then downloaded into got): cudatest::run_both.
template <class T>
auto run_plan_both(const cuda_context& ctx, const support::plan& plan, const host_tensor<T>& q, const host_tensor<T>& k,
                   const host_tensor<T>& v, host_tensor<T>& want, const device_tensor<T>& dq,
                   const device_tensor<T>& dk, const device_tensor<T>& dv, device_tensor<T>& dout,
                   host_tensor<T>& got) {
  return run_both(
      ctx, [&](tensor3_view<T> out) { return support::run(cpu{}, plan, q.cview(), k.cview(), v.cview(), out).heads; },
      want,
      [&](tensor3_view<T> out) { return support::run<T>(ctx, plan, dq.cview(), dk.cview(), dv.cview(), out).heads; },
      dout, got);
}

/// Fill, plan on the host, run on both backends, compare (see the header comment).
template <class T>
void compare_backends(const cuda_context& ctx, const problem& pr, const support::options& o, data_kind kind,
                      std::mt19937_64& g, const std::string& what) {
  INFO(what << " | dtype " << to_string(dtype_of_v<T>) << ", n_q " << pr.n_q << ", n_kv " << pr.n_kv << ", heads "
            << pr.h_q << "/" << pr.h_kv << ", d " << pr.d << ", d_v " << pr.d_v << ", causal " << o.causal);
  host_tensor<T> q(pr.n_q, pr.h_q, pr.d), k(pr.n_kv, pr.h_kv, pr.d), v(pr.n_kv, pr.h_kv, pr.d_v);
  switch (kind) {
    case data_kind::outliers:
      q.fill(g, 0.1, 0.15, 20);  // 15% of rows with entries ~2
      k.fill(g, 0.1, 0.15, 20);
      break;
    case data_kind::small:
      q.fill(g, 0.3);
      k.fill(g, 0.3);
      break;
    case data_kind::large:
      q.fill(g, 1.0);
      k.fill(g, 1.0);
      break;
    case data_kind::spread:
      q.fill_spread(g);
      k.fill_spread(g);
      break;
  }
  v.fill(g, 1.0);
  const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
  host_tensor<T> want(pr.n_q, pr.h_q, pr.d_v), got(pr.n_q, pr.h_q, pr.d_v);
  const std::vector<support::head_report> cpu_rep =
      support::run(cpu{}, plan, q.cview(), k.cview(), v.cview(), want.view()).heads;
  const std::vector<double> qd = values_of(q), kd = values_of(k), vd = values_of(v);
  std::vector<double> vmax(static_cast<std::size_t>(pr.h_kv), 0.0);
  for (index_t j = 0; j < pr.n_kv; ++j)
    for (index_t h = 0; h < pr.h_kv; ++h)
      for (index_t c = 0; c < pr.d_v; ++c)
        vmax[std::size_t(h)] = std::max(vmax[std::size_t(h)], std::abs(to_d(v.at(j, h, c))));
  std::vector<row_forecast> fc;
  for (index_t h = 0; h < pr.h_q; ++h)
    fc.push_back(forecast_rows(plan, qd, kd, vmax[std::size_t(h / (pr.h_q / pr.h_kv))], h));

  const double nan = std::numeric_limits<double>::quiet_NaN();
  const device_tensor<T> dq(ctx, q, pad, nan), dk(ctx, k, pad, nan), dv(ctx, v, pad, nan);
  device_tensor<T> dout(ctx, want, pad, 0.0);
  device_buffer<unsigned char> ws(static_cast<index_t>(support::workspace_bytes(ctx, plan, pr.d_v)));
  // Run 0 on the host plan; runs 1 and 2 on the uploaded plan (tables in device memory, a workspace
  // without them), each on a dirty (re-poisoned) workspace.
  const support::device_plan dplan = support::upload(ctx, plan);
  const std::size_t dws_bytes = support::workspace_bytes(ctx, dplan, pr.d_v);
  CHECK(dws_bytes < ws.bytes());
  CHECK(dws_bytes + dplan.bytes() >= ws.bytes() - basisattn::detail::cuda_workspace_align);
  const double tol = o.tolerance;
  for (int run = 0; run < 3; ++run) {
    dout.poison(ctx);
    poison(ctx, ws);
    std::vector<support::head_report> gpu_rep(static_cast<std::size_t>(pr.h_q));
    if (run == 0)
      support::run<T>(ctx, plan, dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), ws.bytes(),
                      gpu_rep.data());
    else
      support::run<T>(ctx, dplan, dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), dws_bytes,
                      gpu_rep.data());
    ctx.synchronize();
    const readback rb = dout.download(ctx, got);
    CHECK(rb.non_finite == 0);
    CHECK(rb.padding_touched == 0);
    std::vector<bool> compare_head(static_cast<std::size_t>(pr.h_q), true), exact_gpu(compare_head.size(), false),
        exact_cpu(compare_head.size(), false);
    for (index_t h = 0; h < pr.h_q; ++h) {
      const auto& a = gpu_rep[static_cast<std::size_t>(h)];
      const auto& b = cpu_rep[static_cast<std::size_t>(h)];
      const row_forecast& f = fc[std::size_t(h)];
      const double vm = vmax[std::size_t(h / (pr.h_q / pr.h_kv))];
      INFO("run " << run << ", head " << h << ": estimated_error gpu " << a.estimated_error << " cpu "
                  << b.estimated_error << ", bad rows gpu " << a.repaired_rows << " cpu " << b.repaired_rows
                  << " (forecast " << f.bad << " + " << f.unsure << " unsure of " << f.P.size() << "), poly rows gpu "
                  << a.poly_rows << " cpu " << b.poly_rows << ", fallback gpu " << a.fell_back << " cpu "
                  << b.fell_back);
      CHECK(a.degree == b.degree);  // make_plan's part is copied from the plan
      CHECK(a.features == b.features);
      CHECK(a.query_support == b.query_support);
      for (const support::head_report* x : {&a, &b}) {
        CHECK(x->poly_rows + x->repaired_rows == static_cast<std::int64_t>(f.P.size()));
        CHECK(x->repaired_rows >= f.bad);
        CHECK(x->repaired_rows <= f.bad + f.unsure);
        CHECK(x->checked_rows == std::min<std::int64_t>(o.check_rows, x->poly_rows));
        const bool no_guarantee = x->poly_error >= 1 && std::isfinite(tol);
        CHECK(x->fell_back == (o.check_rows > 0 && (x->estimated_error > tol || no_guarantee)));
      }
      if (f.unsure > 0) {  // the row sets may differ: no row-by-row comparison for this head
        compare_head[std::size_t(h)] = false;
        continue;
      }
      // Same rows on both: each report against its own outputs, then against each other.
      const std::vector<index_t> rows = estimate_rows(f.approximated(), o.check_rows);
      if (o.check_rows > 0 && !rows.empty()) {
        const est_range ra = own_estimate(plan, qd, kd, vd, got, h, rows, vm),
                        rb = own_estimate(plan, qd, kd, vd, want, h, rows, vm);
        INFO("gpu estimate within [" << ra.max_lo << ", " << ra.max_hi << "], cpu within [" << rb.max_lo << ", "
                                     << rb.max_hi << "]");
        CHECK(a.estimated_error >= ra.max_lo);
        CHECK(a.estimated_error <= ra.max_hi);
        CHECK(a.mean_estimated_error >= ra.mean_lo);
        CHECK(a.mean_estimated_error <= ra.mean_hi);
        CHECK(b.estimated_error >= rb.max_lo);
        CHECK(b.estimated_error <= rb.max_hi);
        CHECK(b.mean_estimated_error >= rb.mean_lo);
        CHECK(b.mean_estimated_error <= rb.mean_hi);
        // Each fallback follows its own estimate (checked above); they must agree where both estimates
        // are certainly on the same side of the tolerance (poly_error is the plan's: the same on both).
        if ((ra.max_lo > tol && rb.max_lo > tol) || (ra.max_hi <= tol && rb.max_hi <= tol))
          CHECK(a.fell_back == b.fell_back);
      } else {
        CHECK(a.estimated_error == 0);
        CHECK(b.estimated_error == 0);
        CHECK(a.fell_back == b.fell_back);
      }
      // A head that fell back is exact attention: against the oracle, not the other backend.
      if (a.fell_back || b.fell_back) compare_head[std::size_t(h)] = false;
      exact_gpu[std::size_t(h)] = a.fell_back;
      exact_cpu[std::size_t(h)] = b.fell_back;
    }
    // Outputs of the heads and rows both backends treated alike.
    double num = 0, den = 0;
    for (index_t h = 0; h < pr.h_q; ++h) {
      if (!compare_head[std::size_t(h)]) continue;
      for (index_t i = 0; i < pr.n_q; ++i)
        for (index_t c = 0; c < pr.d_v; ++c) {
          const double x = to_d(got.at(i, h, c)), y = to_d(want.at(i, h, c));
          num += (x - y) * (x - y);
          den += y * y;
        }
    }
    if (den > 0) {
      const double e = std::sqrt(num / den);
      INFO("run " << run << ": nerr " << e << " (bound " << tolerance<T>() << ")");
      CHECK(e <= tolerance<T>());
    }
    check_exact_heads(plan, q, k, v, got, exact_gpu, true, "gpu fallback");
    check_exact_heads(plan, q, k, v, want, exact_cpu, false, "cpu fallback");
  }
}

template <class T>
void suite() {
  const std::uint64_t seed = cudatest::test_seed((std::string("support suite ") + to_string(dtype_of_v<T>)).c_str());
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;

  // Mixed supports (outlier rows), degree 2 and 1, causal and not, GQA and MQA, end-aligned n_q < n_kv.
  struct cfg {
    problem pr;
    bool causal;
    int degree;
    std::int64_t block;
  };
  const cfg mixed[] = {
      {{96, 96, 2, 2, 16, 8}, true, 2, 32},   {{96, 96, 2, 2, 16, 8}, false, 2, 32},
      {{70, 130, 4, 2, 16, 8}, true, 1, 32},  {{64, 100, 4, 1, 16, 40}, false, 2, 24},
      {{100, 100, 4, 1, 16, 8}, true, 2, 48}, {{50, 77, 2, 1, 48, 40}, true, 2, 16},
  };
  for (const cfg& c : mixed) {
    support::options o;
    o.causal = c.causal;
    o.threshold = 0.5;
    o.max_degree = c.degree;
    o.target_error = 1e-14;  // the maximal degree
    o.tolerance = INFINITY;
    o.block = c.block;
    compare_backends<T>(ctx, c.pr, o, data_kind::outliers, g, "mixed supports, degree " + std::to_string(c.degree));
  }

  // Polynomial part alone (nothing in the supports), both masks, degrees 1 and 2.
  for (const bool causal : {false, true})
    for (const int degree : {1, 2}) {
      support::options o;
      o.causal = causal;
      o.threshold = 100;
      o.max_degree = degree;
      o.target_error = 1e-14;
      o.tolerance = INFINITY;
      o.block = 40;
      compare_backends<T>(ctx, problem{}, o, data_kind::small, g, "polynomial only, degree " + std::to_string(degree));
    }

  // Everything exact (threshold 0: degree 0, no polynomial part).
  for (const bool causal : {false, true}) {
    support::options o;
    o.causal = causal;
    o.threshold = 0;
    compare_backends<T>(ctx, problem{70, 90, 3, 1, 16, 8}, o, data_kind::large, g, "all exact");
  }

  // Sketched features: degree 2 (one GEMM and one product per degree) and 3, causal and not.
  for (const bool causal : {false, true})
    for (const int degree : {2, 3}) {
      support::options o;
      o.causal = causal;
      o.threshold = 0.5;
      o.max_degree = degree;
      o.target_error = 1e-14;
      o.tolerance = INFINITY;
      o.sketch = true;
      o.sketch_size = 32;
      o.seed = 7;
      o.block = 48;
      compare_backends<T>(ctx, problem{128, 128, 2, 2, 16, 8}, o, data_kind::outliers, g,
                          "sketched, degree " + std::to_string(degree));
    }

  // Multi-threshold: six levels over two decades of row scales, causal; and three levels non-causal GQA.
  {
    support::options o;
    o.causal = true;
    o.max_degree = 2;
    o.target_error = 1e-14;
    o.tolerance = INFINITY;
    o.block = 32;
    o.levels = {0.02, 0.05, 0.1, 0.3, 0.6, 1.2};
    compare_backends<T>(ctx, problem{128, 128, 2, 2, 16, 8}, o, data_kind::spread, g, "six levels");
    o.causal = false;
    o.levels = {0.05, 0.3, 0.6};
    compare_backends<T>(ctx, problem{80, 112, 4, 2, 16, 8}, o, data_kind::spread, g, "three levels, GQA");
  }

  // Default options (automatic degree, error estimate on 16 rows, fallback tolerance 1e-2).
  compare_backends<T>(ctx, problem{}, support::options{}, data_kind::outliers, g, "default options");
}

/// Small cases for compute-sanitizer reaching every kernel of <basisattn/cuda/kernels/support.cuh>: the
/// head load and the v scan, features (monomials; sketches with their products), states, the causal
/// in-block products, the exact part in all three modes (rows after the polynomial part, recomputed
/// bad rows, the fallback), detection, the output check, compaction, the double estimate and its summary.
void sanitize_suite() {
  const std::uint64_t seed = cudatest::test_seed("support [sanitize]");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  {
    support::options o;
    o.threshold = 0.5;
    o.max_degree = 2;
    o.target_error = 1e-14;
    o.tolerance = INFINITY;
    o.block = 32;
    compare_backends<float>(ctx, problem{70, 100, 4, 2, 16, 40}, o, data_kind::outliers, g, "causal, mixed, GQA");
    o.causal = false;
    o.sketch = true;
    o.sketch_size = 16;
    o.max_degree = 3;
    o.block = 24;
    compare_backends<Eigen::half>(ctx, problem{64, 64, 2, 1, 16, 8}, o, data_kind::outliers, g, "non-causal, sketched");
    o.causal = true;
    o.sketch = false;
    o.max_degree = 2;
    o.levels = {0.05, 0.3, 0.6};
    compare_backends<float>(ctx, problem{64, 64, 2, 2, 16, 8}, o, data_kind::spread, g, "three levels");
  }
  {
    // Bad rows (negative polynomial denominators, the data of the test below) and the exact fallback.
    const index_t n = 40, dv = 3;
    std::normal_distribution<double> nd(0, 1);
    host_tensor<float> q(n, 1, 1), k(n, 1, 1), v(n, 1, dv), got(n, 1, dv);
    for (index_t i = 0; i < n; ++i) {
      q.at(i, 0, 0) = i % 3 != 0 ? -1.0f : 1.0f;
      k.at(i, 0, 0) = 1.0f;
      for (index_t e = 0; e < dv; ++e) v.at(i, 0, e) = static_cast<float>(nd(g));
    }
    support::options o;
    o.scale = 5;
    o.threshold = 2;
    o.max_degree = 1;
    o.block = 16;
    for (const double tol : {double(INFINITY), 0.0}) {
      o.tolerance = tol;
      const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
      const double nan = std::numeric_limits<double>::quiet_NaN();
      const device_tensor<float> dq(ctx, q, pad, nan), dk(ctx, k, pad, nan), dvv(ctx, v, pad, nan);
      device_tensor<float> dout(ctx, got, pad, 0.0);
      dout.poison(ctx);
      const auto rep = support::run<float>(ctx, plan, dq.cview(), dk.cview(), dvv.cview(), dout.view());
      const readback rb = dout.download(ctx, got);
      CHECK(rb.non_finite == 0);
      CHECK(rb.padding_touched == 0);
      CHECK(rep.heads[0].repaired_rows > 0);
      CHECK(rep.heads[0].fell_back == (tol == 0.0));  // poly_error >= 1 here: a finite tolerance always falls back
      CHECK(rep.fallbacks == (tol == 0.0 ? 1 : 0));
    }
  }
}

/// [large]: n tokens (65536 causal in fp16, 32768 non-causal in bf16), 8 query heads on 4 kv heads,
/// d = 16, d_v = 64 (causal) or 128: v has 16.8M elements, so its NaN/Inf scan runs on 65536 blocks
/// (> 65535). q and k entries N(0, 0.1^2), 1% of the rows ten times larger (R and C: the exact part
/// runs); threshold 0.5, degree 3 (the plan's polynomial meets 1e-6 on [-B, B], B ~ 0.1, or stops at
/// 3), 969 exact monomial features, blocks of 256 rows. Host cost (16 cores): the data (~30M normal
/// draws, ~1 s), the plan (O(n d) per head), the oracle on ~64 sampled rows per head at O(n (d + d_v))
/// each (~5 GFLOP in all, parallel over rows): a few seconds, printed.
/// Checks: every output finite, padding untouched; repaired_rows = 0, poly_rows = |P|, checked_rows = 16
/// (derived below from the plan's bounds: every polynomial denominator is far above FLT_MIN); the run's
/// estimate against its own outputs (as in compare_backends); and per sampled row
///   ||out_r - y_r|| <= G_r + u_T ||y_r|| + sqrt(d_v) eta_T + 2 u_32 (sqrt(n + r) + g + sqrt(d) kappa'_r
///                      + 2 max|s| + 8) A_r,
/// G_r = eps / (1 - eps) max_j ||v_j - y_r|| the method's guarantee (eps = 1.001 poly_error: the plan's
/// fit error on a 2001-point grid, which may miss the maximum by 1e-3 relative; 0 for rows without a
/// polynomial pair), and the rest the fp32 evaluation in the root-mean-square model of
/// tests/test_attention.cpp: every term of the weighted sums (weight c_j p_j relative to its exact
/// weight, times ||v_j|| + ||y||: A_r) carries a relative error growing like sqrt(n + r) (the key sums
/// and the r-feature read-out), g (feature products), sqrt(d) kappa' (scores), 2 max|s| (shifts), 8
/// (fixed roundings, expf's 2 ulp counted twice); the factor 2 because this is one row's l2 norm over
/// d_v channels, not a norm over many rows (a chi variable with d_v >= 64 degrees of freedom stays
/// below twice its rms with overwhelming probability).
template <class T>
void support_large(bool causal) {
  const std::uint64_t seed = cudatest::test_seed(causal ? "support [large] causal" : "support [large] non-causal");
  INFO("seed " << seed);
  auto since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  const auto t0 = std::chrono::steady_clock::now();
  cuda_context ctx;
  const index_t n = causal ? 65536 : 32768, hq = 8, hkv = 4, d = 16, dv = causal ? 64 : 128;
  std::mt19937_64 g(seed);
  host_tensor<T> q(n, hq, d), k(n, hkv, d), v(n, hkv, dv), got(n, hq, dv);
  q.fill(g, 0.1, 0.01, 10);
  k.fill(g, 0.1, 0.01, 10);
  v.fill(g, 1.0);
  const double t_data = since(t0);
  support::options o;
  o.causal = causal;
  o.threshold = 0.5;
  o.max_degree = 3;
  o.target_error = 1e-6;
  o.tolerance = INFINITY;
  o.check_rows = 16;
  o.block = 256;
  const auto t1 = std::chrono::steady_clock::now();
  const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
  const double t_plan = since(t1);
  const std::vector<double> qd = values_of(q), kd = values_of(k), vd = values_of(v);

  // repaired_rows = 0, derived: a row with a visible polynomial key has dpoly >= (1 - eps) e^(s - M) >= (1 - eps)
  // e^(-2B) (|s| <= B, M = B with one level); its fp32 evaluation is within gamma_N W of it, W <= cmax dpoly,
  // cmax = (sum_t |a_t| B^t) e^B / (1 - eps) (the pair's polynomial); the exact part then rescales the
  // renormalised row by e^(m - m_new) >= e^-(smax + 2B - log((1 - eps) / 2)), smax = scale max||q|| max||k||
  // bounding every score. With gamma_N cmax < 1/2 and that exponent below 80, every denominator is a
  // normal number and no row is bad; then A = P (rows not in R with a visible polynomial key).
  double qmax = 0, kmax = 0;
  for (index_t r = 0; r < n * hq; ++r) {
    double s2 = 0;
    for (index_t e = 0; e < d; ++e) s2 += qd[std::size_t(r * d + e)] * qd[std::size_t(r * d + e)];
    qmax = std::max(qmax, std::sqrt(s2));
  }
  for (index_t r = 0; r < n * hkv; ++r) {
    double s2 = 0;
    for (index_t e = 0; e < d; ++e) s2 += kd[std::size_t(r * d + e)] * kd[std::size_t(r * d + e)];
    kmax = std::max(kmax, std::sqrt(s2));
  }
  const double smax = plan.shape.scale * qmax * kmax;
  for (index_t h = 0; h < hq; ++h) {
    const support::head_report& pr = plan.report[std::size_t(h)];
    INFO("head " << h << ": degree " << pr.degree << ", B " << pr.bound << ", poly_error " << pr.poly_error << ", R "
                 << pr.query_support << ", C " << pr.key_support << ", smax " << smax);
    REQUIRE(plan.levels == 1);
    REQUIRE(pr.degree >= 1);
    REQUIRE(pr.poly_error < 1e-3);
    const double B = pr.bound, eps = 1.001 * pr.poly_error;
    double csum = 0, pw = 1;
    for (double a : plan.pairs[std::size_t(h)][0].poly.coef) {
      csum += std::abs(a) * pw;
      pw *= B;
    }
    const double cmax = csum * std::exp(B) / (1 - eps);
    const double N = double(n + plan.head_width[std::size_t(h)] + (pr.degree + 1) * (d + 2) + 8);
    REQUIRE(N * test::u<float>() / (1 - N * test::u<float>()) * cmax < 0.5);
    REQUIRE(smax + 2 * B - std::log(0.5 * (1 - eps)) < 80);
  }

  const double nan = std::numeric_limits<double>::quiet_NaN();
  const device_tensor<T> dq(ctx, q, pad, nan), dk(ctx, k, pad, nan), dvv(ctx, v, pad, nan);
  device_tensor<T> dout(ctx, got, pad, 0.0);
  device_buffer<unsigned char> ws(static_cast<index_t>(support::workspace_bytes(ctx, plan, dv)));
  dout.poison(ctx);
  poison(ctx, ws);
  std::vector<support::head_report> rep(static_cast<std::size_t>(hq));
  const auto t2 = std::chrono::steady_clock::now();
  support::run<T>(ctx, plan, dq.cview(), dk.cview(), dvv.cview(), dout.view(), ws.data(), ws.bytes(), rep.data());
  ctx.synchronize();
  const double t_gpu = since(t2);
  const readback rb = dout.download(ctx, got);
  CHECK(rb.non_finite == 0);
  CHECK(rb.padding_touched == 0);

  // P per head, the run's estimate rows, and the sample: those, the first and last rows, evenly spread ones.
  std::vector<std::vector<index_t>> est_rows(static_cast<std::size_t>(hq));
  std::vector<std::pair<index_t, index_t>> work;
  std::vector<std::int64_t> P(static_cast<std::size_t>(hq), 0);
  for (index_t h = 0; h < hq; ++h) {
    const auto& qb = plan.q_bucket[std::size_t(h)];
    const auto& pre = plan.k_poly_prefix[std::size_t(h / (hq / hkv))];
    std::vector<index_t> A;
    for (index_t i = 0; i < n; ++i) {
      const index_t vis = causal ? i + 1 : n;
      if (qb[std::size_t(i)] < plan.levels && pre[std::size_t(vis)] > 0) A.push_back(i);
    }
    P[std::size_t(h)] = static_cast<std::int64_t>(A.size());
    est_rows[std::size_t(h)] = estimate_rows(A, o.check_rows);
    std::vector<index_t> rows = est_rows[std::size_t(h)];
    for (index_t i = 0; i < 48; ++i) rows.push_back(i * (n - 1) / 47);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    for (index_t i : rows) work.emplace_back(h, i);
  }
  const auto t3 = std::chrono::steady_clock::now();
  std::vector<srow> orc(work.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (std::size_t w = 0; w < work.size(); ++w)
    orc[w] = support_row(plan, qd, kd, vd, dv, work[w].first, work[w].second);
  const double t_oracle = since(t3);

  const double uT = test::u<T>(), etaT = test::eta<T>(), u32 = test::u<float>();
  const double vm = max_abs(vd);  // over every kv head: an upper bound for each
  double worst = 0;
  for (index_t h = 0; h < hq; ++h) {
    const support::head_report& r = rep[std::size_t(h)];
    const support::head_report& pr = plan.report[std::size_t(h)];
    INFO("head " << h << ": bad rows " << r.repaired_rows << ", poly rows " << r.poly_rows << " (|P| "
                 << P[std::size_t(h)] << "), checked " << r.checked_rows << ", estimate max " << r.estimated_error
                 << " mean " << r.mean_estimated_error);
    CHECK(r.repaired_rows == 0);
    CHECK(r.poly_rows == P[std::size_t(h)]);
    CHECK(r.checked_rows == std::min<std::int64_t>(16, P[std::size_t(h)]));
    CHECK(!r.fell_back);
    const double eps = 1.001 * pr.poly_error, width = double(plan.head_width[std::size_t(h)]);
    // the run's estimate against its own outputs (its rows are among the sampled ones)
    double max_lo = 0, max_hi = 0, mean_lo = 0, mean_hi = 0;
    for (std::size_t w = 0; w < work.size(); ++w) {
      if (work[w].first != h) continue;
      const index_t i = work[w].second;
      const srow& ro = orc[w];
      double e2 = 0;
      for (index_t c = 0; c < dv; ++c) {
        const double x = to_d(got.at(i, h, c)) - ro.y[std::size_t(c)];
        e2 += x * x;
      }
      const double err = std::sqrt(e2);
      const double G = ro.poly ? eps / (1 - eps) * ro.vdev : 0.0;
      const double allowed =
          G + uT * ro.ynorm + std::sqrt(double(dv)) * etaT +
          2 * u32 * (std::sqrt(double(n) + width) + pr.degree + std::sqrt(double(d)) * ro.kappa + 2 * ro.smax + 8) *
              ro.A;
      const double ratio = err / allowed;
      if (!(ratio <= 1)) {
        INFO("row " << i << ": error " << err << ", allowed " << allowed << " (||y|| " << ro.ynorm << ", G " << G
                    << ", A " << ro.A << ")");
        CHECK(ratio <= 1);
      }
      worst = std::max(worst, ratio);
      if (std::find(est_rows[std::size_t(h)].begin(), est_rows[std::size_t(h)].end(), i) !=
          est_rows[std::size_t(h)].end()) {
        const double dbl = dbl_slack(ro, n, d, dv, vm), s = double(est_rows[std::size_t(h)].size());
        const double lo = std::max(0.0, err - dbl) / (ro.ynorm + dbl), hi = (err + dbl) / (ro.ynorm - dbl);
        max_lo = std::max(max_lo, lo);
        max_hi = std::max(max_hi, hi);
        mean_lo += lo / s;
        mean_hi += hi / s;
      }
    }
    CHECK(r.estimated_error >= max_lo);
    CHECK(r.estimated_error <= max_hi);
    CHECK(r.mean_estimated_error >= mean_lo);
    CHECK(r.mean_estimated_error <= mean_hi);
  }
  std::printf(
      "support %s %lld tokens %s: max row error / allowed %.3g; host: data %.1f s, plan %.1f s, oracle %.1f s; "
      "gpu run %.2f s\n",
      to_string(dtype_of_v<T>), static_cast<long long>(n), causal ? "causal" : "non-causal", worst, t_data, t_plan,
      t_oracle, t_gpu);
}

/// A run on an uploaded plan with check_rows = 0, check_finite = false and no report, captured in a
/// CUDA graph and replayed twice (the second time on new values of v written into the same buffer):
/// capture must succeed (no host copy, allocation or wait inside the run) and each replay must match
/// the CPU run on the values current at its launch, on the heads without unsure rows (as compare_backends).
void graph_capture_case() {
  const std::uint64_t seed = cudatest::test_seed("support graph capture");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const index_t n = 70, hq = 4, hkv = 2, d = 16, dv = 8;
  host_tensor<float> q(n, hq, d), k(n, hkv, d), v(n, hkv, dv), v2(n, hkv, dv), want(n, hq, dv), got(n, hq, dv);
  q.fill(g, 0.1, 0.15, 20);
  k.fill(g, 0.1, 0.15, 20);
  v.fill(g, 1.0);
  v2.fill(g, 1.0);
  support::options o;
  o.threshold = 0.5;
  o.max_degree = 2;
  o.target_error = 1e-14;
  o.block = 32;
  o.check_rows = 0;
  o.check_finite = false;
  const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
  const std::vector<double> qd = values_of(q), kd = values_of(k);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const device_tensor<float> dq(ctx, q, pad, nan), dk(ctx, k, pad, nan), dvv(ctx, v, pad, nan), dv2(ctx, v2, pad, nan);
  device_tensor<float> dout(ctx, want, pad, 0.0);
  const support::device_plan dplan = support::upload(ctx, plan);
  device_buffer<unsigned char> ws(static_cast<index_t>(support::workspace_bytes(ctx, dplan, dv)));
  const cudaStream_t st = ctx.stream();
  cudaGraph_t graph = nullptr;
  REQUIRE(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
  std::string thrown;
  try {
    support::run<float>(ctx, dplan, dq.cview(), dk.cview(), dvv.cview(), dout.view(), ws.data(), ws.bytes());
  } catch (const basisattn::error& e) {
    thrown = e.what();
  }
  const cudaError_t end = cudaStreamEndCapture(st, &graph);
  INFO("run during capture: " << (thrown.empty() ? "no error" : thrown));
  REQUIRE(thrown.empty());
  REQUIRE(end == cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
  for (int replay = 0; replay < 2; ++replay) {
    const host_tensor<float>& vv = replay == 0 ? v : v2;
    if (replay == 1)
      REQUIRE(cudaMemcpyAsync(dvv.buf.data(), dv2.buf.data(), dvv.buf.bytes(), cudaMemcpyDeviceToDevice, st) ==
              cudaSuccess);
    dout.poison(ctx);
    REQUIRE(cudaGraphLaunch(exec, st) == cudaSuccess);
    ctx.synchronize();
    const readback rb = dout.download(ctx, got);
    CHECK(rb.non_finite == 0);
    CHECK(rb.padding_touched == 0);
    support::run(cpu{}, plan, q.cview(), k.cview(), vv.cview(), want.view());
    double vmax = 0;
    for (float x : vv.buf) vmax = std::max(vmax, double(std::abs(x)));
    double num = 0, den = 0;
    index_t compared = 0;
    for (index_t h = 0; h < hq; ++h) {
      if (forecast_rows(plan, qd, kd, vmax, h).unsure > 0) continue;
      ++compared;
      for (index_t i = 0; i < n; ++i)
        for (index_t c = 0; c < dv; ++c) {
          const double x = got.at(i, h, c), y = want.at(i, h, c);
          num += (x - y) * (x - y);
          den += y * y;
        }
    }
    INFO("replay " << replay << ": " << compared << " heads compared, nerr " << std::sqrt(num / den));
    REQUIRE(compared > 0);
    CHECK(std::sqrt(num / den) <= tolerance<float>());
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

}  // namespace

TEST_CASE("CUDA support-basis attention matches the CPU backend: fp32") { suite<float>(); }
TEST_CASE("CUDA support-basis attention matches the CPU backend: fp16") { suite<Eigen::half>(); }
TEST_CASE("CUDA support-basis attention matches the CPU backend: bf16") { suite<Eigen::bfloat16>(); }
TEST_CASE("CUDA support-basis attention, small cases for compute-sanitizer", "[sanitize]") { sanitize_suite(); }
TEST_CASE("CUDA support-basis: a run on an uploaded plan can be captured in a CUDA graph") { graph_capture_case(); }
TEST_CASE("CUDA support-basis attention at 65536 tokens against the double oracle: fp16, causal", "[large]") {
  support_large<Eigen::half>(true);
}
TEST_CASE("CUDA support-basis attention at 32768 tokens against the double oracle: bf16, non-causal", "[large]") {
  support_large<Eigen::bfloat16>(false);
}

TEST_CASE("CUDA support-basis: non-positive denominators are detected and recomputed as on the CPU") {
  // The CPU test's data: d = 1, scale 5, keys all +1; degree 1 on [-5, 5] is negative at -5, so every
  // query -1 has a negative polynomial denominator: dpoly = (visible keys) p(-5) e^-M with p(-5) = a_0 -
  // 5 a_1 < 0 by a margin far beyond its fp32 rounding (forecast_rows classifies every row with
  // certainty, checked below), so both backends count exactly these rows.
  const std::uint64_t seed = cudatest::test_seed("support negative denominators");
  INFO("seed " << seed);
  cuda_context ctx;
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0, 1);
  for (const bool causal : {false, true}) {
    INFO("causal " << causal);
    const index_t n = 40, dv = 3;
    host_tensor<float> q(n, 1, 1), k(n, 1, 1), v(n, 1, dv), want(n, 1, dv), got(n, 1, dv);
    index_t negatives = 0;
    for (index_t i = 0; i < n; ++i) {
      const bool neg = i % 3 != 0;
      negatives += neg;
      q.at(i, 0, 0) = neg ? -1.0f : 1.0f;
      k.at(i, 0, 0) = 1.0f;
      for (index_t e = 0; e < dv; ++e) v.at(i, 0, e) = static_cast<float>(nd(g));
    }
    support::options o;
    o.causal = causal;
    o.scale = 5;
    o.threshold = 2;
    o.max_degree = 1;
    o.tolerance = INFINITY;
    o.block = 16;
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const row_forecast f = forecast_rows(plan, values_of(q), values_of(k), max_abs(values_of(v)), 0);
    REQUIRE(f.unsure == 0);
    REQUIRE(f.bad == negatives);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const device_tensor<float> dq(ctx, q, pad, nan), dk(ctx, k, pad, nan), dvv(ctx, v, pad, nan);
    device_tensor<float> dout(ctx, want, pad, 0.0);
    const auto [cpu_rep, gpu_rep, rb] = run_plan_both(ctx, plan, q, k, v, want, dq, dk, dvv, dout, got);
    REQUIRE(cpu_rep[0].repaired_rows == negatives);
    CHECK(gpu_rep[0].repaired_rows == negatives);
    CHECK(gpu_rep[0].poly_rows == cpu_rep[0].poly_rows);
    CHECK(gpu_rep[0].checked_rows == cpu_rep[0].checked_rows);
    CHECK(rb.non_finite == 0);
    CHECK(rb.padding_touched == 0);
    CHECK(nerr(got, want) <= tolerance<float>());
  }
}

TEST_CASE("CUDA support-basis: error estimate and exact fallback as on the CPU") {
  const std::uint64_t seed = cudatest::test_seed("support estimate and fallback");
  INFO("seed " << seed);
  cuda_context ctx;
  std::mt19937_64 g(seed);
  const problem pr;
  host_tensor<float> q(pr.n_q, pr.h_q, pr.d), k(pr.n_kv, pr.h_kv, pr.d), v(pr.n_kv, pr.h_kv, pr.d_v);
  q.fill(g, 1.0);  // large entries with a threshold that puts nothing in the supports
  k.fill(g, 1.0);
  v.fill(g, 1.0);
  support::options o;
  o.threshold = 100;
  o.max_degree = 2;
  o.target_error = 1e-3;
  o.check_rows = 8;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const device_tensor<float> dq(ctx, q, pad, nan), dk(ctx, k, pad, nan), dv(ctx, v, pad, nan);
  host_tensor<float> want(pr.n_q, pr.h_q, pr.d_v), got(pr.n_q, pr.h_q, pr.d_v);
  device_tensor<float> dout(ctx, want, pad, 0.0);
  // Without the fallback: a large estimate on both backends. (The polynomial is poor here, B ~ 9 at
  // degree 2, so rows with small positive denominators may amplify rounding differences: the outputs
  // and estimates of the two backends are not compared to the tight bound of the other tests.)
  o.tolerance = INFINITY;
  {
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto [cpu_rep, gpu_rep, rb] = run_plan_both(ctx, plan, q, k, v, want, dq, dk, dv, dout, got);
    CHECK(rb.non_finite == 0);
    CHECK(rb.padding_touched == 0);
    for (std::size_t h = 0; h < gpu_rep.size(); ++h) {
      CHECK(gpu_rep[h].checked_rows == 8);
      CHECK(cpu_rep[h].checked_rows == 8);
      CHECK(cpu_rep[h].estimated_error > 0.05);
      CHECK(gpu_rep[h].estimated_error > 0.05);
      CHECK(gpu_rep[h].mean_estimated_error <= gpu_rep[h].estimated_error);
      CHECK(!gpu_rep[h].fell_back);
    }
  }
  // With the fallback: a head falls back exactly when its own estimate exceeds 0.05 (or its polynomial
  // guarantees nothing); one that did is exact fp32 attention, checked against the double oracle
  // within the exact-attention model (the GPU's own exact kernel, the CPU's attention).
  o.tolerance = 0.05;
  {
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto [cpu_rep, gpu_rep, rb] = run_plan_both(ctx, plan, q, k, v, want, dq, dk, dv, dout, got);
    CHECK(rb.non_finite == 0);
    CHECK(rb.padding_touched == 0);
    std::vector<bool> fb_gpu, fb_cpu;
    for (std::size_t h = 0; h < gpu_rep.size(); ++h) {
      for (const auto* x : {&gpu_rep[h], &cpu_rep[h]})
        CHECK(x->fell_back == (x->estimated_error > o.tolerance || x->poly_error >= 1));
      CHECK(gpu_rep[h].fell_back);  // the estimates above are far beyond 0.05 on these data
      fb_gpu.push_back(gpu_rep[h].fell_back);
      fb_cpu.push_back(cpu_rep[h].fell_back);
    }
    check_exact_heads(plan, q, k, v, got, fb_gpu, true, "gpu fallback");
    check_exact_heads(plan, q, k, v, want, fb_cpu, false, "cpu fallback");
  }
}

TEST_CASE("CUDA support-basis: a loose bound in float gives no non-finite output, as on the CPU") {
  // The CPU test's data (tests/test_support_basis.cpp): entries N(0, 5^2), d = 8, scale 1, degree 1:
  // B > 300, so the polynomial sums are 0, denormal or barely normal in fp32. Which rows end up bad
  // then depends on fp32 rounding (and on denormal flushing in cuBLAS), so repaired_rows is not compared
  // with the CPU here; the row rules' invariants are. Key 0 is large (in C): causal row 0 sees only it,
  // has no visible polynomial key, so its shift restarts at -inf and its output is v_0 (not bad).
  const std::uint64_t seed = cudatest::test_seed("support loose bound");
  INFO("seed " << seed);
  cuda_context ctx;
  std::mt19937_64 g(seed);
  const index_t n = 64, d = 8, dv = 4;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  host_tensor<float> q(n, 1, d), k(n, 1, d), v(n, 1, dv), want(n, 1, dv), got(n, 1, dv);
  q.fill(g, 5.0);
  k.fill(g, 5.0);
  v.fill(g, 1.0);
  for (index_t e = 0; e < d; ++e) k.at(0, 0, e) = 100.0f;
  support::options o;
  o.threshold = 60;  // only key 0 is above it
  o.scale = 1;
  o.max_degree = 1;
  o.tolerance = INFINITY;
  o.block = 16;
  const device_tensor<float> dq(ctx, q, pad, nan), dk(ctx, k, pad, nan), dv_(ctx, v, pad, nan);
  device_tensor<float> dout(ctx, want, pad, 0.0);
  {
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto [cpu_rep, gpu_rep, rb] = run_plan_both(ctx, plan, q, k, v, want, dq, dk, dv_, dout, got);
    const support::head_report& h = gpu_rep[0];
    INFO("bound " << h.bound << ", poly_error " << h.poly_error << ", bad rows gpu " << h.repaired_rows << " cpu "
                  << cpu_rep[0].repaired_rows << ", poly rows gpu " << h.poly_rows << " cpu " << cpu_rep[0].poly_rows);
    REQUIRE(h.bound > 300);
    CHECK(rb.non_finite == 0);
    CHECK(rb.padding_touched == 0);
    CHECK(h.repaired_rows + h.poly_rows <= n);
    CHECK(h.checked_rows == std::min<std::int64_t>(o.check_rows, h.poly_rows));
    CHECK(!h.fell_back);
    // row 0: the exact part alone, one key: fp32 computes 1 * v_0 / 1 exactly (p = expf(0) = 1)
    for (index_t e = 0; e < dv; ++e)
      CHECK(std::abs(got.at(0, 0, e) - v.at(0, 0, e)) <= 1e-6 * std::abs(v.at(0, 0, e)) + 1e-30);
    // The polynomial guarantees nothing here (poly_error >= 1): with a finite tolerance the head falls
    // back on both backends, and both outputs are exact fp32 attention.
    REQUIRE(h.poly_error >= 1);
  }
  o.tolerance = 1e9;
  {
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto [cpu_rep, gpu_rep, rb] = run_plan_both(ctx, plan, q, k, v, want, dq, dk, dv_, dout, got);
    CHECK(cpu_rep[0].fell_back);
    CHECK(gpu_rep[0].fell_back);
    CHECK(rb.non_finite == 0);
    CHECK(rb.padding_touched == 0);
    // scores up to ~|q_0| ||k_0|| ~ 1e3: the exact-attention model with the data's kappa (~3e3 here)
    check_exact_heads(plan, q, k, v, got, {true}, true, "gpu fallback");
    check_exact_heads(plan, q, k, v, want, {true}, false, "cpu fallback");
  }

  // d = 1, every q and k entry 1, scale 320: every score is B = 320 and the degree-1 polynomial sums
  // are ~1e-41 or less, far below FLT_MIN on both backends: every row is bad and recomputed exactly,
  // none is approximated, nothing is checked.
  for (const bool causal : {true, false}) {
    INFO("equal scores, causal " << causal);
    host_tensor<float> q1(n, 1, 1), k1(n, 1, 1), w1(n, 1, dv), g1(n, 1, dv);
    for (index_t i = 0; i < n; ++i) {
      q1.at(i, 0, 0) = 1.0f;
      k1.at(i, 0, 0) = 1.0f;
    }
    support::options o3;
    o3.causal = causal;
    o3.scale = 320;
    o3.threshold = 2;
    o3.max_degree = 1;
    o3.tolerance = INFINITY;
    o3.block = 16;
    const support::plan plan = support::make_plan(cpu{}, q1.cview(), k1.cview(), o3);
    const row_forecast f = forecast_rows(plan, values_of(q1), values_of(k1), max_abs(values_of(v)), 0);
    REQUIRE(f.unsure == 0);  // dpoly + its rounding bound < FLT_MIN for every row
    REQUIRE(f.bad == n);
    const device_tensor<float> dq1(ctx, q1, pad, nan), dk1(ctx, k1, pad, nan);
    device_tensor<float> do1(ctx, w1, pad, 0.0);
    const auto [cpu_rep, gpu_rep, rb] = run_plan_both(ctx, plan, q1, k1, v, w1, dq1, dk1, dv_, do1, g1);
    REQUIRE(cpu_rep[0].repaired_rows == n);
    CHECK(gpu_rep[0].repaired_rows == n);
    CHECK(gpu_rep[0].poly_rows == 0);
    CHECK(cpu_rep[0].poly_rows == 0);
    CHECK(gpu_rep[0].checked_rows == 0);
    CHECK(gpu_rep[0].estimated_error == 0);
    CHECK(gpu_rep[0].mean_estimated_error == 0);
    CHECK(!gpu_rep[0].fell_back);
    CHECK(rb.non_finite == 0);
    CHECK(rb.padding_touched == 0);
    // every row recomputed exactly: exact attention against the oracle (all scores equal: kappa = 320)
    check_exact_heads(plan, q1, k1, v, g1, {true}, true, "gpu");
    check_exact_heads(plan, q1, k1, v, w1, {true}, false, "cpu");
  }
}

TEST_CASE("CUDA support-basis rejects bad arguments like the CPU run") {
  cuda_context ctx;
  std::mt19937_64 g(3);
  const problem pr;
  host_tensor<float> q(pr.n_q, pr.h_q, pr.d), k(pr.n_kv, pr.h_kv, pr.d), v(pr.n_kv, pr.h_kv, pr.d_v),
      out(pr.n_q, pr.h_q, pr.d_v);
  q.fill(g, 0.1);
  k.fill(g, 0.1);
  v.fill(g, 1.0);
  const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview());
  const device_tensor<float> dq(ctx, q, pad, 0.0), dk(ctx, k, pad, 0.0), dv(ctx, v, pad, 0.0);
  device_tensor<float> dout(ctx, out, pad, 0.0);
  const std::size_t need = support::workspace_bytes(ctx, plan, pr.d_v);
  device_buffer<unsigned char> ws(static_cast<index_t>(need));
  auto run = [&](tensor3_view<const float> a, tensor3_view<const float> b, tensor3_view<const float> c,
                 tensor3_view<float> o, void* w, std::size_t bytes, const support::plan& p) {
    support::run<float>(ctx, p, a, b, c, o, w, bytes);
    ctx.synchronize();
  };
  // the well-formed call runs
  CHECK(code_of([&] { run(dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), ws.bytes(), plan); }) ==
        errc::io);
  // shapes (views over the same buffers with other extents: nothing is read before the checks)
  const auto v3 = dv.cview();
  const tensor3_view<const float> v_short(v3.data, pr.n_kv - 1, pr.h_kv, pr.d_v, v3.stride[0], v3.stride[1], 1);
  CHECK(code_of([&] { run(dq.cview(), dk.cview(), v_short, dout.view(), ws.data(), ws.bytes(), plan); }) ==
        errc::shape_mismatch);
  const auto o3 = dout.view();
  const tensor3_view<float> out_bad(o3.data, pr.n_q, pr.h_q, pr.d_v - 1, o3.stride[0], o3.stride[1], 1);
  CHECK(message_of([&] {
          run(dq.cview(), dk.cview(), dv.cview(), out_bad, ws.data(), ws.bytes(), plan);
        }).find("out has extents") != std::string::npos);
  const auto q3 = dq.cview();
  const tensor3_view<const float> q_short(q3.data, pr.n_q - 1, pr.h_q, pr.d, q3.stride[0], q3.stride[1], 1);
  const tensor3_view<float> out_short(o3.data, pr.n_q - 1, pr.h_q, pr.d_v, o3.stride[0], o3.stride[1], 1);
  CHECK(code_of([&] { run(q_short, dk.cview(), dv.cview(), out_short, ws.data(), ws.bytes(), plan); }) ==
        errc::shape_mismatch);
  CHECK(message_of([&] {
          run(q_short, dk.cview(), dv.cview(), out_short, ws.data(), ws.bytes(), plan);
        }).find("do not match the plan") != std::string::npos);
  // storage type other than the plan's
  {
    device_buffer<Eigen::half> hq(pr.n_q * pr.h_q * pr.d), hk(pr.n_kv * pr.h_kv * pr.d), hv(pr.n_kv * pr.h_kv * pr.d_v),
        ho(pr.n_q * pr.h_q * pr.d_v);
    const std::string msg = message_of([&] {
      support::run<Eigen::half>(ctx, plan, tensor3_view<const Eigen::half>(hq.data(), pr.n_q, pr.h_q, pr.d),
                                tensor3_view<const Eigen::half>(hk.data(), pr.n_kv, pr.h_kv, pr.d),
                                tensor3_view<const Eigen::half>(hv.data(), pr.n_kv, pr.h_kv, pr.d_v),
                                tensor3_view<Eigen::half>(ho.data(), pr.n_q, pr.h_q, pr.d_v), ws.data(), ws.bytes());
    });
    CHECK(msg.find("plan was made for f32") != std::string::npos);
  }
  // workspace
  CHECK(message_of([&] {
          run(dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), need - 300, plan);
        }).find("workspace") != std::string::npos);
  CHECK(message_of([&] { run(dq.cview(), dk.cview(), dv.cview(), dout.view(), nullptr, 0, plan); }).find("(null)") !=
        std::string::npos);
  // accumulate_double is CPU-only
  {
    support::options o;
    o.accumulate_double = true;
    const support::plan pd = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    device_buffer<unsigned char> w2(static_cast<index_t>(support::workspace_bytes(ctx, pd, pr.d_v)));
    CHECK(code_of([&] { run(dq.cview(), dk.cview(), dv.cview(), dout.view(), w2.data(), w2.bytes(), pd); }) ==
          errc::unsupported);
  }
  // non-finite v (options.check_finite, the default)
  {
    host_tensor<float> vb = v;
    vb.at(7, 1, 0) = std::numeric_limits<float>::quiet_NaN();
    const device_tensor<float> dvb(ctx, vb, pad, 0.0);
    CHECK(code_of([&] { run(dq.cview(), dk.cview(), dvb.cview(), dout.view(), ws.data(), ws.bytes(), plan); }) ==
          errc::non_finite);
    CHECK(message_of([&] {
            run(dq.cview(), dk.cview(), dvb.cview(), dout.view(), ws.data(), ws.bytes(), plan);
          }).find("v has a non-finite value") != std::string::npos);
  }
  // workspace_bytes validates d_v
  CHECK(code_of([&] { (void)support::workspace_bytes(ctx, plan, 0); }) == errc::invalid_argument);
  // an empty plan or device_plan; the uploaded plan's own workspace check
  CHECK(code_of([&] { (void)support::upload(ctx, support::plan{}); }) == errc::invalid_argument);
  const support::device_plan none;
  CHECK(message_of([&] {
          support::run<float>(ctx, none, dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), ws.bytes());
        }).find("empty") != std::string::npos);
  const support::device_plan dp = support::upload(ctx, plan);
  const std::size_t dneed = support::workspace_bytes(ctx, dp, pr.d_v);
  CHECK(message_of([&] {
          support::run<float>(ctx, dp, dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), dneed - 300);
        }).find("workspace") != std::string::npos);
}
