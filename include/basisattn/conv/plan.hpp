// basisattn/conv/plan.hpp - conv-basis planning, backend-neutral (entry points documented in
// <basisattn/conv.hpp>).
//
// make_plan recovers, per query head (in parallel over heads), the anchors and kernels of the lower
// basis (and the upper one when non-causal) from q and k in double (conv/recovery.hpp), samples the
// structure diagnostic and keeps a checksum of q and k. The plan lives on the host; the CPU run
// (<basisattn/cpu/conv.hpp>) and the CUDA run (<basisattn/cuda/conv.hpp>) both apply it, and share
// the argument checks and the choice of sampled rows below.
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/conv/options.hpp>
#include <basisattn/conv/recovery.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/core/view.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace conv {

/// Smallest multiple of 4 that is >= m and has no prime factor other than 2, 3 and 5.
inline index_t fft_size(index_t m) {
  index_t n = m < 4 ? 4 : (m + 3) / 4 * 4;
  for (;; n += 4) {
    index_t r = n;
    for (index_t p : {2, 3, 5})
      while (r % p == 0) r /= p;
    if (r == 1) return n;
  }
}

namespace detail {

/// Rows of head h of x (n x d) in double.
template <class T>
mat_d head_to_double(const tensor3_view<const T>& x, index_t h) {
  mat_d m(x.extent[0], x.extent[2]);
  for (index_t i = 0; i < x.extent[0]; ++i)
    for (index_t c = 0; c < x.extent[2]; ++c)
      m(i, c) = static_cast<double>(basisattn::detail::to_compute<compute_t<T>>(x(i, h, c)));
  return m;
}

/// The checksum of q and k of query head h (kv head hk) a plan keeps: a run refuses other q, k.
template <class T>
double qk_checksum(const tensor3_view<const T>& q, const tensor3_view<const T>& k, index_t h, index_t hk) {
  return basisattn::detail::head_checksum(q, h) + basisattn::detail::head_checksum(k, hk);
}

inline void check_options(const char* fn, const options& opt, index_t n) {
  BASISATTN_REQUIRE(opt.k >= 1 && opt.k <= n, invalid_argument, fn, ": options.k = ", opt.k,
                    " must be in [1, n] (n = ", n, " tokens)");
  BASISATTN_REQUIRE(opt.probe >= 1, invalid_argument, fn, ": options.probe = ", opt.probe, " must be >= 1");
  BASISATTN_REQUIRE(std::isfinite(opt.delta) && opt.delta >= 0, invalid_argument, fn, ": options.delta = ", opt.delta,
                    " must be finite and >= 0");
  BASISATTN_REQUIRE(opt.rule != anchor_rule::search || opt.delta > 0, invalid_argument, fn,
                    ": anchor_rule::search needs options.delta > 0 (the l1 threshold per compared logit)");
  if (opt.rule == anchor_rule::given) {
    BASISATTN_REQUIRE(!opt.anchors.empty() && opt.anchors.front() == 0, invalid_argument, fn,
                      ": anchor_rule::given needs options.anchors to start with 0");
    BASISATTN_REQUIRE(static_cast<index_t>(opt.anchors.size()) <= opt.k, invalid_argument, fn, ": ", opt.anchors.size(),
                      " anchors given but options.k = ", opt.k);
    for (std::size_t i = 1; i < opt.anchors.size(); ++i)
      BASISATTN_REQUIRE(opt.anchors[i] > opt.anchors[i - 1] && opt.anchors[i] < n, invalid_argument, fn,
                        ": options.anchors must be ascending, distinct and < n = ", n, "; entry ", i, " is ",
                        opt.anchors[i], " after ", opt.anchors[i - 1]);
  }
  BASISATTN_REQUIRE(opt.check_rows >= 0, invalid_argument, fn, ": options.check_rows = ", opt.check_rows,
                    " must be >= 0");
  BASISATTN_REQUIRE(!std::isnan(opt.tolerance) && opt.tolerance >= 0, invalid_argument, fn,
                    ": options.tolerance = ", opt.tolerance, " must be >= 0 (infinity: never fall back)");
  BASISATTN_REQUIRE(std::isfinite(opt.fft_tolerance) && opt.fft_tolerance > 0, invalid_argument, fn,
                    ": options.fft_tolerance = ", opt.fft_tolerance, " must be finite and > 0");
  BASISATTN_REQUIRE(opt.diagnostic_samples >= 0, invalid_argument, fn,
                    ": options.diagnostic_samples = ", opt.diagnostic_samples, " must be >= 0");
  BASISATTN_REQUIRE(std::isfinite(opt.scale) && opt.scale >= 0, invalid_argument, fn, ": options.scale = ", opt.scale,
                    " must be finite and >= 0 (0 selects 1/sqrt(d_qk))");
}

template <class T>
void check_qk(const char* fn, const tensor3_view<const T>& q, const tensor3_view<const T>& k) {
  using basisattn::detail::extents_string;
  BASISATTN_REQUIRE(q.extent[0] >= 1 && q.extent[1] >= 1 && q.extent[2] >= 1, invalid_argument, fn, ": q has extents ",
                    extents_string(q), "; n, H_q and d_qk must be >= 1");
  BASISATTN_REQUIRE(k.extent[1] >= 1, invalid_argument, fn, ": k has extents ", extents_string(k),
                    "; H_kv must be >= 1");
  BASISATTN_REQUIRE(k.extent[0] == q.extent[0], shape_mismatch, fn,
                    ": conv-basis attention is self-attention (n_q == n_kv), but q ", extents_string(q), " has ",
                    q.extent[0], " tokens and k ", extents_string(k), " has ", k.extent[0]);
  BASISATTN_REQUIRE(k.extent[2] == q.extent[2], shape_mismatch, fn, ": q ", extents_string(q),
                    " has d_qk = ", q.extent[2], " but k ", extents_string(k), " has d_qk = ", k.extent[2]);
  BASISATTN_REQUIRE(q.extent[1] % k.extent[1] == 0, shape_mismatch, fn, ": q ", extents_string(q),
                    " has H_q = ", q.extent[1], " heads, not a multiple of the H_kv = ", k.extent[1], " heads of k ",
                    extents_string(k));
  BASISATTN_REQUIRE(q.data && k.data, invalid_argument, fn, ": ", !q.data ? "q" : "k", ".data is null");
}

/// The arguments of a run (CPU or CUDA) against its plan: extents, mask, and the plan's shape.
template <class T>
basisattn::detail::attention_shape check_run_args(const char* fn, const plan& p, const tensor3_view<const T>& q,
                                                  const tensor3_view<const T>& k, const tensor3_view<const T>& v,
                                                  const tensor3_view<T>& out) {
  using basisattn::detail::extents_string;
  attention_options aopt;
  aopt.causal = p.opt.causal;
  aopt.scale = p.scale;
  const basisattn::detail::attention_shape sh = basisattn::detail::check_attention_args(fn, q, k, v, out, aopt);
  check_qk(fn, q, k);
  BASISATTN_REQUIRE(!p.heads.empty(), invalid_argument, fn, ": the plan is empty (make it with conv::make_plan)");
  BASISATTN_REQUIRE(sh.n_q == p.n && sh.h_q == p.h_q && sh.h_kv == p.h_kv && sh.d_qk == p.d_qk, shape_mismatch, fn,
                    ": the plan was made for n = ", p.n, ", H_q = ", p.h_q, ", H_kv = ", p.h_kv, ", d_qk = ", p.d_qk,
                    " but q ", extents_string(q), " and k ", extents_string(k), " were passed");
  return sh;
}

inline int run_threads(index_t h_q) {
  return static_cast<int>(std::max<index_t>(1, std::min<index_t>(basisattn::detail::cpu_threads(), h_q)));
}

/// Sampled rows of a head: check_rows distinct rows, the last one always among them, ascending.
inline std::vector<index_t> sampled_rows(index_t n, index_t count, std::uint64_t seed) {
  std::vector<index_t> rows;
  if (count <= 0) return rows;
  rows.push_back(n - 1);
  if (count >= n) {
    rows.resize(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) rows[std::size_t(i)] = i;
    return rows;
  }
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<index_t> d(0, n - 2);
  while (static_cast<index_t>(rows.size()) < count) {
    const index_t r = d(g);
    if (std::find(rows.begin(), rows.end(), r) == rows.end()) rows.push_back(r);
  }
  std::sort(rows.begin(), rows.end());
  return rows;
}

/// The rows query head h of a run on plan p checks exactly: the same on every backend.
inline std::vector<index_t> head_sampled_rows(const plan& p, index_t h) {
  return sampled_rows(p.n, p.opt.check_rows, p.opt.seed + std::uint64_t(h) * 7919u);
}

}  // namespace detail

