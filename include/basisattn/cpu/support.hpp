// basisattn/cpu/support.hpp - support-basis attention on the CPU backend (Eigen, OpenMP over heads).
//
// Public entry points (namespace basisattn::support; documented in <basisattn/support.hpp>):
//   workspace_bytes(cpu{}, plan, d_v)
//   run(cpu{}, plan, q, k, v, out, workspace, workspace_bytes, report = nullptr)
//   run(cpu{}, plan, q, k, v, out) -> report           allocates the workspace
//   attention(cpu{}, q, k, v, out, options) -> report   make_plan + run
//
// Per query head h (kv head hk), in compute type C (float; double for double storage or
// options.accumulate_double), with s_ij = scale q_i.k_j and P the plan's pair polynomials:
//   accumulators per row i: num_i (d_v), den_i, shift m_i.
//   1. polynomial part, rows i not in R, keys j not in C (bq = bucket of i, bk = bucket of j):
//        num_i = sum_j P_{bq,bk}(s_ij) e^{-M_bq} v_j, den_i = same with 1, m_i = M_bq
//      as linear attention: key features phi(k_j) (chunks of options.block rows, never n x r at once)
//      build per key bucket the state S_bk = sum_j phi(k_j) [v_j, 1]^T (r x (d_v + 1)); queries read
//      (c_{bq,bk} o phi(q_i))^T S_bk. Causal: blocks of options.block keys in order; a query whose
//      position i + n_kv - n_q falls in block b reads the states of blocks < b, plus exact products
//      P(s_ij) for the visible non-top keys of block b; then block b's keys enter the states.
//   2. rows after the polynomial part: a row with no visible polynomial key restarts its shift at -inf
//      (the loose M_bq would push its exact weights to 0 in float); a row whose polynomial sum dpoly is
//      not a normal positive number, or whose numerator is not finite, is bad (step 4); the others are
//      renormalised to dpoly = 1 (m += log dpoly, num /= dpoly).
//   3. exact part, flash-style on the same accumulators (online max: m_i only grows, and num, den are
//      rescaled by e^{m_old - m_new}, so no exp overflows): rows not in R against the keys in C; rows
//      in R (m_i = -inf, num = den = 0) against every visible key.
//   4. bad rows (step 2, or a final denominator that is not a normal positive number, or a non-finite
//      numerator) are recomputed exactly and counted (report.repaired_rows); out_i = num_i / den_i, and a
//      row whose output still overflows is recomputed exactly too (and counted).
//   5. error estimate over the approximated rows A (not in R, not bad, with a visible polynomial key;
//      report.poly_rows = |A|): s = min(options.check_rows, |A|) rows A[floor((j+1) |A| / s) - 1] (evenly
//      spread, the last always in) are recomputed in double from the storage values; relative l2 row
//      errors against the stored out give estimated_error / mean_estimated_error. When that max exceeds
//      options.tolerance, or poly_error >= 1 with a finite tolerance (the polynomial guarantees
//      nothing), the head is recomputed with the exact blocked CPU attention (flagged).
// Heads are spread over detail::cpu_threads() OpenMP threads, each with its own workspace slice;
// GQA heads of one kv head each rebuild the key states (their polynomials differ).
#pragma once

#include <basisattn/cpu/support_steps.hpp>
#include <basisattn/attention/options.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/cpu/attention.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/support/features.hpp>
#include <basisattn/support/options.hpp>
#include <basisattn/support/plan.hpp>
#include <basisattn/support/polynomial.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <type_traits>

