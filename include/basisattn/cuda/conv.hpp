// basisattn/cuda/conv.hpp - conv-basis attention on the CUDA backend (cuFFT + basisattn's kernels).
//
// Host-side header (g++ compiles it). Programs using it link basisattn::cuda (which brings cuFFT) and
// include <basisattn/cuda/kernels.cuh> in exactly one .cu file (see <basisattn/cuda/kernel_launch.hpp>).
// What conv-basis attention computes, and when it is accurate: <basisattn/conv/options.hpp> and
// <basisattn/conv.hpp>. This is the GPU twin of the CPU run (<basisattn/cpu/conv.hpp>):
// same plan, same semantics, same report.
//
// The plan is made on the host: the recovery needs q and k of every head, so copy them to the host
// and call conv::make_plan(cpu{}, q_host, k_host, opt) there (the CPU recovery costs O(k n d) per
// head plus the anchor search). A plan is reusable for any number of runs with the same q and k.
//
//   conv::device_plan conv::upload(ctx, plan)
//       The plan's kernels, FFT block tables and sampled rows copied to device memory once (allocates,
//       waits for the stream). Every entry point below takes a plan or a device_plan; on a device_plan
//       a run copies nothing of the plan from the host (on a plan it copies up to 2 k n doubles per
//       head from pageable memory per run). The workspace is the same for both.
//   std::size_t conv::workspace_bytes(ctx, plan, d_v, max_chunk_bytes = 1 GiB)
//       Device bytes of the caller-owned workspace of a run with d_v value channels. The blocks of a
//       head are transformed in chunks; a chunk of c blocks needs c (d_v + 1) (nf + 2) reals of FFT
//       buffer (nf = fft_size(2 n - 1)), and this size takes the largest c with that buffer (in
//       double) <= max_chunk_bytes (at least one block, at most all blocks of a head). The rest is
//       O(n d_v + k n) per head, reused from head to head. Any alignment of the pointer is accepted.
//   report conv::run<T>(ctx, plan, q, k, v, out, workspace, workspace_bytes, fft_plans)
//   report conv::run<T>(ctx, plan, q, k, v, out, workspace, workspace_bytes)   temporary plans
//   report conv::run<T>(ctx, plan, q, k, v, out)             allocates workspace and plans
//       q [n, H_q, d_qk], k [n, H_kv, d_qk], v [n, H_kv, d_v], out [n, H_q, d_v]: device memory, any
//       element strides; self-attention (n_q == n_kv), GQA/MQA (query head h reads kv head
//       h / (H_q / H_kv)), causal or not as the plan says. T = float, Eigen::half or Eigen::bfloat16;
//       all arithmetic in double (FFTs in double, or in float behind the dynamic-range check of
//       fft_precision::f32_checked), one rounding of each output to T. d_qk and d_v must be <= 256
//       (the limit of the exact attention kernel the fallback uses; errc::unsupported).
//       A workspace smaller than workspace_bytes(...) but holding one block runs with smaller chunks.
//       fft_plans (cufft_plan_cache, <basisattn/cuda/cufft.hpp>): the cuFFT plans of the run are made
//       on first use and kept there; reuse one cache across runs and a run allocates nothing. The
//       overloads without it create the plans for this call (cuFFT allocates).
//       Writes out in full and returns the per-head report (conv::report), like the CPU run.
//       Synchronises ctx's stream: once after scanning q, k, v (checksums and NaN/Inf), once per head
//       with fft_precision::f32_checked (the precision decision), and once at the end (the report and
//       the fallback decision come back to the host); exact fallbacks are then enqueued and the call
//       returns without waiting for them. Not for CUDA graphs, even on a device_plan: the precision
//       choice and the fallback are decided on the host from device results.
//   No backward pass on the GPU: conv::backward runs on the CPU only (<basisattn/cpu/conv_backward.hpp>).
//
// Errors: the CPU run's, with the same codes and messages (shapes, the plan's extents, q or k other
// than the plan's, NaN/Inf when the plan's options.check_finite is set, too small a workspace), plus
// errc::unsupported for head dims above 256 and errc::backend for CUDA / cuFFT failures.
// The q/k check: a checksum of q and k per head is computed on the device (in double, the weights of
// basisattn::detail::head_checksum) and compared with the plan's within the rounding of the two
// summation orders (|difference| <= 2 N eps sum|terms|, N the number of terms), so any real change
// of q or k is refused, but a change at the level of rounding is not.
//
// How a run goes (the steps, their cost and the workspace layout): docs/design/cuda-conv.md.
#pragma once

