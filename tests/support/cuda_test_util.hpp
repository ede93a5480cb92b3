// Helpers shared by the CUDA tests: the skip rule (no usable device -> exit 77, see skip_main.hpp),
// storage <-> double conversions, fresh seeds, poisoning device buffers (all bytes 0xFF: NaN in fp32, fp16 and bf16) and comparing
// a padded device result with the CPU's, counting unwritten elements and touched padding.
#pragma once

#include <basisattn/cpu/eigen.hpp>
#include <basisattn/cuda/context.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

bool test_prerequisites(std::string& why) {
  if (basisattn::cuda_device_count() > 0) return true;
  why = "no usable CUDA device (cudaGetDeviceCount reports none or an error)";
  return false;
}

namespace cudatest {

using basisattn::index_t;

/// A storage value as double, and back (fp32 arithmetic for the 16-bit types, as on the GPU).
template <class T>
double to_d(T x) {
  return static_cast<double>(basisattn::detail::to_compute<float>(x));
}
template <class T>
T from_d(double x) {
  return basisattn::detail::from_compute<T>(x);
}

inline std::uint64_t fresh_seed() {
  std::random_device rd;
  return (std::uint64_t(rd()) << 32) ^ rd();
}

/// All bytes 0xFF: NaN in fp32, fp16 and bf16.
template <class T>
void poison(const basisattn::cuda_context& ctx, basisattn::device_buffer<T>& b) {
  if (b.empty()) return;
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(b.data(), 0xFF, b.bytes(), ctx.stream()));
  ctx.synchronize();
}

template <class T>
bool is_poison(const T& x) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &x, sizeof(T));
  return std::all_of(bytes, bytes + sizeof(T), [](unsigned char c) { return c == 0xFF; });
}

struct comparison {
  double nerr = 0;
  index_t non_finite = 0;       // elements of the result that are NaN/Inf (unwritten: poison)
  index_t padding_touched = 0;  // padding elements that lost their poison
};

/// Compare a rows x ld device result (first cols columns) with the CPU's rows x cols result:
/// nerr = ||got - want||_F / ||want||_F over the finite elements.
template <class T>
comparison compare(const std::vector<T>& got, index_t ld, const basisattn::matrix<T>& want) {
  comparison c;
  double num = 0, den = 0;
  for (index_t i = 0; i < want.rows(); ++i)
    for (index_t j = 0; j < ld; ++j) {
      const T g = got[static_cast<std::size_t>(i * ld + j)];
      if (j >= want.cols()) {
        if (!is_poison(g)) ++c.padding_touched;
        continue;
      }
      const double a = basisattn::detail::to_compute<float>(g);
      const double b = basisattn::detail::to_compute<float>(want(i, j));
      if (!std::isfinite(a)) {
        ++c.non_finite;
        continue;
      }
      num += (a - b) * (a - b);
      den += b * b;
    }
  c.nerr = std::sqrt(num / std::max(den, 1e-300));
  return c;
}

}  // namespace cudatest
