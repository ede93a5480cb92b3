// basisattn/cuda/kernels/projection.cuh - internal: the small kernels around the projection GEMMs (nvcc only).
//
// Definitions of launch_gather_columns and launch_broadcast_rows, declared in
// <basisattn/cuda/kernel_launch.hpp>. Both are bandwidth-bound grid-stride loops; the GEMM itself is
// cuBLAS / cuBLASLt (see <basisattn/cuda/projection.hpp>).
#pragma once

#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/kernel_launch.hpp>
#include <basisattn/cuda/kernels/common.cuh>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

template <class D>
__global__ void gather_columns_kernel(const D* __restrict__ x, long long ldx, const int* __restrict__ perm,
                                      long long cols, long long rows, D* __restrict__ out, long long ldo) {
  const long long n = rows * cols;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long t = i / cols, c = i - t * cols;
    out[t * ldo + c] = x[t * ldx + perm[c]];
  }
}

template <class D>
__global__ void broadcast_rows_kernel(const D* __restrict__ xb, long long ldx, long long r, long long groups,
                                      const D* __restrict__ bias, long long bias_stride, long long rows,
                                      D* __restrict__ y, long long ldy) {
  const long long width = r * groups, n = rows * width;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long t = i / width, j = i - t * width, g = j / r, k = j - g * r;
    float s = xb ? load_f(xb[t * ldx + k]) : 0.0f;
    if (bias) s += load_f(bias[g * bias_stride + k]);
    y[t * ldy + j] = store_f<D>(s);
  }
}

template <class T>
void launch_gather_columns(const T* x, index_t ldx, const int* perm, index_t cols, index_t rows, T* out, index_t ldo,
                           cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  constexpr int threads = 256;
  gather_columns_kernel<<<grid_for(rows * cols, threads), threads, 0, stream>>>(as_device(x), ldx, perm, cols, rows,
                                                                                as_device(out), ldo);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void launch_broadcast_rows(const T* xb, index_t ldx, index_t r, index_t groups, const T* bias, index_t bias_stride,
                           index_t rows, T* y, index_t ldy, cudaStream_t stream) {
  if (rows <= 0 || r <= 0 || groups <= 0) return;
  constexpr int threads = 256;
  broadcast_rows_kernel<<<grid_for(rows * r * groups, threads), threads, 0, stream>>>(
      as_device(xb), ldx, r, groups, as_device(bias), bias_stride, rows, as_device(y), ldy);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
