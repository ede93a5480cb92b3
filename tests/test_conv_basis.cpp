// Conv-basis attention: recovery, FFT application, error control, gradients, bad input.
//
// Oracle: attention_reference (plain double) and, for gradients, a plain double softmax-attention
// gradient written below. Tolerances. Where the conv structure holds exactly, the basis logits equal
// the true ones up to the rounding of a length-d dot product (~ sqrt(d) u64 |s|), and the FFTs add
// at most options.fft_tolerance (1e-6 by default, a bound relative to max |v| that the run enforces
// per row, far above what double FFTs of these sizes produce: ~1e-14). We check 1e-9 there, with
// fft_tolerance lowered to 1e-11 so that the bound itself guarantees it: normwise, 1e-11 max|v|
// sqrt(n h_q) / ||y||_F <= 1.8e-10 in every such case below. Storage types other than double add their
// own output rounding u_T.
//
// FFT error model (cases that check the FFTs themselves). The run's contract, per row r of head h:
//   ||y_r - y*_r||_2 <= bound_r max|v_h|,  bound_r <= fft_tolerance for every row kept from the FFTs
// (head_report::fft_error_bound = max bound_r; repaired rows are direct double sums). bound_r is the
// run's own error model, eps (sum_i log2(N_i) ||a_i||_2 ||V_i||_F / max|v| + sum_i ||a_i||_1) / D_r: a
// numerator term (the normwise FFT-convolution error) and a denominator term (prefix-sum cancellation).
// Both are typical-size models, not worst-case bounds: measured errors reach 0.91 of bound_r on a wide-
// range head (the prefix sums' cancellation, up to gamma_L ||a||_1 in the worst case, is priced at
// eps ||a||_1), but stay below 1.2% of it where the numerators dominate. Hence:
//   - double FFTs on wide logits are checked against the contract's fft_tolerance, not fft_error_bound;
//   - float FFTs (the denominators stay double, yet bound_r prices them at float eps, so only the
//     numerator model is live) and engine-vs-engine differences (identical denominators) are checked
//     against fft_error_bound itself;
//   - normwise, a convolution through three transforms of length N (N <= fft_size(2n - 1)) carries a
//     relative error <= fft_model(T, N) = 3 log2(N) eta_T, eta_T = u_T + gamma_4 (sqrt(2) + u_T) (Higham,
//     Accuracy and Stability, Thm 24.2, per transform, twiddles correct to u_T: Eigen's kissfft and FFTW
//     both compute them in double). With unstructured values the output has the size of the transforms'
//     norms, so the numerators, and the rows after the division by the (double) denominators, inherit it.
// Every per-row allowance adds row_slack: the non-FFT rounding of the run and of the oracle (derivation
// at row_slack).
#include <basisattn/attention/reference.hpp>
#include <basisattn/conv.hpp>
#if defined(BASISATTN_TEST_FFTW)
#include <basisattn/cpu/fftw.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances
#endif

#include <catch2/catch.hpp>

#include <cstring>

#include "conv_cases.hpp"
#include "expect_error.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using basisattn::index_t;
using basisattn::matrix;
using basisattn::tensor3_view;
namespace conv = basisattn::conv;

using test::qkv;
using test::random_qkv;
using test::switching;

std::vector<double> reference(const qkv& x, bool causal, double scale = 0) {
  std::vector<double> out(static_cast<std::size_t>(x.n * x.hq * x.dv));
  basisattn::attention_options o;
  o.causal = causal;
  o.scale = scale;
  basisattn::attention_reference<double, double>(x.Q(), x.K(), x.V(), {out.data(), x.n, x.hq, x.dv}, o);
  return out;
}

