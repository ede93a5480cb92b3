// basisattn/cuda/kernels/common.cuh - internal: device-side helpers shared by basisattn's kernels (nvcc only).
//
//   device_type_t<T>        the CUDA type with T's bits: float, __half for Eigen::half,
//                           __nv_bfloat16 for Eigen::bfloat16
//   as_device(p)            reinterpret a pointer to the public storage type as its device type
//   load_f(x) / store_f<D>  fp32 widening / round-to-nearest narrowing on the device
//   store_double<D>(x)      double -> storage, rounded once (no double rounding through float)
//   grid_for(n, threads)    a 1-D grid for a grid-stride loop over n elements
#pragma once

#if !defined(__CUDACC__)
#error "basisattn/cuda/kernels/*.cuh contain CUDA kernels and must be compiled by nvcc (a .cu file)"
#endif
// Internal: the kernel headers define the launchers but instantiate nothing, so a program that
// included one of them directly would miss symbols (or define them twice). <basisattn/cuda/kernels.cuh>
// includes them all and instantiates every launcher; it sets this macro first.
#if !defined(BASISATTN_CUDA_KERNELS_TU)
#error "basisattn/cuda/kernels/*.cuh are internal: include <basisattn/cuda/kernels.cuh> in exactly one .cu file"
#endif

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

// nvcc before 12 defaults to C++14 for .cu files (and CMake's cxx_std_17 does not reach them): the
// library needs C++17 (if constexpr, inline variables) on the device side too.
static_assert(__cplusplus >= 201703L,
              "basisattn's CUDA kernels need C++17: compile .cu files with -std=c++17 "
              "(CMake: CMAKE_CUDA_STANDARD 17 or the cuda_std_17 compile feature)");

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

template <class T>
struct device_type {
  using type = T;
};
template <>
struct device_type<Eigen::half> {
  using type = __half;
};
template <>
struct device_type<Eigen::bfloat16> {
  using type = __nv_bfloat16;
};
template <class T>
using device_type_t = typename device_type<T>::type;

static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit device types");

template <class T>
inline const device_type_t<T>* as_device(const T* p) {
  return reinterpret_cast<const device_type_t<T>*>(p);
}
template <class T>
inline device_type_t<T>* as_device(T* p) {
  return reinterpret_cast<device_type_t<T>*>(p);
}

__device__ __forceinline__ float load_f(float x) { return x; }
__device__ __forceinline__ float load_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float load_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class D>
__device__ __forceinline__ D store_f(float x);
template <>
__device__ __forceinline__ float store_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half store_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

/// Correctly rounded double -> storage conversion (as the CPU's from_compute<T>(double)): the 16-bit
/// types are rounded once from double, never through float (double rounding can differ by one unit).
template <class D>
__device__ __forceinline__ D store_double(double x);
template <>
__device__ __forceinline__ float store_double<float>(double x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ __half store_double<__half>(double x) {
  return __double2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_double<__nv_bfloat16>(double x) {
  return __double2bfloat16(x);
}

/// Blocks for a grid-stride loop over n elements (at most 65535 * 16 blocks, at least 1).
inline unsigned grid_for(long long n, int threads) {
  const long long blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::max<long long>(1, std::min<long long>(blocks, 65535LL * 16)));
}

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