BASISATTN_BEGIN_NAMESPACE
namespace support {
namespace detail {

/// One query head.
template <class C, class T>
void run_head(const plan& pl, const slice_layout& lay, unsigned char* base, index_t h, const tensor3_view<const T>& q,
              const tensor3_view<const T>& k, const tensor3_view<const T>& v, const tensor3_view<T>& out,
              head_report& rep) {
  const auto& sh = pl.shape;
  head_ctx<C, T> c;
  c.p = &pl;
  c.lay = &lay;
  c.base = base;
  c.h = h;
  c.hk = h / sh.group;
  c.nq = sh.n_q;
  c.nkv = sh.n_kv;
  c.d = sh.d_qk;
  c.dv = v.extent[2];
  c.off = sh.causal_offset;
  c.blk = lay.blk;
  c.nl = pl.levels;
  c.g = lay.g;
  c.causal = pl.options.causal;
  const auto hu = static_cast<std::size_t>(h), hku = static_cast<std::size_t>(c.hk);

  // Load the head (q scaled) in the compute type.
  auto Q = c.Q();
  auto K = c.K();
  auto V = c.V();
  const C scale = static_cast<C>(sh.scale);
  for (index_t i = 0; i < c.nq; ++i)
    for (index_t e = 0; e < c.d; ++e) Q(i, e) = scale * basisattn::detail::to_compute<C>(q(i, h, e));
  for (index_t j = 0; j < c.nkv; ++j) {
    for (index_t e = 0; e < c.d; ++e) K(j, e) = basisattn::detail::to_compute<C>(k(j, c.hk, e));
    for (index_t e = 0; e < c.dv; ++e) V(j, e) = basisattn::detail::to_compute<C>(v(j, c.hk, e));
  }
  C* const cf = c.template at<C>(lay.coef);
  for (int bq = 0; bq < c.nl; ++bq)
    for (int bk = 0; bk < c.nl; ++bk) {
      const pair_poly& pp = pl.pairs[hu][static_cast<std::size_t>(bq * c.nl + bk)];
      for (index_t t = 0; t <= c.g; ++t)
        cf[(bq * c.nl + bk) * (c.g + 1) + t] =
            pp.degree > 0 ? static_cast<C>(pp.coef[static_cast<std::size_t>(t)]) : C(0);
    }

  // Accumulators.
  auto num = c.num();
  num.setZero();
  const auto& qb = pl.q_bucket[hu];
  for (index_t i = 0; i < c.nq; ++i) {
    const int b = qb[static_cast<std::size_t>(i)];
    c.dpoly()[i] = 0;
    c.m()[i] =
        b < c.nl ? static_cast<C>(pl.shift[hu][static_cast<std::size_t>(b)]) : -std::numeric_limits<C>::infinity();
  }
  if (pl.head_width[hu] > 0) {
    if (c.causal)
      poly_causal(c);
    else
      poly_noncausal(c);
  }

  // Rows after the polynomial part (flag: 0 exact only, 1 approximated, 2 bad). A row with no visible
  // polynomial key restarts its shift at -inf (the loose M_bq would push its exact weights to 0 in
  // float); a row whose polynomial sum is not a normal positive number (or whose numerator is not
  // finite) is bad; the others are renormalised to dpoly = 1 (m += log dpoly, num /= dpoly: the same
  // value), so the exact part's online max starts from the row's real magnitude.
  const auto& pre = pl.k_poly_prefix[hku];
  std::uint8_t* const flag = c.template at<std::uint8_t>(lay.flag);
  constexpr C tiny = std::numeric_limits<C>::min();
  constexpr C neg_inf = -std::numeric_limits<C>::infinity();
  for (index_t i = 0; i < c.nq; ++i) {
    flag[i] = 0;
    if (qb[static_cast<std::size_t>(i)] >= c.nl) continue;  // in R
    const index_t vis = c.causal ? std::min(c.nkv, i + c.off + 1) : c.nkv;
    if (pre[static_cast<std::size_t>(vis)] == 0) {
      c.m()[i] = neg_inf;
      continue;
    }
    const C dp = c.dpoly()[i];
    if (!(dp >= tiny) || !std::isfinite(dp) || !num.row(i).allFinite()) {
      flag[i] = 2;
      continue;
    }
    c.m()[i] += std::log(dp);
    num.row(i) /= dp;
    c.dpoly()[i] = 1;
    flag[i] = 1;
  }
  for (index_t i = 0; i < c.nq; ++i) c.den()[i] = c.dpoly()[i];

  // Exact part (bad rows are recomputed from scratch below).
  index_t* const rows = c.template at<index_t>(lay.rows);
  index_t n = 0;
  for (index_t i = 0; i < c.nq; ++i)
    if (qb[static_cast<std::size_t>(i)] < c.nl && flag[i] != 2) rows[n++] = i;
  const auto& ckeys = pl.k_rows[hku][static_cast<std::size_t>(c.nl)];
  if (n > 0 && !ckeys.empty()) exact_rows(c, rows, n, ckeys.data(), static_cast<index_t>(ckeys.size()));
  const auto& rrows = pl.q_rows[hu][static_cast<std::size_t>(c.nl)];
  if (!rrows.empty()) exact_rows(c, rrows.data(), static_cast<index_t>(rrows.size()), nullptr, c.nkv);

  // Bad rows (flagged above, or a denominator that is not a normal positive number, or a non-finite
  // numerator): recomputed exactly. Then out = num / den; a row that still overflows is recomputed too.
  auto recompute = [&](index_t count) {
    for (index_t r = 0; r < count; ++r) {
      const index_t i = rows[r];
      flag[i] = 2;
      num.row(i).setZero();
      c.den()[i] = 0;
      c.m()[i] = neg_inf;
    }
    if (count > 0) exact_rows(c, rows, count, nullptr, c.nkv);
  };
  n = 0;
  for (index_t i = 0; i < c.nq; ++i) {
    const C dd = c.den()[i];
    if (flag[i] == 2 || !(dd >= tiny) || !std::isfinite(dd) || !num.row(i).allFinite()) rows[n++] = i;
  }
  recompute(n);
  rep.repaired_rows = n;
  auto write_rows = [&](bool all) {
    index_t over = 0;
    for (index_t i = 0; i < c.nq; ++i) {
      if (!all && flag[i] != 2) continue;
      const C inv = C(1) / c.den()[i];
      bool finite = true;
      for (index_t e = 0; e < c.dv; ++e) {
        const C y = num(i, e) * inv;
        finite = finite && std::isfinite(y);
        out(i, h, e) = basisattn::detail::from_compute<T>(y);
      }
      if (!finite && flag[i] != 2) rows[over++] = i;
    }
    return over;
  };
  n = write_rows(true);
  if (n > 0) {
    recompute(n);
    rep.repaired_rows += n;
    write_rows(false);
  }

  // Error estimate over the approximated rows (not in R, not bad, with a visible polynomial key):
  // check_rows of them evenly spread, the last one always in. Rows computed exactly have no error.
  index_t na = 0;
  for (index_t i = 0; i < c.nq; ++i)
    if (flag[i] == 1) rows[na++] = i;
  rep.poly_rows = na;
  const index_t s = std::min<index_t>(static_cast<index_t>(pl.options.check_rows), na);
  rep.checked_rows = s;
  rep.fell_back = false;
  if (pl.options.check_rows == 0) return;              // estimate disabled: the estimates stay NaN
  rep.estimated_error = rep.mean_estimated_error = 0;  // 0 when every row was computed exactly
  double* const sbuf = c.template at<double>(lay.est);
  double* const y = sbuf + c.nkv;
  double sum = 0;
  for (index_t j = 0; j < s; ++j) {
    const index_t i = rows[((j + 1) * na) / s - 1];
    exact_row_double(pl, q, k, v, h, i, sbuf, y);
    double e2 = 0, y2 = 0;
    for (index_t e = 0; e < c.dv; ++e) {
      const double got = static_cast<double>(basisattn::detail::to_compute<compute_t<T>>(out(i, h, e)));
      e2 += (got - y[e]) * (got - y[e]);
      y2 += y[e] * y[e];
    }
    const double err = std::isfinite(e2) ? (y2 > 0 ? std::sqrt(e2 / y2) : std::sqrt(e2)) : INFINITY;
    rep.estimated_error = std::max(rep.estimated_error, err);
    sum += err;
  }
  if (s > 0) rep.mean_estimated_error = sum / double(s);
  // The fallback: the estimate is above the tolerance, or the polynomial guarantees nothing on its
  // range (poly_error >= 1: its weights may be off by 100% or change sign) while a tolerance is set.
  const bool no_guarantee = rep.poly_error >= 1 && std::isfinite(pl.options.tolerance);
  if (rep.estimated_error > pl.options.tolerance || no_guarantee) {
    attention_options ao;
    ao.causal = c.causal;
    ao.scale = sh.scale;
    ao.accumulate_double = std::is_same_v<C, double>;
    ao.check_finite = false;
    basisattn::attention(cpu{}, q.sub1(h, 1), k.sub1(c.hk, 1), v.sub1(c.hk, 1), out.sub1(h, 1), ao, base + lay.exact,
                         lay.exact_bytes);
    rep.fell_back = true;
  }
}

template <class C, class T>
void run_impl(const plan& pl, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v,
              tensor3_view<T> out, void* workspace, std::size_t bytes, head_report* report) {
  const slice_layout lay = make_slice_layout<C>(pl, v.extent[2]);
  const basisattn::detail::workspace_slices ws =
      basisattn::detail::slice_workspace(workspace, bytes, lay.slice, ws_align);
  BASISATTN_REQUIRE(ws.count >= 1, invalid_argument, "support::run: workspace of ", bytes, " bytes",
                    workspace ? "" : " (null)", " is too small; this problem needs at least ",
                    basisattn::detail::sliced_workspace_bytes(lay.slice, 1, ws_align),
                    " bytes (see support::workspace_bytes)");
  const index_t threads = std::min<index_t>(support_threads(pl), static_cast<index_t>(ws.count));
  basisattn::detail::parallel_for_slots(pl.shape.h_q, static_cast<int>(threads), [&](index_t h, int slot) {
    head_report rep = pl.report[static_cast<std::size_t>(h)];
    run_head<C, T>(pl, lay, ws[static_cast<std::size_t>(slot)], h, q, k, v, out, rep);
    if (report) report[h] = rep;
  });
}

}  // namespace detail

/// Bytes of caller-owned workspace that run(cpu{}, plan, ...) needs with value head dim d_v, with the
/// current thread count (one slice per thread, at most one thread per query head).
inline std::size_t workspace_bytes(cpu, const plan& p, index_t d_v) {
  BASISATTN_REQUIRE(d_v >= 1, invalid_argument, "support::workspace_bytes: d_v = ", d_v, " must be >= 1");
  const bool dbl = p.storage == dtype::f64 || p.options.accumulate_double;
  const std::size_t slice =
      dbl ? detail::make_slice_layout<double>(p, d_v).slice : detail::make_slice_layout<float>(p, d_v).slice;
  return basisattn::detail::sliced_workspace_bytes(slice, static_cast<std::size_t>(detail::support_threads(p)),
                                                   detail::ws_align);
}

/// Run support-basis attention with a plan made from the same q and k (extents, storage type and a
/// checksum of the values are checked: errc::invalid_argument for other q or k). v [n_kv, H_kv, d_v],
/// out [n_q, H_q, d_v]. Allocates nothing itself (Eigen's GEMM may allocate packing buffers for large
/// products). `report`, when not null, receives
/// H_q head reports.
template <class T>
void run(cpu, const plan& p, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v,
         tensor3_view<T> out, void* workspace, std::size_t workspace_bytes, head_report* report = nullptr) {
  static_assert(supports_storage_v<cpu, T> && !std::is_const_v<T>, "support::run: T must be a storage type");
  constexpr const char* fn = "support::run";
  const basisattn::detail::attention_shape sh = detail::check_run_args(fn, p, q, k, v, out);
  for (index_t h = 0; h < sh.h_q; ++h)
    BASISATTN_REQUIRE(basisattn::detail::same_checksum(basisattn::detail::head_checksum(q, h),
                                                       p.q_checksum[static_cast<std::size_t>(h)]),
                      invalid_argument, fn, ": q of head ", h, " differs from the q the plan was made from");
  for (index_t h = 0; h < sh.h_kv; ++h)
    BASISATTN_REQUIRE(basisattn::detail::same_checksum(basisattn::detail::head_checksum(k, h),
                                                       p.k_checksum[static_cast<std::size_t>(h)]),
                      invalid_argument, fn, ": k of head ", h, " differs from the k the plan was made from");
  if (p.options.check_finite) basisattn::detail::require_finite(v, "support::run: v");
  if constexpr (std::is_same_v<compute_t<T>, double>)
    detail::run_impl<double>(p, q, k, v, out, workspace, workspace_bytes, report);
  else if (p.options.accumulate_double)
    detail::run_impl<double>(p, q, k, v, out, workspace, workspace_bytes, report);
  else
    detail::run_impl<float>(p, q, k, v, out, workspace, workspace_bytes, report);
}

/// run with a workspace it allocates; returns the report (H_q heads).
template <class T>
report run(cpu, const plan& p, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v,
           tensor3_view<T> out) {
  BASISATTN_REQUIRE(v.extent[2] >= 1, invalid_argument, "support::run: v has d_v = ", v.extent[2], "; must be >= 1");
  const std::size_t bytes = workspace_bytes(cpu{}, p, v.extent[2]);
  std::unique_ptr<unsigned char[]> ws(new unsigned char[bytes]);
  report rep;
  rep.heads.resize(static_cast<std::size_t>(p.shape.h_q));
  run(cpu{}, p, q, k, v, out, ws.get(), bytes, rep.heads.data());
  for (const head_report& h : rep.heads) rep.fallbacks += h.fell_back ? 1 : 0;
  return rep;
}

/// Support-basis attention in one call (make_plan + run); returns the report (H_q heads).
template <class T>
report attention(cpu, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v, tensor3_view<T> out,
                 const options& opt = {}) {
  const plan p = make_plan(cpu{}, q, k, opt);
  return run(cpu{}, p, q, k, v, out);
}

}  // namespace support
BASISATTN_END_NAMESPACE