double rel(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

std::vector<double> run(const qkv& x, const conv::options& o, conv::report* rep = nullptr) {
  std::vector<double> out(std::size_t(x.n * x.hq * x.dv), std::nan(""));
  const conv::report r =
      conv::attention<double>(basisattn::cpu{}, x.Q(), x.K(), x.V(), {out.data(), x.n, x.hq, x.dv}, o);
  if (rep) *rep = r;
  return out;
}

/// The run of an existing plan (what the one-call form does after make_plan).
template <class FFT = conv::fft_eigen>
std::vector<double> run_plan(const qkv& x, const conv::plan& p, conv::report* rep = nullptr) {
  std::vector<double> out(std::size_t(x.n * x.hq * x.dv), std::nan(""));
  const conv::report r =
      conv::run<double, FFT>(basisattn::cpu{}, p, x.Q(), x.K(), x.V(), {out.data(), x.n, x.hq, x.dv});
  if (rep) *rep = r;
  return out;
}

/// The FFT error model of the header comment: normwise relative error of a convolution through three
/// transforms of length N in precision Real.
template <class Real>
double fft_model(index_t n_fft) {
  const double u = std::numeric_limits<Real>::epsilon() / 2;
  const double eta = u + 4 * u / (1 - 4 * u) * (std::sqrt(2.0) + u);
  return 3 * std::log2(double(n_fft)) * eta;
}

/// Largest transform length of a run on n tokens.
index_t fft_max(index_t n) { return conv::fft_size(2 * n - 1); }

double vmax_of(const qkv& x, index_t hk) {
  double m = 0;
  for (index_t j = 0; j < x.n; ++j)
    for (index_t c = 0; c < x.dv; ++c) m = std::max(m, std::abs(x.va(j, hk, c)));
  return m;
}

/// Scales of one head of a structured case, from its data and plan: delta, the largest |b(r, c) - s(r, c)|
/// between the basis logit and the oracle's s = scale q_r.k_c over the visible pairs (the structure's own
/// error: the data's RoPE rotations are rounded), computed like the oracle; kappa' = max scale ||q_r||
/// ||k_c|| >= scale sum_e |q_e k_e| (the dot products' error scale, Higham eq. 3.5); max_j ||v_j||, max|v|.
struct head_scales {
  double delta = 0, kappa = 0, vnorm = 0, vmax = 0;
};
head_scales scales_of(const qkv& x, const conv::plan& p, index_t h) {
  const index_t hk = h / (x.hq / x.hkv);
  const conv::head_plan& hp = p.heads[std::size_t(h)];
  head_scales sc;
  for (index_t r = 0; r < x.n; ++r)
    for (index_t c = 0; c < (p.opt.causal ? r + 1 : x.n); ++c) {
      double dot = 0, qq = 0, kk = 0;
      for (index_t e = 0; e < x.d; ++e) {
        const double a = x.qa(r, h, e), b = x.ka(c, hk, e);
        dot += a * b;
        qq += a * a;
        kk += b * b;
      }
      sc.delta = std::max(sc.delta, std::abs(p.scale * dot - conv::detail::basis_logit(hp, r, c)));
      sc.kappa = std::max(sc.kappa, p.scale * std::sqrt(qq * kk));
    }
  for (index_t j = 0; j < x.n; ++j) {
    double s2 = 0;
    for (index_t c = 0; c < x.dv; ++c) s2 += x.va(j, hk, c) * x.va(j, hk, c);
    sc.vnorm = std::max(sc.vnorm, std::sqrt(s2));
  }
  sc.vmax = vmax_of(x, hk);
  return sc;
}

/// Non-FFT rounding of one head of a run against the oracle, per row (l2 over d_v), worst case. Every
/// weight of a row is exp(logit - shift); the run uses the basis logit b(r, c), the oracle s(r, c), both
/// in double:
///   |b - s| <= delta + (gamma_d + u) kappa'   (delta is measured with the oracle's own error,
///       <= gamma_d scale sum|q_e k_e| + u |s|);
///   the oracle's s itself: (gamma_d + u) kappa' again; each side's exp argument logit - shift (|.| <=
///       2 kappa'): u 2 kappa', and exp: u.
/// So every log-weight moves by <= lam = delta + (2 gamma_d + 6 u) kappa' + 2 u, a relative weight error
/// eps = e^lam - 1, and a weighted mean moves by <= eps / (1 - eps) max_j ||v_j - y|| <= eps / (1 - eps)
/// 2 max_j ||v_j|| (the header of test_support_basis.cpp). The numerator and denominator sums of <= n
/// terms (direct rows and oracle) add (2 gamma_n + u) max|v| per entry on each side: 2 sqrt(d_v)
/// (2 gamma_n + u) max|v| in l2.
double row_slack(const qkv& x, const conv::plan& p, index_t h) {
  const head_scales sc = scales_of(x, p, h);
  const double u = test::u<double>();
  const double lam = sc.delta + (2 * test::gamma<double>(x.d) + 6 * u) * sc.kappa + 2 * u;
  const double eps = std::expm1(lam);
  return eps / (1 - eps) * 2 * sc.vnorm + 2 * std::sqrt(double(x.dv)) * (2 * test::gamma<double>(x.n) + u) * sc.vmax;
}

/// Largest ||got_r - want_r||_2 / allowed[h] over the rows r and query heads h: <= 1 when every row is
/// within its head's allowance (a row with got_r == want_r counts 0; a non-finite entry gives infinity).
double worst_row_ratio(const qkv& x, const std::vector<double>& got, const std::vector<double>& want,
                       const std::vector<double>& allowed) {
  double worst = 0;
  for (index_t h = 0; h < x.hq; ++h)
    for (index_t r = 0; r < x.n; ++r) {
      double e2 = 0;
      for (index_t c = 0; c < x.dv; ++c) {
        const std::size_t i = std::size_t((r * x.hq + h) * x.dv + c);
        if (!std::isfinite(got[i])) return INFINITY;
        e2 += (got[i] - want[i]) * (got[i] - want[i]);
      }
      if (e2 > 0) worst = std::max(worst, std::sqrt(e2) / allowed[std::size_t(h)]);
    }
  return worst;
}

/// What the non-FFT arithmetic adds to rel() (normwise): the oracle's and the run's double arithmetic,
/// u (kappa' sqrt(d) + sqrt(n) + 4) each under the model of tests/test_attention.cpp (statistical growth:
/// rel() is a Frobenius norm over n h_q d_v entries), and the structure's logit mismatch delta, which
/// moves the output by that relative size (ibid.). Largest over the heads.
double frob_slack(const qkv& x, const conv::plan& p) {
  double worst = 0;
  for (index_t h = 0; h < x.hq; ++h) {
    const head_scales sc = scales_of(x, p, h);
    worst = std::max(
        worst, sc.delta + 2 * test::u<double>() * (sc.kappa * std::sqrt(double(x.d)) + std::sqrt(double(x.n)) + 4));
  }
  return worst;
}

}  // namespace

TEST_CASE("conv: fft_size gives multiples of 4 with factors 2, 3, 5", "[conv]") {
  for (index_t m : {1, 3, 4, 5, 17, 97, 1000, 4097}) {
    const index_t n = conv::fft_size(m);
    CHECK(n >= m);
    CHECK(n % 4 == 0);
    index_t r = n;
    for (index_t p : {2, 3, 5})
      while (r % p == 0) r /= p;
    CHECK(r == 1);
  }
}

