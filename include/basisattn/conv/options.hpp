// basisattn/conv/options.hpp - options, plan and report types of conv-basis attention.
//
// Conv-basis attention (Liang et al., arXiv 2405.05219) writes the lower-triangular attention logits
// of one head as a sum of k convolution matrices: with anchors s_1 = 0 < s_2 < ... < s_k and
// cumulative kernels u_i (length n - s_i), every column c in block [s_i, s_{i+1}) gets
//     logit(r, c) = u_i[r - c]           for r >= c,
// i.e. the diagonal-aligned columns are piecewise constant in k pieces. u_i is column s_i of the
// true logits (scale * Q K^T), so the approximation is exact on the anchor columns and wherever the
// structure holds. Softmax keeps the structure (exp is entry-wise), so the output
//     Y = D^-1 sum_i Toep(exp(u_i - g)) V[s_i : s_{i+1})
// costs k (d_v + 1) FFT convolutions: O(k d n log n) instead of O(n^2 d). Non-causal attention adds a
// second basis for the strict upper triangle: row anchors p_i and kernels w_i with
// logit(r, r + t) = w_i[t] (t >= 1) for rows r in [p_i, p_{i+1}).
//
// Public types (namespace basisattn::conv):
//   anchor_rule     how anchors are found: change_scan (default), search (the paper's), given
//   fft_precision   f64 (default) or f32_checked (float FFTs only when a dynamic-range bound allows)
//   options         k, rule, probe length, delta, causal, scale, error control, fallback tolerance
//   basis           anchors and kernels of one triangle of one head
//   head_plan       lower (and upper) basis of one query head plus its structure diagnostic
//   plan            everything make_plan recovered; reusable for several runs with the same q, k
//   head_report     what one run measured per head: error estimate, repaired rows, fallback, ...
//   report          all heads of a run
// The entry points are in <basisattn/conv.hpp>.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/report.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace conv {

/// How a plan chooses its anchors.
enum class anchor_rule {
  /// Linear scan: every column j >= 1 gets a change score, the mean |difference| between its first
  /// `probe` diagonal-aligned logits and those of column j - 1; the anchors are column 0 and the
  /// k - 1 columns with the largest scores above `delta` (O(n probe d)). Needs no monotonicity.
  change_scan,
  /// The paper's search: the next anchor is the first column after the last anchor whose first
  /// `probe` diagonal-aligned logits differ from the current kernel by more than `delta` (mean
  /// |difference|), found by binary search (O(probe d log n) per anchor). Assumes that once a column
  /// differs, every later one does; stops early when no later column differs.
  search,
  /// The anchors in options.anchors, used for every head (and for the upper triangle too).
  given,
};

/// Precision of the FFTs of a run.
enum class fft_precision {
  f64,          ///< double FFTs (default)
  f32_checked,  ///< float FFTs for a head only when the per-row error bound allows it, else double
};

/// Options of conv-basis attention.
struct options {
  /// Largest basis size (number of anchors) per head and triangle; 1 <= k <= n.
  index_t k = 8;
  anchor_rule rule = anchor_rule::change_scan;
  /// Diagonal-aligned logits compared per column (T in the notes), >= 1.
  index_t probe = 16;
  /// change_scan: scores <= delta are not changes. search: the threshold (must be > 0).
  double delta = 0;
  /// anchor_rule::given: ascending, distinct, first entry 0, all < n.
  std::vector<index_t> anchors;
  /// Causal (lower triangle) or full attention (a second basis for the upper triangle). Conv-basis
  /// attention is self-attention: n_q == n_kv.
  bool causal = true;
  /// Softmax scale applied to q.k; 0 selects 1/sqrt(d_qk).
  double scale = 0;
  /// Exactly computed rows per head for the error estimate (the last row is always one of them);
  /// 0 disables the estimate (and the fallback).
  index_t check_rows = 8;
  /// A head whose estimated error (largest relative l2 error of a checked row) exceeds this is
  /// recomputed with exact attention: safe by default, as support::options (1e-2). Infinity never
  /// falls back (to measure the approximation itself).
  double tolerance = 1e-2;
  /// Rows whose FFT error bound (relative to max |v|) exceeds this are recomputed directly from the
  /// basis (O(n d) each) instead of being taken from the FFTs; must be > 0.
  double fft_tolerance = 1e-6;
  fft_precision precision = fft_precision::f64;
  /// Entries sampled (per head and triangle) for the structure diagnostic; 0 disables it.
  index_t diagnostic_samples = 4096;
  /// Seed of the row and entry sampling.
  std::uint64_t seed = 0x5eed;
  /// Scan q, k and v for NaN/Inf first and raise errc::non_finite.
  bool check_finite = true;
};

