// basisattn/support/options.hpp - options and per-head reports of support-basis attention.
//
// Public entry points (namespace basisattn::support):
//   options   what make_plan / run / attention(cpu{}, ...) of <basisattn/support.hpp>
//                     do: mask, scale, thresholds (one, or several magnitude levels), polynomial degree and
//                     target error, sketching, error estimate and exact fallback.
//   head_report       what happened to one query head: support fractions |R|/n_q and |C|/n_kv, degree,
//                     feature count, score bound, polynomial error (filled by make_plan) and the sampled
//                     output-error estimate, fallback flag and recomputed rows (filled by run).
//
// Internal (basisattn::support::detail):
//   check_options(fn, opt) raises errc::invalid_argument naming the bad field.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/report.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace support {

/// Largest polynomial degree make_plan accepts (exp's Chebyshev interpolant is converted to monomials,
/// which stays well conditioned up to about this degree).
inline constexpr int max_supported_degree = 8;

/// Options of support-basis attention.
struct options {
  /// End-aligned causal mask (query i sees keys j <= i + n_kv - n_q), as attention_options::causal.
  bool causal = true;
  /// Softmax scale applied to q.k; 0 selects 1/sqrt(d_qk).
  double scale = 0;
  /// Single threshold T (used when `levels` is empty): query rows with any |entry| > T form R, key rows
  /// with any |entry| > T form C; those are computed exactly. Entries are taken as passed, i.e. q and k
  /// must be the tensors that enter the dot product (after RoPE, before the scale). Must be >= 0.
  double threshold = 0.5;
  /// Multi-threshold: strictly increasing levels T_0 < ... < T_{L-1} (>= 0). A row with max |entry| = a
  /// lies in bucket 0 when a <= T_0, bucket l when T_{l-1} < a <= T_l, and in the top bucket L when
  /// a > T_{L-1}. Pairs (query bucket, key bucket) with either bucket = L are exact; every other pair has
  /// its own score bound and polynomial. Non-empty `levels` replace `threshold` ({T} is the same as
  /// threshold = T).
  std::vector<double> levels;
  /// Highest polynomial degree (1 .. max_supported_degree).
  int max_degree = 2;
  /// The degree of each pair is the smallest g <= max_degree whose Chebyshev interpolant p of exp on
  /// [-B, B] has max |p(x) - e^x| / e^x <= target_error (max_degree when none does). Must be > 0.
  double target_error = 1e-3;
  /// Exact monomial features: a degree whose feature count C(d + g, g) exceeds this is not used.
  std::int64_t max_features = 1 << 16;
  /// Replace the degree-t (t >= 2) monomial features by a tensorized random projection of size
  /// sketch_size (see <basisattn/support/features.hpp>); degrees 0 and 1 stay exact.
  bool sketch = false;
  std::int64_t sketch_size = 256;  ///< features per sketched degree; >= 1 when sketch is set
  std::uint64_t seed = 0;          ///< seed of the sketch's random signs
  /// Rows per head computed exactly (in double) by run to estimate the output error, taken among the
  /// rows whose output came from the polynomial (head_report::poly_rows; spread evenly, the last of
  /// them always in): rows computed exactly have no error to estimate. 0 disables the estimate and
  /// the fallback.
  std::int64_t check_rows = 16;
  /// When the estimate's max relative row error exceeds this, or when the head's polynomial guarantees
  /// nothing (head_report::poly_error >= 1), run recomputes the head with exact attention and flags
  /// it. Infinity disables the fallback. Must be >= 0 (NaN not allowed).
  double tolerance = 1e-2;
  /// Rows per feature chunk and per causal block (>= 1).
  std::int64_t block = 256;
  /// Do all arithmetic in double whatever the storage type (double storage always does).
  bool accumulate_double = false;
  /// Scan q, k (make_plan) and v (run) for NaN/Inf and raise errc::non_finite.
  bool check_finite = true;
};

/// The name before options were named the same in every method (conv::options, support::options).
using support_options [[deprecated("use basisattn::support::options")]] = options;

