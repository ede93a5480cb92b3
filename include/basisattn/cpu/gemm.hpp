// basisattn/cpu/gemm.hpp - the one GEMM of the CPU backend (internal, basisattn::detail).
//
// Every GEMM-shaped step of a CPU run in float (the projections, the attention blocks, the exact
// part of support-basis attention) calls detail::cpu_gemm. It goes to the GEMM provider the build
// chose, named by backend_traits<cpu>::gemm:
//   "eigen"   Eigen's GEMM (the default; no dependency beyond Eigen).
//   "onednn"  oneDNN's dnnl_sgemm (Debian: libdnnl-dev), when BASISATTN_WITH_ONEDNN is defined to 1
//             for the whole program and the program links oneDNN (the CMake option
//             BASISATTN_WITH_ONEDNN=ON does both through basisattn::basisattn). Double-precision
//             products (double storage, accumulate_double, the preparation of BD) stay with Eigen:
//             oneDNN has no double GEMM.
// Measured on a 2-core AMD EPYC Zen 4 (AVX-512), fp32, one thread, 4096 x 384 times 384 x 2048 in
// row chunks of 256 (bench_bd's shape): Eigen 65% of the measured FMA peak, oneDNN 94%.
//
// Threads: the library never changes a thread setting. Called inside one of the library's OpenMP
// regions, either provider runs single-threaded (both see omp_in_parallel()). Called outside one,
// Eigen uses Eigen::nbThreads() (OpenMP's thread count unless Eigen::setNbThreads was called) and
// oneDNN OpenMP's thread count. This holds for a oneDNN built on the same OpenMP runtime as the
// program (Debian's is built on GCC's libgomp, the runtime of g++ -fopenmp); with another runtime
// (clang's libomp, a TBB build of oneDNN) oneDNN cannot see the library's regions and each of the
// library's threads may start a full team of its own. A program compiled without OpenMP gets no
// threads of the library's, but oneDNN still uses OpenMP's default thread count (OMP_NUM_THREADS).
// Define BASISATTN_WITH_ONEDNN the same way in every translation unit of a program (it selects
// inline code; the results of the two providers obey the same bound, below).
//
// Rounding: both providers sum k products in float, in an order of their choosing, with or without
// fused multiply-adds (Eigen uses them where the build enables FMA); the componentwise bound
// gamma_k |A||B| holds for either, and no test depends on the order.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/error.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <type_traits>

#if defined(BASISATTN_WITH_ONEDNN) && BASISATTN_WITH_ONEDNN
#include <oneapi/dnnl/dnnl.h>
#endif

BASISATTN_BEGIN_NAMESPACE
namespace detail {

/// Leading dimension of a row-major matrix with `rows` rows of `cols` elements as a GEMM library
/// wants it: the stride, or the row length when there is a single row (any stride is legal then).
inline index_t gemm_ld(index_t rows, index_t cols, index_t ld) { return rows <= 1 ? std::max<index_t>(cols, 1) : ld; }

/// C = alpha op(A) op(B) + beta C, row-major, m x n = (m x k)(k x n); op(X) = X^T when tX is set
/// (A is then stored k x m, B n x k). beta == 0 overwrites C (NaN in C does not propagate). ld* are
/// row strides in elements.
template <class S>
void cpu_gemm(bool ta, bool tb, index_t m, index_t n, index_t k, S alpha, const S* a, index_t lda, const S* b,
              index_t ldb, S beta, S* c, index_t ldc) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>, "cpu_gemm: float or double");
  if (m <= 0 || n <= 0) return;
  lda = gemm_ld(ta ? k : m, ta ? m : k, lda);
  ldb = gemm_ld(tb ? n : k, tb ? k : n, ldb);
  ldc = gemm_ld(m, n, ldc);
#if defined(BASISATTN_WITH_ONEDNN) && BASISATTN_WITH_ONEDNN
  if constexpr (std::is_same_v<S, float>) {
    if (k > 0) {
      const dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      BASISATTN_REQUIRE(st == dnnl_success, backend, "oneDNN dnnl_sgemm(", m, " x ", n, " x ", k,
                        ") failed with status ", static_cast<int>(st));
      return;
    }
  }
#endif
  using cmap = Eigen::Map<const rm_matrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
  using mmap = Eigen::Map<rm_matrix<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
  mmap cm(c, m, n, Eigen::OuterStride<>(ldc));
  if (k <= 0) {
    if (beta == S(0))
      cm.setZero();
    else
      cm *= beta;
    return;
  }
  const cmap am(a, ta ? k : m, ta ? m : k, Eigen::OuterStride<>(lda));
  const cmap bm(b, tb ? n : k, tb ? k : n, Eigen::OuterStride<>(ldb));
  auto apply = [&](const auto& x, const auto& y) {
    if (beta == S(0)) {
      cm.noalias() = alpha * x * y;
    } else {
      if (beta != S(1)) cm *= beta;
      cm.noalias() += alpha * x * y;
    }
  };
  if (!ta && !tb)
    apply(am, bm);
  else if (!ta)
    apply(am, bm.transpose());
  else if (!tb)
    apply(am.transpose(), bm);
  else
    apply(am.transpose(), bm.transpose());
}

}  // namespace detail
BASISATTN_END_NAMESPACE
