// basisattn/bd/options.hpp - options and diagnostics of Basis Decomposition (BD) preparation.
//
// BD rewrites a pair of weights A (m x r, one per head) and B (r x n) whose product is all a model
// uses into A' = A A_S^-1 (identity on the r basis rows S, coefficients C = A[~S] A_S^-1 elsewhere)
// and B' = A_S B. Outputs are unchanged up to rounding; the rounding depends on the choice of S,
// which `strategy` selects. All heads factorized together share one S, so the projection of all of
// them is one GEMM over the m - r non-basis input channels (see bd/projection.hpp); prepare_mha
// decides per layer side whether that is all kv heads or each kv head alone (bd::basis_grouping).
#pragma once

#include <basisattn/core/config.hpp>

#include <limits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

/// How the shared basis rows S are chosen.
enum class strategy {
  /// S = {0, ..., r-1}: what the official BD kernel assumes.
  first_r,
  /// The paper's rule: candidates {0..r-1} and {m-r..m-1}; for each, C is computed in double and
  /// rounded to the storage type, and the candidate with the least mean relative residual
  /// ||A[~S] - round(C) A[S]||_F / ||A||_F over heads is kept. Candidates whose basis is singular
  /// for some head are skipped.
  residual_min,
  /// Ours (the default): greedy joint volume pivoting refined by max-volume swaps, shared by all
  /// heads. Step 1 picks rows one at a time, each maximising sum_g log ||residual of row j in head
  /// g||, the residual being taken against the span of the rows already picked (for each head, this
  /// is the row that grows prod_g |det A_g[S]| the most). It runs blocked: candidates are advanced
  /// exactly and all rows are updated with one GEMM per block; a block ends early whenever an
  /// out-of-block row could have won, so the picks are those of the plain greedy. Step 2 swaps a
  /// basis row i for a non-basis row j while prod_g |C_g[j, i]| > swap_gain, the exact factor by
  /// which the swap multiplies prod_g |det A_g[S]|. At the end no single swap can grow the joint
  /// volume by more than swap_gain, which keeps the coefficients of every head small (for one head:
  /// every |C_ij| <= swap_gain, unless max_swaps stopped it first; for G heads: the geometric mean over heads of |C_g[j, i]| is at most
  /// swap_gain^(1/G) for every (j, i)). The swap criterion, like C itself, is invariant to any
  /// per-head change of basis A_g -> A_g T_g; the greedy start is only a good first guess.
  /// Step 3 (refine_error, on by default) then swaps while a swap lowers sum_g ||C_g||_F^2 (the
  /// quantity BD's rounding error grows with) by at least 0.1%; given the paired factors' Grams
  /// B_g B_g^T (factorize's pair_grams; prepare_options::weigh_by_product), the estimated rounded
  /// product error sum_g sum_k w_g,k (2 ||M_g[:, k]||^2 - 1) instead, with M_g = A_g A_S^-1 =
  /// [I; C_g] and w_g,k = ||A_g[s_k, :] B_g||^2, the squared norm of row k of B' = A_S B_g.
  /// A-optimal rather than D-optimal exchanges, so the final basis is no longer exactly max-volume.
  shared_pivot,
};

inline const char* to_string(strategy s) noexcept {
  switch (s) {
    case strategy::first_r:
      return "first_r";
    case strategy::residual_min:
      return "residual_min";
    case strategy::shared_pivot:
      return "shared_pivot";
  }
  return "?";
}

/// How the prepared layers round BD's weights (the coefficients C and the absorbed B' = A_S B) to
/// their storage type.
enum class rounding {
  /// Each value to nearest: simple, but on real weights the product error is 3-5x that of the
  /// dense weights rounded to the same type.
  nearest,
  /// C and B' of each head rounded together, for the least product error the grid allows
  /// (shared_basis::round_pair): 0.9-1.5x the dense rounding error in fp16/bf16 on the real models
  /// with prepare_mha's default grouping, 1.1-2.1x with one basis shared by all kv heads.
  error_aware,
};