#include <basisattn/cuda/conv_steps.hpp>
#include <basisattn/attention/options.hpp>
#include <basisattn/conv/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/conv/plan.hpp>  // fft_size, detail::check_run_args, head_sampled_rows (shared with the CPU run)
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

/// A plan resident on the device: made by upload(ctx, plan), it holds the host plan (moved or copied in)
/// and, in device memory, every head's kernels, FFT block table and sampled rows, so a run on it copies
/// nothing from the host. Movable, not copyable.
class device_plan {
 public:
  device_plan() = default;
  /// The host plan it was uploaded from.
  const plan& host() const noexcept { return host_; }
  /// Device bytes of the uploaded tables.
  std::size_t bytes() const noexcept { return data_.bytes(); }
  bool empty() const noexcept { return data_.empty(); }
  /// Head h's kernels, block table and sampled rows in device memory (internal to run).
  const double* kernels(index_t h) const noexcept { return at<double>(kernel_off_[std::size_t(h)]); }
  const basisattn::detail::cuda_kernels::conv_item* items(index_t h) const noexcept {
    return at<basisattn::detail::cuda_kernels::conv_item>(item_off_[std::size_t(h)]);
  }
  const long long* rows(index_t h) const noexcept { return at<long long>(row_off_[std::size_t(h)]); }

 private:
  friend device_plan upload(const cuda_context& ctx, plan p);
  template <class U>
  const U* at(std::size_t off) const noexcept {
    return reinterpret_cast<const U*>(data_.data() + off);
  }
  plan host_;
  device_buffer<unsigned char> data_;
  std::vector<std::size_t> kernel_off_, item_off_, row_off_;
};

/// Upload a plan made by make_plan(cpu{}, ...) once (cudaMalloc + copies, then waits for ctx's stream):
/// runs on the device_plan then skip the per-run copies of the kernels (up to 2 k n doubles per head)
/// from pageable host memory. Pass the plan with std::move to avoid a host copy.
inline device_plan upload(const cuda_context& ctx, plan p) {
  BASISATTN_REQUIRE(p.n >= 1 && !p.heads.empty() && p.heads.size() == static_cast<std::size_t>(p.h_q), invalid_argument,
                    "conv::upload: the plan is empty (make it with conv::make_plan)");
  namespace ck = basisattn::detail::cuda_kernels;
  device_plan dp;
  dp.host_ = std::move(p);
  const plan& hp = dp.host_;
  const std::size_t heads = static_cast<std::size_t>(hp.h_q);
  std::vector<std::vector<ck::conv_item>> items(heads);
  std::vector<std::vector<long long>> rows(heads);
  basisattn::detail::workspace_carver w = basisattn::detail::workspace_carver::relative(detail::cuda_layout::align);
  dp.kernel_off_.resize(heads);
  dp.item_off_.resize(heads);
  dp.row_off_.resize(heads);
  for (std::size_t h = 0; h < heads; ++h) {
    const head_plan& pl = hp.heads[h];
    detail::head_items(hp, static_cast<index_t>(h), items[h]);
    const std::vector<index_t> picked = detail::head_sampled_rows(hp, static_cast<index_t>(h));
    rows[h].assign(picked.begin(), picked.end());
    const std::size_t nk = pl.lower.values.size() + (hp.opt.causal ? 0 : pl.upper.values.size());
    dp.kernel_off_[h] = w.take(std::max<std::size_t>(1, nk * sizeof(double)));
    dp.item_off_[h] = w.take(std::max<std::size_t>(1, items[h].size() * sizeof(ck::conv_item)));
    dp.row_off_[h] = w.take(std::max<std::size_t>(1, rows[h].size() * sizeof(long long)));
  }
  dp.data_ = device_buffer<unsigned char>(static_cast<index_t>(w.bytes()));
  const cudaStream_t st = ctx.stream();
  auto put = [&](std::size_t off, const void* src, std::size_t bytes) {
    if (bytes > 0) BASISATTN_CUDA_CHECK(cudaMemcpyAsync(dp.data_.data() + off, src, bytes, cudaMemcpyHostToDevice, st));
  };
  for (std::size_t h = 0; h < heads; ++h) {
    const head_plan& pl = hp.heads[h];
    put(dp.kernel_off_[h], pl.lower.values.data(), pl.lower.values.size() * sizeof(double));
    if (!hp.opt.causal)
      put(dp.kernel_off_[h] + pl.lower.values.size() * sizeof(double), pl.upper.values.data(),
          pl.upper.values.size() * sizeof(double));
    put(dp.item_off_[h], items[h].data(), items[h].size() * sizeof(ck::conv_item));
    put(dp.row_off_[h], rows[h].data(), rows[h].size() * sizeof(long long));
  }
  ctx.synchronize();  // the host staging vectors die on return
  return dp;
}

