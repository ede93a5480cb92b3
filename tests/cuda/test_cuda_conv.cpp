// CUDA conv-basis attention vs the CPU conv-basis run with the same plan (made on the host from the
// same q, k) and vs a double-precision oracle: constructed cases of test_conv_basis.cpp
// (common/conv_cases.hpp) on fresh random inputs (the seed is printed at the start and on failure;
// BASISATTN_TEST_SEED reruns one): exact structure (causal and not, GQA, both anchor rules), k = n on
// unstructured data, a wide logit range (repaired rows), float FFTs behind the range check, the error
// estimate and the exact fallback; float storage everywhere, fp16 / bf16 once. Device tensors have
// padded token rows; out and the whole workspace are poisoned (all bytes 0xFF: NaN) before each run,
// so an unwritten output, a touched padding element or a buffer read before it is written shows up.
// [sanitize]: small cases that reach every kernel of the family once (compute-sanitizer).
// [large]: 65536 tokens in fp16 and bf16 against the double oracle on sampled rows.
//
// Error model. y* denotes the exact output of the basis (softmax of the basis logits, exact arithmetic).
//  (a) FFT rows. Each run reports fft_error_bound = max over the rows it kept from the FFTs of its own
//      per-row model bound_r (the run guarantees bound_r <= fft_tolerance; worse rows are repaired), a
//      bound relative to max|v|. The model is not rigorous (tests/test_conv_basis.cpp: one row measured
//      at 0.91 of it): its denominator term prices the prefix sums' rounding at eps ||a||_1 where the
//      worst case is (gamma_L + 2 eps) ||a||_1 <= (L/2 + 2) eps ||a||_1, L <= n; its numerator term
//      lacks a factor sqrt(d_v) (l2 over the channels) and was measured with the CPU's FFT engines, not
//      cuFFT (whose accuracy is not documented), staying below 1.2% of the model there. So we allow
//          F = M bound max|v| + direct,   M = max(2 sqrt(d_v), (n/2 + 2) eps_64 / eps_FFT),
//      per row: the factor 2 sqrt(d_v) restores the missing factor with a factor 2 for cuFFT (>= 80x
//      margin on the measured numerators), (n/2 + 2) covers the worst case of the double prefix sums
//      (eps_64 / eps_FFT: with float FFTs the bound prices them at eps_32 though they are double), and
//      `direct` is the double arithmetic outside the FFTs (as for a repaired row, below).
//  (b) Direct rows (repaired rows, the oracle). A row computed directly in double from logits
//      that are each off by <= lam (relative weight error <= expm1(lam)) moves by at most
//          wsb(lam) = expm1(lam) / (1 - expm1(lam)) max_c ||v_c - y||
//      (the header of test_support_basis.cpp), and its two sums of <= n terms add (2 gamma_n + u) max|v|
//      per entry. With kappa' = max_c scale sum_e |q_e k_e| (Higham eq. 3.5 for the dot products):
//          one exact row from q . k in double:   lam1 = (gamma_d + 3 u) kappa' + u  (dot, its scale, the
//                                                shift, exp): dbl = wsb(lam1) + sqrt(d_v)(2 gamma_n + u) max|v|
//          a direct row from the basis logits:   direct = wsb(6 u kappa' + 2 u) + 2 sqrt(d_v)(2 gamma_n + u) max|v|
//          the basis against the exact row:      S_r = wsb(delta_r + (2 gamma_d + 6 u) kappa' + 2 u)
//                                                      + 2 sqrt(d_v)(2 gamma_n + u) max|v|
//      with delta_r = max_c |b(r, c) - s(r, c)| measured by the oracle (b the plan's basis logit, s the
//      oracle's q . k): the row_slack of test_conv_basis.cpp. u = 2^-53.
//  (c) One rounding to T of each output (both runs round the double row once): |fl(x) - x| <=
//      u_T |x| + eta_T.
// Comparisons.
//  - GPU vs CPU outputs (heads that did not fall back): the double rows differ by <= F_gpu + F_cpu, so
//        ||out_gpu - out_cpu||_F <= (1 + u_T) D + 2 u_T / (1 - u_T) (||out_cpu||_F + sqrt(N) eta_T)
//                                   + 2 sqrt(N) eta_T,   D = sqrt(n sum_h (F_gpu,h + F_cpu,h)^2).
//  - Estimated error: est_r = ||y_r - ye_r|| / ||ye_r|| with each run's own double output y_r and exact
//    row ye_r (within dbl_r of the truth), so |est_gpu,r - est_cpu,r| <= (F_gpu + F_cpu + 2 dbl_r (1 +
//    est_cpu)) / (||y_r|| - 2 dbl_r); the max and the mean over the rows move by no more. Each run's own
//    estimate is <= max_r (F + S_r + dbl_r) / (||y_r|| - 2 dbl_r) (it measures its own error).
//  - Decisions taken by floating-point comparisons (float FFTs, repaired rows, the fallback) are
//    required only where the deciding quantity is further than its rounding from the threshold: the
//    host recomputes the GPU's per-row bound ratio (gpu_row_ratios) in double (relative rounding
//    <~ n eps_64, so 1e-6 relative is "far"), and each run's fallback must agree with its own estimate
//    (fell_back == estimated_error > tolerance), the two runs' fallbacks only where the estimates are
//    further apart from the tolerance than they can differ.
//  - Heads that fell back (exact fp32 attention) are compared with the double oracle, each within the
//    normwise model of exact attention (cudatest::exact_attention_tolerance: CPU or CUDA kernel).
// Without a usable GPU the program exits 77 (CTest: Skipped).
#include "skip_main.hpp"

#include "conv_cases.hpp"
#include "cuda_harness.hpp"
#include "expect_error.hpp"

#include <basisattn/conv.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/conv.hpp>
#include <basisattn/cuda/cufft.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <algorithm>
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

using cudatest::device_tensor;
using cudatest::host_tensor;
using cudatest::padding;
using cudatest::poison;
using cudatest::readback;
using cudatest::to_storage;

constexpr double u64 = 0x1p-53;
constexpr double eps64 = std::numeric_limits<double>::epsilon();
constexpr double eps32 = std::numeric_limits<float>::epsilon();

/// x with every value rounded to T and back: what both runs and the oracle read.
template <class T>
test::qkv stored_values(const test::qkv& x) {
  test::qkv s = x;
  for (auto* a : {&s.q, &s.k, &s.v})
    for (auto& e : *a) e = cudatest::to_d(basisattn::detail::from_compute<T>(e));
  return s;
}

