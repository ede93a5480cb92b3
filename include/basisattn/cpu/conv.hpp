// basisattn/cpu/conv.hpp - conv-basis attention on the CPU backend (entry points documented in
// <basisattn/conv.hpp>; this header holds the implementation).
//
// make_plan (backend-neutral) is in <basisattn/conv/plan.hpp>.
// run, per query head (OpenMP over heads, one workspace slice and one FFT engine per thread):
//   1. g = the largest kernel entry (one global shift; it cancels in D^-1).
//   2. Denominators by prefix sums of exp(u_i - g) (no FFT) and a per-row FFT error bound
//          bound_r = eps * (sum_i log2(N_i) ||a_i||_2 ||V_i||_F / max|v| + sum_i ||a_i||_1) / D_r
//      (a_i = exp(u_i - g), V_i the block's values, N_i its FFT length; the second sum is the prefix
//      sums' cancellation). Blocks narrow enough that a direct convolution is cheaper skip the FFT and
//      add nothing to the bound.
//   3. f32_checked: float FFTs when every row's bound with float's eps is <= fft_tolerance.
//   4. Numerators: per block one FFT of the kernel and, per value channel, FFT, product, inverse
//      (lower: convolution; upper: correlation), accumulated in double.
//   5. Rows with bound_r > fft_tolerance, D_r <= 0 or a non-finite result are recomputed directly from
//      the basis with their own shift M_r (O(n d) each) and counted (head_report::repaired_rows).
//   6. Sampled rows are computed exactly in double: estimated error, uniform-attention baseline.
//   7. Heads whose estimated error exceeds options.tolerance are recomputed with exact attention.
// backward (causal): <basisattn/cpu/conv_backward.hpp>.
#pragma once