TEST_CASE("conv: a RoPE-only head with constant content is a 1-conv basis, recovered exactly", "[conv]") {
  const qkv x = switching(300, 2, 1, 16, {0}, 1.0, 11);
  conv::options o = test::no_fallback();
  o.k = 1;
  o.fft_tolerance = 1e-11;
  conv::report rep;
  const auto out = run(x, o, &rep);
  CHECK(rel(out, reference(x, true)) < 1e-9);
  for (const auto& h : rep.heads) {
    CHECK(h.anchors == 1);
    CHECK(h.explained > 1 - 1e-12);
    CHECK(h.estimated_error < 1e-9);
    CHECK(!h.fell_back);
  }
}

TEST_CASE("conv: anchors land on the switches of the key content (change_scan and search)", "[conv]") {
  const std::vector<index_t> sw = {0, 37, 90, 151, 230};
  const qkv x = switching(320, 3, 1, 8, sw, 1.0, 12);
  const auto want = reference(x, true);
  for (auto rule : {conv::anchor_rule::change_scan, conv::anchor_rule::search}) {
    conv::options o = test::no_fallback();
    o.k = 5;
    o.rule = rule;
    o.delta = rule == conv::anchor_rule::search ? 1e-6 : 0;
    o.fft_tolerance = 1e-11;
    const conv::plan p = conv::make_plan<double>(basisattn::cpu{}, x.Q(), x.K(), o);
    for (const auto& hp : p.heads) {
      CHECK(hp.lower.anchors == sw);
      CHECK(!hp.lower.degenerate());
      CHECK(hp.explained > 1 - 1e-12);
    }
    std::vector<double> out(want.size());
    conv::run<double>(basisattn::cpu{}, p, x.Q(), x.K(), x.V(), {out.data(), x.n, x.hq, x.dv});
    CHECK(rel(out, want) < 1e-9);
  }
}

TEST_CASE("conv: error falls as k grows; k = n reproduces exact attention on any data", "[conv]") {
  const std::vector<index_t> sw = {0, 20, 45, 70, 101, 133, 160, 190};
  const qkv x = switching(224, 1, 1, 8, sw, 1.2, 13);
  const auto want = reference(x, true);
  double prev = INFINITY;
  for (index_t k : {1, 2, 4, 8}) {
    conv::options o = test::no_fallback();
    o.k = k;
    o.fft_tolerance = 1e-11;
    const double e = rel(run(x, o), want);
    INFO("k = " << k << ": error " << e);
    CHECK(e <= prev * (1 + 1e-12));
    prev = e;
  }
  CHECK(prev < 1e-9);

  const qkv r = random_qkv(96, 4, 2, 8, 6, 1.0, 14);
  for (bool causal : {true, false}) {
    conv::options o = test::no_fallback();
    o.k = r.n;
    o.causal = causal;
    o.fft_tolerance = 1e-11;
    conv::report rep;
    const auto out = run(r, o, &rep);
    INFO("causal " << causal);
    CHECK(rel(out, reference(r, causal)) < 1e-9);
    for (const auto& h : rep.heads) CHECK(h.explained > 1 - 1e-12);
  }
}

TEST_CASE("conv: non-causal attention with a second (upper) basis, and GQA", "[conv]") {
  const qkv x = switching(257, 4, 2, 8, {0}, 1.0, 15);  // logit depends on r - c only: k = 1 per triangle
  conv::options o = test::no_fallback();
  o.k = 1;
  o.causal = false;
  o.fft_tolerance = 1e-11;
  conv::report rep;
  const auto out = run(x, o, &rep);
  CHECK(rel(out, reference(x, false)) < 1e-9);
  for (const auto& h : rep.heads) {
    CHECK(h.anchors == 1);
    CHECK(h.upper_anchors == 1);
  }
  // a non-1 scale is honoured
  o.scale = 0.7;
  CHECK(rel(run(x, o), reference(x, false, 0.7)) < 1e-9);
}

