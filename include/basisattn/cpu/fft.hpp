// basisattn/cpu/fft.hpp - FFT engines of conv-basis attention on the CPU.
//
// An FFT engine is a tag type with traits, like a backend: `fft_traits<Tag>::engine<Real>` is a
// class with
//     engine()                                         ready to transform (may allocate tables lazily)
//     void forward(std::complex<Real>* dst, const Real* src, index_t n)   half spectrum, n / 2 + 1 bins
//     void inverse(Real* dst, const std::complex<Real>* src, index_t n)   scaled by 1 / n; may overwrite src
// for even n (the run only asks for multiples of 4 with factors 2, 3 and 5: see fft_size). The
// primary template is undefined, so an engine whose header is not included is a compile error.
//
// Engines:
//   fft_eigen   Eigen's bundled FFT (unsupported/Eigen/FFT, kissfft; MPL2): header-only, the default.
//               It builds and caches its twiddle tables on the first use of each size (allocation);
//               one engine object per thread.
//   fft_fftw    FFTW 3 (GPL: opt-in), in <basisattn/cpu/fftw.hpp>; link fftw3 (and fftw3f for
//               float): CMake option BASISATTN_WITH_FFTW.
//
// The transform lengths come from conv::fft_size (<basisattn/conv/plan.hpp>).
#pragma once

#include <basisattn/core/config.hpp>

#include <unsupported/Eigen/FFT>

#include <complex>
#include <type_traits>

BASISATTN_BEGIN_NAMESPACE
namespace conv {

/// Eigen's bundled FFT (default).
struct fft_eigen {};
/// FFTW 3 (opt-in, GPL): include <basisattn/cpu/fftw.hpp> and link fftw3 / fftw3f.
struct fft_fftw {};

/// Traits of an FFT engine tag; primary template deliberately undefined.
template <class Tag>
struct fft_traits;

template <>
struct fft_traits<fft_eigen> {
  static constexpr const char* name = "eigen";
  template <class Real>
  class engine {
    static_assert(std::is_same_v<Real, float> || std::is_same_v<Real, double>, "fft_eigen: float or double");

   public:
    engine() { fft_.SetFlag(Eigen::FFT<Real>::HalfSpectrum); }
    void forward(std::complex<Real>* dst, const Real* src, index_t n) { fft_.fwd(dst, src, n); }
    void inverse(Real* dst, const std::complex<Real>* src, index_t n) { fft_.inv(dst, src, n); }

   private:
    Eigen::FFT<Real> fft_;
  };
};

namespace detail {
template <class Tag, class = void>
struct has_fft_traits : std::false_type {};
template <class Tag>
struct has_fft_traits<Tag, std::void_t<decltype(sizeof(fft_traits<Tag>))>> : std::true_type {};
}  // namespace detail

/// True when `fft_traits<Tag>` is defined (the engine's header is included).
template <class Tag>
inline constexpr bool is_fft_engine_v = detail::has_fft_traits<Tag>::value;

}  // namespace conv
BASISATTN_END_NAMESPACE
