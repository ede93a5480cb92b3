// CUDA smoke test: a kernel of ours and the error path, checked against the CPU. Without a usable
// GPU the program exits 77 and CTest reports the tests as Skipped.
#include "skip_main.hpp"

#include <basisattn/cuda/backend.hpp>

#include <cmath>
#include <vector>

void launch_axpb(const float* x, float* y, float a, float b, int n);

bool test_prerequisites(std::string& why) {
  if (basisattn::cuda_device_count() > 0) return true;
  why = "no usable CUDA device (cudaGetDeviceCount reports none or an error)";
  return false;
}

static_assert(basisattn::is_backend_v<basisattn::cuda>);

TEST_CASE("our kernel runs on the device and matches the CPU") {
  const int n = 1000;
  std::vector<float> x(n), y(n, std::nanf("")), want(n);
  for (int i = 0; i < n; ++i) x[i] = std::sin(0.1f * float(i)), want[i] = std::fma(1.5f, x[i], -0.25f);
  float *dx = nullptr, *dy = nullptr;
  BASISATTN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dx), n * sizeof(float)));
  BASISATTN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dy), n * sizeof(float)));
  BASISATTN_CUDA_CHECK(cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  BASISATTN_CUDA_CHECK(cudaMemcpy(dy, y.data(), n * sizeof(float), cudaMemcpyHostToDevice));  // poisoned
  launch_axpb(dx, dy, 1.5f, -0.25f, n);
  BASISATTN_CUDA_CHECK(cudaMemcpy(y.data(), dy, n * sizeof(float), cudaMemcpyDeviceToHost));
  BASISATTN_CUDA_CHECK(cudaFree(dx));
  BASISATTN_CUDA_CHECK(cudaFree(dy));
  for (int i = 0; i < n; ++i) CHECK(y[i] == want[i]);
}

TEST_CASE("a failing CUDA call becomes a basisattn::error with errc::backend") {
  void* p = nullptr;
  try {
    BASISATTN_CUDA_CHECK(cudaMalloc(&p, std::size_t(1) << 60));
    FAIL("allocating 2^60 bytes did not fail");
  } catch (const basisattn::error& e) {
    CHECK(e.code() == basisattn::errc::backend);
    CHECK(std::string(e.what()).find("cudaMalloc") != std::string::npos);
  }
  CHECK(cudaGetLastError() == cudaSuccess);  // the error state was cleared
}
