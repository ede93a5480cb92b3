// CUDA smoke test: two of the library's own kernels (the column gather and the row broadcast of the
// BD projection, <basisattn/cuda/kernel_launch.hpp>) against the CPU, the backend's traits, and the
// error path. Without a usable GPU the program exits 77 and CTest reports the tests as Skipped.
#include "skip_main.hpp"

#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/kernel_launch.hpp>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

bool test_prerequisites(std::string& why) {
  if (basisattn::cuda_device_count() > 0) return true;
  why = "no usable CUDA device (cudaGetDeviceCount reports none or an error)";
  return false;
}

using basisattn::index_t;

// The traits say what CUDA runs: 32- and 16-bit storage, not double (compile-time checks).
static_assert(basisattn::is_backend_v<basisattn::cuda>);
static_assert(basisattn::supports_storage_v<basisattn::cuda, float>);
static_assert(basisattn::supports_storage_v<basisattn::cuda, Eigen::half>);
static_assert(basisattn::supports_storage_v<basisattn::cuda, Eigen::bfloat16>);
static_assert(!basisattn::supports_storage_v<basisattn::cuda, double>);
// A cuda_context, the CUDA entry points' first argument, selects the cuda backend and its traits.
static_assert(std::is_same_v<basisattn::backend_of_t<const basisattn::cuda_context&>, basisattn::cuda>);
static_assert(basisattn::is_backend_v<basisattn::cuda_context>);
static_assert(basisattn::supports_storage_v<basisattn::cuda_context, Eigen::half>);
static_assert(!basisattn::supports_storage_v<basisattn::cuda_context, double>);

namespace {
std::vector<float> ramp(index_t n, float step) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) v[static_cast<std::size_t>(i)] = std::sin(step * float(i + 1)) * 3.0f;
  return v;
}
bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }
}  // namespace

TEST_CASE("the library's gather and broadcast kernels run on the device and match the CPU") {
  namespace ck = basisattn::detail::cuda_kernels;
  basisattn::cuda_context ctx;
  const index_t rows = 37, cols = 24, ldx = 29 + cols, r = 5, groups = 3, bias_stride = 8, ldy = groups * r + 2;
  const std::vector<float> x = ramp(rows * ldx, 0.37f), bias = ramp(groups * bias_stride, 1.3f);
  std::vector<int> perm(static_cast<std::size_t>(cols));
  for (index_t c = 0; c < cols; ++c) perm[static_cast<std::size_t>(c)] = int((c * 7 + 3) % cols);  // 7 is prime to 24
  const auto dx = basisattn::to_device(ctx, x.data(), index_t(x.size()));
  const auto dbias = basisattn::to_device(ctx, bias.data(), index_t(bias.size()));
  const auto dperm = basisattn::to_device(ctx, perm.data(), cols);
  basisattn::device_buffer<float> dg(rows * cols), dy(rows * ldy);
  BASISATTN_CUDA_CHECK(
      cudaMemsetAsync(dg.data(), 0xFF, std::size_t(rows * cols) * sizeof(float), ctx.stream()));  // NaN
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(dy.data(), 0xFF, std::size_t(rows * ldy) * sizeof(float), ctx.stream()));
  ck::launch_gather_columns(dx.data(), ldx, dperm.data(), cols, rows, dg.data(), cols, ctx.stream());
  // y[t, g r + k] = x[t, k] + bias[g bias_stride + k]: the basis copy of every head plus its bias.
  ck::launch_broadcast_rows(dx.data(), ldx, r, groups, dbias.data(), bias_stride, rows, dy.data(), ldy, ctx.stream());
  std::vector<float> g(static_cast<std::size_t>(rows * cols)), y(static_cast<std::size_t>(rows * ldy));
  dg.download(ctx, g.data(), rows * cols);
  dy.download(ctx, y.data(), rows * ldy);
  ctx.synchronize();
  // Bitwise: the gather is a copy, and each broadcast entry is one fp32 addition of two floats,
  // correctly rounded on both sides (IEEE 754; nothing to contract).
  index_t wrong = 0;
  for (index_t t = 0; t < rows; ++t) {
    for (index_t c = 0; c < cols; ++c)
      wrong += !same_bits(g[std::size_t(t * cols + c)], x[std::size_t(t * ldx + perm[std::size_t(c)])]);
    for (index_t gr = 0; gr < groups; ++gr)
      for (index_t k = 0; k < r; ++k)
        wrong += !same_bits(y[std::size_t(t * ldy + gr * r + k)],
                            x[std::size_t(t * ldx + k)] + bias[std::size_t(gr * bias_stride + k)]);
    for (index_t c = groups * r; c < ldy; ++c) wrong += !std::isnan(y[std::size_t(t * ldy + c)]);  // padding untouched
  }
  CHECK(wrong == 0);
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
