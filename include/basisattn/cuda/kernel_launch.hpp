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

/// y[t, g r + k] = xb[t, k] + bias[g r + k] for t < rows, g < groups, k < r, where xb == nullptr
/// reads as 0 and bias == nullptr as 0 (the sum is taken in fp32 and rounded once to T). With
/// xb = x's r basis channels this writes every head's basis copy; with xb = nullptr, groups = 1
/// it broadcasts a bias row.
template <class T>
void launch_broadcast_rows(const T* xb, index_t ldx, index_t r, index_t groups, const T* bias, index_t rows, T* y,
                           index_t ldy, cudaStream_t stream);

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

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
