// basisattn/core/backend.hpp - backend tag types and traits.
//
// A backend is a type: `basisattn::cpu` (Eigen; always available) and `basisattn::cuda` (cuBLAS,
// cuFFT and our kernels; only with the basisattn::cuda target). Every entry point takes the backend
// as its first argument, and that argument's type selects the overload: the tag `cpu{}` on the CPU,
// e.g. `bd::project(cpu{}, proj, x, y)`; on CUDA the backend's object, a `cuda_context` (device,
// stream, library handles), e.g. `bd::project(ctx, dproj, x, y, ws, bytes)`. The arguments after it
// come in the same order on both. `backend_of_t<A>` names the backend an argument of type A selects
// (`cpu` for `cpu`, `cuda` for `cuda_context`), so generic code can ask the traits below, e.g.
//   template <class B, class T> void layer(const B& be, ...) {
//     static_assert(supports_storage_v<B, T>, "...");  // B = cpu or cuda_context
//     attention(be, q, k, v, out, opt); }
//
// `backend_traits<B>` is specialised per backend; the primary template is left undefined, so using
// a backend whose header was not included (or an unknown type) is a compile error. The traits of
// `cuda` live in <basisattn/cuda/backend.hpp>.
//
// Capability checks are constexpr predicates meant for static_assert (B: a backend or an argument
// type that selects one, as above):
//   is_backend_v<B>                 B's backend has traits (its header is included)
//   supports_storage_v<B, T>        B's backend can run with storage type T
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>

#include <type_traits>

BASISATTN_BEGIN_NAMESPACE

/// Host backend: Eigen (or oneDNN's sgemm, backend_traits<cpu>::gemm) GEMMs, OpenMP threads when
/// compiled with OpenMP.
struct cpu {};
/// CUDA backend: see <basisattn/cuda/backend.hpp>.
struct cuda {};

/// Traits of a backend; primary template deliberately undefined.
template <class Backend>
struct backend_traits;

/// The backend a first argument of type Arg selects: Arg itself for a tag; specialised for backend
/// objects (cuda_context -> cuda in <basisattn/cuda/context.hpp>).
template <class Arg>
struct backend_of {
  using type = Arg;
};
template <class Arg>
using backend_of_t = typename backend_of<std::remove_cv_t<std::remove_reference_t<Arg>>>::type;

template <>
struct backend_traits<cpu> {
  static constexpr const char* name = "cpu";
  /// Memory the backend computes on is host memory.
  static constexpr bool host_memory = true;
  template <class T>
  static constexpr bool supports_storage = is_storage_type_v<T>;
  /// The GEMM provider of float products (see <basisattn/cpu/gemm.hpp>): "onednn" when the program
  /// is built with BASISATTN_WITH_ONEDNN=1 and links oneDNN, else "eigen".
#if defined(BASISATTN_WITH_ONEDNN) && BASISATTN_WITH_ONEDNN
  static constexpr const char* gemm = "onednn";
#else
  static constexpr const char* gemm = "eigen";
#endif
};

namespace detail {
template <class B, class = void>
struct has_traits : std::false_type {};
template <class B>
struct has_traits<B, std::void_t<decltype(sizeof(backend_traits<B>))>> : std::true_type {};
}  // namespace detail

/// True when `backend_traits<backend_of_t<B>>` is defined (B is or selects a backend whose header is
/// included).
template <class B>
inline constexpr bool is_backend_v = detail::has_traits<backend_of_t<B>>::value;

/// True when the backend B is or selects supports storage type T.
template <class B, class T>
inline constexpr bool supports_storage_v = backend_traits<backend_of_t<B>>::template supports_storage<T>;

BASISATTN_END_NAMESPACE
