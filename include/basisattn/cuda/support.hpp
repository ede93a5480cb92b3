// basisattn/cuda/support.hpp - support-basis attention on the CUDA backend.
//
// Host-side header (g++ compiles it; needs the basisattn::cuda target). The kernels are in
// <basisattn/cuda/kernels/support.cuh>, compiled into the program by including
// <basisattn/cuda/kernels.cuh> in one .cu file; the products of features and states are cuBLAS GEMMs
// (fp32, CUBLAS_COMPUTE_32F: no TF32).
//
// Public entry points (namespace basisattn::support; `plan` is a plan or a device_plan):
//   upload(ctx, plan) -> device_plan       the plan's tables in device memory, once (allocates, waits)
//   workspace_bytes(ctx, plan, d_v)        device workspace bytes run(ctx, ...) needs
//   run(ctx, plan, q, k, v, out, workspace, bytes, report = nullptr)
//                                          support-basis attention of device tensors; allocates nothing
//   run(ctx, plan, q, k, v, out) -> std::vector<head_report>
//                                          the same with a workspace it allocates (cudaMalloc)
//
// The plan. There is no GPU make_plan: make the plan with the CPU one, support::make_plan(cpu{}, q, k,
// opt), from HOST copies of the q and k the GPU run will get (same values, same storage type; RoPE
// applied). The plan is what decides R, C, the buckets and the polynomials, so a run on other q or k
// is silently wrong: unlike the CPU run, run(ctx, ...) cannot compare checksums of device data with
// the plan's (the summation order of a device checksum would differ), so extents and storage type are
// checked and the values are the caller's responsibility. A run on a host plan uploads what it needs
// of the plan (row buckets, the C key lists, the k_poly_prefix counts, the pair coefficients and
// shifts, the feature tables and sketch sign matrices) into the first part of the caller's workspace,
// with cudaMemcpyAsync from the plan's (pageable) host vectors: those copies wait for the stream, so
// the plan may be destroyed as soon as run returns. The plan is not modified. upload(ctx, plan) makes
// those copies once into a device_plan; runs on it copy nothing from the host, need a workspace
// smaller by the tables, and with options.check_rows = 0, options.check_finite = false and no report
// only enqueue work on ctx's stream (kernels and cuBLAS GEMMs, no copy, allocation or wait), which
// is what capturing them in a CUDA graph needs. (Capture itself has not yet run on a GPU here.)
//
// Layout and mask as on the CPU (<basisattn/support.hpp>): q [n_q, H_q, d], k [n_kv, H_kv, d],
// v [n_kv, H_kv, d_v], out [n_q, H_q, d_v], device memory, any element strides; GQA (query head h uses
// kv head h / (H_q / H_kv)); causal mask end-aligned. T = float, Eigen::half or Eigen::bfloat16, fp32
// arithmetic (options.accumulate_double raises errc::unsupported).
//
// Algorithm, per query head (heads one after the other on ctx's stream; the workspace holds one head's
// buffers), as the CPU run (<basisattn/cpu/support.hpp>):
//   0. the head's q, k, v are copied to fp32 row-major buffers; accumulators num (n_q x d_v), den, m,
//      dpoly start at 0, 0, M_bq (-inf for rows in R), 0.
//   1. polynomial part as streamed linear attention, options.block rows at a time (never n x r features):
//      features phi (block x r, column-major): degree 0 and 1 copied, exact monomials one degree at a
//      time from the plan's parent/var/ratio tables (phi[:, c] = phi[:, parent] * x[:, var] * ratio),
//      sketched degrees by cuBLAS GEMMs with the plan's sign matrices and elementwise products.
//      Key states S_bk = sum_{j in bucket bk} phi(k_j) [v_j, 1]^T (r x (d_v + 1), one per key bucket)
//      by GEMMs phi^T [V, 1] with the keys of other buckets masked to zero rows; queries read
//      sum_bk (c_{bq,bk} o phi(q_i))^T S_bk (coefficients by degree, zero for rows in R).
//      Non-causal: all keys into the states, then all queries read them. Causal (block lower-triangular):
//      for each block of keys, the queries whose position falls in the block read the states of the
//      previous blocks plus the exact products P_{bq,bk}(s_ij) e^{-M_bq} of the block's visible
//      non-top keys (one GEMM for the scores, one for the products with [V, 1]), then the block's keys
//      enter the states.
//   2. rows after the polynomial part (before the exact part), each row i not in R with vis visible
//      keys (row flags: 0 exact only, 1 approximated, 2 bad):
//        - no visible polynomial key (plan.k_poly_prefix[hk][vis] == 0, so no polynomial term): m_i = -inf,
//          so the exact part's online max starts fresh instead of at the loose M_bq (whose weights
//          e^{s - M_bq} can underflow to 0 or a denormal in fp32 and give inf outputs);
//        - else dpoly_i not a normal positive finite number (!(dpoly_i >= FLT_MIN): <= 0, denormal, NaN;
//          or inf) or num_i with a non-finite entry: the row is bad (step 4), the exact part skips it;
//        - else renormalised: m_i += log dpoly_i, num_i /= dpoly_i, dpoly_i = 1 (the same num e^m).
//      Rows in R keep m = -inf, num = dpoly = 0.
//   3. exact part, flash-style on the same accumulators (den starts at dpoly; one warp per query row,
//      online max: m only grows and num, den are rescaled): rows in R against every visible key, the
//      other non-bad rows against the visible keys in C.
//   4. bad rows (step 2, or a final den not in [FLT_MIN, finite], or a non-finite num entry) are
//      recomputed exactly from scratch; out = num / den, rounded once to T; a row whose fp32 output
//      num * (1 / den) is still non-finite is recomputed exactly too and stored again.
//      head_report::repaired_rows counts the distinct recomputed rows of both rounds.
//   5. error estimate over the approximated rows A (ascending: not in R, not bad, with a visible
//      polynomial key; head_report::poly_rows = |A|, listed on the device by a one-block scan):
//      s = min(options.check_rows, |A|) rows A[floor((j + 1) |A| / s) - 1], j < s (evenly spread, the
//      last approximated row always in), recomputed on the GPU in double from the storage values of q,
//      k, v and compared with the stored out (relative l2 row errors -> estimated_error / mean_estimated_error);
//      checked_rows = s; with |A| = 0 (every row exact) checked_rows = 0 and both estimates are 0.
// These are the CPU run's rules (<basisattn/cpu/support.hpp>, detail::run_head), so on the same plan
// both backends give the same repaired_rows, poly_rows and checked_rows and the same rows' estimates (up to
// fp32 rounding order).
// After the last head, when options.check_rows > 0 or `report` is not null, run waits for the stream
// (ctx.synchronize()) and reads the per-head bad-row counts, |A| and error summaries back (a few bytes
// per head, into local variables). With options.check_rows > 0, a head whose estimated_error exceeds
// options.tolerance, or whose plan has poly_error >= 1 while options.tolerance is finite (the
// polynomial guarantees nothing on [-B, B]), is then recomputed exactly with this file's own exact
// kernel (step 3 with every row against every visible key: no head dim limit, fp32) and flagged
// (head_report::fell_back). With check_rows = 0 and no report, run returns without waiting.
//
// Errors: the CPU run's argument checks (errc::shape_mismatch / invalid_argument with the same messages,
// the plan's extents and storage type, a too small or null workspace); options.check_finite scans v on
// the device for NaN/Inf (errc::non_finite; this waits for the stream); CUDA and cuBLAS failures raise
// errc::backend (sticky CUDA errors abort, see <basisattn/cuda/context.hpp>).
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/support_launch.hpp>
#include <basisattn/support/options.hpp>
#include <basisattn/support/plan.hpp>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace support {
namespace detail {

/// Alignment of every region of the CUDA workspace.
inline constexpr std::size_t cuda_ws_align = basisattn::detail::cuda_workspace_align;

/// Byte offsets of the regions of the CUDA workspace: the uploaded plan tables and results of all
/// heads, then one head's fp32 buffers.
struct cuda_layout {
  index_t blk = 0, r = 0, g = 0, nl = 0, samples = 0, dv = 0, coef_stride = 0;
  // plan tables (all heads): in the workspace, or in a device_plan (then sized 0 here)
  std::size_t qb = 0, kb = 0, kpre = 0, ckeys = 0, coef = 0, shift = 0;
  std::size_t parent = 0, var = 0, ratio = 0, degree_of = 0, proj = 0;
  std::size_t tables_end = 0;  ///< end of the plan tables
  // per-head results, zeroed at the start of a run
  std::size_t err = 0, y = 0, summary = 0, bad = 0, na = 0, nonfinite = 0;
  std::size_t results_end = 0;
  // one head's buffers (fp32 unless noted)
  std::size_t Q = 0, K = 0, V = 0, num = 0, den = 0, m = 0, dpoly = 0, flags = 0, arows = 0;
  std::size_t xq = 0, xk = 0, phi = 0, psi = 0, sk = 0, vx = 0, tmp = 0, st = 0, s = 0;
  std::size_t total = 0;
};

/// with_tables = false: the plan tables live in a device_plan, so the workspace keeps no room for them
/// (their offsets are then those of make_cuda_layout(p, dv, true), relative to the device_plan's buffer).
inline cuda_layout make_cuda_layout(const plan& p, index_t dv, bool with_tables = true) {
  const auto& sh = p.shape;
  const feature_map& fm = p.features;
  cuda_layout L;
  L.blk = std::min<index_t>(static_cast<index_t>(p.options.block), std::max(sh.n_q, sh.n_kv));
  L.r = p.max_width;
  L.g = fm.max_degree;
  L.nl = p.levels;
  L.dv = dv;
  L.samples = std::min<index_t>(static_cast<index_t>(p.options.check_rows), sh.n_q);
  L.coef_stride = (L.nl + 1) * L.nl * (L.g + 1);
  const index_t b = L.blk, d = sh.d_qk, r = L.r, ms = fm.sketch ? fm.m : 0;
  const index_t nfeat = static_cast<index_t>(fm.degree_of.size());
  basisattn::detail::workspace_carver w = basisattn::detail::workspace_carver::relative(cuda_ws_align);
  auto take = [&](std::size_t bytes) { return w.take(std::max<std::size_t>(bytes, 1)); };
  auto n_of = [](index_t n, std::size_t size) { return static_cast<std::size_t>(n) * size; };
  auto t_of = [&](index_t n, std::size_t size) { return with_tables ? n_of(n, size) : std::size_t(0); };
  L.qb = take(t_of(sh.h_q * sh.n_q, 1));
  L.kb = take(t_of(sh.h_kv * sh.n_kv, 1));
  L.kpre = take(t_of(sh.h_kv * (sh.n_kv + 1), sizeof(index_t)));
  L.ckeys = take(t_of(sh.h_kv * sh.n_kv, sizeof(index_t)));
  L.coef = take(t_of(sh.h_q * L.coef_stride, sizeof(double)));
  L.shift = take(t_of(sh.h_q * L.nl, sizeof(double)));
  L.parent = take(t_of(static_cast<index_t>(fm.parent.size()), sizeof(index_t)));
  L.var = take(t_of(static_cast<index_t>(fm.var.size()), sizeof(index_t)));
  L.ratio = take(t_of(static_cast<index_t>(fm.ratio.size()), sizeof(double)));
  L.degree_of = take(t_of(nfeat, sizeof(int)));
  L.proj = take(t_of(static_cast<index_t>(fm.proj_f.size()), sizeof(float)));
  L.tables_end = w.bytes();
  L.err = take(n_of(L.samples, sizeof(double)));
  L.y = take(n_of(L.samples * dv, sizeof(double)));
  L.summary = take(n_of(2 * sh.h_q, sizeof(double)));
  L.bad = take(n_of(sh.h_q, sizeof(unsigned long long)));
  L.na = take(n_of(sh.h_q, sizeof(unsigned long long)));
  L.nonfinite = take(sizeof(unsigned long long));
  L.results_end = w.bytes();
  auto f = [&](index_t n) { return take(n_of(n, sizeof(float))); };
  L.Q = f(sh.n_q * d);
  L.K = f(sh.n_kv * d);
  L.V = f(sh.n_kv * dv);
  L.num = f(sh.n_q * dv);
  L.den = f(sh.n_q);
  L.m = f(sh.n_q);
  L.dpoly = f(sh.n_q);
  L.flags = take(n_of(sh.n_q, sizeof(int)));
  L.arows = take(n_of(sh.n_q, sizeof(index_t)));
  L.xq = f(b * d);
  L.xk = f(b * d);
  L.phi = f(b * r);
  L.psi = f(b * r);
  L.sk = f(b * ms);
  L.vx = f(b * (dv + 1));
  L.tmp = f(b * (dv + 1));
  L.st = f(L.nl * r * (dv + 1));
  L.s = f(b * b);
  L.total = w.bytes();
  return L;
}

/// Column-major C (m x n) = alpha op(A) op(B) + beta C in fp32 (CUBLAS_COMPUTE_32F).
inline void cuda_sgemm(const cuda_context& ctx, bool ta, bool tb, index_t m, index_t n, index_t k, float alpha,
                       const float* a, index_t lda, const float* b, index_t ldb, float beta, float* c, index_t ldc) {
  if (m <= 0 || n <= 0) return;
  BASISATTN_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, a,
                                      CUDA_R_32F, static_cast<int>(lda), b, CUDA_R_32F, static_cast<int>(ldb), &beta, c,
                                      CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/// Host -> device copy of n elements on ctx's stream (nothing for n = 0).
template <class U>
void cuda_upload(const cuda_context& ctx, void* dst, const U* src, std::size_t n) {
  if (n == 0) return;
  BASISATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(U), cudaMemcpyHostToDevice, ctx.stream()));
}

