// basisattn/cuda/kernel_launch.hpp - declarations of basisattn's own CUDA kernel launchers.
//
// Host-side header (g++ compiles it; it declares, it never defines). The launchers are function
// templates whose definitions, and their explicit instantiations for float, Eigen::half and
// Eigen::bfloat16, live in <basisattn/cuda/kernels.cuh>, which needs nvcc:
//
//     // exactly one .cu file of the program:
//     #include <basisattn/cuda/kernels.cuh>
//
// Forgetting it gives a link error naming basisattn::v0::detail::cuda_kernels::launch_...; including
// it in two .cu files gives duplicate symbols. This is the flash-attention style declaration /
// explicit-instantiation split: every other file (Eigen included) stays an ordinary C++ file, and
// the kernels are compiled once.
//
// All launchers enqueue on `stream`, check the launch (BASISATTN_CUDA_CHECK(cudaGetLastError())) and
// return without waiting. Element strides and extents are in elements. T is the storage type as the
// public API spells it (Eigen::half / Eigen::bfloat16 are reinterpreted as __half / __nv_bfloat16
// on the device: identical bits).
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>

#include <cuda_runtime_api.h>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

/// out[t, c] = x[t, perm[c]] for t < rows, c < cols (a column gather / permutation).
template <class T>
void launch_gather_columns(const T* x, index_t ldx, const int* perm, index_t cols, index_t rows, T* out, index_t ldo,
                           cudaStream_t stream);

/// y[t, g r + k] = xb[t, k] + bias[g bias_stride + k] for t < rows, g < groups, k < r, where
/// xb == nullptr reads as 0 and bias == nullptr as 0 (the sum is taken in fp32 and rounded once to T). With
/// xb = x's r basis channels this writes every head's basis copy; with xb = nullptr, groups = 1
/// it broadcasts a bias row.
template <class T>
void launch_broadcast_rows(const T* xb, index_t ldx, index_t r, index_t groups, const T* bias, index_t bias_stride,
                           index_t rows, T* y, index_t ldy, cudaStream_t stream);

/// Parameters of the exact attention kernel (see <basisattn/cuda/attention.hpp>). Layouts as in
/// <basisattn/attention/options.hpp>: q [n_q, h_q, d_qk], k [n_kv, h_kv, d_qk], v [n_kv, h_kv, d_v],
/// out [n_q, h_q, d_v], any element strides.
template <class T>
struct attention_kernel_params {
  const T* q = nullptr;
  const T* k = nullptr;
  const T* v = nullptr;
  T* out = nullptr;
  long long n_q = 0, n_kv = 0, h_q = 0, h_kv = 0, d_qk = 0, d_v = 0;
  long long group = 1;          ///< h_q / h_kv
  long long causal_offset = 0;  ///< n_kv - n_q
  long long q_stride[3] = {0, 0, 0}, k_stride[3] = {0, 0, 0}, v_stride[3] = {0, 0, 0}, o_stride[3] = {0, 0, 0};
  float scale = 1.0f;
  bool causal = true;
};

/// Largest d_qk and d_v the attention kernel handles.
constexpr index_t attention_kernel_max_dim = 256;

/// Tiled streaming-softmax attention: one block per (query tile, query head), fp32 arithmetic.
template <class T>
void launch_attention(const attention_kernel_params<T>& p, cudaStream_t stream);

/// RoPE in place on x [tokens, heads, d] (element strides s0, s1, s2; d even): token t at position
/// position_offset + t, pair i (interleaved: (2i, 2i+1); else (i, i + d/2)) rotated by
/// pos * theta^(-2i/d), arithmetic in double as apply_rope (<basisattn/attention/rope.hpp>).
template <class T>
void launch_rope(T* x, index_t tokens, index_t heads, index_t d, index_t s0, index_t s1, index_t s2, double theta,
                 bool interleaved, index_t position_offset, cudaStream_t stream);

/// RMSNorm of every row in place: x[t, j] <- x[t, j] / sqrt(mean_j x[t, j]^2 + eps) * weight[j] for
/// t < rows, j < cols (fp32 arithmetic, one rounding to T).
template <class T>
void launch_rms_norm_rows(T* x, index_t ldx, index_t rows, index_t cols, const T* weight, float eps,
                          cudaStream_t stream);

/// out[t, h, :] = a[t, h, :da] ++ b[t, h, :db] for t < rows, h < heads, where a[t, h, c] is
/// a[t lda + h a_head_stride + c] (same for b; a head stride of 0 shares one row among the heads) and
/// out[t, h, c] is out[t ldo + h (da + db) + c].
template <class T>
void launch_concat_heads(const T* a, index_t lda, index_t a_head_stride, index_t da, const T* b, index_t ldb,
                         index_t b_head_stride, index_t db, index_t rows, index_t heads, T* out, index_t ldo,
                         cudaStream_t stream);

// ---- conv-basis attention (<basisattn/cuda/conv.hpp>; definitions in kernels/conv.cuh) --------------

