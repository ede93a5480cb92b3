// basisattn/cuda/support_launch.hpp - declarations of the CUDA kernels of support-basis attention.
//
// Host-side header (g++ compiles it; it declares, it never defines; no Eigen). Used by
// <basisattn/cuda/support.hpp>; the definitions (and the explicit instantiations of the templated
// launchers for float, Eigen::half and Eigen::bfloat16) live in <basisattn/cuda/kernels/support.cuh>,
// compiled into the program by <basisattn/cuda/kernels.cuh> in one .cu file (see kernel_launch.hpp).
//
// Conventions. Every launcher enqueues on `stream`, checks the launch and returns without waiting.
// "rm" buffers are row-major fp32 with the given width as leading dimension; "cm" buffers are
// column-major fp32 (leading dimension = their row count), as cuBLAS takes them. Bucket arrays are
// the plan's uint8 buckets (bucket nl = the exact top bucket); `coef` points at one query head's
// coefficient table, (nl + 1) x nl x (g + 1) doubles indexed [(bq * nl + bk) * (g + 1) + t], whose
// row bq = nl (queries in R) is all zeros.
//
// Row flags (int per query row of the current head), as the CPU run's flags (<basisattn/cpu/support.hpp>):
//   0  computed exactly only (in R, or no visible polynomial key)
//   1  approximated (not in R, a visible polynomial key, renormalised to dpoly = 1)
//   2  bad: recomputed (or to be recomputed) exactly from scratch; skipped by the exact part's mode 0
//   3  bad, recompute pending (set by launch_support_detect / launch_support_check_output; the exact
//      part's mode 1 recomputes these rows and sets them to 2)
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>

#include <cuda_runtime_api.h>

#include <cstdint>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

// ---- storage-typed (T = float, Eigen::half, Eigen::bfloat16) ----

/// dst (rm n x d) = x[i, c] = x[i s0 + c s2] in fp32 (x already points at the head).
template <class T>
void launch_support_load_head(const T* x, index_t n, index_t d, index_t s0, index_t s2, float* dst,
                              cudaStream_t stream);

/// out[i s0 + c s2] = num[i, c] * (1 / den[i]) rounded to T (num rm n x dv; out points at the head);
/// flags not null: only the rows with flags[i] == 2.
template <class T>
void launch_support_store(const float* num, const float* den, index_t n, index_t dv, T* out, index_t s0, index_t s2,
                          const int* flags, cudaStream_t stream);

/// Adds to *count the number of NaN/Inf entries of x [e0, e1, e2] (any strides); *count must be zeroed first.
template <class T>
void launch_support_count_nonfinite(const T* x, index_t e0, index_t e1, index_t e2, index_t s0, index_t s1, index_t s2,
                                    unsigned long long* count, cudaStream_t stream);

/// Parameters of the sampled-row error estimate of one query head: with na = *n_rows approximated rows
/// rows[0, na) (ascending) and s = min(samples, na), rows i_j = rows[floor((j + 1) na / s) - 1], j < s,
/// computed exactly in double from the storage values, against the stored out.
template <class T>
struct support_estimate_params {
  const T* q = nullptr;    ///< q at head h (strides q_s0 tokens, q_s2 features)
  const T* k = nullptr;    ///< k at kv head h / group
  const T* v = nullptr;    ///< v at kv head h / group
  const T* out = nullptr;  ///< out at head h
  index_t q_s0 = 0, q_s2 = 1, k_s0 = 0, k_s2 = 1, v_s0 = 0, v_s2 = 1, o_s0 = 0, o_s2 = 1;
  index_t n_q = 0, n_kv = 0, d = 0, dv = 0, samples = 0, causal_offset = 0;
  bool causal = true;
  double scale = 1;
  const index_t* rows = nullptr;               ///< the approximated rows, ascending (device)
  const unsigned long long* n_rows = nullptr;  ///< their number na (device)
  double* y = nullptr;                         ///< scratch, samples x dv doubles
  double* err = nullptr;                       ///< samples relative l2 row errors (inf when non-finite)
};

/// One block per possible sampled row (p.samples blocks, an upper bound of s); writes p.err[0, s).
template <class T>
void launch_support_estimate(const support_estimate_params<T>& p, cudaStream_t stream);

// ---- fp32 ----

/// dst (cm nrows x cols) = mult * src[row0 + i, c] (src rm with leading dimension ld).
void launch_support_gather_cm(const float* src, index_t ld, index_t row0, index_t nrows, index_t cols, float mult,
                              float* dst, cudaStream_t stream);

/// phi (cm nb x *) columns 0 (ones) and 1..d (= x, cm nb x d).
void launch_support_features_base(const float* x, index_t nb, index_t d, float* phi, cudaStream_t stream);

/// phi columns [c0, c1): phi[:, c] = phi[:, parent[c]] * x[:, var[c]] * ratio[c] (one degree at a time:
/// the parents, of the degree below, are complete).
void launch_support_monomials(const float* x, index_t nb, const index_t* parent, const index_t* var,
                              const double* ratio, index_t c0, index_t c1, float* phi, cudaStream_t stream);

/// a[e] *= b[e] for e < n.
void launch_support_mul(float* a, const float* b, index_t n, cudaStream_t stream);

