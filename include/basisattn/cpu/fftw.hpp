// basisattn/cpu/fftw.hpp - the FFTW 3 engine of conv-basis attention (opt-in).
//
// FFTW is GPL-licensed: including this header and linking libfftw3 (double) and libfftw3f (float)
// makes the program subject to the GPL (or a commercial FFTW licence). basisattn itself never
// includes it; the CMake option BASISATTN_WITH_FFTW builds our tests and benchmarks with it.
//
// Public entry point: the tag conv::fft_fftw (declared in <basisattn/cpu/fft.hpp>) gets its traits
// here; pass it as the FFT template argument: conv::attention<float, conv::fft_fftw>(cpu{}, ...).
// Plans are made with FFTW_ESTIMATE (no timing runs), one pair for SIMD-aligned arrays and one with
// FFTW_UNALIGNED for any others, on first use of each size, under a process-wide mutex (FFTW's planner is not thread-safe; execution is), and kept
// in a process-wide cache until exit (a lookup takes the mutex; an FFT of the sizes used costs far more).
#pragma once

#include <basisattn/cpu/fft.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <fftw3.h>

#include <complex>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace conv {
namespace detail {

inline std::mutex& fftw_planner_mutex() {
  static std::mutex m;
  return m;
}

template <class Real>
struct fftw_api;
template <>
struct fftw_api<double> {
  using plan = fftw_plan;
  using cpx = fftw_complex;
  static plan r2c(int n, double* in, cpx* out, unsigned f) {
    return fftw_plan_dft_r2c_1d(n, in, out, FFTW_ESTIMATE | f);
  }
  static plan c2r(int n, cpx* in, double* out, unsigned f) {
    return fftw_plan_dft_c2r_1d(n, in, out, FFTW_ESTIMATE | f);
  }
  static void* alloc(std::size_t bytes) { return fftw_malloc(bytes); }
  static void release(void* p) { fftw_free(p); }
  static bool aligned(const void* p) { return fftw_alignment_of(static_cast<double*>(const_cast<void*>(p))) == 0; }
  static void exec_r2c(plan p, double* in, cpx* out) { fftw_execute_dft_r2c(p, in, out); }
  static void exec_c2r(plan p, cpx* in, double* out) { fftw_execute_dft_c2r(p, in, out); }
  static void destroy(plan p) { fftw_destroy_plan(p); }
};
template <>
struct fftw_api<float> {
  using plan = fftwf_plan;
  using cpx = fftwf_complex;
  static plan r2c(int n, float* in, cpx* out, unsigned f) {
    return fftwf_plan_dft_r2c_1d(n, in, out, FFTW_ESTIMATE | f);
  }
  static plan c2r(int n, cpx* in, float* out, unsigned f) {
    return fftwf_plan_dft_c2r_1d(n, in, out, FFTW_ESTIMATE | f);
  }
  static void* alloc(std::size_t bytes) { return fftwf_malloc(bytes); }
  static void release(void* p) { fftwf_free(p); }
  static bool aligned(const void* p) { return fftwf_alignment_of(static_cast<float*>(const_cast<void*>(p))) == 0; }
  static void exec_r2c(plan p, float* in, cpx* out) { fftwf_execute_dft_r2c(p, in, out); }
  static void exec_c2r(plan p, cpx* in, float* out) { fftwf_execute_dft_c2r(p, in, out); }
  static void destroy(plan p) { fftwf_destroy_plan(p); }
};

}  // namespace detail

template <>
struct fft_traits<fft_fftw> {
  static constexpr const char* name = "fftw";
  template <class Real>
  class engine {
    static_assert(std::is_same_v<Real, float> || std::is_same_v<Real, double>, "fft_fftw: float or double");
    using api = detail::fftw_api<Real>;
    struct plans {
      typename api::plan fwd, inv;      // for arrays with FFTW's SIMD alignment
      typename api::plan fwd_u, inv_u;  // FFTW_UNALIGNED: any arrays
    };

   public:
    void forward(std::complex<Real>* dst, const Real* src, index_t n) {
      // FFTW's r2c does not modify its input (without FFTW_DESTROY_INPUT), the cast is safe
      const plans& p = get(n);
      api::exec_r2c(api::aligned(src) && api::aligned(dst) ? p.fwd : p.fwd_u, const_cast<Real*>(src),
                    reinterpret_cast<typename api::cpx*>(dst));
    }
    /// Scaled by 1 / n. Overwrites src (FFTW's c2r destroys its input).
    void inverse(Real* dst, const std::complex<Real>* src, index_t n) {
      const plans& p = get(n);
      api::exec_c2r(api::aligned(src) && api::aligned(dst) ? p.inv : p.inv_u,
                    reinterpret_cast<typename api::cpx*>(const_cast<std::complex<Real>*>(src)), dst);
      const Real s = Real(1) / Real(n);
      for (index_t i = 0; i < n; ++i) dst[i] *= s;
    }

   private:
    /// Plans are shared by all engines of the process (executing a plan is thread-safe in FFTW) and
    /// live until exit: planning costs more than many transforms of small sizes.
    static const plans& get(index_t n) {
      static std::map<index_t, plans> cache;
      std::lock_guard<std::mutex> lock(detail::fftw_planner_mutex());
      auto it = cache.find(n);
      if (it != cache.end()) return it->second;
      Real* r = static_cast<Real*>(api::alloc(sizeof(Real) * static_cast<std::size_t>(n)));
      auto* c =
          static_cast<typename api::cpx*>(api::alloc(sizeof(typename api::cpx) * static_cast<std::size_t>(n / 2 + 1)));
      BASISATTN_REQUIRE(r && c, backend, "fftw: out of memory planning a transform of size ", n);
      plans p;
      const int ni = static_cast<int>(n);
      p.fwd = api::r2c(ni, r, c, 0);
      p.inv = api::c2r(ni, c, r, 0);
      p.fwd_u = api::r2c(ni, r, c, FFTW_UNALIGNED);
      p.inv_u = api::c2r(ni, c, r, FFTW_UNALIGNED);
      api::release(r);
      api::release(c);
      BASISATTN_REQUIRE(p.fwd && p.inv && p.fwd_u && p.inv_u, backend, "fftw: no plan for a real transform of size ",
                        n);
      return cache.emplace(n, p).first->second;
    }
  };
};

}  // namespace conv
BASISATTN_END_NAMESPACE