/// One block of a head's conv basis on the device. Lower block: columns [s0, e0), kernel u[t] =
/// logit(s0 + t, s0); upper block: rows [s0, e0), kernel w[t] = logit(s0, s0 + t), t >= 1. Both kernels
/// have n - s0 entries.
struct conv_item {
  long long s0 = 0, e0 = 0;
  long long koff = 0;  ///< offset of the kernel in conv_head_params::kernels
  long long poff = 0;  ///< offset of its n - s0 + 1 prefix sums in conv_head_params::prefix
  int upper = 0;       ///< 1: upper-triangle block (non-causal plans)
};

/// Device buffers and sizes of one head of a conv-basis run (all in the caller's workspace; see
/// <basisattn/cuda/conv.hpp> for what each holds). Items: the lower blocks first (ascending s0), then
/// the upper ones (ascending s0).
struct conv_head_params {
  long long n = 0, d_v = 0;
  long long nf = 0;      ///< FFT length (the same for every block)
  long long signal = 0;  ///< distance between two FFT signals in the chunk buffer, in reals: 2 (nf / 2 + 1)
  int n_items = 0, n_lower = 0;
  const conv_item* items = nullptr;
  const double* kernels = nullptr;           ///< the head's kernels (logits), as in conv::basis::values
  double* prefix = nullptr;                  ///< per item: P[m] = sum_{t0 <= t < m} exp(u[t] - g), m in [0, n - s0]
  double* item_max = nullptr;                ///< per item: largest kernel entry
  double* item_cnum = nullptr;               ///< per item: log2(nf) ||a||_2 ||V_block||_F / max|v| (numerator bound)
  double* item_cden = nullptr;               ///< per item: ||a||_1 (denominator bound)
  double* shift = nullptr;                   ///< 1 double: the global shift g
  double* vd = nullptr;                      ///< d_v x n values in double, channel-major
  double* vrow = nullptr;                    ///< n + 1: squared row norms of v, then their exclusive prefix sums
  unsigned long long* vmax_bits = nullptr;   ///< max |v| as the bits of a non-negative double
  double* num = nullptr;                     ///< d_v x n numerators, channel-major; the double outputs afterwards
  double* den = nullptr;                     ///< n denominators
  double* bnd = nullptr;                     ///< n: FFT error bound of each row, before the factor eps / den
  int* flags = nullptr;                      ///< n: 1 = the row is recomputed directly from the basis
  unsigned long long* ratio_bits = nullptr;  ///< max over rows with den > 0 of bnd / den (bits)
  unsigned long long* worst_bits = nullptr;  ///< largest bound among the rows kept (bits)
  unsigned long long* repaired = nullptr;    ///< count of repaired rows
};

/// Per head h < heads: sum[h] = sum_{i, c} x(i, h, c) w(i, c) with the weights of
/// basisattn::detail::head_checksum, abs_sum[h] the same of |x w|; *nonfinite += the NaN/Inf count.
template <class T>
void launch_conv_checksum(const T* x, long long n, long long heads, long long d, const long long* stride, double* sum,
                          double* abs_sum, unsigned long long* nonfinite, cudaStream_t stream);

/// vd, vrow (squared row norms) and vmax_bits of kv head hk of v (strides of v in elements).
template <class T>
void launch_conv_load_values(const conv_head_params& p, const T* v, long long hk, const long long* stride,
                             cudaStream_t stream);

/// Exclusive prefix sums of vrow, item maxima, the global shift, the items' prefix sums and their
/// bound constants.
void launch_conv_head_prefix(const conv_head_params& p, cudaStream_t stream);

/// den, bnd and ratio_bits of every row.
void launch_conv_rows(const conv_head_params& p, cudaStream_t stream);

/// Write the FFT inputs of items [item0, item0 + count) into buf: count kernel signals, then count x d_v
/// value signals, each nf reals (zero padded) at distance p.signal.
template <class Real>
void launch_conv_fill(const conv_head_params& p, int item0, int count, Real* buf, cudaStream_t stream);

/// Value spectra times the kernel spectrum (lower) or its conjugate (upper), in place.
template <class Real>
void launch_conv_multiply(const conv_head_params& p, int item0, int count, Real* buf, cudaStream_t stream);

/// num += the inverse transforms of the value signals (scaled by 1 / nf), at the rows each block feeds.
template <class Real>
void launch_conv_gather(const conv_head_params& p, int item0, int count, const Real* buf, cudaStream_t stream);

/// Output rows num / den where the row's bound eps bnd / den <= tol and everything is finite (also kept
/// in num, in double); other rows are flagged for repair. Writes out(r, h, :) (strides of out).
template <class T>
void launch_conv_finalize(const conv_head_params& p, double eps, double tol, T* out, long long h,
                          const long long* stride, cudaStream_t stream);

/// Flagged rows recomputed directly from the basis with their own shift; writes out and num.
template <class T>
void launch_conv_repair(const conv_head_params& p, bool causal, T* out, long long h, const long long* stride,
                        cudaStream_t stream);

/// For each of the `count` sampled rows: the exact output in double (scale q_r . k_c of query head h and
/// kv head hk), its relative l2 error against num's row (err[i]) and uniform attention's (uerr[i]).
template <class T>
void launch_conv_exact_rows(const conv_head_params& p, const T* q, const long long* q_stride, const T* k,
                            const long long* k_stride, long long h, long long hk, long long d_qk, double scale,
                            bool causal, const long long* rows, int count, double* err, double* uerr,
                            cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
