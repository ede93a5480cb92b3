// basisattn/cuda/cufft.hpp - cuFFT error checks and a small cache of batched real-FFT plans.
//
// Host-side header (g++ compiles it; needs the basisattn::cuda target, which links CUDA::cufft).
//
//   BASISATTN_CUFFT_CHECK(expr)    a cufftResult other than CUFFT_SUCCESS becomes
//                                  basisattn::error(errc::backend, "<expr> failed: <name> at file:line");
//                                  an execution failure that left a sticky CUDA error behind aborts,
//                                  like BASISATTN_CUBLAS_CHECK.
//
//   cufft_plan_cache plans;        move-only; holds cuFFT plans of in-place, batched, real 1-D
//                                  transforms, keyed by (length, batch, precision, direction), and one
//                                  work area shared by all of them
//   plans.forward(ctx, nf, batch, data)    R2C (float*) or D2Z (double*) in place on ctx's stream
//   plans.inverse(ctx, nf, batch, data)    C2R / Z2D in place, unnormalised (cuFFT's convention)
//       Layout (FFTW's padded in-place layout): signal b starts at data + b * 2 (nf / 2 + 1) reals;
//       forward reads nf reals there and writes nf / 2 + 1 complex values over them; inverse the
//       reverse. nf must be even.
//   plans.size(), plans.work_bytes(), plans.clear()
//
// The first use of a (length, batch, precision, direction) makes its plan (cuFFT allocates host and
// device memory for it) and may grow the work area (after waiting for ctx's stream, since earlier
// transforms may still use the old one). Later uses allocate nothing: keep one cache per stream and
// host thread (like cuda_context), reused across calls, and the hot loop is allocation-free. A cache
// belongs to the device that was current when it made its first plan.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/context.hpp>

#include <cufft.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>
#include <vector>

BASISATTN_BEGIN_NAMESPACE

namespace detail {

inline const char* cufft_result_name(cufftResult r) noexcept {
  switch (r) {
    case CUFFT_SUCCESS:
      return "CUFFT_SUCCESS";
    case CUFFT_INVALID_PLAN:
      return "CUFFT_INVALID_PLAN";
    case CUFFT_ALLOC_FAILED:
      return "CUFFT_ALLOC_FAILED";
    case CUFFT_INVALID_TYPE:
      return "CUFFT_INVALID_TYPE";
    case CUFFT_INVALID_VALUE:
      return "CUFFT_INVALID_VALUE";
    case CUFFT_INTERNAL_ERROR:
      return "CUFFT_INTERNAL_ERROR";
    case CUFFT_EXEC_FAILED:
      return "CUFFT_EXEC_FAILED";
    case CUFFT_SETUP_FAILED:
      return "CUFFT_SETUP_FAILED";
    case CUFFT_INVALID_SIZE:
      return "CUFFT_INVALID_SIZE";
    case CUFFT_UNALIGNED_DATA:
      return "CUFFT_UNALIGNED_DATA";
    case CUFFT_INVALID_DEVICE:
      return "CUFFT_INVALID_DEVICE";
    case CUFFT_NO_WORKSPACE:
      return "CUFFT_NO_WORKSPACE";
    case CUFFT_NOT_IMPLEMENTED:
      return "CUFFT_NOT_IMPLEMENTED";
    case CUFFT_NOT_SUPPORTED:
      return "CUFFT_NOT_SUPPORTED";
    default:
      return "unknown cufftResult";
  }
}

inline void cufft_check(cufftResult r, const char* expr, const char* file, int line) {
  if (r == CUFFT_SUCCESS) return;
  if (r == CUFFT_EXEC_FAILED) {
    // A cuFFT kernel failed: when the CUDA context is gone, that is the sticky error to report.
    const cudaError_t e = cudaPeekAtLastError();
    if (cuda_error_is_sticky(e)) cuda_check(e, expr, file, line);  // aborts
  }
  raise(errc::backend,
        concat(expr, " failed: ", cufft_result_name(r), " (", static_cast<int>(r), ") at ", file, ":", line));
}

}  // namespace detail

BASISATTN_END_NAMESPACE

#define BASISATTN_CUFFT_CHECK(expr) ::basisattn::detail::cufft_check((expr), #expr, __FILE__, __LINE__)

BASISATTN_BEGIN_NAMESPACE

/// cuFFT plans of in-place batched real transforms, made on first use and kept (see the top of this file).
class cufft_plan_cache {
 public:
  cufft_plan_cache() = default;
  cufft_plan_cache(const cufft_plan_cache&) = delete;
  cufft_plan_cache& operator=(const cufft_plan_cache&) = delete;
  cufft_plan_cache(cufft_plan_cache&& o) noexcept : plans_(std::move(o.plans_)), work_(std::move(o.work_)) {
    o.plans_.clear();
  }
  cufft_plan_cache& operator=(cufft_plan_cache&& o) noexcept {
    if (this != &o) {
      clear();
      plans_ = std::move(o.plans_);
      work_ = std::move(o.work_);
      o.plans_.clear();
    }
    return *this;
  }
  ~cufft_plan_cache() { clear(); }

