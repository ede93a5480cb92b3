// basisattn/cuda/support_steps.hpp - internal: the steps of a support-basis head on the CUDA backend
// (workspace layout, plan-table upload, features and the polynomial part with cuBLAS, the exact part,
// loads and stores, one head). The run that chains them, and the algorithm, are in
// <basisattn/cuda/support.hpp>.
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

/// Polynomial part of the current head (docs/design/cuda-support.md, step 1).
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

/// Steps 0-5 of docs/design/cuda-support.md for query head c.h.
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
}  // namespace support
BASISATTN_END_NAMESPACE