TEST_CASE("conv: other storage types round once at the end", "[conv]") {
  const qkv x = switching(200, 2, 2, 8, {0, 64, 130}, 1.0, 16);
  const auto want = reference(x, true);
  auto check_type = [&](auto tag, double tol) {
    using T = decltype(tag);
    std::vector<T> q(x.q.size()), k(x.k.size()), v(x.v.size()), out(want.size());
    // store the rounded inputs and compare with the oracle on the same rounded inputs
    qkv xr = x;
    for (std::size_t i = 0; i < q.size(); ++i) {
      q[i] = T(x.q[i]);
      xr.q[i] = double(float(q[i]));
    }
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = T(x.k[i]);
      xr.k[i] = double(float(k[i]));
    }
    for (std::size_t i = 0; i < v.size(); ++i) {
      v[i] = T(x.v[i]);
      xr.v[i] = double(float(v[i]));
    }
    conv::options o = test::no_fallback();
    o.k = 3;
    o.fft_tolerance = 1e-11;
    conv::attention<T>(basisattn::cpu{}, tensor3_view<const T>(q.data(), x.n, x.hq, x.d),
                       tensor3_view<const T>(k.data(), x.n, x.hkv, x.d),
                       tensor3_view<const T>(v.data(), x.n, x.hkv, x.dv), tensor3_view<T>(out.data(), x.n, x.hq, x.dv),
                       o);
    std::vector<double> got(out.size());
    for (std::size_t i = 0; i < out.size(); ++i) got[i] = double(float(out[i]));
    // rounded inputs break the exact structure by ~u_T per logit: compare with the oracle on them
    CHECK(rel(got, reference(xr, true)) < tol);
    // Round once: a run in double storage on the same (rounded) values performs the same arithmetic on
    // the same shapes (T storage is widened to double on entry, the plan and the FFT-precision choice
    // depend only on those values, and every head runs the same code whichever thread takes it), so
    // each T output must be exactly that double output rounded once to T. A path through float
    // (double -> float -> T) differs wherever float's rounding lands on a tie of T's grid, and any
    // arithmetic done in T differs far more often.
    std::vector<double> yd(out.size());
    conv::attention<double>(basisattn::cpu{}, tensor3_view<const double>(xr.q.data(), x.n, x.hq, x.d),
                            tensor3_view<const double>(xr.k.data(), x.n, x.hkv, x.d),
                            tensor3_view<const double>(xr.v.data(), x.n, x.hkv, x.dv),
                            tensor3_view<double>(yd.data(), x.n, x.hq, x.dv), o);
    std::size_t differ = 0;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const T once = basisattn::detail::from_compute<T>(yd[i]);
      if (std::memcmp(&once, &out[i], sizeof(T)) != 0) ++differ;
    }
    INFO("storage " << basisattn::to_string(basisattn::dtype_of_v<T>) << ": " << differ << " of " << out.size()
                    << " outputs differ from the double run rounded once");
    CHECK(differ == 0);
  };
  check_type(float{}, 4 * test::u<float>() + 1e-6);
  check_type(Eigen::half{}, 8 * test::u<Eigen::half>() + 3e-3);
  check_type(Eigen::bfloat16{}, 8 * test::u<Eigen::bfloat16>() + 2e-2);
}

TEST_CASE("conv: float FFTs only behind the dynamic-range check; far-below rows are repaired", "[conv]") {
  // Narrow range: float FFTs are allowed when the (norm-wise, pessimistic) bound is below the
  // tolerance, and the result is then as good as float; a tighter tolerance refuses float.
  const qkv narrow = switching(256, 1, 1, 8, {0, 100}, 0.3, 17);
  const auto want_narrow = reference(narrow, true);
  conv::options o = test::no_fallback();
  o.k = 2;
  o.precision = conv::fft_precision::f32_checked;
  o.fft_tolerance = 1e-2;
  conv::report rep;
  conv::plan p = conv::make_plan<double>(basisattn::cpu{}, narrow.Q(), narrow.K(), o);
  auto out = run_plan(narrow, p, &rep);
  CHECK(rep.heads[0].float_fft);
  CHECK(rep.heads[0].fft_error_bound <= 1e-2);
  // Float FFTs, double denominators (header comment): per row within the float numerator model
  // fft_error_bound max|v| + row_slack (measured 0.56% of it: margin 180), and normwise within the FFT
  // model fft_model<float>(fft_size(2n - 1)) = 1.07e-5 plus frob_slack (measured 5.8e-7 with AVX-512,
  // 5.3e-7 with SSE2: margin 18).
  CHECK(worst_row_ratio(narrow, out, want_narrow,
                        {rep.heads[0].fft_error_bound * vmax_of(narrow, 0) + row_slack(narrow, p, 0)}) <= 1);
  CHECK(rel(out, want_narrow) <= fft_model<float>(fft_max(narrow.n)) + frob_slack(narrow, p));
  o.fft_tolerance = 1e-6;
  p = conv::make_plan<double>(basisattn::cpu{}, narrow.Q(), narrow.K(), o);
  out = run_plan(narrow, p, &rep);
  CHECK(!rep.heads[0].float_fft);
  // Double FFTs: the same two checks in double (fft_tolerance = 1e-6 alone would only give 1e-6 max|v|
  // per row). Per row measured 0.38% of the allowance (margin 260); normwise fft_model<double> = 2.0e-14
  // plus frob_slack 5.4e-15, measured 1.35e-15 (margin 19).
  CHECK(worst_row_ratio(narrow, out, want_narrow,
                        {rep.heads[0].fft_error_bound * vmax_of(narrow, 0) + row_slack(narrow, p, 0)}) <= 1);
  CHECK(rel(out, want_narrow) <= fft_model<double>(fft_max(narrow.n)) + frob_slack(narrow, p));

  // Wide range (logits of +-hundreds): float would break rows; the check refuses it, and rows whose
  // largest logit sits far below the global one are recomputed directly. No non-finite value escapes.
  const qkv wide = switching(256, 2, 1, 8, {0, 50, 120}, 6.0, 18);
  o.k = 3;
  o.fft_tolerance = 1e-6;
  p = conv::make_plan<double>(basisattn::cpu{}, wide.Q(), wide.K(), o);
  out = run_plan(wide, p, &rep);
  for (const auto& h : rep.heads) {
    CHECK(!h.float_fft);
    CHECK(h.repaired_rows > 0);
    CHECK(h.fft_error_bound <= 1e-6);
  }
  CHECK(std::all_of(out.begin(), out.end(), [](double e) { return std::isfinite(e); }));
  // The run's contract per row: ||y_r - y*_r|| <= fft_tolerance max|v| (+ row_slack), since every row
  // kept from the FFTs has bound_r <= fft_tolerance and the repaired ones are direct double sums. Not
  // fft_error_bound itself: on these rows the denominators' prefix-sum cancellation reaches 0.91 of
  // bound_r (header comment). Measured: 0.30 of the allowance on head 1 (margin 3.4, the same with
  // AVX-512 and SSE2: the denominators' prefix sums, which dominate, have no FMA to contract), 1.2e-4 on
  // head 0.
  std::vector<double> allowed;
  for (index_t h = 0; h < wide.hq; ++h)
    allowed.push_back(o.fft_tolerance * vmax_of(wide, h / (wide.hq / wide.hkv)) + row_slack(wide, p, h));
  CHECK(worst_row_ratio(wide, out, reference(wide, true), allowed) <= 1);
}