/// See the top of this header.
inline std::size_t workspace_bytes(const cuda_context&, const plan& p, index_t d_v,
                                   std::size_t max_chunk_bytes = std::size_t(1) << 30) {
  const char* fn = "conv::workspace_bytes(cuda)";
  BASISATTN_REQUIRE(p.n >= 1 && !p.heads.empty() && d_v >= 1, invalid_argument, fn, ": empty plan or d_v = ", d_v,
                    " < 1");
  detail::check_cuda_dims(fn, p.d_qk, d_v);
  const detail::cuda_run_sizes s = detail::cuda_sizes(p, d_v);
  const index_t per = static_cast<index_t>(max_chunk_bytes / detail::cuda_chunk_item_bytes(s));
  const index_t c = std::max<index_t>(1, std::min(per, std::max<index_t>(1, s.max_items)));
  return detail::make_cuda_layout(s, c).total;
}

/// The same for a run on an uploaded plan (the workspace is laid out alike).
inline std::size_t workspace_bytes(const cuda_context& ctx, const device_plan& p, index_t d_v,
                                   std::size_t max_chunk_bytes = std::size_t(1) << 30) {
  return workspace_bytes(ctx, p.host(), d_v, max_chunk_bytes);
}

namespace detail {

/// The run of the public overloads: the head's kernels, block table and sampled rows are copied from
/// the host plan into the workspace (dp null) or read from the uploaded plan dp (whose host() is p).
template <class T>
report run_cuda(const cuda_context& ctx, const plan& p, const device_plan* dp, tensor3_view<const T> q,
                tensor3_view<const T> k, tensor3_view<const T> v, tensor3_view<T> out, void* workspace,
                std::size_t workspace_bytes, cufft_plan_cache& fft_plans) {
  namespace ck = basisattn::detail::cuda_kernels;
  const char* fn = "conv::run(cuda)";
  const basisattn::detail::attention_shape sh = detail::check_run_args<T>(fn, p, q, k, v, out);
  BASISATTN_REQUIRE(out.data != nullptr && v.data != nullptr, invalid_argument, fn, ": v or out data is null");
  detail::check_cuda_dims(fn, sh.d_qk, sh.d_v);

  const index_t n = p.n, d_v = sh.d_v;
  const detail::cuda_run_sizes sz = detail::cuda_sizes(p, d_v);
  const detail::cuda_layout one = detail::make_cuda_layout(sz, 1);
  BASISATTN_REQUIRE(workspace != nullptr && workspace_bytes >= one.total, invalid_argument, fn, ": workspace of ",
                    workspace_bytes, " bytes; at least ", one.total, " needed (conv::workspace_bytes)");
  index_t chunk = std::max<index_t>(1, sz.max_items);
  chunk = std::min<index_t>(
      chunk, 1 + static_cast<index_t>((workspace_bytes - one.total) / detail::cuda_chunk_item_bytes(sz)));
  while (chunk > 1 && detail::make_cuda_layout(sz, chunk).total > workspace_bytes) --chunk;
  const detail::cuda_layout lay = detail::make_cuda_layout(sz, chunk);
  unsigned char* const base =
      basisattn::detail::slice_workspace(workspace, workspace_bytes, 1, detail::cuda_layout::align).base;
  auto at = [&](std::size_t off) { return static_cast<void*>(base + off); };
  const cudaStream_t st = ctx.stream();
  auto strides = [](const auto& t) {
    std::vector<long long> s = {t.stride[0], t.stride[1], t.stride[2]};
    return s;
  };
  const std::vector<long long> qs = strides(q), ks = strides(k), vs = strides(v), os = strides(out);

  // 0. checksums of q and k, NaN/Inf in q, k, v
  {
    double* c = static_cast<double*>(at(lay.checks));
    const index_t hq = p.h_q, hkv = p.h_kv;
    double *qsum = c, *qabs = c + hq, *ksum = c + 2 * hq, *kabs = ksum + hkv, *vsum = kabs + hkv, *vabs = vsum + hkv;
    auto* bad = reinterpret_cast<unsigned long long*>(vabs + hkv);
    BASISATTN_CUDA_CHECK(cudaMemsetAsync(bad, 0, 3 * sizeof(unsigned long long), st));
    ck::launch_conv_checksum(q.data, n, hq, p.d_qk, qs.data(), qsum, qabs, bad, st);
    ck::launch_conv_checksum(k.data, n, hkv, p.d_qk, ks.data(), ksum, kabs, bad + 1, st);
    ck::launch_conv_checksum(v.data, n, hkv, d_v, vs.data(), vsum, vabs, bad + 2, st);
    std::vector<double> h(static_cast<std::size_t>(2 * hq + 4 * hkv + 3));
    BASISATTN_CUDA_CHECK(cudaMemcpyAsync(h.data(), c, h.size() * sizeof(double), cudaMemcpyDeviceToHost, st));
    ctx.synchronize();
    std::uint64_t nonfinite[3];
    std::memcpy(nonfinite, h.data() + 2 * hq + 4 * hkv, sizeof nonfinite);
    if (p.opt.check_finite) {
      const char* names[3] = {"q", "k", "v"};
      for (int t = 0; t < 3; ++t)
        BASISATTN_REQUIRE(nonfinite[t] == 0, non_finite, fn, ": ", names[t], " has ", nonfinite[t],
                          " non-finite value(s)");
    }
    for (index_t hh = 0; hh < hq; ++hh) {
      const index_t hk = hh / sh.group;
      const double s = h[std::size_t(hh)] + h[std::size_t(2 * hq + hk)];
      const double a = h[std::size_t(hq + hh)] + h[std::size_t(2 * hq + hkv + hk)];
      BASISATTN_REQUIRE(detail::cuda_checksum_agrees(s, a, p.checksums[std::size_t(hh)], 2 * n * p.d_qk),
                        invalid_argument, fn, ": q or k of head ", hh, " differ from those the plan was made from");
    }
  }

  // per-head buffers
  ck::conv_head_params hp;
  hp.n = n;
  hp.d_v = d_v;
  hp.nf = sz.nf;
  hp.signal = sz.signal;
  auto* items_dev = static_cast<ck::conv_item*>(at(lay.items));
  auto* kernels_dev = static_cast<double*>(at(lay.kernels));
  hp.items = items_dev;
  hp.kernels = kernels_dev;
  hp.prefix = static_cast<double*>(at(lay.prefix));
  hp.item_max = static_cast<double*>(at(lay.item_stats));
  hp.item_cnum = hp.item_max + sz.max_items;
  hp.item_cden = hp.item_cnum + sz.max_items;
  hp.shift = static_cast<double*>(at(lay.scalars));
  hp.vmax_bits = reinterpret_cast<unsigned long long*>(hp.shift + 1);
  hp.vd = static_cast<double*>(at(lay.vd));
  hp.num = static_cast<double*>(at(lay.num));
  hp.den = static_cast<double*>(at(lay.den));
  hp.bnd = static_cast<double*>(at(lay.bnd));
  hp.flags = static_cast<int*>(at(lay.flags));
  hp.vrow = static_cast<double*>(at(lay.vrow));
  auto* results = static_cast<unsigned long long*>(at(lay.results));
  auto* rows_dev = static_cast<long long*>(at(lay.rows));
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(results, 0, 8 * std::size_t(p.h_q) * std::size_t(lay.result_words), st));