/// Device -> host copy of n elements on ctx's stream, then wait.
template <class U>
void cuda_download(const cuda_context& ctx, U* dst, const void* src, std::size_t n) {
  BASISATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(U), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
}

/// One run's state: the context, the plan, the layout and the workspace base, and where the plan
/// tables are (T: their offsets from `tables`, which is the workspace base or a device_plan's buffer).
struct cuda_run {
  const cuda_context* ctx = nullptr;
  const plan* p = nullptr;
  cuda_layout L, T;
  unsigned char* base = nullptr;
  const unsigned char* tables = nullptr;
  index_t h = 0, hk = 0;  // current query head and its kv head

  template <class U>
  U* at(std::size_t off) const {
    return reinterpret_cast<U*>(base + off);
  }
  template <class U>
  const U* tab(std::size_t off) const {
    return reinterpret_cast<const U*>(tables + off);
  }
  cudaStream_t stream() const { return ctx->stream(); }
  const std::uint8_t* qb() const { return tab<std::uint8_t>(T.qb) + h * p->shape.n_q; }
  const std::uint8_t* kb() const { return tab<std::uint8_t>(T.kb) + hk * p->shape.n_kv; }
  const double* coef() const { return tab<double>(T.coef) + h * T.coef_stride; }
  float* state(int bk) const { return at<float>(L.st) + static_cast<index_t>(bk) * L.r * (L.dv + 1); }
  index_t key_width(int bk) const { return p->key_width[static_cast<std::size_t>(h)][static_cast<std::size_t>(bk)]; }
};

