// basisattn/core/parallel.hpp - the one parallel loop of the library (internal, basisattn::detail).
//
// Every host-side parallel loop (CPU backend runs, plan making, preparation) goes through
// parallel_for / parallel_for_slots: OpenMP when the build has it, a plain loop otherwise. The thread
// count is read from OpenMP's current setting (what Eigen's GEMM also uses), never changed: the
// library leaves the user's process-wide settings alone. An exception thrown by the loop body is
// carried out of the parallel region and rethrown once the loop ends (the first one wins).
#pragma once

#include <basisattn/core/config.hpp>

#include <Eigen/Core>

#include <exception>

#if defined(_OPENMP)
#include <omp.h>
#endif

BASISATTN_BEGIN_NAMESPACE
namespace detail {

/// Number of threads the CPU backend uses for its own parallel loops (OpenMP's current setting,
/// which is also what Eigen's GEMM uses unless Eigen::setNbThreads was called); 1 inside a parallel
/// region and without OpenMP.
inline int cpu_threads() {
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : Eigen::nbThreads();
#else
  return 1;
#endif
}

/// How iterations are handed to threads: `dynamic` (one at a time, for uneven iterations such as
/// heads with different work) or `fixed` (contiguous equal ranges: iteration i always goes to the
/// same slot for a given n and thread count).
enum class loop_schedule { dynamic, fixed };

/// for (i = 0; i < n; ++i) f(i, slot) on `threads` OpenMP threads (1: in the calling thread). slot
/// in [0, threads) is the running thread's, so per-thread scratch (a workspace slice) can be indexed
/// by it. The first exception thrown by f is rethrown after the loop.
template <class F>
void parallel_for_slots(index_t n, int threads, F&& f, loop_schedule sched = loop_schedule::dynamic) {
#if defined(_OPENMP)
  if (threads > 1 && n > 1) {
#if BASISATTN_HAS_EXCEPTIONS
    std::exception_ptr err;
    auto body = [&](index_t i) {
      try {
        f(i, omp_get_thread_num());
      } catch (...) {
#pragma omp critical(basisattn_parallel_for_error)
        if (!err) err = std::current_exception();
      }
    };
#else
    auto body = [&](index_t i) { f(i, omp_get_thread_num()); };
#endif
    if (sched == loop_schedule::dynamic) {
#pragma omp parallel for schedule(dynamic) num_threads(threads)
      for (index_t i = 0; i < n; ++i) body(i);
    } else {
#pragma omp parallel for schedule(static) num_threads(threads)
      for (index_t i = 0; i < n; ++i) body(i);
    }
#if BASISATTN_HAS_EXCEPTIONS
    if (err) std::rethrow_exception(err);
#endif
    return;
  }
#endif
  (void)threads;
  (void)sched;
  for (index_t i = 0; i < n; ++i) f(i, 0);
}

/// for (i = 0; i < n; ++i) f(i) on cpu_threads() threads (dynamic schedule).
template <class F>
void parallel_for(index_t n, F&& f) {
  parallel_for_slots(n, cpu_threads(), [&](index_t i, int) { f(i); });
}

}  // namespace detail
BASISATTN_END_NAMESPACE