  report rep;
  rep.heads.resize(static_cast<std::size_t>(p.h_q));
  std::vector<ck::conv_item> items;
  std::vector<long long> rows;
  constexpr double eps64 = std::numeric_limits<double>::epsilon();
  constexpr double eps32 = std::numeric_limits<float>::epsilon();
  for (index_t h = 0; h < p.h_q; ++h) {
    const index_t hk = h / sh.group;
    const head_plan& pl = p.heads[std::size_t(h)];
    head_report& hr = rep.heads[std::size_t(h)];
    hr.anchors = pl.lower.size();
    hr.upper_anchors = p.opt.causal ? 0 : pl.upper.size();
    hr.degenerate = pl.lower.degenerate() || (!p.opt.causal && pl.upper.degenerate());
    hr.explained = pl.explained;

    // 1. the head's kernels and blocks; its values
    detail::head_items(p, h, items);
    hp.n_items = static_cast<int>(items.size());
    hp.n_lower = static_cast<int>(pl.lower.size());
    unsigned long long* res = results + std::size_t(h) * std::size_t(lay.result_words);
    hp.repaired = res;
    hp.worst_bits = res + 1;
    hp.ratio_bits = res + 2;
    if (dp) {
      hp.kernels = dp->kernels(h);
      hp.items = dp->items(h);
    } else {
      BASISATTN_CUDA_CHECK(cudaMemcpyAsync(kernels_dev, pl.lower.values.data(), pl.lower.values.size() * sizeof(double),
                                           cudaMemcpyHostToDevice, st));
      if (!p.opt.causal && !pl.upper.values.empty())
        BASISATTN_CUDA_CHECK(cudaMemcpyAsync(kernels_dev + pl.lower.values.size(), pl.upper.values.data(),
                                             pl.upper.values.size() * sizeof(double), cudaMemcpyHostToDevice, st));
      BASISATTN_CUDA_CHECK(
          cudaMemcpyAsync(items_dev, items.data(), items.size() * sizeof(ck::conv_item), cudaMemcpyHostToDevice, st));
    }
    BASISATTN_CUDA_CHECK(cudaMemsetAsync(hp.num, 0, sizeof(double) * std::size_t(n) * std::size_t(d_v), st));
    ck::launch_conv_load_values(hp, v.data, hk, vs.data(), st);

    // 2. shift, prefix sums, denominators, bounds
    ck::launch_conv_head_prefix(hp, st);
    ck::launch_conv_rows(hp, st);

    // 3. precision
    bool use_float = false;
    if (p.opt.precision == fft_precision::f32_checked) {
      std::uint64_t ratio = 0;
      BASISATTN_CUDA_CHECK(cudaMemcpyAsync(&ratio, hp.ratio_bits, sizeof ratio, cudaMemcpyDeviceToHost, st));
      ctx.synchronize();
      use_float = eps32 * detail::bits_to_double(ratio) <= p.opt.fft_tolerance;
    }
    hr.float_fft = use_float;

    // 4. numerators, chunk by chunk
    for (int i0 = 0; i0 < hp.n_items; i0 += static_cast<int>(lay.chunk_items)) {
      const int b = static_cast<int>(std::min<index_t>(lay.chunk_items, hp.n_items - i0));
      auto run_chunk = [&](auto* buf) {
        ck::launch_conv_fill(hp, i0, b, buf, st);
        fft_plans.forward(ctx, sz.nf, index_t(b) * (d_v + 1), buf);
        ck::launch_conv_multiply(hp, i0, b, buf, st);
        fft_plans.inverse(ctx, sz.nf, index_t(b) * d_v, buf + std::size_t(b) * std::size_t(sz.signal));
        ck::launch_conv_gather(hp, i0, b, static_cast<const std::remove_pointer_t<decltype(buf)>*>(buf), st);
      };
      if (use_float)
        run_chunk(static_cast<float*>(at(lay.chunk)));
      else
        run_chunk(static_cast<double*>(at(lay.chunk)));
    }

    // 5. outputs, repaired rows
    ck::launch_conv_finalize(hp, use_float ? eps32 : eps64, p.opt.fft_tolerance, out.data, h, os.data(), st);
    ck::launch_conv_repair(hp, p.opt.causal, out.data, h, os.data(), st);

    // 6. sampled rows, exactly
    const std::vector<index_t> picked = detail::head_sampled_rows(p, h);
    rows.assign(picked.begin(), picked.end());
    hr.checked_rows = static_cast<index_t>(rows.size());
    if (!rows.empty()) {
      if (!dp)
        BASISATTN_CUDA_CHECK(
            cudaMemcpyAsync(rows_dev, rows.data(), rows.size() * sizeof(long long), cudaMemcpyHostToDevice, st));
      double* err = reinterpret_cast<double*>(res + 3);
      ck::launch_conv_exact_rows(hp, q.data, qs.data(), k.data, ks.data(), h, hk, p.d_qk, p.scale, p.opt.causal,
                                 dp ? dp->rows(h) : rows_dev, static_cast<int>(rows.size()), err, err + sz.samples, st);
    }
  }