/// Zero the plan tables at `dst` (layout T, made with tables) and upload them (all heads), on ctx's
/// stream from the plan's host vectors.
inline void upload_tables(const cuda_context& ctx, const plan& p, const cuda_layout& T, unsigned char* dst) {
  const auto& sh = p.shape;
  const int nl = static_cast<int>(T.nl);
  auto at = [&](std::size_t off) { return static_cast<void*>(dst + off); };
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(dst, 0, T.tables_end, ctx.stream()));
  for (index_t h = 0; h < sh.h_q; ++h) {
    const auto hu = static_cast<std::size_t>(h);
    cuda_upload(ctx, static_cast<std::uint8_t*>(at(T.qb)) + h * sh.n_q, p.q_bucket[hu].data(), p.q_bucket[hu].size());
    cuda_upload(ctx, static_cast<double*>(at(T.shift)) + h * T.nl, p.shift[hu].data(), p.shift[hu].size());
    for (int bq = 0; bq < nl; ++bq)
      for (int bk = 0; bk < nl; ++bk) {
        const pair_poly& pp = p.pairs[hu][static_cast<std::size_t>(bq * nl + bk)];
        if (pp.degree == 0) continue;  // zero coefficients (the memset)
        cuda_upload(ctx, static_cast<double*>(at(T.coef)) + h * T.coef_stride + (bq * T.nl + bk) * (T.g + 1),
                    pp.coef.data(), std::min<std::size_t>(pp.coef.size(), static_cast<std::size_t>(T.g + 1)));
      }
  }
  for (index_t hk = 0; hk < sh.h_kv; ++hk) {
    const auto hu = static_cast<std::size_t>(hk);
    cuda_upload(ctx, static_cast<std::uint8_t*>(at(T.kb)) + hk * sh.n_kv, p.k_bucket[hu].data(), p.k_bucket[hu].size());
    cuda_upload(ctx, static_cast<index_t*>(at(T.kpre)) + hk * (sh.n_kv + 1), p.k_poly_prefix[hu].data(),
                p.k_poly_prefix[hu].size());
    const auto& ck = p.k_rows[hu][static_cast<std::size_t>(nl)];
    cuda_upload(ctx, static_cast<index_t*>(at(T.ckeys)) + hk * sh.n_kv, ck.data(), ck.size());
  }
  const feature_map& fm = p.features;
  cuda_upload(ctx, static_cast<index_t*>(at(T.parent)), fm.parent.data(), fm.parent.size());
  cuda_upload(ctx, static_cast<index_t*>(at(T.var)), fm.var.data(), fm.var.size());
  cuda_upload(ctx, static_cast<double*>(at(T.ratio)), fm.ratio.data(), fm.ratio.size());
  cuda_upload(ctx, static_cast<int*>(at(T.degree_of)), fm.degree_of.data(), fm.degree_of.size());
  cuda_upload(ctx, static_cast<float*>(at(T.proj)), fm.proj_f.data(), fm.proj_f.size());
}

