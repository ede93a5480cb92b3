// bench/cuda_bench_util.hpp - what the CUDA benchmark programs share: the no-GPU error path, the
// median of per-iteration timings, a CUDA-event timer, an L2 flush, fast random device data, exact
// FLOP counts of (causal) attention and the device description written into the JSON context.
#pragma once

#include <basisattn/cuda/context.hpp>

#include <benchmark/benchmark.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace cudabench {

using basisattn::index_t;

/// True when a CUDA device answers; otherwise the benchmark reports "no usable CUDA device".
inline bool have_device(benchmark::State& state) {
  if (basisattn::cuda_device_count() > 0) return true;
  state.SkipWithError("no usable CUDA device");
  return false;
}

/// Median of v (0 when empty; the upper median for an even count).
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

/// Host wall-clock seconds since t0 (the setup_s counters).
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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

/// Evicts the benchmark's data from L2: flush(s) enqueues on stream s a cudaMemsetAsync over a scratch
/// buffer of twice the device's L2 size (cudaDevAttrL2CacheSize; H100/H200: 2 x 50-60 MB, ~40 us at
/// HBM write speed). Enqueue it before the start event of every timed region, so that the region
/// reads its inputs and weights from HBM, not from the L2 lines a previous region left behind.
class l2_flusher {
 public:
  l2_flusher() {
    int dev = 0, l2 = 0;
    BASISATTN_CUDA_CHECK(cudaGetDevice(&dev));
    BASISATTN_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    bytes_ = 2 * static_cast<std::size_t>(std::max(l2, 1 << 20));
    BASISATTN_CUDA_CHECK(cudaMalloc(&buf_, bytes_));
  }
  l2_flusher(const l2_flusher&) = delete;
  l2_flusher& operator=(const l2_flusher&) = delete;
  ~l2_flusher() { cudaFree(buf_); }
  void flush(cudaStream_t s) { BASISATTN_CUDA_CHECK(cudaMemsetAsync(buf_, (value_ ^= 1), bytes_, s)); }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  void* buf_ = nullptr;
  std::size_t bytes_ = 0;
  int value_ = 0;
};

/// Runs `exact` and `approx` (the baseline and the method: dense and BD, exact and
/// approximate attention) once per iteration with their own event timers, each preceded by an L2
/// flush outside its events; even iterations exact first, odd iterations approx first. Appends the
/// seconds of each to se / sa and sets the iteration's manual time to their sum.
template <class Exact, class Approx>
void timed_pairs(benchmark::State& state, const basisattn::cuda_context& ctx, l2_flusher& l2, Exact&& exact,
                 Approx&& approx, std::vector<double>& se, std::vector<double>& sa) {
  event_timer te, ta;
  long it = 0;
  for (auto _ : state) {
    const bool approx_first = (it++ & 1) != 0;
    for (int step = 0; step < 2; ++step) {
      const bool run_approx = (step == 0) == approx_first;
      l2.flush(ctx.stream());
      event_timer& t = run_approx ? ta : te;
      t.start(ctx.stream());
      if (run_approx)
        approx();
      else
        exact();
      t.stop(ctx.stream());
    }
    se.push_back(te.seconds());
    sa.push_back(ta.seconds());
    state.SetIterationTime(se.back() + sa.back());
  }
}

/// A pool of 2 * pool_elems random values of T, uniform on [-sqrt 3, sqrt 3] (mean 0, variance 1),
/// made on the host once per T by splitmix64 (~2 ns a value; std::normal_distribution with mt19937
/// takes ~13 ns, seconds at the largest sizes).
constexpr index_t pool_elems = index_t(1) << 22;

template <class T>
const std::vector<T>& random_pool() {
  static const std::vector<T> pool = [] {
    std::vector<T> p(static_cast<std::size_t>(2 * pool_elems));
    std::uint64_t s = 0x5EEDu;
    for (auto& v : p) {
      s += 0x9E3779B97F4A7C15ull;
      std::uint64_t z = s;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      const float u = static_cast<float>(static_cast<std::int32_t>(z >> 32)) * (1.7320508f / 2147483648.0f);
      v = T(u);  // float, Eigen::half, Eigen::bfloat16: round to nearest
    }
    return p;
  }();
  return pool;
}