  // 7. the report; exact fallback per head
  std::vector<std::uint64_t> res(std::size_t(p.h_q) * std::size_t(lay.result_words));
  BASISATTN_CUDA_CHECK(cudaMemcpyAsync(res.data(), results, res.size() * 8, cudaMemcpyDeviceToHost, st));
  ctx.synchronize();
  for (index_t h = 0; h < p.h_q; ++h) {
    head_report& hr = rep.heads[std::size_t(h)];
    const std::uint64_t* r = res.data() + std::size_t(h) * std::size_t(lay.result_words);
    hr.repaired_rows = static_cast<index_t>(r[0]);
    hr.fft_error_bound = detail::bits_to_double(r[1]);
    if (hr.checked_rows > 0) {
      double emax = 0, esum = 0, umax = 0;
      for (index_t i = 0; i < hr.checked_rows; ++i) {
        const double e = detail::bits_to_double(r[3 + i]), u = detail::bits_to_double(r[3 + sz.samples + i]);
        emax = std::max(emax, e);
        esum += e;
        umax = std::max(umax, u);
      }
      hr.estimated_error = emax;
      hr.mean_estimated_error = esum / double(hr.checked_rows);
      hr.uniform_error = umax;
    }
  }
  attention_options exact_opt;
  exact_opt.causal = p.opt.causal;
  exact_opt.scale = p.scale;
  for (index_t h = 0; h < p.h_q; ++h) {
    head_report& hr = rep.heads[std::size_t(h)];
    if (!(hr.estimated_error > p.opt.tolerance)) continue;
    const index_t hk = h / sh.group;
    basisattn::attention<T>(ctx, q.sub1(h, 1), k.sub1(hk, 1), v.sub1(hk, 1), out.sub1(h, 1), exact_opt);
    hr.fell_back = true;
    ++rep.fallbacks;
  }
  return rep;
}

}  // namespace detail