/// phi (cm nb x width) = features of degrees 0.. of the rows of x (cm nb x d); width = features(g').
inline void cuda_features(const cuda_run& c, const float* x, index_t nb, index_t width, float* phi) {
  namespace ck = ::basisattn::detail::cuda_kernels;
  const feature_map& fm = c.p->features;
  const index_t d = fm.d;
  ck::launch_support_features_base(x, nb, d, phi, c.stream());
  for (int t = 2; t <= fm.max_degree && fm.offset[static_cast<std::size_t>(t)] < width; ++t) {
    const index_t c0 = fm.offset[static_cast<std::size_t>(t)];
    if (!fm.sketch) {
      const index_t c1 = std::min(width, fm.offset[static_cast<std::size_t>(t + 1)]);
      ck::launch_support_monomials(x, nb, c.tab<index_t>(c.T.parent), c.tab<index_t>(c.T.var), c.tab<double>(c.T.ratio),
                                   c0, c1, phi, c.stream());
      continue;
    }
    // phi_t = (x G_{t,0}) o ... o (x G_{t,t-1}) / sqrt(m), G column-major d x m
    const index_t m = fm.m;
    float* const blk = phi + c0 * nb;
    float* const sk = c.at<float>(c.L.sk);
    const float norm = 1.0f / std::sqrt(static_cast<float>(m));
    for (int l = 0; l < t; ++l) {
      const float* g = c.tab<float>(c.T.proj) + fm.proj_offset[static_cast<std::size_t>(t)] + l * d * m;
      if (l == 0) {
        cuda_sgemm(*c.ctx, false, false, nb, m, d, norm, x, nb, g, d, 0.0f, blk, nb);
      } else {
        cuda_sgemm(*c.ctx, false, false, nb, m, d, 1.0f, x, nb, g, d, 0.0f, sk, nb);
        ck::launch_support_mul(blk, sk, nb * m, c.stream());
      }
    }
  }
}

/// Add keys [k0, k0 + nk) (features already in phi, width >= every key_width) to their buckets' states.
inline void cuda_add_keys(const cuda_run& c, index_t k0, index_t nk, const float* phi) {
  namespace ck = ::basisattn::detail::cuda_kernels;
  const index_t dv = c.L.dv;
  float* const vx = c.at<float>(c.L.vx);
  for (int bk = 0; bk < static_cast<int>(c.L.nl); ++bk) {
    const index_t w = c.key_width(bk);
    if (w == 0) continue;
    ck::launch_support_key_values(c.at<float>(c.L.V), k0, nk, dv, c.kb() + k0, bk, vx, c.stream());
    cuda_sgemm(*c.ctx, true, false, w, dv + 1, nk, 1.0f, phi, nk, vx, nk, 1.0f, c.state(bk), c.L.r);
  }
}

/// tmp (cm ni x (dv + 1)) = sum_bk (c_{bq,bk} o phi(q_i))^T S_bk for queries [i0, i0 + ni) (features in phi).
inline void cuda_read_states(const cuda_run& c, index_t i0, index_t ni, const float* phi, float* tmp) {
  namespace ck = ::basisattn::detail::cuda_kernels;
  const index_t dv = c.L.dv;
  float* const psi = c.at<float>(c.L.psi);
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(tmp, 0, static_cast<std::size_t>(ni * (dv + 1)) * sizeof(float), c.stream()));
  for (int bk = 0; bk < static_cast<int>(c.L.nl); ++bk) {
    const index_t w = c.key_width(bk);
    if (w == 0) continue;
    ck::launch_support_scale_features(phi, ni, w, c.qb() + i0, c.coef(), static_cast<int>(c.L.nl),
                                      static_cast<int>(c.L.g), bk, c.tab<int>(c.T.degree_of), psi, c.stream());
    cuda_sgemm(*c.ctx, false, false, ni, dv + 1, w, 1.0f, psi, ni, c.state(bk), c.L.r, 1.0f, tmp, ni);
  }
}

