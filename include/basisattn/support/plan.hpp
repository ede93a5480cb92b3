// basisattn/support/plan.hpp - the plan of support-basis attention: supports, buckets, polynomials.
//
// Public entry points (namespace basisattn::support):
//   pair_poly                       the polynomial of one (query bucket, key bucket) pair
//   plan                            everything run needs besides v and the workspace (movable, reusable
//                                   for the same q and k, which run checks by a checksum; read-only
//                                   after make_plan)
//   make_plan(cpu{}, q, k, opt)     q [n_q, H_q, d], k [n_kv, H_kv, d] (any storage type, any strides)
//
// What make_plan computes, per head, from the entries of q and k as given (post-RoPE, before the
// softmax scale: the entries that enter the dot product):
//   buckets  levels T_0 < ... < T_{L-1} (options.levels, or {options.threshold}); a row with max |entry|
//            = a is in bucket b = #{l : a > T_l}, so bucket L (the top) holds the rows with an entry
//            above T_{L-1}: R (queries) and C (keys, per kv head).
//   bounds   for each pair (bq, bk) of non-top buckets, B = scale * max_{bq} ||q_i|| * max_{bk} ||k_j||
//            (Cauchy-Schwarz over the rows actually in the buckets). This is never larger than the
//            max-abs bound scale * d * T_bq T_bk (||x|| <= sqrt(d) max |x_i|), and usually much smaller.
//   polys    fit_exp_auto(B, max_degree, target_error, cap): the lowest degree meeting the target, where
//            cap keeps the feature count <= options.max_features.
//   shift    M_bq = max over the bucket's pairs of B: the polynomial part of a query in bucket bq is
//            evaluated as sum_j p(s_ij) e^{-M_bq} [v_j, 1] (every exact weight e^{s - M_bq} is <= 1).
// Pairs with an empty bucket get degree 0 and no features.
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/support/features.hpp>
#include <basisattn/support/options.hpp>
#include <basisattn/support/polynomial.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace support {

/// Polynomial of one (query bucket, key bucket) pair.
struct pair_poly {
  int degree = 0;            ///< 0: the pair is empty (no polynomial)
  index_t width = 0;         ///< features used: feature_map::features(degree) (0 when empty)
  double bound = 0;          ///< score bound B of the pair
  exp_poly poly;             ///< fit of exp on [-B, B]
  std::vector<double> coef;  ///< poly.coef * e^{-M_bq}, padded with zeros to features.max_degree + 1
};

/// The plan of one support-basis attention problem (see the header comment).
struct plan {
  basisattn::detail::attention_shape shape;                   ///< n_q, n_kv, heads, dims, effective scale
  ::basisattn::support::options options;                      ///< the options it was made with
  dtype storage = dtype::f32;                                 ///< storage type of q and k (run requires the same)
  int levels = 1;                                             ///< L: buckets 0..L-1 are polynomial, bucket L is exact
  feature_map features;                                       ///< layout up to the highest degree any pair uses
  std::vector<std::vector<std::uint8_t>> q_bucket, k_bucket;  ///< [head][row] bucket of each row
  std::vector<std::vector<std::vector<index_t>>> q_rows, k_rows;  ///< [head][bucket] rows, ascending
  std::vector<std::vector<index_t>> k_poly_prefix;                ///< [kv head][j]: non-top keys among keys 0..j-1
  std::vector<std::vector<pair_poly>> pairs;                      ///< [query head][bq * L + bk]
  std::vector<std::vector<double>> shift;                         ///< [query head][bq]: M_bq
  std::vector<std::vector<index_t>> key_width;                    ///< [query head][bk]: features of bk's state
  std::vector<index_t> head_width;                                ///< [query head]: widest pair of the head
  index_t max_width = 0;                                          ///< widest pair of all heads
  std::vector<head_report> report;                                ///< [query head]: make_plan's part of the report
  std::vector<double> q_checksum, k_checksum;                     ///< [head]: detail::head_checksum of q and k (run
                                                                  ///< refuses other q, k: the supports would be stale)
};

