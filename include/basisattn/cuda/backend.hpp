// basisattn/cuda/backend.hpp - the CUDA backend's traits, device query and error checks.
//
// Host-side header (ordinary C++; needs the CUDA toolkit's include path, which the basisattn::cuda
// target provides). Kernels live in .cuh files that require nvcc.
//
//   backend_traits<cuda>               makes `cuda` a backend (is_backend_v<cuda>)
//   cuda_device_count()                usable devices; 0 when the runtime reports any error (no GPU,
//                                      no or too old driver: error 35 on machines without a GPU)
//   BASISATTN_CUDA_CHECK(expr)         turns a cudaError_t into basisattn::error(errc::backend, ...),
//                                      except sticky errors (illegal address, launch failure, ...),
//                                      which corrupt the context: those print and abort, as Kokkos does.
#pragma once

#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <type_traits>

BASISATTN_BEGIN_NAMESPACE

template <>
struct backend_traits<cuda> {
  static constexpr const char* name = "cuda";
  static constexpr bool host_memory = false;
  /// float, Eigen::half and Eigen::bfloat16 (fp32 arithmetic); no double.
  template <class T>
  static constexpr bool supports_storage = is_storage_type_v<T> && !std::is_same_v<std::remove_cv_t<T>, double>;
};

namespace detail {

/// Errors after which the CUDA context is unusable.
inline bool cuda_error_is_sticky(cudaError_t e) noexcept {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
      return true;
    default:
      return false;
  }
}

inline void cuda_check(cudaError_t e, const char* expr, const char* file, int line) {
  if (e == cudaSuccess) return;
  const std::string msg =
      concat(expr, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") at ", file, ":", line);
  if (cuda_error_is_sticky(e)) {
    std::fprintf(stderr, "basisattn: backend: sticky CUDA error, the context is lost: %s\n", msg.c_str());
    std::abort();
  }
  cudaGetLastError();  // clear the (non-sticky) error state
  raise(errc::backend, msg);
}

}  // namespace detail

/// Number of usable CUDA devices; 0 whenever the runtime reports an error.
inline int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

BASISATTN_END_NAMESPACE

#define BASISATTN_CUDA_CHECK(expr) ::basisattn::detail::cuda_check((expr), #expr, __FILE__, __LINE__)