TEST_CASE("conv: the error estimate is honest and the fallback returns exact attention", "[conv]") {
  const qkv x = random_qkv(300, 3, 1, 16, 8, 1.5, 19);  // no conv structure at all
  const auto want = reference(x, true);
  conv::options o = test::no_fallback();
  o.k = 4;
  o.check_rows = 12;
  conv::report rep;
  const auto approx = run(x, o, &rep);
  // the estimate is the exact error of sampled rows: never above the largest row error
  for (index_t h = 0; h < x.hq; ++h) {
    double worst = 0;
    for (index_t r = 0; r < x.n; ++r) {
      double num = 0, den = 0;
      for (index_t c = 0; c < x.dv; ++c) {
        const std::size_t i = std::size_t((r * x.hq + h) * x.dv + c);
        num += (approx[i] - want[i]) * (approx[i] - want[i]);
        den += want[i] * want[i];
      }
      worst = std::max(worst, std::sqrt(num / den));
    }
    const auto& hr = rep.heads[std::size_t(h)];
    INFO("head " << h << ": estimate " << hr.estimated_error << ", worst row " << worst << ", uniform "
                 << hr.uniform_error);
    CHECK(hr.checked_rows == 12);
    CHECK(hr.estimated_error > 0.05);  // unstructured data: the approximation is poor, and says so
    CHECK(hr.estimated_error <= worst * (1 + 1e-9));
    CHECK(hr.mean_estimated_error <= hr.estimated_error);
    CHECK(hr.uniform_error > 0);
    CHECK(!hr.fell_back);
  }
  o.tolerance = 0.05;
  const auto fixed = run(x, o, &rep);
  CHECK(rep.fallbacks == x.hq);
  for (const auto& h : rep.heads) CHECK(h.fell_back);
  CHECK(rel(fixed, want) < 1e-12);

  // search with a tiny delta on unstructured data degenerates to the first k columns: reported
  o.rule = conv::anchor_rule::search;
  o.delta = 1e-9;
  o.tolerance = INFINITY;
  run(x, o, &rep);
  for (const auto& h : rep.heads) CHECK(h.degenerate);
}

namespace {

/// Plain double gradients of f = sum(dy * attention(q, k, v)) (causal, scale s): the oracle.
void exact_grad(const qkv& x, const std::vector<double>& dy, double s, std::vector<double>& dq, std::vector<double>& dk,
                std::vector<double>& dv) {
  dq.assign(x.q.size(), 0);
  dk.assign(x.k.size(), 0);
  dv.assign(x.v.size(), 0);
  const index_t g = x.hq / x.hkv;
  for (index_t h = 0; h < x.hq; ++h) {
    const index_t hk = h / g;
    for (index_t i = 0; i < x.n; ++i) {
      std::vector<double> p(static_cast<std::size_t>(i + 1));
      double m = -INFINITY;
      for (index_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (index_t c = 0; c < x.d; ++c)
          dot += x.q[std::size_t((i * x.hq + h) * x.d + c)] * x.k[std::size_t((j * x.hkv + hk) * x.d + c)];
        p[std::size_t(j)] = s * dot;
        m = std::max(m, p[std::size_t(j)]);
      }
      double l = 0;
      for (auto& e : p) l += (e = std::exp(e - m));
      for (auto& e : p) e /= l;
      std::vector<double> dp(p.size());
      double pdp = 0;
      for (index_t j = 0; j <= i; ++j) {
        double dot = 0;
        for (index_t c = 0; c < x.dv; ++c) {
          dot += dy[std::size_t((i * x.hq + h) * x.dv + c)] * x.v[std::size_t((j * x.hkv + hk) * x.dv + c)];
          dv[std::size_t((j * x.hkv + hk) * x.dv + c)] +=
              p[std::size_t(j)] * dy[std::size_t((i * x.hq + h) * x.dv + c)];
        }
        dp[std::size_t(j)] = dot;
        pdp += p[std::size_t(j)] * dot;
      }
      for (index_t j = 0; j <= i; ++j) {
        const double ds = p[std::size_t(j)] * (dp[std::size_t(j)] - pdp) * s;
        for (index_t c = 0; c < x.d; ++c) {
          dq[std::size_t((i * x.hq + h) * x.d + c)] += ds * x.k[std::size_t((j * x.hkv + hk) * x.d + c)];
          dk[std::size_t((j * x.hkv + hk) * x.d + c)] += ds * x.q[std::size_t((i * x.hq + h) * x.d + c)];
        }
      }
    }
  }
}

struct grads {
  std::vector<double> dq, dk, dv;
};

grads conv_grad(const qkv& x, const std::vector<double>& dy, const conv::options& o) {
  const conv::plan p = conv::make_plan<double>(basisattn::cpu{}, x.Q(), x.K(), o);
  grads g{std::vector<double>(x.q.size()), std::vector<double>(x.k.size()), std::vector<double>(x.v.size())};
  conv::backward<double>(basisattn::cpu{}, p, x.Q(), x.K(), x.V(), {dy.data(), x.n, x.hq, x.dv},
                         {g.dq.data(), x.n, x.hq, x.d}, {g.dk.data(), x.n, x.hkv, x.d},
                         {g.dv.data(), x.n, x.hkv, x.dv});
  return g;
}

double loss(const qkv& x, const std::vector<double>& dy, const conv::options& o) {
  const auto out = run(x, o);
  return std::inner_product(out.begin(), out.end(), dy.begin(), 0.0);
}

}  // namespace

