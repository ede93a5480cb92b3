// basisattn/support/support_basis.hpp - support-basis attention (Aliakbarpour et al., arXiv 2510.01643):
// softmax attention split into a polynomial (linear-attention) part for bounded rows and an exact part
// for the rows with large entries. Approximate: check the reports.
//
// Public entry points (namespace basisattn::support), all on the CPU backend:
//   make_plan(cpu{}, q, k, opt) -> plan           supports R, C, buckets, score bounds, polynomials,
//                                                  feature layout (<basisattn/support/plan.hpp>)
//   workspace_bytes(cpu{}, plan, d_v)             caller-owned workspace for run
//   run(cpu{}, plan, q, k, v, out, workspace, bytes, report = nullptr)
//                                                  allocation-free evaluation (<basisattn/support/cpu.hpp>)
//   run(cpu{}, plan, q, k, v, out) -> std::vector<head_report>       allocates its workspace
//   attention(cpu{}, q, k, v, out, opt) -> std::vector<head_report>  plan + run in one call
// Supporting pieces: support_options / head_report (<basisattn/support/options.hpp>), fit_exp /
// fit_exp_auto (<basisattn/support/polynomial.hpp>), feature_map (<basisattn/support/features.hpp>).
//
// Layout and mask as exact attention (<basisattn/attention/options.hpp>): q [n_q, H_q, d], k [n_kv, H_kv, d],
// v [n_kv, H_kv, d_v], out [n_q, H_q, d_v], GQA (query head h uses kv head h / (H_q / H_kv)), causal mask
// end-aligned. q and k are taken as the values that enter the dot product (apply RoPE first).
//
// The method, per query head. R = query rows with an entry above the threshold, C = key rows with one.
//   Y_i = (N_poly,i + N_exact,i) / (D_poly,i + D_exact,i)
// where the polynomial part sums p(s_ij) [v_j, 1] over keys j not in C for queries i not in R (p fitted to
// exp on [-B, B], B a bound on those scores, evaluated as linear attention on polynomial features) and
// the exact part sums e^{s_ij} [v_j, 1] over keys in C for queries not in R, and over all keys for queries
// in R. Both parts of a row share one shift (see cpu.hpp). With several levels each (query bucket, key
// bucket) pair below the top has its own bound and polynomial.
//
// Accuracy: if every polynomial weight has relative error <= eps < 1 (head_report::poly_error with exact
// features), each output row moves by at most eps / (1 - eps) max_j ||v_j - y_i||. Sketched features add
// a random error not covered by poly_error; the sampled estimate (est_error_*) covers both. Heads whose
// estimate exceeds options.tolerance are recomputed exactly (head_report::fallback).
#pragma once

#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/support/cpu.hpp>
#include <basisattn/support/features.hpp>
#include <basisattn/support/options.hpp>
#include <basisattn/support/plan.hpp>
#include <basisattn/support/polynomial.hpp>

#include <memory>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace support {

/// run with a workspace it allocates; returns the H_q head reports.
template <class T>
std::vector<head_report> run(cpu, const plan& p, tensor3_view<const T> q, tensor3_view<const T> k,
                             tensor3_view<const T> v, tensor3_view<T> out) {
  BASISATTN_REQUIRE(v.extent[2] >= 1, invalid_argument, "support::run: v has d_v = ", v.extent[2], "; must be >= 1");
  const std::size_t bytes = workspace_bytes(cpu{}, p, v.extent[2]);
  std::unique_ptr<unsigned char[]> ws(new unsigned char[bytes]);
  std::vector<head_report> rep(static_cast<std::size_t>(p.shape.h_q));
  run(cpu{}, p, q, k, v, out, ws.get(), bytes, rep.data());
  return rep;
}

/// Support-basis attention in one call (make_plan + run); returns the H_q head reports.
template <class T>
std::vector<head_report> attention(cpu, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v,
                                   tensor3_view<T> out, const support_options& opt = {}) {
  const plan p = make_plan(cpu{}, q, k, opt);
  return run(cpu{}, p, q, k, v, out);
}

}  // namespace support
BASISATTN_END_NAMESPACE