/// What support-basis attention did for one query head: the fields every approximate method reports
/// (<basisattn/core/report.hpp>: estimated_error and mean_estimated_error over the checked rows,
/// checked_rows = min(check_rows, poly_rows), repaired_rows = rows whose polynomial sum or
/// denominator was not a normal positive number, or whose numerator or output was not finite,
/// recomputed exactly (a share near 1 means the polynomial failed on this head); fell_back =
/// estimated_error > tolerance, or poly_error >= 1 with a finite tolerance) and support-basis' own.
struct head_report : approx_head_report {
  // ---- filled by make_plan ----
  double query_support = 0;   ///< |R| / n_q: query rows computed exactly against every key
  double key_support = 0;     ///< |C| / n_kv (of this head's kv head): keys computed exactly for every query
  int degree = 0;             ///< highest polynomial degree used by a bucket pair (0: no polynomial part)
  std::int64_t features = 0;  ///< features r at that degree (C(d + g, g), or 1 + d + (g - 1) m sketched)
  double bound = 0;           ///< largest score bound B over the polynomial pairs (scores lie in [-B, B])
  double poly_error = 0;      ///< largest max relative error of a pair's polynomial on its [-B, B]
  // ---- filled by run ----
  std::int64_t poly_rows = 0;  ///< rows whose output came (partly) from the polynomial; the others are exact
};

/// What one run measured: heads, fallbacks, max_estimated_error() (<basisattn/core/report.hpp>).
using report = approx_report<head_report>;

namespace detail {

/// Validate support options for entry point `fn`.
inline void check_options(const char* fn, const options& opt) {
  BASISATTN_REQUIRE(std::isfinite(opt.scale) && opt.scale >= 0, invalid_argument, fn, ": options.scale = ", opt.scale,
                    " must be finite and >= 0 (0 selects 1/sqrt(d_qk))");
  BASISATTN_REQUIRE(std::isfinite(opt.threshold) && opt.threshold >= 0, invalid_argument, fn,
                    ": options.threshold = ", opt.threshold, " must be finite and >= 0");
  for (std::size_t i = 0; i < opt.levels.size(); ++i) {
    BASISATTN_REQUIRE(std::isfinite(opt.levels[i]) && opt.levels[i] >= 0, invalid_argument, fn, ": options.levels[", i,
                      "] = ", opt.levels[i], " must be finite and >= 0");
    BASISATTN_REQUIRE(i == 0 || opt.levels[i] > opt.levels[i - 1], invalid_argument, fn,
                      ": options.levels must be strictly increasing, but levels[", i - 1, "] = ", opt.levels[i - 1],
                      " and levels[", i, "] = ", opt.levels[i]);
  }
  BASISATTN_REQUIRE(opt.levels.size() < 64, invalid_argument, fn, ": options.levels has ", opt.levels.size(),
                    " levels; at most 63 are supported");
  BASISATTN_REQUIRE(opt.max_degree >= 1 && opt.max_degree <= max_supported_degree, invalid_argument, fn,
                    ": options.max_degree = ", opt.max_degree, " must be in [1, ", max_supported_degree, "]");
  BASISATTN_REQUIRE(opt.target_error > 0 && !std::isnan(opt.target_error), invalid_argument, fn,
                    ": options.target_error = ", opt.target_error, " must be > 0");
  BASISATTN_REQUIRE(opt.max_features >= 1, invalid_argument, fn, ": options.max_features = ", opt.max_features,
                    " must be >= 1");
  BASISATTN_REQUIRE(!opt.sketch || (opt.sketch_size >= 1 && opt.sketch_size <= (std::int64_t(1) << 24)),
                    invalid_argument, fn, ": options.sketch_size = ", opt.sketch_size,
                    " must be in [1, 2^24] when options.sketch is set");
  BASISATTN_REQUIRE(opt.check_rows >= 0, invalid_argument, fn, ": options.check_rows = ", opt.check_rows,
                    " must be >= 0");
  BASISATTN_REQUIRE(opt.tolerance >= 0, invalid_argument, fn, ": options.tolerance = ", opt.tolerance,
                    " must be >= 0 (infinity disables the fallback)");
  BASISATTN_REQUIRE(opt.block >= 1 && opt.block <= (std::int64_t(1) << 20), invalid_argument, fn,
                    ": options.block = ", opt.block, " must be in [1, 2^20]");
}

}  // namespace detail
}  // namespace support
BASISATTN_END_NAMESPACE