inline const char* to_string(rounding r) noexcept { return r == rounding::nearest ? "nearest" : "error_aware"; }

/// Options of BD preparation.
struct prepare_options {
  strategy select = strategy::shared_pivot;
  /// A basis is rejected (errc::singular_basis, or errc::rank_deficient when A itself lacks rank)
  /// when the estimated reciprocal 1-norm condition number of some head's A_S is below this...
  double min_rcond = 1e-8;
  /// ... or when some head's estimated error growth (head_diagnostics::error_growth) exceeds this:
  /// its coefficients are so large that storing them would cost far more accuracy than storing
  /// the dense weights does.
  double max_error_growth = 100;
  /// shared_pivot: a swap must multiply the joint volume by more than this (> 1).
  double swap_gain = 1.01;
  /// shared_pivot: at most this many swaps (-1: 4 r).
  index_t max_swaps = -1;
  /// shared_pivot: after the volume swaps, swap further while a swap lowers sum_g ||C_g||_F^2 (or,
  /// with weigh_by_product, the estimated rounded product error) by at least 0.1% (at most
  /// max_swaps more swaps; see strategy::shared_pivot).
  bool refine_error = true;
  /// shared_pivot with refine_error, in prepare_mha / prepare_mla / factorize_pair: form the paired
  /// factors' Grams and weigh the refinement by them (factorize's pair_grams; factorize itself
  /// weighs whenever it is given Grams), i.e. choose the basis by the
  /// estimated rounded product error ||A'B' - AB||_F instead of sum_g ||C_g||_F^2. Off by default:
  /// on the real models it lowers that product error by 2-7% (MiniLM 1.13x -> 1.06x the dense bf16
  /// rounding, SmolLM2 1.53x -> 1.50x, worst sides), yet stories260K's bf16 perplexity change came out at
  /// +0.129%, outside the +0.069..+0.099% spread of the default over rounding realizations (8
  /// draws), perhaps because the Frobenius product error does not weigh the input channels as the
  /// activations do; SmolLM2's, +0.061% vs -0.007%, is within its default's spread (-0.060% ..
  /// +0.058%, 3 draws). It also costs the Grams (about 20% more nearest-rounded preparation time
  /// on the DeepSeek-V2-Lite shape, Zen 4).
  bool weigh_by_product = false;
  /// Rounding of the prepared layers' BD weights (prepare_mha, prepare_mla).
  rounding round = rounding::error_aware;
  /// Raise errc::non_finite when a weight or bias holds NaN or Inf.
  bool check_finite = true;
};

/// Per-head diagnostics of a prepared basis.
struct head_diagnostics {
  double rcond = 0;          ///< estimated reciprocal 1-norm condition number of A_S
  double max_abs_coeff = 0;  ///< max |C_ij|
  /// Estimated ratio of the product error BD adds by rounding C and B' to the error of rounding the
  /// dense A and B to the same type, assuming rounding errors are independent and every row of A B
  /// has the same norm: sqrt((r + 2 ||C||_F^2) / (2 m)). Around 1 for a well-spread basis (it can
  /// be below 1: the r basis rows are rounded once); measured ratios on real weights are 1.5-3.
  double error_growth = 0;
};

/// What preparation found, kept with every prepared object.
struct basis_report {
  strategy used = strategy::shared_pivot;
  std::vector<head_diagnostics> heads;
  double min_rcond = std::numeric_limits<double>::infinity();  ///< over heads
  double max_abs_coeff = 0;                                    ///< over heads
  double error_growth = 0;                                     ///< over heads
  double log_volume = 0;                                       ///< sum_g log |det A_g[S]| (natural log)
  index_t swaps = 0;            ///< shared_pivot swaps made (volume and error refinement)
  bool swap_limit_hit = false;  ///< shared_pivot stopped at max_swaps before converging
};

}  // namespace bd
BASISATTN_END_NAMESPACE