/// psi (cm nb x w) = phi (cm nb x w) scaled by coef[(qb[i] * nl + bk) * (g + 1) + degree_of[c]]
/// (qb: the buckets of the nb query rows).
void launch_support_scale_features(const float* phi, index_t nb, index_t w, const std::uint8_t* qb, const double* coef,
                                   int nl, int g, int bk, const int* degree_of, float* psi, cudaStream_t stream);

/// vx (cm nk x (dv + 1)) = [V[k0 + j, :], 1] for keys j < nk with kb[j] == bk, zero rows for the others
/// (bk < 0: every key). V rm n_kv x dv; kb: the buckets of the nk keys.
void launch_support_key_values(const float* V, index_t k0, index_t nk, index_t dv, const std::uint8_t* kb, int bk,
                               float* vx, cudaStream_t stream);

/// Causal diagonal block: s (cm ni x nk, scores of queries i0 + i and keys k0 + j) becomes
/// P_{bq,bk}(s) e^{-M_bq} where key k0 + j is visible (k0 + j <= i0 + i + off) and not top (kb < nl),
/// 0 elsewhere. qb, kb: buckets of the ni queries and the nk keys.
void launch_support_block_poly(float* s, index_t ni, index_t nk, index_t i0, index_t k0, index_t off,
                               const std::uint8_t* qb, const std::uint8_t* kb, const double* coef, int nl, int g,
                               cudaStream_t stream);

/// num[i0 + i, :] = tmp[i, :dv], dpoly[i0 + i] = tmp[i, dv] (tmp cm ni x (dv + 1), num rm).
void launch_support_scatter_poly(const float* tmp, index_t ni, index_t i0, index_t dv, float* num, float* dpoly,
                                 cudaStream_t stream);

/// Accumulators of one head before the polynomial part: num = 0, dpoly = 0, m[i] = shift[qb[i]] (-inf in R).
void launch_support_init(const std::uint8_t* qb, const double* shift, int nl, index_t n_q, index_t dv, float* num,
                         float* dpoly, float* m, cudaStream_t stream);

/// Parameters of the exact (flash-style) part of one head; one warp per query row.
struct support_exact_params {
  const float* Q = nullptr;  ///< rm n_q x d, unscaled
  const float* K = nullptr;  ///< rm n_kv x d
  const float* V = nullptr;  ///< rm n_kv x dv
  index_t n_q = 0, n_kv = 0, d = 0, dv = 0, causal_offset = 0;
  float scale = 1;
  bool causal = true;
  const std::uint8_t* qb = nullptr;  ///< query buckets (nl = R)
  int nl = 1;
  const index_t* ckeys = nullptr;  ///< keys in C, ascending
  index_t n_ckeys = 0;
  float* num = nullptr;  ///< rm n_q x dv
  float* den = nullptr;
  float* m = nullptr;
  const float* dpoly = nullptr;
  int* flags = nullptr;  ///< row flags (see the top of this file); modes 0 and 1
  /// 0: continue the polynomial accumulators (m, dpoly, num) of the rows with flags != 2: rows in R
  ///    against every visible key, the others against the visible keys in C; writes m, den, num.
  /// 1: rows with flags[i] == 3 from scratch against every visible key; sets their flags to 2.
  /// 2: every row from scratch against every visible key (the exact fallback).
  int mode = 0;
};

void launch_support_exact(const support_exact_params& p, cudaStream_t stream);

/// Rows after the polynomial part, before the exact part; for each row i not in R (qb[i] < nl) with
/// vis visible keys (kpre: the kv head's k_poly_prefix, n_kv + 1 counts):
///   kpre[vis] == 0 (no visible polynomial key): m[i] = -inf, flags 0;
///   else dpoly[i] not in [FLT_MIN, finite] or num[i, :] not finite: flags 2 (bad);
///   else m[i] += log dpoly[i], num[i, :] /= dpoly[i], dpoly[i] = 1, flags 1.
/// Rows in R: flags 0. Writes flags[0, n_q).
void launch_support_post_poly(const std::uint8_t* qb, int nl, const index_t* kpre, index_t n_q, index_t n_kv,
                              index_t dv, bool causal, index_t off, float* num, float* dpoly, float* m, int* flags,
                              cudaStream_t stream);

/// After the exact part: rows with flags 2, or a den not in [FLT_MIN, finite], or a non-finite num
/// entry, get flags 3; adds their number to *count.
void launch_support_detect(const float* den, const float* num, index_t n_q, index_t dv, int* flags,
                           unsigned long long* count, cudaStream_t stream);

/// After the store: rows with flags 0 or 1 whose output num[i, c] * (1 / den[i]) (fp32, as the store
/// computes it) has a non-finite entry get flags 3; adds their number to *count.
void launch_support_check_output(const float* num, const float* den, index_t n_q, index_t dv, int* flags,
                                 unsigned long long* count, cudaStream_t stream);

/// rows[0, na) = the rows with flags 1, ascending; *count = na (one block; n_q may be 0).
void launch_support_compact(const int* flags, index_t n_q, index_t* rows, unsigned long long* count,
                            cudaStream_t stream);

/// With s = min(samples, *n_rows): summary[0] = max, summary[1] = mean of err[0, s); both 0 when s = 0
/// (one thread; nothing is launched for samples <= 0).
void launch_support_summarize(const double* err, index_t samples, const unsigned long long* n_rows, double* summary,
                              cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