TEST_CASE("conv: backward equals the exact gradient when k = n", "[conv][backward]") {
  const qkv x = random_qkv(40, 4, 2, 8, 5, 1.0, 20);
  test::seed(21);
  std::vector<double> dy(static_cast<std::size_t>(x.n * x.hq * x.dv));
  for (auto& e : dy) e = test::normal();
  conv::options o = test::no_fallback();
  o.k = x.n;
  const grads g = conv_grad(x, dy, o);
  std::vector<double> dq, dk, dv;
  exact_grad(x, dy, 1.0 / std::sqrt(double(x.d)), dq, dk, dv);
  CHECK(rel(g.dq, dq) < 1e-10);
  CHECK(rel(g.dk, dk) < 1e-10);
  CHECK(rel(g.dv, dv) < 1e-10);
}

TEST_CASE("conv: backward matches finite differences with the anchors held fixed", "[conv][backward]") {
  qkv x = random_qkv(30, 2, 1, 4, 3, 0.8, 22);
  test::seed(23);
  std::vector<double> dy(static_cast<std::size_t>(x.n * x.hq * x.dv));
  for (auto& e : dy) e = test::normal();
  conv::options o = test::no_fallback();
  o.rule = conv::anchor_rule::given;
  o.anchors = {0, 7, 19};
  o.k = 3;
  o.check_rows = 0;
  const grads g = conv_grad(x, dy, o);
  const double eps = 1e-5;
  double worst = 0, scale = 0;
  auto probe = [&](std::vector<double>& arr, const std::vector<double>& grad) {
    for (std::size_t i = 0; i < arr.size(); ++i) {
      const double keep = arr[i];
      arr[i] = keep + eps;
      const double fp = loss(x, dy, o);
      arr[i] = keep - eps;
      const double fm = loss(x, dy, o);
      arr[i] = keep;
      const double fd = (fp - fm) / (2 * eps);
      worst = std::max(worst, std::abs(fd - grad[i]));
      scale = std::max(scale, std::abs(grad[i]));
    }
  };
  probe(x.q, g.dq);
  probe(x.k, g.dk);
  probe(x.v, g.dv);
  INFO("largest |finite difference - gradient| " << worst << " against max |gradient| " << scale);
  CHECK(worst < 1e-7 * std::max(1.0, scale));
  // non-anchor keys get no gradient
  for (index_t j = 0; j < x.n; ++j)
    if (j != 0 && j != 7 && j != 19)
      for (index_t c = 0; c < x.d; ++c) CHECK(g.dk[std::size_t(j * x.d + c)] == 0);
}