/// A [n, h, d] input on the device with token rows of h * d + pad elements (the padding holds 7).
template <class T>
device_tensor<T> device3(const cuda_context& ctx, const std::vector<T>& x, index_t n, index_t h, index_t d,
                         index_t pad) {
  return device_tensor<T>(ctx, x.data(), n, h, d, padding{0, pad}, 7.0);
}

// ---- the double oracle and the error model (header comment) ---------------------------------------

/// Largest move of a weighted mean whose weights' logits are each off by <= lam.
double wsb(double lam, double vdev) {
  const double e = std::expm1(lam);
  return e < 1 ? e / (1 - e) * vdev : INFINITY;
}
double sum_slack(index_t n, index_t dv, double vmax) {
  return std::sqrt(double(dv)) * (2 * test::gamma<double>(n) + u64) * vmax;
}

/// Exact output row r of query head h in double from the stored q, k, v, and what the error model
/// needs about it.
struct row_oracle {
  std::vector<double> y;
  double ynorm = 0;
  double delta = 0;  ///< max over the visible columns of |basis logit - s|
  double kappa = 0;  ///< kappa' of the row: max scale sum_e |q_e k_e|
  double vdev = 0;   ///< max over the visible columns of ||v_c - y||
};

row_oracle oracle_row(const test::qkv& x, const conv::plan& p, index_t h, index_t r) {
  const index_t hk = h / (x.hq / x.hkv), c_end = p.opt.causal ? r + 1 : x.n;
  const conv::head_plan& hp = p.heads[std::size_t(h)];
  std::vector<double> s(static_cast<std::size_t>(c_end));
  row_oracle o;
  o.y.assign(static_cast<std::size_t>(x.dv), 0.0);
  const double* qr = &x.q[std::size_t((r * x.hq + h) * x.d)];
  double m = -INFINITY;
  for (index_t c = 0; c < c_end; ++c) {
    const double* kc = &x.k[std::size_t((c * x.hkv + hk) * x.d)];
    double dot = 0, ab = 0;
    for (index_t e = 0; e < x.d; ++e) {
      dot += qr[e] * kc[e];
      ab += std::abs(qr[e] * kc[e]);
    }
    s[std::size_t(c)] = p.scale * dot;
    o.kappa = std::max(o.kappa, p.scale * ab);
    o.delta = std::max(o.delta, std::abs(conv::detail::basis_logit(hp, r, c) - s[std::size_t(c)]));
    m = std::max(m, s[std::size_t(c)]);
  }
  double den = 0;
  for (index_t c = 0; c < c_end; ++c) {
    const double w = std::exp(s[std::size_t(c)] - m);
    den += w;
    const double* vc = &x.v[std::size_t((c * x.hkv + hk) * x.dv)];
    for (index_t j = 0; j < x.dv; ++j) o.y[std::size_t(j)] += w * vc[j];
  }
  for (auto& e : o.y) e /= den;
  for (double e : o.y) o.ynorm += e * e;
  o.ynorm = std::sqrt(o.ynorm);
  for (index_t c = 0; c < c_end; ++c) {
    const double* vc = &x.v[std::size_t((c * x.hkv + hk) * x.dv)];
    double dd = 0;
    for (index_t j = 0; j < x.dv; ++j) dd += (vc[j] - o.y[std::size_t(j)]) * (vc[j] - o.y[std::size_t(j)]);
    o.vdev = std::max(o.vdev, std::sqrt(dd));
  }
  return o;
}

/// max |v| of every kv head.
std::vector<double> vmax_of(const test::qkv& x) {
  std::vector<double> m(static_cast<std::size_t>(x.hkv), 0.0);
  for (index_t j = 0; j < x.n; ++j)
    for (index_t h = 0; h < x.hkv; ++h)
      for (index_t c = 0; c < x.dv; ++c) m[std::size_t(h)] = std::max(m[std::size_t(h)], std::abs(x.va(j, h, c)));
  for (auto& e : m)
    if (e == 0) e = 1;  // as the runs (a zero max |v| is taken as 1)
  return m;
}

/// The error-model quantities of one oracle row (header comment (b)).
struct row_bounds {
  double dbl = 0, direct = 0, S = 0;
};
row_bounds bounds_of(const row_oracle& o, index_t n, index_t d, index_t dv, double vmax) {
  row_bounds b;
  const double sums = sum_slack(n, dv, vmax);
  b.dbl = wsb((test::gamma<double>(d) + 3 * u64) * o.kappa + u64, o.vdev) + sums;
  b.direct = wsb(6 * u64 * o.kappa + 2 * u64, o.vdev) + 2 * sums;
  b.S = wsb(o.delta + (2 * test::gamma<double>(d) + 6 * u64) * o.kappa + 2 * u64, o.vdev) + 2 * sums;
  return b;
}

/// Factor on a run's reported fft_error_bound (header comment (a)).
double fft_margin(index_t n, index_t dv, bool float_fft) {
  return std::max(2 * std::sqrt(double(dv)), (double(n) / 2 + 2) * (float_fft ? eps64 / eps32 : 1.0));
}