/// Polynomial part of the current head (see the header comment, step 1).
inline void cuda_poly(const cuda_run& c) {
  namespace ck = ::basisattn::detail::cuda_kernels;
  const auto& sh = c.p->shape;
  const index_t hw = c.p->head_width[static_cast<std::size_t>(c.h)];
  if (hw == 0) return;
  const index_t blk = c.L.blk, d = sh.d_qk, dv = c.L.dv, off = sh.causal_offset;
  const float scale = static_cast<float>(sh.scale);
  float* const Q = c.at<float>(c.L.Q);
  float* const K = c.at<float>(c.L.K);
  float* const xq = c.at<float>(c.L.xq);
  float* const xk = c.at<float>(c.L.xk);
  float* const phi = c.at<float>(c.L.phi);
  float* const tmp = c.at<float>(c.L.tmp);
  float* const num = c.at<float>(c.L.num);
  float* const dpoly = c.at<float>(c.L.dpoly);
  BASISATTN_CUDA_CHECK(
      cudaMemsetAsync(c.state(0), 0, static_cast<std::size_t>(c.L.nl * c.L.r * (dv + 1)) * sizeof(float), c.stream()));
  if (!c.p->options.causal) {
    for (index_t k0 = 0; k0 < sh.n_kv; k0 += blk) {
      const index_t nk = std::min(blk, sh.n_kv - k0);
      ck::launch_support_gather_cm(K, d, k0, nk, d, 1.0f, xk, c.stream());
      cuda_features(c, xk, nk, hw, phi);
      cuda_add_keys(c, k0, nk, phi);
    }
    for (index_t i0 = 0; i0 < sh.n_q; i0 += blk) {
      const index_t ni = std::min(blk, sh.n_q - i0);
      ck::launch_support_gather_cm(Q, d, i0, ni, d, scale, xq, c.stream());
      cuda_features(c, xq, ni, hw, phi);
      cuda_read_states(c, i0, ni, phi, tmp);
      ck::launch_support_scatter_poly(tmp, ni, i0, dv, num, dpoly, c.stream());
    }
    return;
  }
  // Causal, block lower-triangular.
  float* const s = c.at<float>(c.L.s);
  float* const vx = c.at<float>(c.L.vx);
  for (index_t k0 = 0; k0 < sh.n_kv; k0 += blk) {
    const index_t k1 = std::min(sh.n_kv, k0 + blk), nk = k1 - k0;
    const index_t i0 = std::max<index_t>(0, k0 - off), i1 = std::min<index_t>(sh.n_q, k1 - off);
    ck::launch_support_gather_cm(K, d, k0, nk, d, 1.0f, xk, c.stream());
    if (i1 > i0) {
      const index_t ni = i1 - i0;
      ck::launch_support_gather_cm(Q, d, i0, ni, d, scale, xq, c.stream());
      if (k0 > 0) {  // the states of the previous blocks
        cuda_features(c, xq, ni, hw, phi);
        cuda_read_states(c, i0, ni, phi, tmp);
      } else {
        BASISATTN_CUDA_CHECK(
            cudaMemsetAsync(tmp, 0, static_cast<std::size_t>(ni * (dv + 1)) * sizeof(float), c.stream()));
      }
      // Inside the block: exact products P(s_ij) e^{-M} for visible non-top keys.
      cuda_sgemm(*c.ctx, false, true, ni, nk, d, 1.0f, xq, ni, xk, nk, 0.0f, s, ni);
      ck::launch_support_block_poly(s, ni, nk, i0, k0, off, c.qb() + i0, c.kb() + k0, c.coef(),
                                    static_cast<int>(c.L.nl), static_cast<int>(c.L.g), c.stream());
      ck::launch_support_key_values(c.at<float>(c.L.V), k0, nk, dv, c.kb() + k0, -1, vx, c.stream());
      cuda_sgemm(*c.ctx, false, false, ni, dv + 1, nk, 1.0f, s, ni, vx, nk, 1.0f, tmp, ni);
      ck::launch_support_scatter_poly(tmp, ni, i0, dv, num, dpoly, c.stream());
    }
    // The block's keys enter the states.
    cuda_features(c, xk, nk, hw, phi);
    cuda_add_keys(c, k0, nk, phi);
  }
}

/// Exact-part parameters of the current head in `mode` (see support_exact_params).
inline ::basisattn::detail::cuda_kernels::support_exact_params exact_params(const cuda_run& c, int mode) {
  const auto& sh = c.p->shape;
  ::basisattn::detail::cuda_kernels::support_exact_params e;
  e.Q = c.at<float>(c.L.Q);
  e.K = c.at<float>(c.L.K);
  e.V = c.at<float>(c.L.V);
  e.n_q = sh.n_q, e.n_kv = sh.n_kv, e.d = sh.d_qk, e.dv = c.L.dv, e.causal_offset = sh.causal_offset;
  e.scale = static_cast<float>(sh.scale);
  e.causal = c.p->options.causal;
  e.qb = c.qb();
  e.nl = static_cast<int>(c.L.nl);
  e.ckeys = c.tab<index_t>(c.T.ckeys) + c.hk * sh.n_kv;
  e.n_ckeys =
      static_cast<index_t>(c.p->k_rows[static_cast<std::size_t>(c.hk)][static_cast<std::size_t>(c.L.nl)].size());
  e.num = c.at<float>(c.L.num);
  e.den = c.at<float>(c.L.den);
  e.m = c.at<float>(c.L.m);
  e.dpoly = c.at<float>(c.L.dpoly);
  e.flags = c.at<int>(c.L.flags);
  e.mode = mode;
  return e;
}

