// basisattn/cuda/conv_steps.hpp - internal: sizes, workspace layout and block tables of conv-basis
// attention on the CUDA backend. The run, and the algorithm, are in <basisattn/cuda/conv.hpp>.
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/conv/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/conv/plan.hpp>  // fft_size, detail::check_run_args, sampled_rows (shared with the CPU run)
#include <basisattn/cuda/attention.hpp>
#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/cufft.hpp>
#include <basisattn/cuda/kernel_launch.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace conv {
namespace detail {

/// Sizes of a plan that fix the workspace of a CUDA run.
struct cuda_run_sizes {
  index_t n = 0, d_v = 0, h_q = 0, h_kv = 0;
  index_t nf = 0, signal = 0;  ///< FFT length and the distance of two signals in the chunk buffer (reals)
  index_t samples = 0;         ///< sampled rows per head
  index_t max_items = 0;       ///< most FFT blocks of a head (lower + upper)
  index_t max_kernel_values = 0, max_prefix = 0;
};

/// The FFT blocks of one head: the lower blocks, then the upper ones that see a key (n - s0 >= 2).
inline void head_items(const plan& p, index_t h, std::vector<basisattn::detail::cuda_kernels::conv_item>& items,
                       index_t* prefix_total = nullptr) {
  const head_plan& hp = p.heads[static_cast<std::size_t>(h)];
  items.clear();
  long long poff = 0;
  for (int tri = 0; tri < (p.opt.causal ? 1 : 2); ++tri) {
    const basis& b = tri == 0 ? hp.lower : hp.upper;
    for (index_t i = 0; i < b.size(); ++i) {
      const index_t s0 = b.begin(i), L = p.n - s0;
      if (tri == 1 && L < 2) continue;  // the last row sees no key to its right
      basisattn::detail::cuda_kernels::conv_item it;
      it.s0 = s0;
      it.e0 = b.end(i, p.n);
      it.koff =
          static_cast<long long>(b.offsets[static_cast<std::size_t>(i)] + (tri == 1 ? hp.lower.values.size() : 0));
      it.poff = poff;
      it.upper = tri;
      poff += L + 1;
      items.push_back(it);
    }
  }
  if (prefix_total) *prefix_total = static_cast<index_t>(poff);
}

inline cuda_run_sizes cuda_sizes(const plan& p, index_t d_v) {
  cuda_run_sizes s;
  s.n = p.n;
  s.d_v = d_v;
  s.h_q = p.h_q;
  s.h_kv = p.h_kv;
  s.nf = fft_size(2 * p.n - 1);
  s.signal = 2 * (s.nf / 2 + 1);
  s.samples = std::min(p.opt.check_rows, p.n);
  std::vector<basisattn::detail::cuda_kernels::conv_item> items;
  for (index_t h = 0; h < p.h_q; ++h) {
    index_t prefix = 0;
    head_items(p, h, items, &prefix);
    const head_plan& hp = p.heads[static_cast<std::size_t>(h)];
    const std::size_t values = hp.lower.values.size() + (p.opt.causal ? 0 : hp.upper.values.size());
    s.max_items = std::max(s.max_items, static_cast<index_t>(items.size()));
    s.max_prefix = std::max(s.max_prefix, prefix);
    s.max_kernel_values = std::max(s.max_kernel_values, static_cast<index_t>(values));
  }
  return s;
}

/// Where each piece of a CUDA run's workspace lies (byte offsets from the 256-byte aligned base).
struct cuda_layout {
  static constexpr std::size_t align = basisattn::detail::cuda_workspace_align;
  std::size_t checks = 0, results = 0, scalars = 0, vd = 0, num = 0, den = 0, bnd = 0, flags = 0, vrow = 0, kernels = 0,
              prefix = 0, items = 0, item_stats = 0, rows = 0, chunk = 0;
  std::size_t total = 0;  ///< bytes, including the slack for aligning the caller's pointer
  index_t chunk_items = 0;
  index_t result_words = 0;  ///< 8-byte words of results per head: repaired, worst, ratio, err[s], uerr[s]
};

inline cuda_layout make_cuda_layout(const cuda_run_sizes& s, index_t chunk_items) {
  cuda_layout l;
  basisattn::detail::workspace_carver w = basisattn::detail::workspace_carver::relative(cuda_layout::align);
  auto take = [&](std::size_t bytes) { return w.take(bytes); };
  const std::size_t n = static_cast<std::size_t>(s.n), dv = static_cast<std::size_t>(s.d_v);
  l.result_words = 3 + 2 * s.samples;
  l.checks = take(8 * (2 * std::size_t(s.h_q) + 4 * std::size_t(s.h_kv) + 3));
  l.results = take(8 * std::size_t(s.h_q) * std::size_t(l.result_words));
  l.scalars = take(8 * 2);
  l.vd = take(8 * n * dv);
  l.num = take(8 * n * dv);
  l.den = take(8 * n);
  l.bnd = take(8 * n);
  l.flags = take(sizeof(int) * n);
  l.vrow = take(8 * (n + 1));
  l.kernels = take(8 * std::size_t(s.max_kernel_values));
  l.prefix = take(8 * std::size_t(s.max_prefix));
  l.items = take(sizeof(basisattn::detail::cuda_kernels::conv_item) * std::size_t(s.max_items));
  l.item_stats = take(8 * 3 * std::size_t(s.max_items));
  l.rows = take(8 * std::size_t(s.samples));
  l.chunk = take(8 * std::size_t(chunk_items) * (dv + 1) * std::size_t(s.signal));
  l.chunk_items = chunk_items;
  l.total = basisattn::detail::sliced_workspace_bytes(w.bytes(), 1, cuda_layout::align);  // + slack for the pointer
  return l;
}

/// Bytes of FFT buffer one block needs (double precision; float uses half of it).
inline std::size_t cuda_chunk_item_bytes(const cuda_run_sizes& s) {
  return 8 * (std::size_t(s.d_v) + 1) * std::size_t(s.signal);
}

inline void check_cuda_dims(const char* fn, index_t d_qk, index_t d_v) {
  constexpr index_t dmax = basisattn::detail::cuda_kernels::attention_kernel_max_dim;
  BASISATTN_REQUIRE(d_qk <= dmax && d_v <= dmax, unsupported, fn, ": head dims d_qk = ", d_qk, ", d_v = ", d_v,
                    " exceed the CUDA backend's limit of ", dmax);
}

inline double bits_to_double(std::uint64_t b) {
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

/// Checksums of the plan and of the device data agree within the rounding of both summation orders.
inline bool cuda_checksum_agrees(double device_sum, double abs_sum, double plan_sum, index_t terms) {
  if (device_sum == plan_sum) return true;  // also +-Inf data planned with check_finite = false
  if (std::isnan(device_sum) || std::isnan(plan_sum)) return std::isnan(device_sum) && std::isnan(plan_sum);
  const double tol = 2.0 * double(terms) * std::numeric_limits<double>::epsilon() * abs_sum;
  return std::abs(device_sum - plan_sum) <= tol;
}

}  // namespace detail
}  // namespace conv
BASISATTN_END_NAMESPACE