  /// Forward real-to-complex transforms of `batch` signals of length nf, in place.
  void forward(const cuda_context& ctx, index_t nf, index_t batch, double* data) {
    const cufftHandle h = get(ctx, nf, batch, true, true);
    BASISATTN_CUFFT_CHECK(cufftExecD2Z(h, data, reinterpret_cast<cufftDoubleComplex*>(data)));
  }
  void forward(const cuda_context& ctx, index_t nf, index_t batch, float* data) {
    const cufftHandle h = get(ctx, nf, batch, false, true);
    BASISATTN_CUFFT_CHECK(cufftExecR2C(h, data, reinterpret_cast<cufftComplex*>(data)));
  }
  /// Inverse complex-to-real transforms (unnormalised: the result is nf times the signal), in place.
  void inverse(const cuda_context& ctx, index_t nf, index_t batch, double* data) {
    const cufftHandle h = get(ctx, nf, batch, true, false);
    BASISATTN_CUFFT_CHECK(cufftExecZ2D(h, reinterpret_cast<cufftDoubleComplex*>(data), data));
  }
  void inverse(const cuda_context& ctx, index_t nf, index_t batch, float* data) {
    const cufftHandle h = get(ctx, nf, batch, false, false);
    BASISATTN_CUFFT_CHECK(cufftExecC2R(h, reinterpret_cast<cufftComplex*>(data), data));
  }

  /// Plans held.
  std::size_t size() const noexcept { return plans_.size(); }
  /// Bytes of the shared work area.
  std::size_t work_bytes() const noexcept { return work_.bytes(); }
  /// Destroy every plan and free the work area (errors ignored: this runs in destructors). Wait for
  /// the stream first when transforms may still be running.
  void clear() noexcept {
    for (const entry& e : plans_) cufftDestroy(e.handle);
    plans_.clear();
    work_.reset();
  }

 private:
  struct entry {
    index_t nf, batch;
    bool dbl, fwd;
    cufftHandle handle;
    std::size_t work;
  };

  cufftHandle get(const cuda_context& ctx, index_t nf, index_t batch, bool dbl, bool fwd) {
    BASISATTN_REQUIRE(nf >= 2 && nf % 2 == 0 && batch >= 1, invalid_argument, "cufft_plan_cache: length ", nf,
                      " (must be even and >= 2), batch ", batch, " (must be >= 1)");
    const entry* found = nullptr;
    for (const entry& e : plans_)
      if (e.nf == nf && e.batch == batch && e.dbl == dbl && e.fwd == fwd) found = &e;
    if (!found) found = &make(ctx, nf, batch, dbl, fwd);
    BASISATTN_CUFFT_CHECK(cufftSetStream(found->handle, ctx.stream()));
    BASISATTN_CUFFT_CHECK(cufftSetWorkArea(found->handle, work_.data()));
    return found->handle;
  }

  const entry& make(const cuda_context& ctx, index_t nf, index_t batch, bool dbl, bool fwd) {
    cufftHandle h = 0;
    BASISATTN_CUFFT_CHECK(cufftCreate(&h));
    long long n[1] = {nf}, real_embed[1] = {2 * (nf / 2 + 1)}, complex_embed[1] = {nf / 2 + 1};
    const long long real_dist = 2 * (nf / 2 + 1), complex_dist = nf / 2 + 1;
    const cufftType type = dbl ? (fwd ? CUFFT_D2Z : CUFFT_Z2D) : (fwd ? CUFFT_R2C : CUFFT_C2R);
    std::size_t work = 0;
    cufftResult r = cufftSetAutoAllocation(h, 0);  // the work area is ours, shared by every plan
    if (r == CUFFT_SUCCESS)
      r = fwd ? cufftMakePlanMany64(h, 1, n, real_embed, 1, real_dist, complex_embed, 1, complex_dist, type, batch,
                                    &work)
              : cufftMakePlanMany64(h, 1, n, complex_embed, 1, complex_dist, real_embed, 1, real_dist, type, batch,
                                    &work);
    if (r != CUFFT_SUCCESS) {
      cufftDestroy(h);
      detail::cufft_check(r, "cufft_plan_cache: cufftMakePlanMany64", __FILE__, __LINE__);
    }
    if (work > work_.bytes()) {
      ctx.synchronize();  // earlier transforms on the stream may still use the old area
      work_.reset();
      device_buffer<unsigned char> w;
      if (work > 0) {
#if BASISATTN_HAS_EXCEPTIONS
        try {
          w = device_buffer<unsigned char>(static_cast<index_t>(work));
        } catch (...) {
          cufftDestroy(h);
          throw;
        }
#else
        w = device_buffer<unsigned char>(static_cast<index_t>(work));
#endif
      }
      work_ = std::move(w);
    }
    plans_.push_back(entry{nf, batch, dbl, fwd, h, work});
    return plans_.back();
  }

  std::vector<entry> plans_;
  device_buffer<unsigned char> work_;
};

BASISATTN_END_NAMESPACE