namespace detail {

/// Bucket of a row with max |entry| = a.
inline int bucket_of(double a, const std::vector<double>& lv) {
  int b = 0;
  while (b < static_cast<int>(lv.size()) && a > lv[static_cast<std::size_t>(b)]) ++b;
  return b;
}

/// Buckets of the rows of head `head` of x and the largest row norm of each bucket.
template <class T>
void bucket_rows(const tensor3_view<const T>& x, index_t head, const std::vector<double>& lv,
                 std::vector<std::uint8_t>& bucket, std::vector<std::vector<index_t>>& rows,
                 std::vector<double>& max_norm) {
  const index_t n = x.extent[0], d = x.extent[2];
  const int nl = static_cast<int>(lv.size());
  bucket.assign(static_cast<std::size_t>(n), 0);
  rows.assign(static_cast<std::size_t>(nl + 1), {});
  max_norm.assign(static_cast<std::size_t>(nl + 1), 0.0);
  for (index_t i = 0; i < n; ++i) {
    double a = 0, s = 0;
    for (index_t c = 0; c < d; ++c) {
      const double e = static_cast<double>(basisattn::detail::to_compute<compute_t<T>>(x(i, head, c)));
      a = std::isnan(e) ? INFINITY : std::max(a, std::abs(e));  // NaN (check_finite off): exact bucket
      s += e * e;
    }
    const int b = bucket_of(a, lv);
    bucket[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(b);
    rows[static_cast<std::size_t>(b)].push_back(i);
    max_norm[static_cast<std::size_t>(b)] = std::max(max_norm[static_cast<std::size_t>(b)], std::sqrt(s));
  }
}

/// Checks of q and k shared by make_plan and run.
template <class T>
void check_plan_args(const char* fn, const tensor3_view<const T>& q, const tensor3_view<const T>& k,
                     const options& opt) {
  BASISATTN_REQUIRE(q.extent[0] >= 1 && q.extent[1] >= 1 && q.extent[2] >= 1, invalid_argument, fn, ": q has extents ",
                    basisattn::detail::extents_string(q), "; n_q, H_q and d_qk must be >= 1");
  BASISATTN_REQUIRE(k.extent[0] >= 1 && k.extent[1] >= 1 && k.extent[2] >= 1, invalid_argument, fn, ": k has extents ",
                    basisattn::detail::extents_string(k), "; n_kv, H_kv and d_qk must be >= 1");
  BASISATTN_REQUIRE(k.extent[2] == q.extent[2], shape_mismatch, fn, ": q ", basisattn::detail::extents_string(q),
                    " has d_qk = ", q.extent[2], " but k ", basisattn::detail::extents_string(k),
                    " has d_qk = ", k.extent[2]);
  BASISATTN_REQUIRE(q.extent[1] % k.extent[1] == 0, shape_mismatch, fn, ": q ", basisattn::detail::extents_string(q),
                    " has H_q = ", q.extent[1], " heads, not a multiple of the H_kv = ", k.extent[1], " heads of k ",
                    basisattn::detail::extents_string(k));
  BASISATTN_REQUIRE(!opt.causal || q.extent[0] <= k.extent[0], invalid_argument, fn,
                    ": causal attention needs n_q <= n_kv, but q has n_q = ", q.extent[0],
                    " tokens and k has n_kv = ", k.extent[0]);
  BASISATTN_REQUIRE(q.data && k.data, invalid_argument, fn, ": ", !q.data ? "q" : "k", ".data is null");
}

/// The arguments of a run (CPU or CUDA) against its plan: extents, mask, the plan's shape and storage
/// type (the values of q and k are the backend's to check).
template <class T>
basisattn::detail::attention_shape check_run_args(const char* fn, const plan& p, const tensor3_view<const T>& q,
                                                  const tensor3_view<const T>& k, const tensor3_view<const T>& v,
                                                  const tensor3_view<T>& out) {
  using basisattn::detail::extents_string;
  attention_options ao;
  ao.causal = p.options.causal;
  ao.scale = p.options.scale;
  const basisattn::detail::attention_shape sh = basisattn::detail::check_attention_args(fn, q, k, v, out, ao);
  BASISATTN_REQUIRE(sh.n_q == p.shape.n_q && sh.n_kv == p.shape.n_kv && sh.h_q == p.shape.h_q &&
                        sh.h_kv == p.shape.h_kv && sh.d_qk == p.shape.d_qk,
                    shape_mismatch, fn, ": q ", extents_string(q), " and k ", extents_string(k),
                    " do not match the plan's q [", p.shape.n_q, ", ", p.shape.h_q, ", ", p.shape.d_qk, "] and k [",
                    p.shape.n_kv, ", ", p.shape.h_kv, ", ", p.shape.d_qk, "]");
  BASISATTN_REQUIRE(dtype_of_v<T> == p.storage, invalid_argument, fn, ": the plan was made for ", to_string(p.storage),
                    " storage, run got ", to_string(dtype_of_v<T>));
  return sh;
}

}  // namespace detail

/// Make the plan of support-basis attention for q and k (see the header comment).
template <class T>
plan make_plan(cpu, tensor3_view<const T> q, tensor3_view<const T> k, const options& opt = {}) {
  static_assert(supports_storage_v<cpu, T>, "support::make_plan: T must be a storage type");
  constexpr const char* fn = "support::make_plan";
  detail::check_options(fn, opt);
  detail::check_plan_args(fn, q, k, opt);
  if (opt.check_finite) {
    basisattn::detail::require_finite(q, "support::make_plan: q");
    basisattn::detail::require_finite(k, "support::make_plan: k");
  }

  plan p;
  p.options = opt;
  p.storage = dtype_of_v<T>;
  auto& s = p.shape;
  s.n_q = q.extent[0];
  s.n_kv = k.extent[0];
  s.h_q = q.extent[1];
  s.h_kv = k.extent[1];
  s.d_qk = q.extent[2];
  s.d_v = 0;  // known at run time
  s.group = s.h_q / s.h_kv;
  s.causal_offset = s.n_kv - s.n_q;
  s.scale = opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(s.d_qk));