/// Copy head h's q, k, v into the fp32 head buffers.
template <class T>
void load_head(const cuda_run& c, const tensor3_view<const T>& q, const tensor3_view<const T>& k,
               const tensor3_view<const T>& v) {
  namespace ck = ::basisattn::detail::cuda_kernels;
  const auto& sh = c.p->shape;
  ck::launch_support_load_head(q.data + c.h * q.stride[1], sh.n_q, sh.d_qk, q.stride[0], q.stride[2],
                               c.at<float>(c.L.Q), c.stream());
  ck::launch_support_load_head(k.data + c.hk * k.stride[1], sh.n_kv, sh.d_qk, k.stride[0], k.stride[2],
                               c.at<float>(c.L.K), c.stream());
  ck::launch_support_load_head(v.data + c.hk * v.stride[1], sh.n_kv, c.L.dv, v.stride[0], v.stride[2],
                               c.at<float>(c.L.V), c.stream());
}

/// out of head c.h = num / den rounded to T: every row (bad_only false) or the rows flagged 2.
template <class T>
void store_head(const cuda_run& c, const tensor3_view<T>& out, bool bad_only = false) {
  ::basisattn::detail::cuda_kernels::launch_support_store(
      c.at<float>(c.L.num), c.at<float>(c.L.den), c.p->shape.n_q, c.L.dv, out.data + c.h * out.stride[1], out.stride[0],
      out.stride[2], bad_only ? c.at<int>(c.L.flags) : nullptr, c.stream());
}

/// Steps 0-5 of the header comment for query head c.h.
template <class T>
void run_head_cuda(const cuda_run& c, const tensor3_view<const T>& q, const tensor3_view<const T>& k,
                   const tensor3_view<const T>& v, const tensor3_view<T>& out) {
  namespace ck = ::basisattn::detail::cuda_kernels;
  const auto& sh = c.p->shape;
  const cuda_layout& L = c.L;
  load_head(c, q, k, v);
  ck::launch_support_init(c.qb(), c.tab<double>(c.T.shift) + c.h * L.nl, static_cast<int>(L.nl), sh.n_q, L.dv,
                          c.at<float>(L.num), c.at<float>(L.dpoly), c.at<float>(L.m), c.stream());
  cuda_poly(c);
  int* const flags = c.at<int>(L.flags);
  unsigned long long* const bad = c.at<unsigned long long>(L.bad) + c.h;
  ck::launch_support_post_poly(c.qb(), static_cast<int>(L.nl), c.tab<index_t>(c.T.kpre) + c.hk * (sh.n_kv + 1), sh.n_q,
                               sh.n_kv, L.dv, c.p->options.causal, sh.causal_offset, c.at<float>(L.num),
                               c.at<float>(L.dpoly), c.at<float>(L.m), flags, c.stream());
  ck::launch_support_exact(exact_params(c, 0), c.stream());
  ck::launch_support_detect(c.at<float>(L.den), c.at<float>(L.num), sh.n_q, L.dv, flags, bad, c.stream());
  ck::launch_support_exact(exact_params(c, 1), c.stream());
  store_head(c, out);
  // Rows whose output still overflows: recomputed exactly too (counted), and stored again.
  ck::launch_support_check_output(c.at<float>(L.num), c.at<float>(L.den), sh.n_q, L.dv, flags, bad, c.stream());
  ck::launch_support_exact(exact_params(c, 1), c.stream());
  store_head(c, out, true);
  ck::launch_support_compact(flags, sh.n_q, c.at<index_t>(L.arows), c.at<unsigned long long>(L.na) + c.h, c.stream());
  if (L.samples > 0) {
    ck::support_estimate_params<T> e;
    e.q = q.data + c.h * q.stride[1];
    e.k = k.data + c.hk * k.stride[1];
    e.v = v.data + c.hk * v.stride[1];
    e.out = out.data + c.h * out.stride[1];
    e.q_s0 = q.stride[0], e.q_s2 = q.stride[2], e.k_s0 = k.stride[0], e.k_s2 = k.stride[2];
    e.v_s0 = v.stride[0], e.v_s2 = v.stride[2], e.o_s0 = out.stride[0], e.o_s2 = out.stride[2];
    e.n_q = sh.n_q, e.n_kv = sh.n_kv, e.d = sh.d_qk, e.dv = L.dv, e.samples = L.samples;
    e.causal_offset = sh.causal_offset;
    e.causal = c.p->options.causal;
    e.scale = sh.scale;
    e.rows = c.at<index_t>(L.arows);
    e.n_rows = c.at<unsigned long long>(L.na) + c.h;
    e.y = c.at<double>(L.y);
    e.err = c.at<double>(L.err);
    ck::launch_support_estimate(e, c.stream());
    ck::launch_support_summarize(c.at<double>(L.err), L.samples, c.at<unsigned long long>(L.na) + c.h,
                                 c.at<double>(L.summary) + 2 * c.h, c.stream());
  }
}

}  // namespace detail