#include <basisattn/conv/options.hpp>
#include <basisattn/conv/plan.hpp>
#include <basisattn/cpu/attention.hpp>
#include <basisattn/cpu/fft.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/core/workspace.hpp>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace conv {
namespace detail {

/// Per-thread slice of a run's workspace (all in doubles; float FFTs reuse the same memory).
struct run_slice {
  double* v;       // n x d_v values of the head
  double* num;     // n x d_v numerators
  double* den;     // n denominators
  double* bnum;    // n numerator error-bound sums (difference array, then prefix-summed)
  double* bden;    // n denominator error-bound sums
  double* prefix;  // n + 1 prefix sums
  double* kern;    // fft_n real: the kernel (exp) padded
  double* xbuf;    // fft_n real
  double* kspec;   // (fft_n / 2 + 1) complex
  double* xspec;   // (fft_n / 2 + 1) complex
  double* exact;   // n + d_v: sampled exact rows
};

inline index_t run_fft_max(index_t n) { return fft_size(2 * n - 1); }

/// Lays out one slice's buffers with `w` (64-byte aligned regions, so the FFT buffers suit SIMD
/// FFTs): with a counting carver to size a slice, with one over the slice to hand out its pointers.
inline run_slice layout_slice(basisattn::detail::workspace_carver& w, index_t n, index_t d_v) {
  const index_t nf = run_fft_max(n);
  run_slice s;
  s.v = w.take_elems<double>(n * d_v);
  s.num = w.take_elems<double>(n * d_v);
  s.den = w.take_elems<double>(n);
  s.bnum = w.take_elems<double>(n);
  s.bden = w.take_elems<double>(n);
  s.prefix = w.take_elems<double>(n + 1);
  s.kern = w.take_elems<double>(nf);
  s.xbuf = w.take_elems<double>(nf);
  s.kspec = w.take_elems<double>(2 * (nf / 2 + 1));
  s.xspec = w.take_elems<double>(2 * (nf / 2 + 1));
  s.exact = w.take_elems<double>(n + d_v);
  return s;
}

inline constexpr std::size_t slice_align = basisattn::detail::cpu_workspace_align;

/// Bytes of one slice (a multiple of slice_align).
inline std::size_t run_slice_bytes(index_t n, index_t d_v) {
  basisattn::detail::workspace_carver w = basisattn::detail::workspace_carver::relative(slice_align);
  layout_slice(w, n, d_v);
  return w.bytes();
}

/// The buffers of the slice at `base` (moved up to slice_align when it is not aligned: then the
/// slice needs slice_align - 1 more bytes, as run_workspace_bytes counts).
inline run_slice carve_slice(unsigned char* base, index_t n, index_t d_v) {
  basisattn::detail::workspace_carver w(slice_align, base);
  return layout_slice(w, n, d_v);
}

/// A block is applied by direct convolution when that costs less than its FFTs.
inline bool block_is_direct(index_t L, index_t b, index_t d_v, index_t nfft) {
  const double direct = double(L) * double(b) * double(d_v);
  const double fft = 2.5 * double(nfft) * std::log2(double(nfft)) * double(2 * d_v + 1);
  return direct <= fft;
}

/// The one global shift of a head: its largest kernel entry (the upper kernels' unused entry 0 left out).
inline double global_shift(const head_plan& hp, index_t n, bool causal) {
  double g = -std::numeric_limits<double>::infinity();
  for (index_t i = 0; i < hp.lower.size(); ++i) {
    const double* u = hp.lower.kernel(i);
    for (index_t t = 0; t < n - hp.lower.begin(i); ++t) g = std::max(g, u[t]);
  }
  if (!causal)
    for (index_t i = 0; i < hp.upper.size(); ++i) {
      const double* u = hp.upper.kernel(i);
      for (index_t t = 1; t < n - hp.upper.begin(i); ++t) g = std::max(g, u[t]);
    }
  return g;
}

/// Logit the basis assigns to (r, c) (lower: c <= r; upper: c > r).
inline double basis_logit(const head_plan& hp, index_t r, index_t c) {
  if (c <= r) {
    const index_t i = block_of(hp.lower, c);
    return hp.lower.kernel(i)[r - c];
  }
  const index_t i = block_of(hp.upper, r);
  return hp.upper.kernel(i)[c - r];
}

/// Row r of the conv-basis output computed directly from the basis (shift: the row's own maximum).
inline void direct_row(const head_plan& hp, index_t n, bool causal, const double* v, index_t d_v, index_t r,
                       double* y) {
  const index_t c_end = causal ? r + 1 : n;
  double m = -std::numeric_limits<double>::infinity();
  for (index_t c = 0; c < c_end; ++c) m = std::max(m, basis_logit(hp, r, c));
  double den = 0;
  std::fill(y, y + d_v, 0.0);
  for (index_t c = 0; c < c_end; ++c) {
    const double w = std::exp(basis_logit(hp, r, c) - m);
    den += w;
    const double* vc = v + c * d_v;
    for (index_t j = 0; j < d_v; ++j) y[j] += w * vc[j];
  }
  for (index_t j = 0; j < d_v; ++j) y[j] /= den;
}

/// Numerators of one head by FFT in precision Real (accumulated into s.num in double).
template <class Real, class Engine>
void fft_numerators(const head_plan& hp, index_t n, bool causal, index_t d_v, double g, const run_slice& s,
                    Engine& eng) {
  Real* kern = reinterpret_cast<Real*>(s.kern);
  Real* xb = reinterpret_cast<Real*>(s.xbuf);
  auto* ks = reinterpret_cast<std::complex<Real>*>(s.kspec);
  auto* xs = reinterpret_cast<std::complex<Real>*>(s.xspec);
  for (int tri = 0; tri < (causal ? 1 : 2); ++tri) {
    const basis& b = tri == 0 ? hp.lower : hp.upper;
    for (index_t i = 0; i < b.size(); ++i) {
      const index_t s0 = b.begin(i), e0 = b.end(i, n), L = n - s0, w = e0 - s0;
      if (tri == 1 && L < 2) continue;  // the last row sees no key to its right
      const index_t nf = fft_size(L + w - 1);
      const double* u = b.kernel(i);
      if (block_is_direct(L, w, d_v, nf)) {  // direct: numerator rows s0 + t
        if (tri == 0) {
          for (index_t m = 0; m < w; ++m) {  // column s0 + m feeds rows s0 + m + t
            const double* vc = s.v + (s0 + m) * d_v;
            for (index_t t = 0; s0 + m + t < n; ++t) {
              const double a = std::exp(u[t] - g);
              double* nr = s.num + (s0 + m + t) * d_v;
              for (index_t j = 0; j < d_v; ++j) nr[j] += a * vc[j];
            }
          }
        } else {
          for (index_t r = s0; r < e0; ++r) {  // row r sees columns r + t, t >= 1
            double* nr = s.num + r * d_v;
            for (index_t t = 1; r + t < n; ++t) {
              const double a = std::exp(u[t] - g);
              const double* vc = s.v + (r + t) * d_v;
              for (index_t j = 0; j < d_v; ++j) nr[j] += a * vc[j];
            }
          }
        }
        continue;
      }
      const index_t nb = nf / 2 + 1;
      for (index_t t = 0; t < nf; ++t) kern[t] = t < L && (tri == 0 || t >= 1) ? Real(std::exp(u[t] - g)) : Real(0);
      eng.forward(ks, kern, nf);
      if (tri == 1)
        for (index_t f = 0; f < nb; ++f) ks[f] = std::conj(ks[f]);  // correlation
      for (index_t j = 0; j < d_v; ++j) {
        if (tri == 0)  // convolution with the block's values: outputs s0 + t, t < L
          for (index_t t = 0; t < nf; ++t) xb[t] = t < w ? Real(s.v[(s0 + t) * d_v + j]) : Real(0);
        else  // correlation with the values from s0 on: outputs s0 + rho, rho < w
          for (index_t t = 0; t < nf; ++t) xb[t] = t < L ? Real(s.v[(s0 + t) * d_v + j]) : Real(0);
        eng.forward(xs, xb, nf);
        for (index_t f = 0; f < nb; ++f) xs[f] *= ks[f];
        eng.inverse(xb, xs, nf);
        const index_t outs = tri == 0 ? L : w;
        for (index_t t = 0; t < outs; ++t) s.num[(s0 + t) * d_v + j] += double(xb[t]);
      }
    }
  }
}

/// Bytes of the caller-owned workspace of a run with `threads` slices.
inline std::size_t run_workspace_bytes(index_t n, index_t d_v, int threads) {
  return basisattn::detail::sliced_workspace_bytes(run_slice_bytes(n, d_v), std::size_t(threads), slice_align);
}

/// One head of a run. Writes out's head h and fills rep (except fell_back).
template <class T, class FFT>
void run_head(const plan& p, index_t h, const tensor3_view<const T>& q, const tensor3_view<const T>& k,
              const tensor3_view<const T>& v, const tensor3_view<T>& out, const run_slice& s, head_report& rep) {
  using basisattn::detail::from_compute;
  using basisattn::detail::to_compute;
  const index_t n = p.n, d_v = v.extent[2], hk = h / (p.h_q / p.h_kv);
  const bool causal = p.opt.causal;
  const head_plan& hp = p.heads[std::size_t(h)];
  rep.anchors = hp.lower.size();
  rep.upper_anchors = causal ? 0 : hp.upper.size();
  rep.degenerate = hp.lower.degenerate() || (!causal && hp.upper.degenerate());
  rep.explained = hp.explained;

  double vmax = 0;
  for (index_t r = 0; r < n; ++r)
    for (index_t j = 0; j < d_v; ++j) {
      const double x = static_cast<double>(to_compute<compute_t<T>>(v(r, hk, j)));
      s.v[r * d_v + j] = x;
      vmax = std::max(vmax, std::abs(x));
    }
  if (vmax == 0) vmax = 1;

  // 1. global shift
  const double g = global_shift(hp, n, causal);

  // 2. denominators, error-bound sums
  std::fill(s.num, s.num + n * d_v, 0.0);
  std::fill(s.den, s.den + n, 0.0);
  std::fill(s.bnum, s.bnum + n, 0.0);
  std::fill(s.bden, s.bden + n, 0.0);
  for (index_t i = 0; i < hp.lower.size(); ++i) {
    const index_t s0 = hp.lower.begin(i), e0 = hp.lower.end(i, n), L = n - s0, w = e0 - s0;
    const double* u = hp.lower.kernel(i);
    double* P = s.prefix;
    P[0] = 0;
    double n2 = 0;
    for (index_t t = 0; t < L; ++t) {
      const double a = std::exp(u[t] - g);
      P[t + 1] = P[t] + a;
      n2 += a * a;
    }
    // row r sees lags [max(0, r - e0 + 1), r - s0] of this block
    for (index_t r = s0; r < n; ++r) {
      const index_t hi = r - s0, lo = std::max<index_t>(0, r - e0 + 1);
      s.den[r] += P[hi + 1] - P[lo];
    }
    const index_t nf = fft_size(L + w - 1);
    if (!block_is_direct(L, w, d_v, nf)) {
      double vn = 0;
      for (index_t r = s0; r < e0; ++r)
        for (index_t j = 0; j < d_v; ++j) vn += s.v[r * d_v + j] * s.v[r * d_v + j];
      s.bnum[s0] += std::log2(double(nf)) * std::sqrt(n2) * std::sqrt(vn) / vmax;
    }
    s.bden[s0] += P[L];
  }
  if (!causal)
    for (index_t i = 0; i < hp.upper.size(); ++i) {
      const index_t s0 = hp.upper.begin(i), e0 = hp.upper.end(i, n), L = n - s0, w = e0 - s0;
      if (L < 2) continue;
      const double* u = hp.upper.kernel(i);
      double* P = s.prefix;  // P[m] = sum_{1 <= t < m} exp(u_t - g)
      P[0] = P[1] = 0;
      double n2 = 0;
      for (index_t t = 1; t < L; ++t) {
        const double a = std::exp(u[t] - g);
        P[t + 1] = P[t] + a;
        n2 += a * a;
      }
      // row r in [s0, e0) sees lags 1 .. n - 1 - r
      for (index_t r = s0; r < e0; ++r)
        if (n - 1 - r >= 1) s.den[r] += P[n - r];
      const index_t nf = fft_size(L + w - 1);
      if (!block_is_direct(L, w, d_v, nf)) {
        double vn = 0;
        for (index_t r = s0 + 1; r < n; ++r)
          for (index_t j = 0; j < d_v; ++j) vn += s.v[r * d_v + j] * s.v[r * d_v + j];
        const double c = std::log2(double(nf)) * std::sqrt(n2) * std::sqrt(vn) / vmax;
        s.bnum[s0] += c;
        if (e0 < n) s.bnum[e0] -= c;
      }
      s.bden[s0] += P[L];
      if (e0 < n) s.bden[e0] -= P[L];
    }
  for (index_t r = 1; r < n; ++r) {
    s.bnum[r] += s.bnum[r - 1];
    s.bden[r] += s.bden[r - 1];
  }
  // bound_r for a given eps (rows with D_r <= 0 are repaired whatever the precision)
  auto bound = [&](index_t r, double eps) { return eps * (s.bnum[r] + s.bden[r]) / s.den[r]; };
  constexpr double eps64 = std::numeric_limits<double>::epsilon();
  constexpr double eps32 = std::numeric_limits<float>::epsilon();

  // 3. precision
  bool use_float = false;
  if (p.opt.precision == fft_precision::f32_checked) {
    use_float = true;
    for (index_t r = 0; r < n && use_float; ++r)
      if (s.den[r] > 0 && std::isfinite(s.den[r]) && !(bound(r, eps32) <= p.opt.fft_tolerance)) use_float = false;
  }
  rep.float_fft = use_float;
  const double eps = use_float ? eps32 : eps64;

  // 4. numerators
  bool any_fft_row = false;
  for (index_t r = 0; r < n && !any_fft_row; ++r)
    any_fft_row = s.den[r] > 0 && std::isfinite(s.den[r]) && bound(r, eps) <= p.opt.fft_tolerance;
  if (any_fft_row) {
    if (use_float) {
      typename fft_traits<FFT>::template engine<float> eng;
      fft_numerators<float>(hp, n, causal, d_v, g, s, eng);
    } else {
      typename fft_traits<FFT>::template engine<double> eng;
      fft_numerators<double>(hp, n, causal, d_v, g, s, eng);
    }
  }

  // 5. outputs, with direct repair of the rows the FFTs cannot be trusted with
  double* y = s.exact;  // d_v scratch
  index_t repaired = 0;
  double worst = 0;
  for (index_t r = 0; r < n; ++r) {
    const double dr = s.den[r];
    bool ok = dr > 0 && std::isfinite(dr) && bound(r, eps) <= p.opt.fft_tolerance;
    if (ok) {
      for (index_t j = 0; j < d_v; ++j) {
        y[j] = s.num[r * d_v + j] / dr;
        ok = ok && std::isfinite(y[j]);
      }
    }
    if (ok) {
      worst = std::max(worst, bound(r, eps));
    } else {
      direct_row(hp, n, causal, s.v, d_v, r, y);
      ++repaired;
    }
    for (index_t j = 0; j < d_v; ++j) {
      s.num[r * d_v + j] = y[j];  // keep the double output for the estimate
      out(r, h, j) = from_compute<T>(y[j]);
    }
  }
  rep.repaired_rows = repaired;
  rep.fft_error_bound = worst;

  // 6. error estimate on sampled rows
  const std::vector<index_t> rows = head_sampled_rows(p, h);
  rep.checked_rows = static_cast<index_t>(rows.size());
  if (!rows.empty()) {
    double emax = 0, esum = 0, umax = 0;
    double* pr = s.exact;                                   // n probabilities
    double* ye = s.exact + n;                               // d_v exact row
    std::vector<double> yu(static_cast<std::size_t>(d_v));  // tiny; the estimate is off the hot path
    for (index_t r : rows) {
      const index_t c_end = causal ? r + 1 : n;
      double m = -std::numeric_limits<double>::infinity();
      for (index_t c = 0; c < c_end; ++c) {
        double dot = 0;
        for (index_t e = 0; e < p.d_qk; ++e)
          dot += static_cast<double>(to_compute<compute_t<T>>(q(r, h, e))) *
                 static_cast<double>(to_compute<compute_t<T>>(k(c, hk, e)));
        pr[c] = p.scale * dot;
        m = std::max(m, pr[c]);
      }
      double den = 0;
      std::fill(ye, ye + d_v, 0.0);
      std::fill(yu.begin(), yu.end(), 0.0);
      for (index_t c = 0; c < c_end; ++c) {
        const double w = std::exp(pr[c] - m);
        den += w;
        for (index_t j = 0; j < d_v; ++j) {
          ye[j] += w * s.v[c * d_v + j];
          yu[std::size_t(j)] += s.v[c * d_v + j];
        }
      }
      double ne = 0, de = 0, du = 0;
      for (index_t j = 0; j < d_v; ++j) {
        ye[j] /= den;
        const double uj = yu[std::size_t(j)] / double(c_end);
        ne += ye[j] * ye[j];
        de += (s.num[r * d_v + j] - ye[j]) * (s.num[r * d_v + j] - ye[j]);
        du += (uj - ye[j]) * (uj - ye[j]);
      }
      const double rel = ne > 0 ? std::sqrt(de / ne) : std::sqrt(de);
      const double relu = ne > 0 ? std::sqrt(du / ne) : std::sqrt(du);
      emax = std::max(emax, rel);
      esum += rel;
      umax = std::max(umax, relu);
    }
    rep.estimated_error = emax;
    rep.mean_estimated_error = esum / double(rows.size());
    rep.uniform_error = umax;
  }
}

}  // namespace detail

