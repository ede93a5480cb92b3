// basisattn/cuda/kernels.cuh - compiles basisattn's CUDA kernels into the program (nvcc only).
//
// Include this file in exactly ONE .cu file of every program that uses the CUDA backend:
//
//     // basisattn_kernels.cu
//     #include <basisattn/cuda/kernels.cuh>
//
// It defines the launchers declared in <basisattn/cuda/kernel_launch.hpp> and instantiates them for
// float, Eigen::half and Eigen::bfloat16 (the FFT-buffer kernels of conv-basis attention: for float and
// double). Architectures: whatever CMAKE_CUDA_ARCHITECTURES says; basisattn's own build uses 80;90.
// It includes no Eigen header (Eigen in .cu files makes nvcc noisy); the 16-bit types are only
// forward-declared here.
#pragma once

#if !defined(__CUDACC__)
#error "<basisattn/cuda/kernels.cuh> contains CUDA kernels: include it from a .cu file compiled by nvcc"
#endif

#define BASISATTN_CUDA_KERNELS_TU 1  // lets the internal kernel headers below be included

#include <basisattn/cuda/kernels/attention.cuh>
#include <basisattn/cuda/kernels/conv.cuh>
#include <basisattn/cuda/kernels/layers.cuh>
#include <basisattn/cuda/kernels/projection.cuh>
#include <basisattn/cuda/kernels/support.cuh>  // support-basis kernels (instantiated there)

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

#define BASISATTN_INSTANTIATE_CUDA_KERNELS(T)                                                                          \
  template void launch_gather_columns<T>(const T*, index_t, const int*, index_t, index_t, T*, index_t, cudaStream_t);  \
  template void launch_broadcast_rows<T>(const T*, index_t, index_t, index_t, const T*, index_t, index_t, T*, index_t, \
                                         cudaStream_t);                                                                \
  template void launch_attention<T>(const attention_kernel_params<T>&, cudaStream_t);                                  \
  template void launch_rope<T>(T*, index_t, index_t, index_t, index_t, index_t, index_t, double, bool, index_t,        \
                               cudaStream_t);                                                                          \
  template void launch_rms_norm_rows<T>(T*, index_t, index_t, index_t, const T*, float, cudaStream_t);                 \
  template void launch_concat_heads<T>(const T*, index_t, index_t, index_t, const T*, index_t, index_t, index_t,       \
                                       index_t, index_t, T*, index_t, cudaStream_t);                                   \
  template void launch_conv_checksum<T>(const T*, long long, long long, long long, const long long*, double*, double*, \
                                        unsigned long long*, cudaStream_t);                                            \
  template void launch_conv_load_values<T>(const conv_head_params&, const T*, long long, const long long*,             \
                                           cudaStream_t);                                                              \
  template void launch_conv_finalize<T>(const conv_head_params&, double, double, T*, long long, const long long*,      \
                                        cudaStream_t);                                                                 \
  template void launch_conv_repair<T>(const conv_head_params&, bool, T*, long long, const long long*, cudaStream_t);   \
  template void launch_conv_exact_rows<T>(const conv_head_params&, const T*, const long long*, const T*,               \
                                          const long long*, long long, long long, long long, double, bool,             \
                                          const long long*, int, double*, double*, cudaStream_t);

BASISATTN_INSTANTIATE_CUDA_KERNELS(float)
BASISATTN_INSTANTIATE_CUDA_KERNELS(Eigen::half)
BASISATTN_INSTANTIATE_CUDA_KERNELS(Eigen::bfloat16)

#undef BASISATTN_INSTANTIATE_CUDA_KERNELS

// The FFT-buffer kernels of conv-basis attention, per FFT precision.
#define BASISATTN_INSTANTIATE_CONV_FFT_KERNELS(Real)                                                \
  template void launch_conv_fill<Real>(const conv_head_params&, int, int, Real*, cudaStream_t);     \
  template void launch_conv_multiply<Real>(const conv_head_params&, int, int, Real*, cudaStream_t); \
  template void launch_conv_gather<Real>(const conv_head_params&, int, int, const Real*, cudaStream_t);

BASISATTN_INSTANTIATE_CONV_FFT_KERNELS(float)
BASISATTN_INSTANTIATE_CONV_FFT_KERNELS(double)

#undef BASISATTN_INSTANTIATE_CONV_FFT_KERNELS

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
