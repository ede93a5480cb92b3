// basisattn/core/report.hpp - what an approximate method's run measured for one query head.
//
// Conv-basis and support-basis attention both derive their per-head report from approx_head_report,
// so the fields an engine watches have one name whichever method ran:
//   estimated_error / mean_estimated_error   relative l2 row error ||y_r - y*_r|| / ||y*_r|| over
//                                             the rows checked exactly (before any fallback)
//   checked_rows                              rows computed exactly for the estimate (options.check_rows)
//   repaired_rows                             rows the fast path could not vouch for (an error bound
//                                             above its tolerance, a denominator <= 0, a non-finite
//                                             value), recomputed exactly
//   fell_back                                 the estimate exceeded options.tolerance (or the method
//                                             could guarantee nothing): the head was recomputed with
//                                             exact attention
// and their whole-run report is approx_report<their head_report> (conv::report, support::report):
//   heads                                     one entry per query head
//   fallbacks                                 heads that fell back to exact attention
//   max_estimated_error()                     the largest estimate (NaN when none was made)
#pragma once

#include <basisattn/core/config.hpp>

#include <cmath>
#include <limits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE

struct approx_head_report {
  /// Largest relative l2 error over the checked rows; NaN when the estimate is disabled
  /// (options.check_rows = 0), 0 when no row needed checking (support-basis: every row exact).
  double estimated_error = std::numeric_limits<double>::quiet_NaN();
  /// Mean of the same (NaN or 0 likewise).
  double mean_estimated_error = std::numeric_limits<double>::quiet_NaN();
  index_t checked_rows = 0;   ///< rows computed exactly for the estimate
  index_t repaired_rows = 0;  ///< rows recomputed exactly because the fast path failed its own check
  bool fell_back = false;     ///< the head was recomputed with exact attention
};

/// What one run of an approximate method measured, per query head.
template <class HeadReport>
struct approx_report {
  std::vector<HeadReport> heads;
  index_t fallbacks = 0;  ///< heads recomputed exactly (fell_back)
  /// Largest estimated_error over the heads (NaN when no head made an estimate).
  double max_estimated_error() const {
    double m = std::numeric_limits<double>::quiet_NaN();
    for (const auto& h : heads)
      if (!std::isnan(h.estimated_error) && !(h.estimated_error <= m)) m = h.estimated_error;
    return m;
  }
};

BASISATTN_END_NAMESPACE