/// Bytes of caller-owned workspace a run of plan p with d_v value channels needs (current thread
/// count; a smaller workspace that holds at least one slice runs on fewer threads).
inline std::size_t workspace_bytes(cpu, const plan& p, index_t d_v) {
  BASISATTN_REQUIRE(p.n >= 1 && d_v >= 1, invalid_argument, "conv::workspace_bytes: empty plan or d_v = ", d_v, " < 1");
  return detail::run_workspace_bytes(p.n, d_v, detail::run_threads(p.h_q));
}

/// See <basisattn/conv.hpp>.
template <class T, class FFT = fft_eigen>
report run(cpu, const plan& p, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v,
           tensor3_view<T> out, void* workspace, std::size_t workspace_bytes) {
  static_assert(supports_storage_v<cpu, T> && !std::is_const_v<T>, "conv::run: T must be a storage type");
  static_assert(is_fft_engine_v<FFT>, "conv::run: unknown FFT engine (include its header)");
  const char* fn = "conv::run";
  const basisattn::detail::attention_shape sh = detail::check_run_args(fn, p, q, k, v, out);
  if (p.opt.check_finite) {
    basisattn::detail::require_finite(q, "conv::run: q");
    basisattn::detail::require_finite(k, "conv::run: k");
    basisattn::detail::require_finite(v, "conv::run: v");
  }
  const basisattn::detail::workspace_slices ws = basisattn::detail::slice_workspace(
      workspace, workspace_bytes, detail::run_slice_bytes(p.n, sh.d_v), detail::slice_align);
  BASISATTN_REQUIRE(ws.count >= 1, invalid_argument, fn, ": workspace of ", workspace_bytes, " bytes",
                    workspace ? "" : " (null)", "; at least ", detail::run_workspace_bytes(p.n, sh.d_v, 1),
                    " needed (conv::workspace_bytes)");
  const int threads = static_cast<int>(std::min<std::size_t>(std::size_t(detail::run_threads(p.h_q)), ws.count));
  report rep;
  rep.heads.resize(static_cast<std::size_t>(p.h_q));
  basisattn::detail::parallel_for_slots(p.h_q, threads, [&](index_t h, int slot) {
    BASISATTN_REQUIRE(
        basisattn::detail::same_checksum(detail::qk_checksum(q, k, h, h / sh.group), p.checksums[std::size_t(h)]),
        invalid_argument, fn, ": q or k of head ", h, " differ from those the plan was made from");
    const detail::run_slice s = detail::carve_slice(ws[std::size_t(slot)], p.n, sh.d_v);
    detail::run_head<T, FFT>(p, h, q, k, v, out, s, rep.heads[std::size_t(h)]);
  });
  // 7. exact fallback per head (each call uses all threads)
  for (index_t h = 0; h < p.h_q; ++h) {
    head_report& hr = rep.heads[std::size_t(h)];
    if (!(hr.estimated_error > p.opt.tolerance)) continue;
    const index_t hk = h / sh.group;
    attention_options eo;
    eo.causal = p.opt.causal;
    eo.scale = p.scale;
    eo.check_finite = false;
    basisattn::attention<T>(cpu{}, q.sub1(h, 1), k.sub1(hk, 1), v.sub1(hk, 1), out.sub1(h, 1), eo);
    hr.fell_back = true;
    ++rep.fallbacks;
  }
  return rep;
}

/// Same, allocating the workspace.
template <class T, class FFT = fft_eigen>
report run(cpu, const plan& p, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v,
           tensor3_view<T> out) {
  BASISATTN_REQUIRE(v.extent[2] >= 1, invalid_argument, "conv::run: v has d_v = ", v.extent[2], " < 1");
  BASISATTN_REQUIRE(p.n >= 1, invalid_argument, "conv::run: the plan is empty (make it with conv::make_plan)");
  const std::size_t bytes = workspace_bytes(cpu{}, p, v.extent[2]);
  std::unique_ptr<double[]> ws(new double[(bytes + sizeof(double) - 1) / sizeof(double)]);
  return run<T, FFT>(cpu{}, p, q, k, v, out, ws.get(), bytes);
}

/// Plan and run in one call.
template <class T, class FFT = fft_eigen>
report attention(cpu, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v, tensor3_view<T> out,
                 const options& opt = {}) {
  const plan p = make_plan<T>(cpu{}, q, k, opt);
  return run<T, FFT>(cpu{}, p, q, k, v, out);
}

}  // namespace conv
BASISATTN_END_NAMESPACE
