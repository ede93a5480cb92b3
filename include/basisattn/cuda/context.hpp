// basisattn/cuda/context.hpp - the CUDA execution context, cuBLAS error checks and device buffers.
//
// Host-side header (compiled by g++ or nvcc; needs the basisattn::cuda target: CUDA runtime, cuBLAS,
// cuBLASLt). Nothing here launches a kernel.
//
//   cuda_context ctx;                      a new non-blocking stream on the current device, plus a
//                                          cuBLAS and a cuBLASLt handle bound to that stream (the
//                                          cuBLAS handle in CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_
//                                          REDUCTION mode: split-K sums stay in fp32)
//   cuda_context ctx(device);              the same on `device` (made current)
//   cuda_context::on_stream(s)             the caller's stream (not owned, not destroyed)
//   ctx.stream(), ctx.cublas(), ctx.cublaslt(), ctx.device(), ctx.synchronize()
//       The context is the CUDA backend's first argument to every entry point (backend_of_t<cuda_context>
//       is basisattn::cuda, so supports_storage_v<cuda_context, T> etc. ask the cuda traits).
//       A context is move-only. Its handles are bound to its stream, so use one context per host
//       thread (cuBLAS handles are not meant to be shared between threads).
//
//   BASISATTN_CUBLAS_CHECK(expr)           a cublasStatus_t other than success becomes
//                                          basisattn::error(errc::backend, "<expr> failed: <name>
//                                          (<text>) at file:line"); an execution failure that left a
//                                          sticky CUDA error behind aborts, like BASISATTN_CUDA_CHECK.
//
//   device_buffer<T> buf(n)                RAII cudaMalloc of n elements of T (n = 0: no allocation);
//                                          move-only; data(), size(), bytes(), empty()
//   buf.upload(ctx, host, n) / buf.download(ctx, host, n)
//                                          copies on ctx's stream, then waits for that stream (simple,
//                                          meant for weights and tests, not for hot loops)
//   to_device(ctx, host, n)                new device_buffer<T> holding a copy of host[0, n)
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/cuda/backend.hpp>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <utility>

BASISATTN_BEGIN_NAMESPACE

namespace detail {

inline void cublas_check(cublasStatus_t s, const char* expr, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  if (s == CUBLAS_STATUS_EXECUTION_FAILED) {
    // A kernel of cuBLAS failed: when the CUDA context is gone, that is the sticky error to report.
    const cudaError_t e = cudaPeekAtLastError();
    if (cuda_error_is_sticky(e)) cuda_check(e, expr, file, line);  // aborts
  }
  raise(errc::backend,
        concat(expr, " failed: ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ") at ", file, ":", line));
}

}  // namespace detail

BASISATTN_END_NAMESPACE

#define BASISATTN_CUBLAS_CHECK(expr) ::basisattn::detail::cublas_check((expr), #expr, __FILE__, __LINE__)

BASISATTN_BEGIN_NAMESPACE

/// A CUDA stream (owned or borrowed) with a cuBLAS and a cuBLASLt handle bound to it.
class cuda_context {
 public:
  /// A new non-blocking stream on `device` (-1: the current device, which is left current).
  explicit cuda_context(int device = -1) {
    if (device >= 0) BASISATTN_CUDA_CHECK(cudaSetDevice(device));
    BASISATTN_CUDA_CHECK(cudaGetDevice(&device_));
    BASISATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    // From here on a failure must not leak the stream: init_handles releases it before raising.
    owns_stream_ = true;
    init_handles();
  }
  /// Use the caller's stream `s` (0: the legacy default stream) on the current device; the context
  /// never destroys it.
  static cuda_context on_stream(cudaStream_t s) { return cuda_context(s, borrowed{}); }

  cuda_context(const cuda_context&) = delete;
  cuda_context& operator=(const cuda_context&) = delete;
  cuda_context(cuda_context&& o) noexcept { swap(o); }
  cuda_context& operator=(cuda_context&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }
  ~cuda_context() { release(); }

