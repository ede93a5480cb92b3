// basisattn/conv/recovery.hpp - recovery of a conv basis from Q and K (internal, namespace detail).
//
// All of it works on one head at a time with the head's q and k already in double (n x d each):
//   recover_basis(A, B, scale, lag0, opt)  anchors + kernels of the lower triangle of scale * A B^T
//       (lag0 = 0), or of its strict lower triangle (lag0 = 1). The upper triangle of S = scale Q K^T is
//       the strict lower triangle of scale K Q^T, so (A, B) = (K, Q), lag0 = 1 gives the upper basis.
//   block_of(b, c)                         the block of the basis that column c belongs to
//   structure_diagnostic(...)              explained logit variance on sampled visible entries
// (The logit a whole head plan assigns to an entry, basis_logit, is in <basisattn/cpu/conv.hpp>.)
// Never forms the n x n logits: kernels cost O(k n d), change_scan O(n probe d), search
// O(k probe d log n).
#pragma once

#include <basisattn/conv/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace conv {
namespace detail {

using mat_d = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Mean |scale a_{j+t} . b_j - ref[t]| over t in [lag0, lag0 + probe) with j + t < n. `ref` indexed by t.
inline double column_difference(const mat_d& A, const mat_d& B, double scale, index_t j, const double* ref,
                                index_t lag0, index_t probe) {
  const index_t n = A.rows();
  const index_t t_end = std::min(lag0 + probe, n - j);
  if (t_end <= lag0) return 0;
  double s = 0;
  for (index_t t = lag0; t < t_end; ++t) s += std::abs(scale * A.row(j + t).dot(B.row(j)) - ref[t]);
  return s / double(t_end - lag0);
}

/// Kernels of the given anchors: kernel i is column anchors[i] of scale * A B^T from the diagonal down.
inline void fill_kernels(const mat_d& A, const mat_d& B, double scale, basis& b) {
  const index_t n = A.rows();
  b.offsets.clear();
  std::size_t total = 0;
  for (index_t a : b.anchors) {
    b.offsets.push_back(total);
    total += static_cast<std::size_t>(n - a);
  }
  b.values.resize(total);
  for (index_t i = 0; i < b.size(); ++i) {
    const index_t a = b.begin(i), len = n - a;
    Eigen::Map<Eigen::VectorXd> u(b.values.data() + b.offsets[static_cast<std::size_t>(i)], len);
    u.noalias() = scale * (A.middleRows(a, len) * B.row(a).transpose());
  }
}

/// Anchors and kernels of the (strict, when lag0 = 1) lower triangle of scale * A B^T.
inline basis recover_basis(const mat_d& A, const mat_d& B, double scale, index_t lag0, const options& opt) {
  const index_t n = A.rows();
  basis b;
  const index_t k = std::min(opt.k, n);
  if (opt.rule == anchor_rule::given) {
    b.anchors = opt.anchors;
  } else if (opt.rule == anchor_rule::change_scan) {
    // score_j = mean_t |S[j+t, j] - S[j-1+t, j-1]| over the first `probe` lags.
    std::vector<double> prev(static_cast<std::size_t>(lag0 + opt.probe)), cur(prev.size());
    auto band = [&](index_t j, std::vector<double>& out) {
      const index_t t_end = std::min(lag0 + opt.probe, n - j);
      for (index_t t = lag0; t < t_end; ++t) out[static_cast<std::size_t>(t)] = scale * A.row(j + t).dot(B.row(j));
      return t_end;
    };
    std::vector<std::pair<double, index_t>> scores;
    scores.reserve(static_cast<std::size_t>(n));
    band(0, prev);
    for (index_t j = 1; j < n; ++j) {
      const index_t t_end = band(j, cur);
      double s = 0;
      for (index_t t = lag0; t < t_end; ++t)
        s += std::abs(cur[static_cast<std::size_t>(t)] - prev[static_cast<std::size_t>(t)]);
      if (t_end > lag0) {
        s /= double(t_end - lag0);
        if (s > opt.delta) scores.emplace_back(s, j);
      }
      std::swap(prev, cur);
    }
    const std::size_t take = std::min(scores.size(), static_cast<std::size_t>(k - 1));
    // Largest scores first; ties go to the earlier column.
    std::partial_sort(
        scores.begin(), scores.begin() + static_cast<std::ptrdiff_t>(take), scores.end(),
        [](const auto& x, const auto& y) { return x.first > y.first || (x.first == y.first && x.second < y.second); });
    b.anchors.push_back(0);
    for (std::size_t i = 0; i < take; ++i) b.anchors.push_back(scores[i].second);
    std::sort(b.anchors.begin(), b.anchors.end());
  } else {  // search
    b.anchors.push_back(0);
    std::vector<double> ref(static_cast<std::size_t>(n));
    while (b.size() < k) {
      const index_t a = b.anchors.back();
      const index_t t_end = std::min(lag0 + opt.probe, n - a);
      for (index_t t = lag0; t < t_end; ++t) ref[static_cast<std::size_t>(t)] = scale * A.row(a + t).dot(B.row(a));
      // Column j is compared on lags [lag0, min(t_end, n - j)) (the kernel's first probe entries).
      auto differs = [&](index_t j) {
        const index_t probe = std::min(opt.probe, t_end - lag0);
        return column_difference(A, B, scale, j, ref.data(), lag0, probe) > opt.delta;
      };
      index_t lo = a + 1, hi = n - 1 - lag0;  // columns with at least one visible lag
      if (lo > hi || !differs(hi)) break;
      while (lo < hi) {  // first column that differs, assuming monotonicity
        const index_t mid = lo + (hi - lo) / 2;
        if (differs(mid))
          hi = mid;
        else
          lo = mid + 1;
      }
      b.anchors.push_back(lo);
    }
  }
  fill_kernels(A, B, scale, b);
  return b;
}

/// The block of the basis that column c falls in (the last anchor <= c).
inline index_t block_of(const basis& b, index_t c) {
  return static_cast<index_t>(std::upper_bound(b.anchors.begin(), b.anchors.end(), c) - b.anchors.begin()) - 1;
}

/// Structure diagnostic of one head: explained variance (1 - SSE/SST) and the largest |error| of the
/// basis logits on `samples` visible entries drawn uniformly (lower triangle; both triangles when
/// non-causal). Q, K are the head's rows in double.
inline void structure_diagnostic(const mat_d& Q, const mat_d& K, double scale, bool causal, index_t samples,
                                 std::uint64_t seed, head_plan& hp) {
  if (samples <= 0) return;
  const index_t n = Q.rows();
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  std::vector<double> exact(static_cast<std::size_t>(samples)), pred(exact.size());
  for (index_t s = 0; s < samples; ++s) {
    index_t r, c;
    if (causal) {  // uniform over the n(n+1)/2 visible entries
      const double x = unif(g) * double(n) * double(n + 1) / 2.0;
      r = std::min<index_t>(n - 1, static_cast<index_t>((std::sqrt(8.0 * x + 1.0) - 1.0) / 2.0));
      c = std::min<index_t>(r, static_cast<index_t>(unif(g) * double(r + 1)));
    } else {
      r = std::min<index_t>(n - 1, static_cast<index_t>(unif(g) * double(n)));
      c = std::min<index_t>(n - 1, static_cast<index_t>(unif(g) * double(n)));
    }
    exact[static_cast<std::size_t>(s)] = scale * Q.row(r).dot(K.row(c));
    if (c <= r) {
      const index_t i = block_of(hp.lower, c);
      pred[static_cast<std::size_t>(s)] = hp.lower.kernel(i)[r - c];
    } else {
      const index_t i = block_of(hp.upper, r);
      pred[static_cast<std::size_t>(s)] = hp.upper.kernel(i)[c - r];
    }
  }
  const double mean = std::accumulate(exact.begin(), exact.end(), 0.0) / double(samples);
  double sse = 0, sst = 0, mx = 0;
  for (std::size_t s = 0; s < exact.size(); ++s) {
    const double e = exact[s] - pred[s];
    sse += e * e;
    sst += (exact[s] - mean) * (exact[s] - mean);
    mx = std::max(mx, std::abs(e));
  }
  hp.explained = sst > 0 ? 1.0 - sse / sst : (sse == 0 ? 1.0 : 0.0);
  hp.max_logit_error = mx;
}

}  // namespace detail
}  // namespace conv
BASISATTN_END_NAMESPACE