  const std::vector<double> lv = opt.levels.empty() ? std::vector<double>{opt.threshold} : opt.levels;
  const int nl = static_cast<int>(lv.size());
  p.levels = nl;

  // Highest degree whose feature count fits max_features.
  const index_t d = s.d_qk;
  auto count = [&](int g) -> std::int64_t {
    if (!opt.sketch || g <= 1) return monomial_feature_count(d, g);
    return 1 + d + static_cast<std::int64_t>(g - 1) * opt.sketch_size;
  };
  int cap = 0;
  while (cap < opt.max_degree && count(cap + 1) <= opt.max_features) ++cap;
  BASISATTN_REQUIRE(cap >= 1, invalid_argument, fn, ": options.max_features = ", opt.max_features, " is below the ",
                    count(1), " features of degree 1 (d_qk = ", d, ")");

  std::vector<std::vector<double>> k_norm(static_cast<std::size_t>(s.h_kv));
  p.k_bucket.resize(static_cast<std::size_t>(s.h_kv));
  p.k_rows.resize(static_cast<std::size_t>(s.h_kv));
  p.k_poly_prefix.resize(static_cast<std::size_t>(s.h_kv));
  for (index_t hk = 0; hk < s.h_kv; ++hk) {
    const auto hu = static_cast<std::size_t>(hk);
    detail::bucket_rows(k, hk, lv, p.k_bucket[hu], p.k_rows[hu], k_norm[hu]);
    auto& pre = p.k_poly_prefix[hu];
    pre.assign(static_cast<std::size_t>(s.n_kv + 1), 0);
    for (index_t j = 0; j < s.n_kv; ++j)
      pre[static_cast<std::size_t>(j + 1)] =
          pre[static_cast<std::size_t>(j)] + (p.k_bucket[hu][static_cast<std::size_t>(j)] < nl);
  }