/// The GPU's per-row bound / denominator ratio (bound_r / eps, docs/design/cuda-conv.md step 2) of query
/// head h, recomputed on the host in double from the plan and the stored values: every FFT block (lower
/// blocks; upper blocks with n - s0 >= 2) of length nf = fft_size(2n - 1) contributes
/// log2(nf) ||a||_2 ||V_block||_F / max|v| + ||a||_1 to the rows it feeds. Infinity where D_r <= 0.
std::vector<double> gpu_row_ratios(const test::qkv& x, const conv::plan& p, index_t h) {
  const index_t n = x.n, hk = h / (x.hq / x.hkv), nf = conv::fft_size(2 * n - 1);
  const conv::head_plan& hp = p.heads[std::size_t(h)];
  std::vector<double> rownorm2(static_cast<std::size_t>(n), 0.0);
  double vmax = 0;
  for (index_t j = 0; j < n; ++j)
    for (index_t c = 0; c < x.dv; ++c) {
      rownorm2[std::size_t(j)] += x.va(j, hk, c) * x.va(j, hk, c);
      vmax = std::max(vmax, std::abs(x.va(j, hk, c)));
    }
  if (vmax == 0) vmax = 1;
  double g = -INFINITY;
  for (int tri = 0; tri < (p.opt.causal ? 1 : 2); ++tri) {
    const conv::basis& b = tri == 0 ? hp.lower : hp.upper;
    for (index_t i = 0; i < b.size(); ++i)
      for (index_t t = tri; t < n - b.begin(i); ++t) g = std::max(g, b.kernel(i)[t]);
  }
  std::vector<double> den(static_cast<std::size_t>(n), 0.0), bnd(static_cast<std::size_t>(n), 0.0), P;
  for (int tri = 0; tri < (p.opt.causal ? 1 : 2); ++tri) {
    const conv::basis& b = tri == 0 ? hp.lower : hp.upper;
    for (index_t i = 0; i < b.size(); ++i) {
      const index_t s0 = b.begin(i), e0 = b.end(i, n), L = n - s0;
      if (tri == 1 && L < 2) continue;
      P.assign(static_cast<std::size_t>(L + 1), 0.0);
      double sq = 0;
      for (index_t t = 0; t < L; ++t) {
        const double a = t >= tri ? std::exp(b.kernel(i)[t] - g) : 0.0;
        P[std::size_t(t + 1)] = P[std::size_t(t)] + a;
        sq += a * a;
      }
      double vn2 = 0;
      for (index_t r = (tri ? s0 + 1 : s0); r < (tri ? n : e0); ++r) vn2 += rownorm2[std::size_t(r)];
      const double c = std::log2(double(nf)) * std::sqrt(sq) * std::sqrt(vn2) / vmax + P[std::size_t(L)];
      if (tri == 0) {
        for (index_t r = s0; r < n; ++r) {
          den[std::size_t(r)] += P[std::size_t(r - s0 + 1)] - P[std::size_t(std::max<index_t>(0, r - e0 + 1))];
          bnd[std::size_t(r)] += c;
        }
      } else {
        for (index_t r = s0; r < e0; ++r) {
          if (n - 1 - r >= 1) den[std::size_t(r)] += P[std::size_t(n - r)];
          bnd[std::size_t(r)] += c;
        }
      }
    }
  }
  std::vector<double> ratio(static_cast<std::size_t>(n));
  for (index_t r = 0; r < n; ++r)
    ratio[std::size_t(r)] = den[std::size_t(r)] > 0 ? bnd[std::size_t(r)] / den[std::size_t(r)] : INFINITY;
  return ratio;
}

/// Rows of head h the GPU certainly repairs (eps ratio_r > tol by more than 1e-6 relative) and rows
/// whose decision is too close to the threshold to predict.
struct repair_forecast {
  index_t certain = 0, unsure = 0;
  double max_ratio = 0;  ///< over the rows with D_r > 0: the GPU's f32_checked decision quantity
};
repair_forecast forecast(const std::vector<double>& ratio, double eps, double tol) {
  repair_forecast f;
  for (double r : ratio) {
    if (std::isfinite(r)) f.max_ratio = std::max(f.max_ratio, r);
    const double b = eps * r;
    if (!std::isfinite(b) || b > tol * (1 + 1e-6))
      ++f.certain;
    else if (b > tol * (1 - 1e-6))
      ++f.unsure;
  }
  return f;
}

// ---- one case: CPU and GPU with the same plan, and the oracle -----------------------------------

struct outcome {
  conv::report cpu, gpu;
  std::vector<float> got;                     // the GPU's output as float, for comparisons between runs
  std::vector<double> F_gpu;                  // per head: F of the GPU run (header comment (a))
  std::vector<repair_forecast> forecast_gpu;  // per head: the repairs the GPU must make
};