TEST_CASE("conv: bad input raises clear errors", "[conv][errors]") {
  using basisattn::errc;
  const qkv x = random_qkv(32, 2, 1, 8, 8, 1.0, 24);
  std::vector<double> out(static_cast<std::size_t>(x.n * x.hq * x.dv));
  const tensor3_view<double> O(out.data(), x.n, x.hq, x.dv);
  auto plan_with = [&](conv::options o) { return conv::make_plan<double>(basisattn::cpu{}, x.Q(), x.K(), o); };
  conv::options o = test::no_fallback();
  o.k = 33;
  test::expect_error([&] { plan_with(o); }, errc::invalid_argument, "options.k = 33");
  o.k = 0;
  test::expect_error([&] { plan_with(o); }, errc::invalid_argument, "options.k = 0");
  o = {};
  o.rule = conv::anchor_rule::search;
  test::expect_error([&] { plan_with(o); }, errc::invalid_argument, "delta > 0");
  o = {};
  o.rule = conv::anchor_rule::given;
  o.anchors = {1, 5};
  test::expect_error([&] { plan_with(o); }, errc::invalid_argument, "start with 0");
  o.anchors = {0, 5, 5};
  test::expect_error([&] { plan_with(o); }, errc::invalid_argument, "ascending");
  o = {};
  o.fft_tolerance = 0;
  test::expect_error([&] { plan_with(o); }, errc::invalid_argument, "fft_tolerance");
  o = {};
  o.tolerance = std::nan("");
  test::expect_error([&] { plan_with(o); }, errc::invalid_argument, "tolerance");

  qkv bad = x;
  bad.q[17] = std::nan("");
  test::expect_error([&] { conv::make_plan<double>(basisattn::cpu{}, bad.Q(), bad.K(), {}); }, errc::non_finite, "q");
  bad = x;
  bad.v[3] = INFINITY;
  const conv::plan p = plan_with({});
  test::expect_error([&] { conv::run<double>(basisattn::cpu{}, p, bad.Q(), bad.K(), bad.V(), O); }, errc::non_finite,
                     "v");

  // n_q != n_kv, d mismatch, out of the wrong shape
  const tensor3_view<const double> q_short(x.q.data(), 31, x.hq, x.d);
  test::expect_error([&] { conv::make_plan<double>(basisattn::cpu{}, q_short, x.K(), {}); }, errc::shape_mismatch,
                     "self-attention");
  const tensor3_view<const double> k_narrow(x.k.data(), x.n, x.hkv, 4, x.hkv * x.d, x.d, 1);
  test::expect_error([&] { conv::make_plan<double>(basisattn::cpu{}, x.Q(), k_narrow, {}); }, errc::shape_mismatch,
                     "d_qk");
  const tensor3_view<double> o_bad(out.data(), x.n, x.hq, x.dv - 1);
  test::expect_error([&] { conv::run<double>(basisattn::cpu{}, p, x.Q(), x.K(), x.V(), o_bad); }, errc::shape_mismatch,
                     "out");

  // q or k other than the plan's; a plan of other extents; too small a workspace
  qkv other = x;
  other.k[5] += 0.25;
  test::expect_error([&] { conv::run<double>(basisattn::cpu{}, p, other.Q(), other.K(), other.V(), O); },
                     errc::invalid_argument, "differ from those the plan");
  const qkv y = random_qkv(32, 4, 1, 8, 8, 1.0, 25);
  std::vector<double> out4(static_cast<std::size_t>(y.n * y.hq * y.dv));
  test::expect_error(
      [&] {
        conv::run<double>(basisattn::cpu{}, p, y.Q(), y.K(), y.V(), {out4.data(), y.n, y.hq, y.dv});
      },
      errc::shape_mismatch, "plan was made for");
  std::vector<double> ws(16);
  test::expect_error([&] { conv::run<double>(basisattn::cpu{}, p, x.Q(), x.K(), x.V(), O, ws.data(), 128); },
                     errc::invalid_argument, "workspace");

  // backward: non-causal plans are refused
  conv::options nc = test::no_fallback();
  nc.causal = false;
  const conv::plan pn = plan_with(nc);
  std::vector<double> gq(x.q.size()), gk(x.k.size()), gv(x.v.size());
  test::expect_error(
      [&] {
        conv::backward<double>(basisattn::cpu{}, pn, x.Q(), x.K(), x.V(), {out.data(), x.n, x.hq, x.dv},
                               {gq.data(), x.n, x.hq, x.d}, {gk.data(), x.n, x.hkv, x.d},
                               {gv.data(), x.n, x.hkv, x.dv});
      },
      errc::unsupported, "causal");
}