  p.q_bucket.resize(static_cast<std::size_t>(s.h_q));
  p.q_rows.resize(static_cast<std::size_t>(s.h_q));
  p.pairs.resize(static_cast<std::size_t>(s.h_q));
  p.shift.resize(static_cast<std::size_t>(s.h_q));
  p.report.resize(static_cast<std::size_t>(s.h_q));
  int g_used = 0;
  std::vector<double> q_norm;
  for (index_t h = 0; h < s.h_q; ++h) {
    const auto hu = static_cast<std::size_t>(h), hku = static_cast<std::size_t>(h / s.group);
    detail::bucket_rows(q, h, lv, p.q_bucket[hu], p.q_rows[hu], q_norm);
    auto& pairs = p.pairs[hu];
    pairs.assign(static_cast<std::size_t>(nl * nl), pair_poly{});
    p.shift[hu].assign(static_cast<std::size_t>(nl), 0.0);
    head_report& rep = p.report[hu];
    rep.query_support = double(p.q_rows[hu][static_cast<std::size_t>(nl)].size()) / double(s.n_q);
    rep.key_support = double(p.k_rows[hku][static_cast<std::size_t>(nl)].size()) / double(s.n_kv);
    for (int bq = 0; bq < nl; ++bq) {
      if (p.q_rows[hu][static_cast<std::size_t>(bq)].empty()) continue;
      for (int bk = 0; bk < nl; ++bk) {
        if (p.k_rows[hku][static_cast<std::size_t>(bk)].empty()) continue;
        pair_poly& pp = pairs[static_cast<std::size_t>(bq * nl + bk)];
        pp.bound = s.scale * q_norm[static_cast<std::size_t>(bq)] * k_norm[hku][static_cast<std::size_t>(bk)];
        pp.poly = fit_exp_auto(pp.bound, opt.max_degree, opt.target_error, cap);
        pp.degree = pp.poly.degree;
        p.shift[hu][static_cast<std::size_t>(bq)] = std::max(p.shift[hu][static_cast<std::size_t>(bq)], pp.bound);
        g_used = std::max(g_used, pp.degree);
        rep.degree = std::max(rep.degree, pp.degree);
        rep.bound = std::max(rep.bound, pp.bound);
        rep.poly_error = std::max(rep.poly_error, pp.poly.max_rel_error);
      }
    }
  }

  p.q_checksum.resize(static_cast<std::size_t>(s.h_q));
  p.k_checksum.resize(static_cast<std::size_t>(s.h_kv));
  for (index_t h = 0; h < s.h_q; ++h)
    p.q_checksum[static_cast<std::size_t>(h)] = basisattn::detail::head_checksum(q, h);
  for (index_t h = 0; h < s.h_kv; ++h)
    p.k_checksum[static_cast<std::size_t>(h)] = basisattn::detail::head_checksum(k, h);

  p.features =
      make_feature_map(d, g_used, opt.sketch, opt.sketch ? static_cast<index_t>(opt.sketch_size) : 0, opt.seed);
  p.key_width.resize(static_cast<std::size_t>(s.h_q));
  p.head_width.assign(static_cast<std::size_t>(s.h_q), 0);
  for (index_t h = 0; h < s.h_q; ++h) {
    const auto hu = static_cast<std::size_t>(h);
    p.key_width[hu].assign(static_cast<std::size_t>(nl), 0);
    for (int bq = 0; bq < nl; ++bq)
      for (int bk = 0; bk < nl; ++bk) {
        pair_poly& pp = p.pairs[hu][static_cast<std::size_t>(bq * nl + bk)];
        if (pp.degree == 0) continue;
        pp.width = p.features.features(pp.degree);
        pp.coef.assign(static_cast<std::size_t>(g_used + 1), 0.0);
        const double e = std::exp(-p.shift[hu][static_cast<std::size_t>(bq)]);
        for (int t = 0; t <= pp.degree; ++t)
          pp.coef[static_cast<std::size_t>(t)] = pp.poly.coef[static_cast<std::size_t>(t)] * e;
        p.key_width[hu][static_cast<std::size_t>(bk)] =
            std::max(p.key_width[hu][static_cast<std::size_t>(bk)], pp.width);
        p.head_width[hu] = std::max(p.head_width[hu], pp.width);
      }
    p.max_width = std::max(p.max_width, p.head_width[hu]);
    if (p.report[hu].degree > 0) p.report[hu].features = p.features.features(p.report[hu].degree);
  }
  return p;
}

}  // namespace support
BASISATTN_END_NAMESPACE