/// n random device values of T (mean 0, variance 1): pool_elems values of the pool, from an offset
/// chosen by `seed`, are uploaded once and repeated on the device by doubling device-to-device copies
/// (data of period pool_elems, 4M values: the timings here do not depend on the values). Waits.
template <class T>
basisattn::device_buffer<T> random_device(const basisattn::cuda_context& ctx, index_t n, std::uint64_t seed) {
  basisattn::device_buffer<T> b(n);
  if (n == 0) return b;
  const std::vector<T>& pool = random_pool<T>();
  const auto off = static_cast<index_t>((seed * 0x9E3779B97F4A7C15ull >> 11) % std::uint64_t(pool_elems));
  const index_t first = std::min(n, pool_elems);
  BASISATTN_CUDA_CHECK(cudaMemcpyAsync(b.data(), pool.data() + off, static_cast<std::size_t>(first) * sizeof(T),
                                       cudaMemcpyHostToDevice, ctx.stream()));
  for (index_t done = first; done < n;) {
    const index_t c = std::min(done, n - done);
    BASISATTN_CUDA_CHECK(cudaMemcpyAsync(b.data() + done, b.data(), static_cast<std::size_t>(c) * sizeof(T),
                                         cudaMemcpyDeviceToDevice, ctx.stream()));
    done += c;
  }
  ctx.synchronize();
  return b;
}

/// Query-key pairs exact attention scores: n_q n_kv, or with the end-aligned causal mask (query i sees
/// keys j <= i + n_kv - n_q) the exact sum over rows of the visible keys.
inline double attention_pairs(index_t n_q, index_t n_kv, bool causal) {
  if (!causal) return double(n_q) * double(n_kv);
  double pairs = 0;
  const index_t off = n_kv - n_q;
  for (index_t i = 0; i < n_q; ++i) pairs += double(std::min(n_kv, std::max<index_t>(0, i + off + 1)));
  return pairs;
}

/// FLOPs of exact attention: 2 per multiply-add of Q K^T (d_qk) and of P V (d_v) per visible pair and
/// query head (softmax not counted), the convention of FlashAttention's TFLOP/s figures.
inline double attention_flops(index_t n_q, index_t n_kv, index_t h_q, index_t d_qk, index_t d_v, bool causal) {
  return 2.0 * attention_pairs(n_q, n_kv, causal) * double(h_q) * double(d_qk + d_v);
}

/// Records the device in the JSON/console context (cuda_device, sm_count, l2_bytes, ...), or
/// cuda_device = "none" without a usable device. Call before benchmark::RunSpecifiedBenchmarks.
inline void add_device_context() {
  if (basisattn::cuda_device_count() <= 0) {
    benchmark::AddCustomContext("cuda_device", "none");
    return;
  }
  int dev = 0;
  cudaDeviceProp p{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&p, dev) != cudaSuccess) {
    cudaGetLastError();
    benchmark::AddCustomContext("cuda_device", "unknown");
    return;
  }
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  benchmark::AddCustomContext("cuda_device", p.name);
  benchmark::AddCustomContext("cuda_cc", std::to_string(p.major) + "." + std::to_string(p.minor));
  benchmark::AddCustomContext("cuda_sm_count", std::to_string(p.multiProcessorCount));
  benchmark::AddCustomContext("cuda_l2_bytes", std::to_string(p.l2CacheSize));
  benchmark::AddCustomContext("cuda_global_mem_bytes", std::to_string(p.totalGlobalMem));
  benchmark::AddCustomContext("cuda_driver", std::to_string(drv));
  benchmark::AddCustomContext("cuda_runtime", std::to_string(rt));
}

/// BENCHMARK_MAIN's body plus add_device_context().
inline int run_main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_device_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace cudabench