/// A plan resident on the device: made by upload(ctx, plan), it holds the host plan (moved or copied in)
/// and the plan's tables in device memory, so run(ctx, device_plan, ...) copies nothing from the host.
/// Movable, not copyable; valid while the context's device is.
class device_plan {
 public:
  device_plan() = default;
  /// The host plan it was uploaded from (shape, options, make_plan's report).
  const plan& host() const noexcept { return host_; }
  /// Device bytes the uploaded tables take.
  std::size_t bytes() const noexcept { return tables_.bytes(); }
  /// The tables in device memory (null when empty) and their layout (internal to run).
  const unsigned char* tables() const noexcept { return tables_.data(); }
  const detail::cuda_layout& tables_layout() const noexcept { return tables_layout_; }

 private:
  friend device_plan upload(const cuda_context& ctx, plan p);
  plan host_;
  detail::cuda_layout tables_layout_;
  device_buffer<unsigned char> tables_;
};

/// Upload a plan made by make_plan(cpu{}, ...) once (cudaMalloc + copies, then waits for ctx's stream):
/// later runs on the device_plan read its tables from device memory instead of copying them from the
/// host on every call. Pass the plan with std::move to avoid a host copy.
inline device_plan upload(const cuda_context& ctx, plan p) {
  BASISATTN_REQUIRE(p.shape.h_q >= 1 && p.report.size() == static_cast<std::size_t>(p.shape.h_q), invalid_argument,
                    "support::upload: the plan is empty (make it with support::make_plan)");
  device_plan dp;
  dp.host_ = std::move(p);
  dp.tables_layout_ = detail::make_cuda_layout(dp.host_, 1, true);
  dp.tables_ = device_buffer<unsigned char>(static_cast<index_t>(dp.tables_layout_.tables_end));
  detail::upload_tables(ctx, dp.host_, dp.tables_layout_, dp.tables_.data());
  ctx.synchronize();
  return dp;
}

/// Device workspace bytes run(ctx, plan, ...) needs with value head dim d_v (plan tables of all heads,
/// one head's fp32 buffers, alignment slack).
inline std::size_t workspace_bytes(const cuda_context&, const plan& p, index_t d_v) {
  BASISATTN_REQUIRE(d_v >= 1, invalid_argument, "support::workspace_bytes(cuda): d_v = ", d_v, " must be >= 1");
  return basisattn::detail::sliced_workspace_bytes(detail::make_cuda_layout(p, d_v).total, 1, detail::cuda_ws_align);
}

/// Device workspace bytes run(ctx, device_plan, ...) needs: as for the host plan, less the tables.
inline std::size_t workspace_bytes(const cuda_context&, const device_plan& p, index_t d_v) {
  BASISATTN_REQUIRE(d_v >= 1, invalid_argument, "support::workspace_bytes(cuda): d_v = ", d_v, " must be >= 1");
  return basisattn::detail::sliced_workspace_bytes(detail::make_cuda_layout(p.host(), d_v, false).total, 1,
                                                   detail::cuda_ws_align);
}

namespace detail {

/// The run of both public overloads: the plan tables are uploaded into the workspace (device_tables
/// null) or read from a device_plan (device_tables, laid out as make_cuda_layout(p, 1, true)).
template <class T>
void run_cuda(const cuda_context& ctx, const plan& p, const unsigned char* device_tables,
              const cuda_layout* tables_layout, tensor3_view<const T> q, tensor3_view<const T> k,
              tensor3_view<const T> v, tensor3_view<T> out, void* workspace, std::size_t workspace_bytes,
              head_report* report) {
  namespace ck = ::basisattn::detail::cuda_kernels;
  constexpr const char* fn = "support::run(cuda)";
  const basisattn::detail::attention_shape sh = check_run_args<T>(fn, p, q, k, v, out);
  BASISATTN_REQUIRE(!p.options.accumulate_double, unsupported, fn,
                    ": options.accumulate_double is not supported on the GPU (fp32 arithmetic)");
  const cuda_layout L = make_cuda_layout(p, sh.d_v, device_tables == nullptr);
  BASISATTN_REQUIRE(L.r < INT_MAX && L.blk * std::max<index_t>(L.r, sh.d_qk) < INT_MAX && sh.d_v < INT_MAX, unsupported,
                    fn, ": ", L.r, " features x ", L.blk, " rows per block exceed cuBLAS's 32-bit range");
  const basisattn::detail::workspace_slices ws =
      basisattn::detail::slice_workspace(workspace, workspace_bytes, L.total, cuda_ws_align);
  BASISATTN_REQUIRE(ws.count >= 1, invalid_argument, fn, ": workspace of ", workspace_bytes, " bytes",
                    workspace ? "" : " (null)", " is too small; this problem needs ",
                    basisattn::detail::sliced_workspace_bytes(L.total, 1, cuda_ws_align),
                    " bytes (see support::workspace_bytes)");

  cuda_run c;
  c.ctx = &ctx;
  c.p = &p;
  c.L = L;
  c.base = ws.base;
  if (device_tables) {
    c.T = *tables_layout;
    c.tables = device_tables;
  } else {
    c.T = L;
    c.tables = ws.base;
    upload_tables(ctx, p, L, ws.base);
  }
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(ws.base + L.tables_end, 0, L.results_end - L.tables_end, ctx.stream()));
  if (p.options.check_finite) {
    auto* const cnt = c.at<unsigned long long>(L.nonfinite);
    ck::launch_support_count_nonfinite(v.data, v.extent[0], v.extent[1], v.extent[2], v.stride[0], v.stride[1],
                                       v.stride[2], cnt, ctx.stream());
    unsigned long long bad = 0;
    cuda_download(ctx, &bad, cnt, 1);
    BASISATTN_REQUIRE(bad == 0, non_finite, fn, ": v has a non-finite value (", bad, " NaN/Inf entries)");
  }
  for (index_t h = 0; h < sh.h_q; ++h) {
    c.h = h;
    c.hk = h / sh.group;
    run_head_cuda<T>(c, q, k, v, out);
  }
  const std::int64_t check_rows = p.options.check_rows;
  if (check_rows == 0 && !report) return;

