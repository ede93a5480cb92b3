// basisattn/support.hpp - support-basis attention (module header) (Aliakbarpour et al., arXiv 2510.01643):
// softmax attention split into a polynomial (linear-attention) part for bounded rows and an exact part
// for the rows with large entries. Approximate: check the reports.
//
// Public entry points (namespace basisattn::support):
//   make_plan(cpu{}, q, k, opt) -> plan           supports R, C, buckets, score bounds, polynomials,
//                                                  feature layout (<basisattn/support/plan.hpp>, host)
//   workspace_bytes(cpu{}, plan, d_v)             caller-owned workspace for run
//   run(cpu{}, plan, q, k, v, out, workspace, bytes, report = nullptr)
//                                                  allocation-free evaluation (<basisattn/cpu/support.hpp>)
//   run(cpu{}, plan, q, k, v, out) -> report       allocates its workspace (report: heads, fallbacks)
//   attention(cpu{}, q, k, v, out, opt) -> report  plan + run in one call
// Supporting pieces: options / head_report (<basisattn/support/options.hpp>), fit_exp /
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
// in R. Both parts of a row share one shift (see cpu/support.hpp). With several levels each (query bucket, key
// bucket) pair below the top has its own bound and polynomial.
//
// Accuracy: if every polynomial weight has relative error <= eps < 1 (head_report::poly_error with exact
// features), each output row moves by at most eps / (1 - eps) max_j ||v_j - y_i||. Sketched features add
// a random error not covered by poly_error; the sampled estimate (estimated_error) covers both. Heads whose
// estimate exceeds options.tolerance are recomputed exactly (head_report::fell_back).
//
// CUDA backend: support::workspace_bytes(ctx, plan, d_v) and support::run(ctx, plan, ...) in
// <basisattn/cuda/support.hpp> (through <basisattn/cuda.hpp>) run the same host-made plan on device tensors.
#pragma once

#include <basisattn/cpu/support.hpp>
#include <basisattn/support/features.hpp>
#include <basisattn/support/options.hpp>
#include <basisattn/support/plan.hpp>
#include <basisattn/support/polynomial.hpp>
