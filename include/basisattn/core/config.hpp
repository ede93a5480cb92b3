// basisattn/core/config.hpp - version, namespace and portability macros.
//
// Every public header includes this first. It defines:
//   BASISATTN_VERSION_{MAJOR,MINOR,PATCH}, BASISATTN_VERSION (MMmmpp as an integer)
//   BASISATTN_BEGIN_NAMESPACE / BASISATTN_END_NAMESPACE: open/close `basisattn::v0`, an inline
//       namespace, so two engines can embed two incompatible versions in one program.
//   BASISATTN_HOST_DEVICE: `__host__ __device__ inline` under nvcc, plain `inline` elsewhere.
//   BASISATTN_HAS_EXCEPTIONS: 1 when C++ exceptions are enabled. With -fno-exceptions the
//       library prints its error message to stderr and calls std::abort() instead of throwing.
#pragma once

#define BASISATTN_VERSION_MAJOR 0
#define BASISATTN_VERSION_MINOR 1
#define BASISATTN_VERSION_PATCH 0
#define BASISATTN_VERSION (BASISATTN_VERSION_MAJOR * 10000 + BASISATTN_VERSION_MINOR * 100 + BASISATTN_VERSION_PATCH)

#define BASISATTN_BEGIN_NAMESPACE \
  namespace basisattn {           \
  inline namespace v0 {
#define BASISATTN_END_NAMESPACE \
  }                             \
  }

#if defined(__CUDACC__)
#define BASISATTN_HOST_DEVICE __host__ __device__ inline
#else
#define BASISATTN_HOST_DEVICE inline
#endif

#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#define BASISATTN_HAS_EXCEPTIONS 1
#else
#define BASISATTN_HAS_EXCEPTIONS 0
#endif

#include <cstddef>

BASISATTN_BEGIN_NAMESPACE
/// Signed index type used for every extent, stride and index in the public API.
using index_t = std::ptrdiff_t;
BASISATTN_END_NAMESPACE