#if defined(BASISATTN_TEST_FFTW)
namespace {

/// Magnitudes of the terms of the conv-basis gradients of f = sum(dy * out) (causal, plan p, anchors
/// held fixed), in double: with P_rc the softmax of the basis logits b(r, c), y_r = sum_c P_rc v_c and,
/// for a column c of block i (anchor s), t = r - c (b(r, c) = scale q_{s+t}.k_s):
///   dv_c gets P_rc dy_r; dq_{s+t} gets scale ds_rc k_s and dk_s gets scale ds_rc q_{s+t}, where
///   ds_rc = P_rc (dy_r.v_c - dy_r.y_r), whose terms have size P_rc sum_j (|dy_rj v_cj| + |dy_rj y_rj|).
/// Entrywise absolute values of those terms, summed: what the FFTs' normwise errors are relative to.
void grad_magnitudes(const qkv& x, const std::vector<double>& dy, const conv::plan& p, std::vector<double>& mq,
                     std::vector<double>& mk, std::vector<double>& mv) {
  mq.assign(x.q.size(), 0);
  mk.assign(x.k.size(), 0);
  mv.assign(x.v.size(), 0);
  const index_t g = x.hq / x.hkv;
  std::vector<double> w(std::size_t(x.n)), y(std::size_t(x.dv));
  for (index_t h = 0; h < x.hq; ++h) {
    const index_t hk = h / g;
    const conv::head_plan& hp = p.heads[std::size_t(h)];
    for (index_t r = 0; r < x.n; ++r) {
      double m = -INFINITY, l = 0, dyy = 0;
      for (index_t c = 0; c <= r; ++c) m = std::max(m, conv::detail::basis_logit(hp, r, c));
      for (index_t c = 0; c <= r; ++c) l += (w[std::size_t(c)] = std::exp(conv::detail::basis_logit(hp, r, c) - m));
      std::fill(y.begin(), y.end(), 0.0);
      for (index_t c = 0; c <= r; ++c)
        for (index_t j = 0; j < x.dv; ++j) y[std::size_t(j)] += w[std::size_t(c)] / l * x.va(c, hk, j);
      for (index_t j = 0; j < x.dv; ++j)
        dyy += std::abs(dy[std::size_t((r * x.hq + h) * x.dv + j)] * y[std::size_t(j)]);
      for (index_t c = 0; c <= r; ++c) {
        const double pr = w[std::size_t(c)] / l;
        double dpv = 0;
        for (index_t j = 0; j < x.dv; ++j) {
          const double dyj = std::abs(dy[std::size_t((r * x.hq + h) * x.dv + j)]);
          dpv += dyj * std::abs(x.va(c, hk, j));
          mv[std::size_t((c * x.hkv + hk) * x.dv + j)] += pr * dyj;
        }
        const double ds = p.scale * pr * (dpv + dyy);
        const index_t s0 = hp.lower.begin(conv::detail::block_of(hp.lower, c)), t = r - c;
        for (index_t e = 0; e < x.d; ++e) {
          mq[std::size_t(((s0 + t) * x.hq + h) * x.d + e)] += ds * std::abs(x.ka(s0, hk, e));
          mk[std::size_t((s0 * x.hkv + hk) * x.d + e)] += ds * std::abs(x.qa(s0 + t, h, e));
        }
      }
    }
  }
}

/// ||a - b||_F / ||m||_F.
double diff_over(const std::vector<double>& a, const std::vector<double>& b, const std::vector<double>& m) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += m[i] * m[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST_CASE("conv: the FFTW engine gives the same results as Eigen's FFT (forward, float checked, backward)",
          "[conv][fftw]") {
  // FFTW picks its codelets (SIMD width, aligned or not) by machine and pointer: the two engines agree
  // to the FFT error model of the header comment, never bitwise.
  const qkv x = switching(300, 2, 1, 16, {0, 77, 160}, 1.0, 26);
  conv::options o = test::no_fallback();
  o.k = 3;
  o.fft_tolerance = 1e-11;
  const conv::plan p = conv::make_plan<double>(basisattn::cpu{}, x.Q(), x.K(), o);
  conv::report ra, rb;
  const auto a = run_plan<conv::fft_eigen>(x, p, &ra);
  auto b = run_plan<conv::fft_fftw>(x, p, &rb);
  const auto want = reference(x, true);
  CHECK(rel(a, want) < 1e-9);
  CHECK(rel(b, want) < 1e-9);
  // The engines differ only in the numerators' FFTs (the denominators, direct blocks and repairs are the
  // same code on the same data): per row <= the two numerator models, (bound_a + bound_b) max|v|
  // (measured 0.50% of it: margin 200), and normwise <= 2 fft_model<double>(fft_size(2n - 1)) = 4.1e-14
  // (measured 1.9e-15: margin 22).
  std::vector<double> allowed;
  for (index_t h = 0; h < x.hq; ++h)
    allowed.push_back((ra.heads[std::size_t(h)].fft_error_bound + rb.heads[std::size_t(h)].fft_error_bound) *
                      vmax_of(x, h / (x.hq / x.hkv)));
  CHECK(worst_row_ratio(x, b, a, allowed) <= 1);
  CHECK(rel(b, a) <= 2 * fft_model<double>(fft_max(x.n)));
  // float FFTs through FFTW, as in the float case above: per row within the float numerator model
  // (measured 0.71% of it: margin 140), normwise within fft_model<float> = 1.1e-5 (measured 7.2e-7:
  // margin 15)
  o.precision = conv::fft_precision::f32_checked;
  o.fft_tolerance = 1e-1;
  const conv::plan pf = conv::make_plan<double>(basisattn::cpu{}, x.Q(), x.K(), o);
  conv::report rf;
  b = run_plan<conv::fft_fftw>(x, pf, &rf);
  CHECK(rf.heads[0].float_fft);
  allowed.clear();
  for (index_t h = 0; h < x.hq; ++h)
    allowed.push_back(rf.heads[std::size_t(h)].fft_error_bound * vmax_of(x, h / (x.hq / x.hkv)) + row_slack(x, pf, h));
  CHECK(worst_row_ratio(x, b, want, allowed) <= 1);
  CHECK(rel(b, want) <= fft_model<float>(fft_max(x.n)) + frob_slack(x, pf));
  // backward
  test::seed(27);
  std::vector<double> dy(a.size());
  for (auto& e : dy) e = test::normal();
  std::vector<double> g1q(x.q.size()), g1k(x.k.size()), g1v(x.v.size()), g2q(g1q.size()), g2k(g1k.size()),
      g2v(g1v.size());
  conv::backward<double, conv::fft_eigen>(basisattn::cpu{}, p, x.Q(), x.K(), x.V(), {dy.data(), x.n, x.hq, x.dv},
                                          {g1q.data(), x.n, x.hq, x.d}, {g1k.data(), x.n, x.hkv, x.d},
                                          {g1v.data(), x.n, x.hkv, x.dv});
  conv::backward<double, conv::fft_fftw>(basisattn::cpu{}, p, x.Q(), x.K(), x.V(), {dy.data(), x.n, x.hq, x.dv},
                                         {g2q.data(), x.n, x.hq, x.d}, {g2k.data(), x.n, x.hkv, x.d},
                                         {g2v.data(), x.n, x.hkv, x.dv});
  // Every FFT-computed quantity of the backward pass (the forward numerators behind y, the correlation
  // behind dv, the one behind dp) is one convolution through three transforms: relative error <=
  // fft_model<double>(N) = 2.0e-14 of the size of its terms (grad_magnitudes; the prefix sums and the
  // rest are the same code in both runs). Each gradient of the two engines therefore differs by <= 2
  // fft_model ||magnitudes||_F = 4.1e-14 of it. Measured: 1.4e-16 (dq), 1.6e-17 (dk), 2.3e-16 (dv) of
  // ||magnitudes||_F (margins 300, 2500, 180: dk's terms cancel, sum_c ds_rc = 0, but its error does
  // not have to).
  std::vector<double> mq, mk, mv;
  grad_magnitudes(x, dy, p, mq, mk, mv);
  const double tol = 2 * fft_model<double>(fft_max(x.n));
  CHECK(diff_over(g2q, g1q, mq) <= tol);
  CHECK(diff_over(g2k, g1k, mk) <= tol);
  CHECK(diff_over(g2v, g1v, mv) <= tol);
}
#endif