/// Anchors and kernels of one triangle of one query head. Kernel i holds logits (scale applied):
/// lower triangle: u_i[t] = logit(s_i + t, s_i), t in [0, n - s_i);
/// upper triangle: w_i[t] = logit(p_i, p_i + t), t in [0, n - p_i) (entry 0 is the diagonal, which
/// belongs to the lower triangle, and is not used).
struct basis {
  std::vector<index_t> anchors;      ///< ascending, anchors[0] == 0
  std::vector<double> values;        ///< the kernels, concatenated
  std::vector<std::size_t> offsets;  ///< kernel i starts at values[offsets[i]]
  index_t size() const { return static_cast<index_t>(anchors.size()); }
  const double* kernel(index_t i) const { return values.data() + offsets[static_cast<std::size_t>(i)]; }
  /// First column (row, for the upper triangle) of block i, and one past its last.
  index_t begin(index_t i) const { return anchors[static_cast<std::size_t>(i)]; }
  index_t end(index_t i, index_t n) const { return i + 1 < size() ? anchors[static_cast<std::size_t>(i + 1)] : n; }
  /// True when the anchors are 0, 1, ..., size() - 1 with size() >= 2: the recovery found no
  /// structure and spent the basis on the first columns.
  bool degenerate() const {
    if (size() < 2) return false;
    for (index_t i = 0; i < size(); ++i)
      if (anchors[static_cast<std::size_t>(i)] != i) return false;
    return true;
  }
};

/// The recovered basis of one query head.
struct head_plan {
  basis lower;  ///< columns [s_i, s_{i+1}), rows r >= c
  basis upper;  ///< non-causal only: rows [p_i, p_{i+1}), columns c > r
  /// Structure diagnostic: the share of logit variance the basis explains (1 - SSE/SST) on
  /// diagnostic_samples entries drawn uniformly from the visible ones; 1 = exact structure, <= 0 =
  /// no better than a constant. NaN when disabled.
  double explained = std::numeric_limits<double>::quiet_NaN();
  /// Largest |logit - basis logit| among the sampled entries.
  double max_logit_error = std::numeric_limits<double>::quiet_NaN();
};

/// Everything make_plan recovered. Reusable for any number of runs with the same q and k (a run
/// checks a checksum of q and k and refuses others); the value tensors may differ between runs.
struct plan {
  index_t n = 0;  ///< tokens (n_q == n_kv)
  index_t h_q = 0, h_kv = 0;
  index_t d_qk = 0;
  double scale = 0;  ///< the effective softmax scale
  options opt;       ///< the options it was made with
  std::vector<head_plan> heads;
  std::vector<double> checksums;  ///< per query head: a checksum of q and k (see detail::qk_checksum)
};

/// What one run measured for one query head: the fields every approximate method reports
/// (<basisattn/core/report.hpp>: estimated_error and mean_estimated_error over the checked rows,
/// checked_rows, repaired_rows = rows whose FFT error bound exceeded fft_tolerance or whose FFT
/// denominator was <= 0 or not finite, recomputed directly from the basis; fell_back =
/// estimated_error > tolerance) and conv-basis' own.
struct head_report : approx_head_report {
  index_t anchors = 0;        ///< lower-triangle basis size
  index_t upper_anchors = 0;  ///< upper-triangle basis size (non-causal)
  bool degenerate = false;    ///< a basis degenerated to the first columns (see basis::degenerate)
  double explained = std::numeric_limits<double>::quiet_NaN();  ///< copied from the plan
  /// The estimate's measure for uniform attention (mean of the visible values) on the same rows: the
  /// baseline an approximation must beat to be useful.
  double uniform_error = std::numeric_limits<double>::quiet_NaN();
  /// Largest per-row FFT error bound among the rows kept from the FFTs (relative to max |v|).
  double fft_error_bound = 0;
  bool float_fft = false;  ///< the FFTs of this head ran in float (fft_precision::f32_checked)
};

/// What one run measured: heads, fallbacks, max_estimated_error() (<basisattn/core/report.hpp>).
using report = approx_report<head_report>;

}  // namespace conv
BASISATTN_END_NAMESPACE
