// basisattn/cuda/kernels/layers.cuh - internal: the small kernels of the attention-layer forward pass (nvcc only).
//
// Definitions of launch_rope, launch_rms_norm_rows and launch_concat_heads, declared in
// <basisattn/cuda/kernel_launch.hpp>; the layer itself is host code in <basisattn/cuda/layers.hpp>.
// All three are bandwidth-bound and tiny next to the projections and the attention; they follow the
// CPU backend's arithmetic (RoPE in double as <basisattn/attention/rope.hpp>, RMSNorm in fp32 as
// <basisattn/cpu/layers.hpp>) so that the GPU and CPU layers differ only by summation order.
#pragma once

#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/kernel_launch.hpp>
#include <basisattn/cuda/kernels/common.cuh>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

/// One thread per (token, head, pair i). Angle pos * theta^(-2i/d), sine/cosine and the rotation in
/// double, rounded once to the storage type, as apply_rope does.
template <class D>
__global__ void rope_kernel(D* __restrict__ x, long long tokens, long long heads, long long d, long long s0,
                            long long s1, long long s2, double theta, bool interleaved, long long position_offset) {
  const long long half = d / 2, n = tokens * heads * half;
  const long long partner = interleaved ? 1 : half;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long i = idx % half, th = idx / half, h = th % heads, t = th / heads;
    const long long i0 = interleaved ? 2 * i : i;
    const double inv_freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
    const double a = static_cast<double>(position_offset + t) * inv_freq;
    double s, c;
    sincos(a, &s, &c);
    D* const base = x + t * s0 + h * s1;
    D& e0 = base[i0 * s2];
    D& e1 = base[(i0 + partner) * s2];
    const double x0 = static_cast<double>(load_f(e0)), x1 = static_cast<double>(load_f(e1));
    e0 = store_double<D>(x0 * c - x1 * s);
    e1 = store_double<D>(x0 * s + x1 * c);
  }
}

/// One block per row: x[t, :cols] <- round(x * (1 / sqrt(mean(x^2) + eps)) * w), fp32 arithmetic.
template <class D>
__global__ void rms_norm_rows_kernel(D* __restrict__ x, long long ldx, long long rows, long long cols,
                                     const D* __restrict__ w, float eps) {
  __shared__ float partial[32];
  for (long long t = blockIdx.x; t < rows; t += gridDim.x) {
    D* const row = x + t * ldx;
    float ss = 0.0f;
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) {
      const float z = load_f(row[j]);
      ss = fmaf(z, z, ss);
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
      float v = lane < warps ? partial[lane] : 0.0f;
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    const float inv = 1.0f / sqrtf(partial[0] / static_cast<float>(cols) + eps);
    for (long long j = threadIdx.x; j < cols; j += blockDim.x) row[j] = store_f<D>(load_f(row[j]) * inv * load_f(w[j]));
    __syncthreads();  // partial[] is reused by the next row
  }
}

/// out[t, h, :da] = a[t, h, :], out[t, h, da:da+db] = b[t, h, :] (head strides may be 0: shared).
template <class D>
__global__ void concat_heads_kernel(const D* __restrict__ a, long long lda, long long ash, long long da,
                                    const D* __restrict__ b, long long ldb, long long bsh, long long db, long long rows,
                                    long long heads, D* __restrict__ out, long long ldo) {
  const long long w = da + db, n = rows * heads * w;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long c = idx % w, th = idx / w, h = th % heads, t = th / heads;
    out[t * ldo + h * w + c] = c < da ? a[t * lda + h * ash + c] : b[t * ldb + h * bsh + (c - da)];
  }
}

template <class T>
void launch_rope(T* x, index_t tokens, index_t heads, index_t d, index_t s0, index_t s1, index_t s2, double theta,
                 bool interleaved, index_t position_offset, cudaStream_t stream) {
  if (tokens <= 0 || heads <= 0 || d < 2) return;
  constexpr int threads = 256;
  rope_kernel<device_type_t<T>><<<grid_for(tokens * heads * (d / 2), threads), threads, 0, stream>>>(
      as_device(x), tokens, heads, d, s0, s1, s2, theta, interleaved, position_offset);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void launch_rms_norm_rows(T* x, index_t ldx, index_t rows, index_t cols, const T* weight, float eps,
                          cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  constexpr int threads = 256;
  const unsigned blocks = static_cast<unsigned>(rows < 65535LL * 16 ? rows : 65535LL * 16);
  rms_norm_rows_kernel<<<blocks, threads, 0, stream>>>(as_device(x), ldx, rows, cols, as_device(weight), eps);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void launch_concat_heads(const T* a, index_t lda, index_t a_head_stride, index_t da, const T* b, index_t ldb,
                         index_t b_head_stride, index_t db, index_t rows, index_t heads, T* out, index_t ldo,
                         cudaStream_t stream) {
  if (rows <= 0 || heads <= 0 || da + db <= 0) return;
  constexpr int threads = 256;
  concat_heads_kernel<<<grid_for(rows * heads * (da + db), threads), threads, 0, stream>>>(
      as_device(a), lda, a_head_stride, da, as_device(b), ldb, b_head_stride, db, rows, heads, as_device(out), ldo);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