  // Reports and the exact fallback (the first download waits for the whole head loop).
  const double tol = p.options.tolerance;
  for (index_t h = 0; h < sh.h_q; ++h) {
    c.h = h;
    c.hk = h / sh.group;
    head_report rep = p.report[static_cast<std::size_t>(h)];
    unsigned long long bad = 0, na = 0;
    cuda_download(ctx, &bad, c.at<unsigned long long>(L.bad) + h, 1);
    cuda_download(ctx, &na, c.at<unsigned long long>(L.na) + h, 1);
    rep.repaired_rows = static_cast<std::int64_t>(bad);
    rep.poly_rows = static_cast<std::int64_t>(na);
    rep.checked_rows = std::min<std::int64_t>(check_rows, rep.poly_rows);
    if (check_rows > 0) rep.estimated_error = rep.mean_estimated_error = 0;  // else disabled: NaN, as on the CPU
    if (rep.checked_rows > 0) {
      double summary[2] = {0, 0};
      cuda_download(ctx, summary, c.at<double>(L.summary) + 2 * h, 2);
      rep.estimated_error = summary[0];
      rep.mean_estimated_error = summary[1];
    }
    rep.fell_back = false;
    // As the CPU: the estimate is above the tolerance, or the polynomial guarantees nothing on its
    // range (poly_error >= 1) while a tolerance is set; only with the estimate enabled.
    const bool no_guarantee = rep.poly_error >= 1 && std::isfinite(tol);
    if (check_rows > 0 && (rep.estimated_error > tol || no_guarantee)) {
      load_head(c, q, k, v);
      ck::launch_support_exact(exact_params(c, 2), ctx.stream());
      store_head(c, out);
      rep.fell_back = true;
    }
    if (report) report[h] = rep;
  }
}

}  // namespace detail

/// Support-basis attention of device tensors with a plan made by make_plan(cpu{}, ...) from host copies
/// of the same q and k (see the header comment). `report`, when not null, receives H_q head reports.
/// Copies the plan's tables from the host into the workspace first: a plan run more than once is
/// better uploaded once (upload(ctx, plan), then the device_plan overload).
template <class T>
void run(const cuda_context& ctx, const plan& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
         tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
         tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out, void* workspace,
         std::size_t workspace_bytes, head_report* report = nullptr) {
  static_assert(supports_storage_v<cuda, T>, "support::run(cuda): T must be float, Eigen::half or Eigen::bfloat16");
  detail::run_cuda<T>(ctx, p, nullptr, nullptr, q, k, v, out, workspace, workspace_bytes, report);
}

/// The same on an uploaded plan: nothing is copied from the host. With options.check_rows = 0,
/// options.check_finite = false and report = nullptr the run only enqueues work on ctx's stream (no
/// host synchronisation, no allocation), so it can be captured in a CUDA graph.
template <class T>
void run(const cuda_context& ctx, const device_plan& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
         tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
         tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out, void* workspace,
         std::size_t workspace_bytes, head_report* report = nullptr) {
  static_assert(supports_storage_v<cuda, T>, "support::run(cuda): T must be float, Eigen::half or Eigen::bfloat16");
  BASISATTN_REQUIRE(p.tables() != nullptr, invalid_argument,
                    "support::run(cuda): the device_plan is empty (make it with support::upload)");
  detail::run_cuda<T>(ctx, p.host(), p.tables(), &p.tables_layout(), q, k, v, out, workspace, workspace_bytes, report);
}

/// run(ctx, ...) with a device workspace it allocates (and frees after waiting for the stream);
/// returns the H_q head reports. P is a plan or a device_plan.
template <class T, class P, class = std::enable_if_t<std::is_same_v<P, plan> || std::is_same_v<P, device_plan>>>
std::vector<head_report> run(const cuda_context& ctx, const P& p,
                             tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
                             tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
                             tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out) {
  BASISATTN_REQUIRE(v.extent[2] >= 1, invalid_argument, "support::run(cuda): v has d_v = ", v.extent[2],
                    "; must be >= 1");
  device_buffer<unsigned char> ws(static_cast<index_t>(workspace_bytes(ctx, p, v.extent[2])));
  const plan& hp = [&]() -> const plan& {
    if constexpr (std::is_same_v<P, plan>)
      return p;
    else
      return p.host();
  }();
  std::vector<head_report> rep(static_cast<std::size_t>(hp.shape.h_q));
  run<T>(ctx, p, q, k, v, out, ws.data(), ws.bytes(), rep.data());
  ctx.synchronize();  // the workspace is freed on return
  return rep;
}

}  // namespace support
BASISATTN_END_NAMESPACE