/// Plan on the host, run on the CPU and on the GPU with the same plan, compare them and the oracle
/// (header comment). chunk_bytes bounds the FFT chunk (1: one block per chunk). uploaded: the GPU runs
/// on conv::upload's device_plan (the same checks apply: the run must not depend on where the plan is).
template <class T>
outcome check_case(const cuda_context& ctx, cufft_plan_cache& plans, const test::qkv& x, const conv::options& o,
                   std::size_t chunk_bytes = std::size_t(1) << 30, bool uploaded = false) {
  const double uT = test::u<T>(), etaT = test::eta<T>();
  const auto qh = to_storage<T>(x.q), kh = to_storage<T>(x.k), vh = to_storage<T>(x.v);
  const test::qkv xs = stored_values<T>(x);
  const tensor3_view<const T> Q(qh.data(), x.n, x.hq, x.d), K(kh.data(), x.n, x.hkv, x.d),
      V(vh.data(), x.n, x.hkv, x.dv);
  const conv::plan p = conv::make_plan<T>(cpu{}, Q, K, o);
  matrix<T> want(x.n * x.hq, x.dv);
  outcome r;
  r.cpu = conv::run<T>(cpu{}, p, Q, K, V, tensor3_view<T>(want.data(), x.n, x.hq, x.dv));

  const device_tensor<T> dq = device3(ctx, qh, x.n, x.hq, x.d, 3), dk = device3(ctx, kh, x.n, x.hkv, x.d, 1),
                         dv = device3(ctx, vh, x.n, x.hkv, x.dv, 2);
  device_tensor<T> dout(x.n, x.hq, x.dv, padding{3, 0});  // head rows of d_v + 3 elements
  const std::size_t bytes = conv::workspace_bytes(ctx, p, x.dv, chunk_bytes);
  device_buffer<unsigned char> ws(static_cast<index_t>(bytes) + 5);
  dout.poison(ctx);
  poison(ctx, ws);
  // an odd workspace pointer: the run aligns it itself
  const tensor3_view<T> out = dout.view();
  if (uploaded) {
    const conv::device_plan dp = conv::upload(ctx, p);
    CHECK(conv::workspace_bytes(ctx, dp, x.dv, chunk_bytes) == bytes);
    r.gpu = conv::run<T>(ctx, dp, dq.cview(), dk.cview(), dv.cview(), out, ws.data() + 5, bytes, plans);
    ctx.synchronize();  // before dp is freed
  } else {
    r.gpu = conv::run<T>(ctx, p, dq.cview(), dk.cview(), dv.cview(), out, ws.data() + 5, bytes, plans);
  }
  ctx.synchronize();
  host_tensor<T> got(x.n, x.hq, x.dv);
  const readback all = dout.download(ctx, got);  // unwritten elements and padding
  CHECK(all.non_finite == 0);
  CHECK(all.padding_touched == 0);
  REQUIRE(r.gpu.heads.size() == r.cpu.heads.size());

  // The oracle on every row (these cases are small: O(n^2 d) per head).
  const std::vector<double> vmax = vmax_of(xs);
  std::vector<std::vector<row_oracle>> orc(static_cast<std::size_t>(x.hq), std::vector<row_oracle>(std::size_t(x.n)));
#pragma omp parallel for schedule(dynamic, 16)
  for (index_t e = 0; e < x.hq * x.n; ++e)
    orc[std::size_t(e / x.n)][std::size_t(e % x.n)] = oracle_row(xs, p, e / x.n, e % x.n);

  double D2 = 0, diff2 = 0, want2 = 0;
  index_t compared = 0, fallbacks_gpu = 0, fallbacks_cpu = 0;
  for (std::size_t h = 0; h < r.cpu.heads.size(); ++h) {
    const conv::head_report &a = r.gpu.heads[h], &b = r.cpu.heads[h];
    const double vm = vmax[std::size_t(index_t(h) / (x.hq / x.hkv))];
    const auto& rows = orc[h];
    double kap = 0, direct = 0;
    for (const auto& ro : rows) {
      kap = std::max(kap, ro.kappa);
      direct = std::max(direct, bounds_of(ro, x.n, x.d, x.dv, vm).direct);
    }
    const double Fa = fft_margin(x.n, x.dv, a.float_fft) * a.fft_error_bound * vm + direct;
    const double Fb = fft_margin(x.n, x.dv, b.float_fft) * b.fft_error_bound * vm + direct;
    r.F_gpu.push_back(Fa);
    const repair_forecast fc =
        forecast(gpu_row_ratios(xs, p, index_t(h)), a.float_fft ? eps32 : eps64, o.fft_tolerance);
    r.forecast_gpu.push_back(fc);
    INFO("head " << h << ": estimated error gpu " << a.estimated_error << " cpu " << b.estimated_error
                 << ", uniform gpu " << a.uniform_error << " cpu " << b.uniform_error << ", repaired gpu "
                 << a.repaired_rows << " cpu " << b.repaired_rows << " (forecast " << fc.certain << " + " << fc.unsure
                 << " unsure), bound gpu " << a.fft_error_bound << " cpu " << b.fft_error_bound << ", float FFTs gpu "
                 << a.float_fft << " cpu " << b.float_fft << ", fell back gpu " << a.fell_back << " cpu "
                 << b.fell_back);
    // What the plan alone decides: equal by construction (host code on the same plan).
    CHECK(a.anchors == b.anchors);
    CHECK(a.upper_anchors == b.upper_anchors);
    CHECK(a.degenerate == b.degenerate);
    CHECK(a.checked_rows == b.checked_rows);
    // The run's contract, and its decisions where they are not near a threshold.
    CHECK(a.fft_error_bound <= o.fft_tolerance);
    CHECK(b.fft_error_bound <= o.fft_tolerance);
    if (o.precision == conv::fft_precision::f32_checked) {
      const double q32 = eps32 * fc.max_ratio;
      if (std::abs(q32 / o.fft_tolerance - 1) > 1e-6) {
        CHECK(a.float_fft == (q32 <= o.fft_tolerance));
        if (q32 <= o.fft_tolerance) CHECK(b.float_fft);  // the CPU's bound is never larger than the GPU's
      }
    } else {
      CHECK(!a.float_fft);
      CHECK(!b.float_fft);
    }
    CHECK(a.repaired_rows >= fc.certain);
    CHECK(a.repaired_rows <= fc.certain + fc.unsure);
    CHECK(a.fell_back == (a.estimated_error > o.tolerance));
    CHECK(b.fell_back == (b.estimated_error > o.tolerance));
    fallbacks_gpu += a.fell_back;
    fallbacks_cpu += b.fell_back;

    // Estimates: against each other and each against its own bound.
    const std::vector<index_t> picked = conv::detail::head_sampled_rows(p, index_t(h));
    if (b.checked_rows > 0) {
      double allow = 0, uallow = 0, own_a = 0, own_b = 0;
      for (index_t row : picked) {
        const row_oracle& ro = rows[std::size_t(row)];
        const row_bounds rb = bounds_of(ro, x.n, x.d, x.dv, vm);
        const double den = ro.ynorm - 2 * rb.dbl;
        REQUIRE(den > 0);
        allow = std::max(allow, (Fa + Fb + 2 * rb.dbl * (1 + b.estimated_error)) / den);
        uallow = std::max(uallow, (2 * sum_slack(x.n, x.dv, vm) + 2 * rb.dbl * (1 + b.uniform_error)) / den);
        own_a = std::max(own_a, (Fa + rb.S + rb.dbl) / den);
        own_b = std::max(own_b, (Fb + rb.S + rb.dbl) / den);
      }
      INFO("estimate: allowed difference " << allow << ", own bounds gpu " << own_a << " cpu " << own_b);
      CHECK(std::abs(a.estimated_error - b.estimated_error) <= allow);
      CHECK(std::abs(a.mean_estimated_error - b.mean_estimated_error) <= allow);
      CHECK(std::abs(a.uniform_error - b.uniform_error) <= uallow);
      CHECK(a.estimated_error <= own_a);
      CHECK(b.estimated_error <= own_b);
      if (std::abs(b.estimated_error - o.tolerance) > allow) CHECK(a.fell_back == b.fell_back);
    } else {
      CHECK(std::isnan(a.estimated_error));
      CHECK(!a.fell_back);
    }

    // Outputs.
    if (!a.fell_back && !b.fell_back) {
      D2 += double(x.n) * (Fa + Fb) * (Fa + Fb);
      for (index_t i = 0; i < x.n; ++i)
        for (index_t j = 0; j < x.dv; ++j) {
          const double g = cudatest::to_d(got.at(i, index_t(h), j));
          const double w = cudatest::to_d(want(i * x.hq + index_t(h), j));
          diff2 += (g - w) * (g - w);
          want2 += w * w;
        }
      compared += x.n * x.dv;
      continue;
    }
    // A head that fell back: exact fp32 attention against the oracle, normwise over the head.
    for (int side = 0; side < 2; ++side) {
      if (!(side == 0 ? a.fell_back : b.fell_back)) continue;
      double e2 = 0, y2 = 0;
      for (index_t i = 0; i < x.n; ++i)
        for (index_t j = 0; j < x.dv; ++j) {
          const double v =
              side == 0 ? cudatest::to_d(got.at(i, index_t(h), j)) : cudatest::to_d(want(i * x.hq + index_t(h), j));
          const double y = rows[std::size_t(i)].y[std::size_t(j)];
          e2 += (v - y) * (v - y);
          y2 += y * y;
        }
      const double err = std::sqrt(e2 / y2), tol = cudatest::exact_attention_tolerance(uT, kap, x.d, x.n, side == 0);
      INFO((side == 0 ? "gpu" : "cpu") << " fallback: error against the oracle " << err << " (bound " << tol << ")");
      CHECK(err <= tol);
    }
  }
  CHECK(r.gpu.fallbacks == fallbacks_gpu);
  CHECK(r.cpu.fallbacks == fallbacks_cpu);
  if (compared > 0) {
    const double N = double(compared), D = std::sqrt(D2), wn = std::sqrt(want2);
    const double tol_abs = (1 + uT) * D + 2 * uT / (1 - uT) * (wn + std::sqrt(N) * etaT) + 2 * std::sqrt(N) * etaT;
    const double nerr = std::sqrt(diff2) / wn, tol = tol_abs / wn;
    INFO("dtype " << to_string(dtype_of_v<T>) << ": gpu vs cpu nerr " << nerr << " (bound " << tol << " = " << tol / uT
                  << " u_T)");
    CHECK(nerr <= tol);
  }
  for (const T& v : got.buf) r.got.push_back(basisattn::detail::to_compute<float>(v));  // [n, h_q, d_v] order
  return r;
}

