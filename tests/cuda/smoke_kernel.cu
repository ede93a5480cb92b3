// A trivial kernel proving that nvcc builds and links into the test suite: y = a x + b.
#include <basisattn/cuda/backend.hpp>

namespace {
__global__ void axpb_kernel(const float* x, float* y, float a, float b, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = fmaf(a, x[i], b);
}
}  // namespace

void launch_axpb(const float* x, float* y, float a, float b, int n) {
  axpb_kernel<<<(n + 255) / 256, 256>>>(x, y, a, b, n);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}
