// bench/cuda_bench_util.hpp - what the CUDA benchmark programs share: the no-GPU error path, the median
// of per-iteration timings and a CUDA-event timer.
#pragma once

#include <basisattn/cuda/context.hpp>

#include <benchmark/benchmark.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <vector>

namespace cudabench {

/// True when a CUDA device answers; otherwise the benchmark reports "no usable CUDA device".
inline bool have_device(benchmark::State& state) {
  if (basisattn::cuda_device_count() > 0) return true;
  state.SkipWithError("no usable CUDA device");
  return false;
}

/// Median of v (0 when empty).
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

/// A pair of CUDA events timing work enqueued between start() and stop() on one stream.
class event_timer {
 public:
  event_timer() {
    BASISATTN_CUDA_CHECK(cudaEventCreate(&a_));
    BASISATTN_CUDA_CHECK(cudaEventCreate(&b_));
  }
  event_timer(const event_timer&) = delete;
  event_timer& operator=(const event_timer&) = delete;
  ~event_timer() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
  }
  void start(cudaStream_t s) { BASISATTN_CUDA_CHECK(cudaEventRecord(a_, s)); }
  void stop(cudaStream_t s) { BASISATTN_CUDA_CHECK(cudaEventRecord(b_, s)); }
  /// Seconds between the two events (waits for the second).
  double seconds() {
    BASISATTN_CUDA_CHECK(cudaEventSynchronize(b_));
    float ms = 0;
    BASISATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, a_, b_));
    return ms * 1e-3;
  }

 private:
  cudaEvent_t a_ = nullptr, b_ = nullptr;
};

}  // namespace cudabench