/// See <basisattn/conv.hpp>.
template <class T>
plan make_plan(cpu, tensor3_view<const T> q, tensor3_view<const T> k, const options& opt = {}) {
  static_assert(supports_storage_v<cpu, T>, "conv::make_plan: T must be a storage type");
  const char* fn = "conv::make_plan";
  detail::check_qk(fn, q, k);
  const index_t n = q.extent[0];
  detail::check_options(fn, opt, n);
  if (opt.check_finite) {
    basisattn::detail::require_finite(q, "conv::make_plan: q");
    basisattn::detail::require_finite(k, "conv::make_plan: k");
  }
  plan p;
  p.n = n;
  p.h_q = q.extent[1];
  p.h_kv = k.extent[1];
  p.d_qk = q.extent[2];
  p.scale = opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(double(p.d_qk));
  p.opt = opt;
  p.heads.resize(static_cast<std::size_t>(p.h_q));
  p.checksums.resize(static_cast<std::size_t>(p.h_q));
  const index_t group = p.h_q / p.h_kv;
  basisattn::detail::parallel_for_slots(p.h_q, detail::run_threads(p.h_q), [&](index_t h, int) {
    const detail::mat_d Q = detail::head_to_double(q, h), K = detail::head_to_double(k, h / group);
    head_plan& hp = p.heads[std::size_t(h)];
    hp.lower = detail::recover_basis(Q, K, p.scale, 0, opt);
    if (!opt.causal) hp.upper = detail::recover_basis(K, Q, p.scale, 1, opt);
    detail::structure_diagnostic(Q, K, p.scale, opt.causal, opt.diagnostic_samples,
                                 opt.seed ^ (std::uint64_t(h) * 0x9E3779B97F4A7C15ull), hp);
    p.checksums[std::size_t(h)] = detail::qk_checksum(q, k, h, h / group);
  });
  return p;
}

}  // namespace conv
BASISATTN_END_NAMESPACE