  cudaStream_t stream() const noexcept { return stream_; }
  cublasHandle_t cublas() const noexcept { return cublas_; }
  cublasLtHandle_t cublaslt() const noexcept { return lt_; }
  /// The device this context was created on.
  int device() const noexcept { return device_; }
  /// True when the context created (and will destroy) its stream.
  bool owns_stream() const noexcept { return owns_stream_; }
  /// Wait for all work queued on the stream; errors (including asynchronous kernel errors) raise.
  void synchronize() const { BASISATTN_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  struct borrowed {};
  cuda_context(cudaStream_t s, borrowed) : stream_(s), owns_stream_(false) {
    BASISATTN_CUDA_CHECK(cudaGetDevice(&device_));
    init_handles();
  }
  void init_handles() {  // no try/catch: the header must also compile with -fno-exceptions
    cublasStatus_t s = cublasCreate(&cublas_);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasSetStream(cublas_, stream_);
    // fp32 accumulation throughout: split-K partial sums of 16-bit GEMMs must not be reduced in fp16/bf16.
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasSetMathMode(
          cublas_, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtCreate(&lt_);
    if (s != CUBLAS_STATUS_SUCCESS) {
      release();  // the destructor does not run when a constructor throws
      detail::cublas_check(s, "cuda_context: creating the cuBLAS/cuBLASLt handles", __FILE__, __LINE__);
    }
  }
  void release() noexcept {
    if (lt_) cublasLtDestroy(lt_);
    if (cublas_) cublasDestroy(cublas_);
    if (owns_stream_ && stream_) cudaStreamDestroy(stream_);
    lt_ = nullptr;
    cublas_ = nullptr;
    stream_ = nullptr;
    owns_stream_ = false;
  }
  void swap(cuda_context& o) noexcept {
    std::swap(device_, o.device_);
    std::swap(stream_, o.stream_);
    std::swap(owns_stream_, o.owns_stream_);
    std::swap(cublas_, o.cublas_);
    std::swap(lt_, o.lt_);
  }

  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;
  cublasHandle_t cublas_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
};

/// A cuda_context as an entry point's first argument selects the cuda backend (<basisattn/core/backend.hpp>).
template <>
struct backend_of<cuda_context> {
  using type = cuda;
};

/// Owning device allocation of `size()` elements of T (cudaMalloc / cudaFree); T is never
/// constructed on the device, the buffer is raw storage.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  /// Uninitialised storage for n elements (n = 0: no allocation, data() is null).
  explicit device_buffer(index_t n) {
    BASISATTN_REQUIRE(n >= 0, invalid_argument, "device_buffer: negative size ", n);
    if (n > 0) {
      void* p = nullptr;
      BASISATTN_CUDA_CHECK(cudaMalloc(&p, static_cast<std::size_t>(n) * sizeof_t()));
      data_ = static_cast<T*>(p);
      size_ = n;
    }
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~device_buffer() { reset(); }

  T* data() const noexcept { return data_; }
  index_t size() const noexcept { return size_; }
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(size_) * sizeof_t(); }
  bool empty() const noexcept { return size_ == 0; }
  /// Free the allocation (errors ignored: this runs in destructors).
  void reset() noexcept {
    if (data_) cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }

  /// Copy host[0, n) into elements [0, n) on ctx's stream and wait for it.
  void upload(const cuda_context& ctx, const T* host, index_t n) {
    BASISATTN_REQUIRE(n >= 0 && n <= size_, invalid_argument, "device_buffer::upload: ", n,
                      " elements into a buffer of ", size_);
    if (n == 0) return;
    BASISATTN_CUDA_CHECK(
        cudaMemcpyAsync(data_, host, static_cast<std::size_t>(n) * sizeof_t(), cudaMemcpyHostToDevice, ctx.stream()));
    ctx.synchronize();
  }
  /// Copy elements [0, n) into host[0, n) on ctx's stream and wait for it.
  void download(const cuda_context& ctx, T* host, index_t n) const {
    BASISATTN_REQUIRE(n >= 0 && n <= size_, invalid_argument, "device_buffer::download: ", n,
                      " elements from a buffer of ", size_);
    if (n == 0) return;
    BASISATTN_CUDA_CHECK(
        cudaMemcpyAsync(host, data_, static_cast<std::size_t>(n) * sizeof_t(), cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
  }

 private:
  static constexpr std::size_t sizeof_t() noexcept { return sizeof(T); }
  T* data_ = nullptr;
  index_t size_ = 0;
};

/// A new device buffer holding a copy of host[0, n).
template <class T>
device_buffer<T> to_device(const cuda_context& ctx, const T* host, index_t n) {
  device_buffer<T> b(n);
  b.upload(ctx, host, n);
  return b;
}

BASISATTN_END_NAMESPACE
