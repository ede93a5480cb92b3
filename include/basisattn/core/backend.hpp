// basisattn/core/backend.hpp - backend tag types and traits.
//
// A backend is a type: `basisattn::cpu` (Eigen; always available) and `basisattn::cuda` (cuBLAS,
// cuFFT and our kernels; only with the basisattn::cuda target). Entry points take the tag as their
// first argument, e.g. `bd::project(cpu{}, proj, x, y)`.
//
// `backend_traits<B>` is specialised per backend; the primary template is left undefined, so using
// a backend whose header was not included (or an unknown type) is a compile error. The traits of
// `cuda` live in <basisattn/cuda/backend.hpp>.
//
// Capability checks are constexpr predicates meant for static_assert:
//   is_backend_v<B>                 B has traits (its header is included)
//   supports_storage_v<B, T>        B can run with storage type T
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>

#include <type_traits>

BASISATTN_BEGIN_NAMESPACE

/// Host backend: Eigen GEMMs, OpenMP threads when compiled with OpenMP.
struct cpu {};
/// CUDA backend: see <basisattn/cuda/backend.hpp>.
struct cuda {};

/// Traits of a backend; primary template deliberately undefined.
template <class Backend>
struct backend_traits;

template <>
struct backend_traits<cpu> {
  static constexpr const char* name = "cpu";
  /// Memory the backend computes on is host memory.
  static constexpr bool host_memory = true;
  template <class T>
  static constexpr bool supports_storage = is_storage_type_v<T>;
};

namespace detail {
template <class B, class = void>
struct has_traits : std::false_type {};
template <class B>
struct has_traits<B, std::void_t<decltype(sizeof(backend_traits<B>))>> : std::true_type {};
}  // namespace detail

/// True when `backend_traits<B>` is defined (B is a backend and its header is included).
template <class B>
inline constexpr bool is_backend_v = detail::has_traits<B>::value;

/// True when backend B supports storage type T.
template <class B, class T>
inline constexpr bool supports_storage_v = backend_traits<B>::template supports_storage<T>;

BASISATTN_END_NAMESPACE