/// Normwise bound for two GPU runs of the same plan on the same data (chunking changes the order
/// of the double sums only): both within F of y*, one rounding each (header comment).
double two_run_tolerance(const outcome& a, const outcome& b, double uT) {
  double D2 = 0, y2 = 0;
  const index_t hq = static_cast<index_t>(a.F_gpu.size());
  const index_t per_head = static_cast<index_t>(a.got.size()) / hq;
  for (std::size_t h = 0; h < a.F_gpu.size(); ++h)
    D2 += double(per_head) * (a.F_gpu[h] + b.F_gpu[h]) * (a.F_gpu[h] + b.F_gpu[h]);
  for (float v : b.got) y2 += double(v) * v;
  const double eta = test::eta<float>() * std::sqrt(double(a.got.size()));
  return ((1 + uT) * std::sqrt(D2) + 2 * uT / (1 - uT) * (std::sqrt(y2) + eta) + 2 * eta) / std::sqrt(y2);
}

double nerr_between(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// ---- [large] ---------------------------------------------------------------------------------------

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// 65536 tokens, 4 query heads on 2 kv heads, d = d_v = 64, data of test::periodic (an exact basis in
/// fp16 and bf16: the oracle's logits and the basis logits agree exactly, delta = 0). Causal: 32
/// segments, anchors recovered by change_scan (O(n probe d) per head on the host). Non-causal: one
/// segment, 32 given anchors at random positions (lower and upper: 64 FFT blocks per head). The FFT
/// chunk may hold 4 GiB, so a chunk has 32 (causal) or 63 blocks (non-causal) of (d_v + 1) signals of
/// 2 (nf/2 + 1) = 131074 reals: 272.6M or 536.8M elements, beyond the 65535 * 16 blocks * 256 threads
/// = 268.4M of one pass of the fill kernel's grid-stride loop (grid_for's cap: it wraps), and the
/// multiply kernel runs on 524288 / 1032192 blocks (> 65535); the repair kernel's 4096 blocks stride
/// over 65536 rows. fft_tolerance 1e-12 makes the causal run repair its first ~100 rows per head.
/// Host cost per case (16 cores): the plan O(k n d + n probe d) per head (~0.3 GFLOP, parallel over
/// heads), the oracle 64 sampled rows per head at O(n (d + d_v)) each (~4 GFLOP in all, parallel
/// over rows), the data (n (h_q + h_kv) d values): a few seconds; printed.
/// Checked on the sampled rows (64 per head: the first, the last, the 16 rows of the run's own
/// estimate and evenly spread ones): ||out_r - y_r|| <= (1 + u_T) (F + S_r) + u_T ||y_r|| + sqrt(d_v)
/// eta_T (header comment), every output finite, the padding untouched, and the report.
template <class T>
void conv_large(bool causal) {
  const std::uint64_t seed = cudatest::test_seed(causal ? "conv [large] causal" : "conv [large] non-causal");
  INFO("seed " << seed);
  const auto t0 = std::chrono::steady_clock::now();
  cuda_context ctx;
  cufft_plan_cache plans;
  const index_t n = 65536, hq = 4, hkv = 2, d = 64, dv = 64, nseg = causal ? 32 : 1;
  std::vector<index_t> sw;
  for (index_t i = 0; i < nseg; ++i) sw.push_back(i * (n / nseg));
  const test::qkv x = test::periodic(n, hq, hkv, d, sw, 8, seed);
  const test::qkv xs = stored_values<T>(x);
  conv::options o = test::no_fallback();
  o.causal = causal;
  o.fft_tolerance = 1e-12;
  o.check_rows = 16;
  o.seed = seed;
  o.k = 32;
  if (!causal) {
    std::mt19937_64 g(seed ^ 0xa5a5u);
    std::uniform_int_distribution<index_t> pos(1, n - 2);
    o.rule = conv::anchor_rule::given;
    o.anchors = {0};
    while (static_cast<index_t>(o.anchors.size()) < o.k) {
      const index_t a = pos(g);
      if (std::find(o.anchors.begin(), o.anchors.end(), a) == o.anchors.end()) o.anchors.push_back(a);
    }
    std::sort(o.anchors.begin(), o.anchors.end());
  }
  const auto qh = to_storage<T>(x.q), kh = to_storage<T>(x.k), vh = to_storage<T>(x.v);
  const double t_data = seconds_since(t0);
  const auto t1 = std::chrono::steady_clock::now();
  const conv::plan p = conv::make_plan<T>(cpu{}, tensor3_view<const T>(qh.data(), n, hq, d),
                                          tensor3_view<const T>(kh.data(), n, hkv, d), o);
  const double t_plan = seconds_since(t1);
  for (index_t h = 0; h < hq; ++h) {
    INFO("head " << h);
    if (causal) CHECK(p.heads[std::size_t(h)].lower.anchors == sw);  // change_scan finds exactly the switches
    CHECK(p.heads[std::size_t(h)].explained == 1.0);  // exact structure: SSE is 0 exactly (integer logits)
  }

  const device_tensor<T> dq = device3(ctx, qh, n, hq, d, 3), dk = device3(ctx, kh, n, hkv, d, 1),
                         dvv = device3(ctx, vh, n, hkv, dv, 2);
  device_tensor<T> dout(n, hq, dv, padding{0, 5});  // token rows of h_q d_v + 5 elements
  const std::size_t bytes = conv::workspace_bytes(ctx, p, dv, std::size_t(4) << 30);
  device_buffer<unsigned char> ws(static_cast<index_t>(bytes));
  dout.poison(ctx);
  poison(ctx, ws);
  const auto t2 = std::chrono::steady_clock::now();
  const conv::report rep =
      conv::run<T>(ctx, p, dq.cview(), dk.cview(), dvv.cview(), dout.view(), ws.data(), bytes, plans);
  ctx.synchronize();
  const double t_gpu = seconds_since(t2);
  host_tensor<T> out(n, hq, dv);
  const readback rb = dout.download(ctx, out);
  CHECK(rb.non_finite == 0);
  CHECK(rb.padding_touched == 0);

  // Sampled rows per head: the first, the last, the run's own 16, and evenly spread ones up to 64.
  const auto t3 = std::chrono::steady_clock::now();
  std::vector<std::vector<index_t>> rows(static_cast<std::size_t>(hq));
  for (index_t h = 0; h < hq; ++h) {
    auto& r = rows[std::size_t(h)];
    r = conv::detail::head_sampled_rows(p, h);
    for (index_t i = 0; i < 48; ++i) r.push_back(i * (n - 1) / 47);  // 0 and n - 1 among them
    std::sort(r.begin(), r.end());
    r.erase(std::unique(r.begin(), r.end()), r.end());
  }
  std::vector<std::pair<index_t, index_t>> work;
  for (index_t h = 0; h < hq; ++h)
    for (index_t row : rows[std::size_t(h)]) work.emplace_back(h, row);
  std::vector<row_oracle> orc(work.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (std::size_t w = 0; w < work.size(); ++w) orc[w] = oracle_row(xs, p, work[w].first, work[w].second);
  const double t_oracle = seconds_since(t3);

  const std::vector<double> vmax = vmax_of(xs);
  const double uT = test::u<T>(), etaT = test::eta<T>();
  double worst = 0;
  for (index_t h = 0; h < hq; ++h) {
    const conv::head_report& hr = rep.heads[std::size_t(h)];
    const double vm = vmax[std::size_t(h / (hq / hkv))];
    const repair_forecast fc = forecast(gpu_row_ratios(xs, p, h), eps64, o.fft_tolerance);
    INFO("head " << h << ": anchors " << hr.anchors << "/" << hr.upper_anchors << ", repaired " << hr.repaired_rows
                 << " (forecast " << fc.certain << " + " << fc.unsure << " unsure), bound " << hr.fft_error_bound
                 << ", estimated error " << hr.estimated_error);
    CHECK(hr.anchors == 32);
    CHECK(hr.upper_anchors == (causal ? 0 : 32));
    CHECK(!hr.float_fft);
    CHECK(!hr.fell_back);
    CHECK(hr.checked_rows == 16);
    CHECK(hr.fft_error_bound <= o.fft_tolerance);
    CHECK(hr.repaired_rows >= fc.certain);
    CHECK(hr.repaired_rows <= fc.certain + fc.unsure);
    if (causal) CHECK(fc.certain > 0);  // the repair kernel has work at this size
    double kap = 0, direct = 0;
    for (std::size_t w = 0; w < work.size(); ++w)
      if (work[w].first == h) {
        kap = std::max(kap, orc[w].kappa);
        direct = std::max(direct, bounds_of(orc[w], n, d, dv, vm).direct);
      }
    const double F = fft_margin(n, dv, false) * hr.fft_error_bound * vm + direct;
    double own = 0;
    for (index_t row : conv::detail::head_sampled_rows(p, h))
      for (std::size_t w = 0; w < work.size(); ++w)
        if (work[w].first == h && work[w].second == row) {
          const row_bounds rb = bounds_of(orc[w], n, d, dv, vm);
          own = std::max(own, (F + rb.S + rb.dbl) / (orc[w].ynorm - 2 * rb.dbl));
        }
    CHECK(hr.estimated_error <= own);
    for (std::size_t w = 0; w < work.size(); ++w) {
      if (work[w].first != h) continue;
      const index_t i = work[w].second;
      const row_oracle& ro = orc[w];
      CHECK(ro.delta == 0);  // the data's promise: basis logits are the true ones, bit for bit
      const row_bounds rb = bounds_of(ro, n, d, dv, vm);
      double e2 = 0;
      for (index_t j = 0; j < dv; ++j) {
        const double g = cudatest::to_d(out.at(i, h, j)) - ro.y[std::size_t(j)];
        e2 += g * g;
      }
      const double allowed = (1 + uT) * (F + rb.S) + uT * ro.ynorm + std::sqrt(double(dv)) * etaT;
      const double ratio = std::sqrt(e2) / allowed;
      if (!(ratio <= 1)) {
        INFO("row " << i << ": error " << std::sqrt(e2) << ", allowed " << allowed << " (||y|| " << ro.ynorm << ", F "
                    << F << ", S " << rb.S << ")");
        CHECK(ratio <= 1);
      }
      worst = std::max(worst, ratio);
    }
  }
  std::printf(
      "conv %s 65536 tokens %s: max row error / allowed %.3g; host: data %.1f s, plan %.1f s, oracle %.1f s; "
      "gpu run %.2f s\n",
      to_string(dtype_of_v<T>), causal ? "causal" : "non-causal", worst, t_data, t_plan, t_oracle, t_gpu);
}

}  // namespace

TEST_CASE("CUDA conv-basis attention matches the CPU run: exact structure, causal and not, GQA") {
  const std::uint64_t seed = cudatest::test_seed("conv exact structure");
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  {
    INFO("3 switches, 2 query heads on 1 kv head, causal");
    conv::options o = test::no_fallback();
    o.k = 3;
    o.fft_tolerance = 1e-11;
    check_case<float>(ctx, plans, test::switching(300, 2, 1, 16, {0, 77, 160}, 1.0, seed), o);
  }
  for (auto rule : {conv::anchor_rule::change_scan, conv::anchor_rule::search}) {
    INFO("5 switches, 3 query heads on 1 kv head, rule "
         << (rule == conv::anchor_rule::search ? "search" : "change_scan"));
    conv::options o = test::no_fallback();
    o.k = 5;
    o.rule = rule;
    o.delta = rule == conv::anchor_rule::search ? 1e-3 : 0;
    o.fft_tolerance = 1e-11;
    check_case<float>(ctx, plans, test::switching(320, 3, 1, 8, {0, 37, 90, 151, 230}, 1.0, seed + 1), o);
  }
  for (double scale : {0.0, 0.7}) {
    INFO("non-causal, 4 query heads on 2 kv heads, scale " << scale);
    conv::options o = test::no_fallback();
    o.k = 1;
    o.causal = false;
    o.scale = scale;
    o.fft_tolerance = 1e-11;
    const auto r = check_case<float>(ctx, plans, test::switching(257, 4, 2, 8, {0}, 1.0, seed + 2), o);
    for (const auto& h : r.gpu.heads) CHECK(h.upper_anchors == 1);
  }
}

TEST_CASE("CUDA conv-basis attention matches the CPU run: k = n on unstructured data, chunked FFTs") {
  const std::uint64_t seed = cudatest::test_seed("conv k = n");
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  const test::qkv x = test::random_qkv(96, 4, 2, 8, 6, 1.0, seed);
  for (bool causal : {true, false}) {
    conv::options o = test::no_fallback();
    o.k = x.n;
    o.causal = causal;
    o.fft_tolerance = 1e-11;
    INFO("causal " << causal << ": all blocks of a head in one chunk, then one block per chunk (uploaded plan)");
    const auto all = check_case<float>(ctx, plans, x, o);
    const auto one = check_case<float>(ctx, plans, x, o, 1, true);
    // chunking changes the order of the double sums only: both within F of y*, one rounding each
    const double e = nerr_between(all.got, one.got), tol = two_run_tolerance(all, one, test::u<float>());
    INFO("chunked vs not: nerr " << e << " (bound " << tol << ")");
    CHECK(e <= tol);
  }
  // The same cache again: no new plan, and the same bits. A bitwise check on purpose: the same plan, data,
  // device and code path, and the run is deterministic by design (no atomics in its arithmetic:
  // docs/design/cuda-conv.md step 4; only maxima and counts use atomics).
  const std::size_t held = plans.size();
  conv::options o = test::no_fallback();
  o.k = 7;
  const auto a = check_case<float>(ctx, plans, x, o);
  const std::size_t after_first = plans.size();
  const auto b = check_case<float>(ctx, plans, x, o);
  CHECK(plans.size() == after_first);
  CHECK(after_first >= held);
  CHECK(a.got == b.got);
}

TEST_CASE("CUDA conv-basis attention: wide logit range (repaired rows) and float FFTs behind the check") {
  const std::uint64_t seed = cudatest::test_seed("conv wide range");
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  {
    conv::options o = test::no_fallback();
    o.k = 3;
    o.fft_tolerance = 1e-11;
    const auto r = check_case<float>(ctx, plans, test::switching(256, 2, 1, 8, {0, 50, 120}, 6.0, seed), o);
    for (std::size_t h = 0; h < r.gpu.heads.size(); ++h) {
      CHECK(!r.gpu.heads[h].float_fft);
      CHECK(r.forecast_gpu[h].certain > 0);  // the data's purpose: rows the GPU must repair (check_case checks it did)
    }
  }
  {
    conv::options o = test::no_fallback();
    o.k = 2;
    o.precision = conv::fft_precision::f32_checked;
    o.fft_tolerance = 1e-2;
    const test::qkv x = test::switching(256, 1, 1, 8, {0, 100}, 0.3, seed + 1);
    const auto r = check_case<float>(ctx, plans, x, o);  // checks the float decision against the host's ratio
    INFO("cpu float FFTs " << r.cpu.heads[0].float_fft << ", gpu " << r.gpu.heads[0].float_fft);
    CHECK(r.gpu.heads[0].float_fft);  // eps_32 * ratio ~ 4e-4 on these data, far below 1e-2
    o.fft_tolerance = 1e-11;          // far below float's reach (eps_32 * ratio >= eps_32): double FFTs
    const auto d = check_case<float>(ctx, plans, x, o);
    CHECK(!d.gpu.heads[0].float_fft);
  }
}

TEST_CASE("CUDA conv-basis attention: error estimate and exact fallback agree with the CPU") {
  const std::uint64_t seed = cudatest::test_seed("conv estimate and fallback");
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  const test::qkv x = test::random_qkv(300, 3, 1, 16, 8, 1.5, seed);  // no conv structure
  conv::options o = test::no_fallback();
  o.k = 4;
  o.check_rows = 12;
  o.fft_tolerance = 1e-11;
  const auto r = check_case<float>(ctx, plans, x, o);
  for (const auto& h : r.gpu.heads) {
    CHECK(h.checked_rows == 12);
    CHECK(h.estimated_error > 0.05);  // unstructured data: the approximation is poor, and says so
    CHECK(!h.fell_back);
  }
  // With a tolerance far below those estimates every head falls back on both runs: each run's output is
  // exact fp32 attention (check_case compares each with the oracle within the exact-attention model).
  o.tolerance = 0.05;
  const auto f = check_case<float>(ctx, plans, x, o);
  CHECK(f.gpu.fallbacks == x.hq);
  const auto fu = check_case<float>(ctx, plans, x, o, std::size_t(1) << 30, true);  // sampled rows from the upload
  CHECK(fu.gpu.fallbacks == x.hq);
  o.check_rows = 0;  // no estimate, no fallback
  check_case<float>(ctx, plans, x, o);
}

TEST_CASE("CUDA conv-basis attention: fp16 and bf16 storage") {
  const std::uint64_t seed = cudatest::test_seed("conv fp16 bf16");
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  const test::qkv x = test::switching(200, 2, 2, 8, {0, 64, 130}, 1.0, seed);
  conv::options o = test::no_fallback();
  o.k = 3;
  o.fft_tolerance = 1e-11;
  check_case<Eigen::half>(ctx, plans, x, o);
  check_case<Eigen::bfloat16>(ctx, plans, x, o);
}

TEST_CASE("CUDA conv-basis attention, small cases for compute-sanitizer", "[sanitize]") {
  // Every kernel of <basisattn/cuda/kernels/conv.cuh> at least once: checksums and the value load,
  // scans and item maxima, rows, fill / multiply / gather in double and in float (cuFFT in both
  // precisions), finalize, the repair kernel (wide logits) and the exact sampled rows, causal and not,
  // one block per chunk and all blocks in one, and the exact fallback (the CUDA attention kernel).
  const std::uint64_t seed = cudatest::test_seed("conv [sanitize]");
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  {
    INFO("causal, wide logits (repaired rows), GQA, one block per chunk");
    conv::options o = test::no_fallback();
    o.k = 3;
    o.check_rows = 4;
    o.fft_tolerance = 1e-11;
    check_case<Eigen::half>(ctx, plans, test::switching(96, 2, 1, 8, {0, 30, 61}, 6.0, seed), o, 1);
  }
  {
    INFO("non-causal, explicit scale");
    conv::options o = test::no_fallback();
    o.k = 2;
    o.causal = false;
    o.scale = 0.7;
    o.check_rows = 4;
    o.fft_tolerance = 1e-11;
    check_case<float>(ctx, plans, test::switching(80, 2, 2, 8, {0, 33}, 1.0, seed + 1), o);
  }
  {
    INFO("float FFTs behind the check");
    conv::options o = test::no_fallback();
    o.k = 2;
    o.precision = conv::fft_precision::f32_checked;
    o.fft_tolerance = 1e-2;
    o.check_rows = 4;
    check_case<float>(ctx, plans, test::switching(64, 1, 1, 8, {0, 20}, 0.3, seed + 2), o);
  }
  {
    INFO("exact fallback");
    conv::options o = test::no_fallback();
    o.k = 2;
    o.check_rows = 4;
    o.tolerance = 0.05;
    o.fft_tolerance = 1e-11;
    check_case<float>(ctx, plans, test::random_qkv(64, 2, 1, 8, 8, 1.5, seed + 3), o);
  }
}

TEST_CASE("CUDA conv-basis attention at 65536 tokens against the double oracle: fp16, causal", "[large]") {
  conv_large<Eigen::half>(true);
}
TEST_CASE("CUDA conv-basis attention at 65536 tokens against the double oracle: bf16, non-causal", "[large]") {
  conv_large<Eigen::bfloat16>(false);
}

TEST_CASE("CUDA conv-basis attention rejects bad input like the CPU run") {
  cuda_context ctx;
  const test::qkv x = test::random_qkv(32, 2, 1, 8, 8, 1.0, 24);
  const auto qh = to_storage<float>(x.q), kh = to_storage<float>(x.k), vh = to_storage<float>(x.v);
  const conv::plan p =
      conv::make_plan<float>(cpu{}, tensor3_view<const float>(qh.data(), x.n, x.hq, x.d),
                             tensor3_view<const float>(kh.data(), x.n, x.hkv, x.d), test::no_fallback());
  const device_tensor<float> dq = device3(ctx, qh, x.n, x.hq, x.d, 0), dk = device3(ctx, kh, x.n, x.hkv, x.d, 0),
                             dv = device3(ctx, vh, x.n, x.hkv, x.dv, 0);
  device_buffer<float> dout(x.n * x.hq * x.dv);
  const tensor3_view<float> O(dout.data(), x.n, x.hq, x.dv);
  const std::size_t bytes = conv::workspace_bytes(ctx, p, x.dv);
  device_buffer<unsigned char> ws(static_cast<index_t>(bytes));
  auto run = [&](const device_tensor<float>& q, const device_tensor<float>& k, const device_tensor<float>& v,
                 tensor3_view<float> out,
                 std::size_t b) { conv::run<float>(ctx, p, q.cview(), k.cview(), v.cview(), out, ws.data(), b); };

  run(dq, dk, dv, O, bytes);  // well formed
  ctx.synchronize();
  test::expect_error([&] { run(dq, dk, dv, O, 128); }, errc::invalid_argument, "workspace");
  test::expect_error([&] { run(dq, dk, dv, tensor3_view<float>(dout.data(), x.n, x.hq, x.dv - 1), bytes); },
                     errc::shape_mismatch, "out");
  // q or k other than the plan's
  test::qkv other = x;
  other.k[5] += 0.25f;
  const device_tensor<float> dk2 = device3(ctx, to_storage<float>(other.k), x.n, x.hkv, x.d, 0);
  test::expect_error([&] { run(dq, dk2, dv, O, bytes); }, errc::invalid_argument, "differ from those the plan");
  // a plan of other extents
  const test::qkv y = test::random_qkv(32, 4, 1, 8, 8, 1.0, 25);
  const device_tensor<float> yq = device3(ctx, to_storage<float>(y.q), y.n, y.hq, y.d, 0);
  device_buffer<float> yout(y.n * y.hq * y.dv);
  test::expect_error([&] { run(yq, dk, dv, tensor3_view<float>(yout.data(), y.n, y.hq, y.dv), bytes); },
                     errc::shape_mismatch, "plan was made for");
  // n_q != n_kv
  test::expect_error(
      [&] {
        conv::run<float>(ctx, p, tensor3_view<const float>(dq.buf.data(), x.n - 1, x.hq, x.d), dk.cview(), dv.cview(),
                         tensor3_view<float>(dout.data(), x.n - 1, x.hq, x.dv), ws.data(), bytes);
      },
      errc::shape_mismatch, "self-attention");
  // NaN/Inf in v
  test::qkv bad = x;
  bad.v[3] = INFINITY;
  const device_tensor<float> dvb = device3(ctx, to_storage<float>(bad.v), x.n, x.hkv, x.dv, 0);
  test::expect_error([&] { run(dq, dk, dvb, O, bytes); }, errc::non_finite, "v");
  // head dims above the CUDA limit
  const test::qkv wide = test::random_qkv(8, 1, 1, 300, 4, 1.0, 26);
  const auto wq = to_storage<float>(wide.q), wk = to_storage<float>(wide.k);
  const conv::plan pw =
      conv::make_plan<float>(cpu{}, tensor3_view<const float>(wq.data(), wide.n, 1, wide.d),
                             tensor3_view<const float>(wk.data(), wide.n, 1, wide.d), test::no_fallback());
  test::expect_error([&] { (void)conv::workspace_bytes(ctx, pw, 4); }, errc::unsupported, "256");
  // an empty plan or device_plan
  test::expect_error([&] { (void)conv::upload(ctx, conv::plan{}); }, errc::invalid_argument, "empty");
  const conv::device_plan none;
  test::expect_error([&] { conv::run<float>(ctx, none, dq.cview(), dk.cview(), dv.cview(), O, ws.data(), bytes); },
                     errc::invalid_argument, "empty");
  // the uploaded plan checks q and k like the plan
  const conv::device_plan dp = conv::upload(ctx, p);
  test::expect_error([&] { conv::run<float>(ctx, dp, dq.cview(), dk2.cview(), dv.cview(), O, ws.data(), bytes); },
                     errc::invalid_argument, "differ from those the plan");
}
