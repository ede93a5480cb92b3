// basisattn/cuda/kernels.cuh - compiles basisattn's CUDA kernels into the program (nvcc only).
//
// Include this file in exactly ONE .cu file of every program that uses the CUDA backend:
//
//     // basisattn_kernels.cu
//     #include <basisattn/cuda/kernels.cuh>
//
// It defines the launchers declared in <basisattn/cuda/kernel_launch.hpp> and instantiates them for
// float, Eigen::half and Eigen::bfloat16 (architectures: whatever CMAKE_CUDA_ARCHITECTURES says;
// basisattn's own build uses 80;90). It includes no Eigen header (Eigen in .cu files makes nvcc noisy);
// the 16-bit types are only forward-declared here.
#pragma once

#if !defined(__CUDACC__)
#error "<basisattn/cuda/kernels.cuh> contains CUDA kernels: include it from a .cu file compiled by nvcc"
#endif

#include <basisattn/cuda/kernels/attention.cuh>
#include <basisattn/cuda/kernels/layers.cuh>
#include <basisattn/cuda/kernels/projection.cuh>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

#define BASISATTN_INSTANTIATE_CUDA_KERNELS(T)                                                                         \
  template void launch_gather_columns<T>(const T*, index_t, const int*, index_t, index_t, T*, index_t, cudaStream_t); \
  template void launch_broadcast_rows<T>(const T*, index_t, index_t, index_t, const T*, index_t, T*, index_t,         \
                                         cudaStream_t);                                                              \
  template void launch_attention<T>(const attention_kernel_params<T>&, cudaStream_t);                               \
  template void launch_rope<T>(T*, index_t, index_t, index_t, index_t, index_t, index_t, double, bool, index_t,       \
                               cudaStream_t);                                                                        \
  template void launch_rms_norm_rows<T>(T*, index_t, index_t, index_t, const T*, float, cudaStream_t);               \
  template void launch_concat_heads<T>(const T*, index_t, index_t, index_t, const T*, index_t, index_t, index_t,      \
                                       index_t, index_t, T*, index_t, cudaStream_t);

BASISATTN_INSTANTIATE_CUDA_KERNELS(float)
BASISATTN_INSTANTIATE_CUDA_KERNELS(Eigen::half)
BASISATTN_INSTANTIATE_CUDA_KERNELS(Eigen::bfloat16)

#undef BASISATTN_INSTANTIATE_CUDA_KERNELS

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