/// See the top of this header.
template <class T>
report run(const cuda_context& ctx, const plan& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out, void* workspace,
           std::size_t workspace_bytes, cufft_plan_cache& fft_plans) {
  static_assert(supports_storage_v<cuda, T>, "conv::run(cuda): T must be float, Eigen::half or Eigen::bfloat16");
  return detail::run_cuda<T>(ctx, p, nullptr, q, k, v, out, workspace, workspace_bytes, fft_plans);
}

/// The same on an uploaded plan: nothing of the plan is copied from the host.
template <class T>
report run(const cuda_context& ctx, const device_plan& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out, void* workspace,
           std::size_t workspace_bytes, cufft_plan_cache& fft_plans) {
  static_assert(supports_storage_v<cuda, T>, "conv::run(cuda): T must be float, Eigen::half or Eigen::bfloat16");
  BASISATTN_REQUIRE(!p.empty(), invalid_argument,
                    "conv::run(cuda): the device_plan is empty (make it with conv::upload)");
  return detail::run_cuda<T>(ctx, p.host(), &p, q, k, v, out, workspace, workspace_bytes, fft_plans);
}

namespace detail {
/// The host plan of a plan or of an uploaded one.
inline const plan& host_plan(const plan& p) { return p; }
inline const plan& host_plan(const device_plan& p) { return p.host(); }
}  // namespace detail

/// Same, with cuFFT plans made for this call only. P is a plan or a device_plan.
template <class T, class P, class = std::enable_if_t<std::is_same_v<P, plan> || std::is_same_v<P, device_plan>>>
report run(const cuda_context& ctx, const P& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out, void* workspace,
           std::size_t workspace_bytes) {
  cufft_plan_cache plans;
  report r = run<T>(ctx, p, q, k, v, out, workspace, workspace_bytes, plans);
  ctx.synchronize();  // the plans are destroyed on return (a fallback may still be running: harmless, it uses none)
  return r;
}

/// Same, allocating the workspace (and the cuFFT plans) for this call. P is a plan or a device_plan.
template <class T, class P, class = std::enable_if_t<std::is_same_v<P, plan> || std::is_same_v<P, device_plan>>>
report run(const cuda_context& ctx, const P& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out) {
  BASISATTN_REQUIRE(v.extent[2] >= 1, invalid_argument, "conv::run(cuda): v has d_v = ", v.extent[2], " < 1");
  const plan& hp = detail::host_plan(p);
  BASISATTN_REQUIRE(hp.n >= 1 && !hp.heads.empty(), invalid_argument,
                    "conv::run(cuda): the plan is empty (make it with conv::make_plan)");
  const std::size_t bytes = workspace_bytes(ctx, p, v.extent[2]);
  device_buffer<unsigned char> ws(static_cast<index_t>(bytes));
  report r = run<T>(ctx, p, q, k, v, out, ws.data(), bytes);
  ctx.synchronize();  // the workspace is freed on return
  return r;
}

}  // namespace conv
BASISATTN_END_NAMESPACE
