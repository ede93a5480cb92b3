// basisattn/cuda/support.hpp - support-basis attention on the CUDA backend.
//
// Host-side header (g++ compiles it; needs the basisattn::cuda target). The kernels are in
// <basisattn/cuda/kernels/support.cuh>, compiled into the program by including
// <basisattn/cuda/kernels.cuh> in one .cu file; the products of features and states are cuBLAS GEMMs
// (fp32, CUBLAS_COMPUTE_32F: no TF32).
//
// Public entry points (namespace basisattn::support; `plan` is a plan or a device_plan):
//   upload(ctx, plan) -> device_plan       the plan's tables in device memory, once (allocates, waits)
//   workspace_bytes(ctx, plan, d_v)        device workspace bytes run(ctx, ...) needs
//   run(ctx, plan, q, k, v, out, workspace, bytes, report = nullptr)
//                                          support-basis attention of device tensors; allocates nothing
//   run(ctx, plan, q, k, v, out) -> report (support::report: heads, fallbacks)
//                                          the same with a workspace it allocates (cudaMalloc)
//
// The plan. There is no GPU make_plan: make the plan with the CPU one, support::make_plan(cpu{}, q, k,
// opt), from HOST copies of the q and k the GPU run will get (same values, same storage type; RoPE
// applied). The plan is what decides R, C, the buckets and the polynomials, so a run on other q or k
// is silently wrong: unlike the CPU run, run(ctx, ...) cannot compare checksums of device data with
// the plan's (the summation order of a device checksum would differ), so extents and storage type are
// checked and the values are the caller's responsibility. A run on a host plan uploads what it needs
// of the plan (row buckets, the C key lists, the k_poly_prefix counts, the pair coefficients and
// shifts, the feature tables and sketch sign matrices) into the first part of the caller's workspace,
// with cudaMemcpyAsync from the plan's (pageable) host vectors: those copies wait for the stream, so
// the plan may be destroyed as soon as run returns. The plan is not modified. upload(ctx, plan) makes
// those copies once into a device_plan; runs on it copy nothing from the host, need a workspace
// smaller by the tables, and with options.check_rows = 0, options.check_finite = false and no report
// only enqueue work on ctx's stream (kernels and cuBLAS GEMMs, no copy, allocation or wait), which
// is what capturing them in a CUDA graph needs. (Capture itself has not yet run on a GPU here.)
//
// Layout and mask as on the CPU (<basisattn/support.hpp>): q [n_q, H_q, d], k [n_kv, H_kv, d],
// v [n_kv, H_kv, d_v], out [n_q, H_q, d_v], device memory, any element strides; GQA (query head h uses
// kv head h / (H_q / H_kv)); causal mask end-aligned. T = float, Eigen::half or Eigen::bfloat16, fp32
// arithmetic (options.accumulate_double raises errc::unsupported).
//
// Algorithm, per query head, as the CPU run (<basisattn/cpu/support.hpp>): docs/design/cuda-support.md.
// On the same plan both backends give the same repaired_rows, poly_rows and checked_rows and the same
// rows' estimates (up to fp32 rounding order).
// After the last head, when options.check_rows > 0 or `report` is not null, run waits for the stream
// (ctx.synchronize()) and reads the per-head bad-row counts, |A| and error summaries back (a few bytes
// per head, into local variables). With options.check_rows > 0, a head whose estimated_error exceeds
// options.tolerance, or whose plan has poly_error >= 1 while options.tolerance is finite (the
// polynomial guarantees nothing on [-B, B]), is then recomputed exactly with this file's own exact
// kernel (the exact part of docs/design/cuda-support.md, step 3, with every row against every visible key: no head dim limit, fp32) and flagged
// (head_report::fell_back). With check_rows = 0 and no report, run returns without waiting.
//
// Errors: the CPU run's argument checks (errc::shape_mismatch / invalid_argument with the same messages,
// the plan's extents and storage type, a too small or null workspace); options.check_finite scans v on
// the device for NaN/Inf (errc::non_finite; this waits for the stream); CUDA and cuBLAS failures raise
// errc::backend (sticky CUDA errors abort, see <basisattn/cuda/context.hpp>).
#pragma once

#include <basisattn/cuda/support_steps.hpp>
#include <basisattn/attention/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/support_launch.hpp>
#include <basisattn/support/options.hpp>
#include <basisattn/support/plan.hpp>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace support {

/// A plan resident on the device: made by upload(ctx, plan), it holds the host plan (moved or copied in)
/// and the plan's tables in device memory, so run(ctx, device_plan, ...) copies nothing from the host.
/// Movable, not copyable; valid while the context's device is.
class device_plan {
 public:
  device_plan() = default;
  /// The host plan it was uploaded from (shape, options, make_plan's report).
  const plan& host() const noexcept { return host_; }
  /// Device bytes the uploaded tables take.
  std::size_t bytes() const noexcept { return tables_.bytes(); }
  /// The tables in device memory (null when empty) and their layout (internal to run).
  const unsigned char* tables() const noexcept { return tables_.data(); }
  const detail::cuda_layout& tables_layout() const noexcept { return tables_layout_; }

 private:
  friend device_plan upload(const cuda_context& ctx, plan p);
  plan host_;
  detail::cuda_layout tables_layout_;
  device_buffer<unsigned char> tables_;
};

/// Upload a plan made by make_plan(cpu{}, ...) once (cudaMalloc + copies, then waits for ctx's stream):
/// later runs on the device_plan read its tables from device memory instead of copying them from the
/// host on every call. Pass the plan with std::move to avoid a host copy.
inline device_plan upload(const cuda_context& ctx, plan p) {
  BASISATTN_REQUIRE(p.shape.h_q >= 1 && p.report.size() == static_cast<std::size_t>(p.shape.h_q), invalid_argument,
                    "support::upload: the plan is empty (make it with support::make_plan)");
  device_plan dp;
  dp.host_ = std::move(p);
  dp.tables_layout_ = detail::make_cuda_layout(dp.host_, 1, true);
  dp.tables_ = device_buffer<unsigned char>(static_cast<index_t>(dp.tables_layout_.tables_end));
  detail::upload_tables(ctx, dp.host_, dp.tables_layout_, dp.tables_.data());
  ctx.synchronize();
  return dp;
}

/// Device workspace bytes run(ctx, plan, ...) needs with value head dim d_v (plan tables of all heads,
/// one head's fp32 buffers, alignment slack).
inline std::size_t workspace_bytes(const cuda_context&, const plan& p, index_t d_v) {
  BASISATTN_REQUIRE(d_v >= 1, invalid_argument, "support::workspace_bytes(cuda): d_v = ", d_v, " must be >= 1");
  return basisattn::detail::sliced_workspace_bytes(detail::make_cuda_layout(p, d_v).total, 1, detail::cuda_ws_align);
}

/// Device workspace bytes run(ctx, device_plan, ...) needs: as for the host plan, less the tables.
inline std::size_t workspace_bytes(const cuda_context&, const device_plan& p, index_t d_v) {
  BASISATTN_REQUIRE(d_v >= 1, invalid_argument, "support::workspace_bytes(cuda): d_v = ", d_v, " must be >= 1");
  return basisattn::detail::sliced_workspace_bytes(detail::make_cuda_layout(p.host(), d_v, false).total, 1,
                                                   detail::cuda_ws_align);
}

namespace detail {

/// The run of both public overloads: the plan tables are uploaded into the workspace (device_tables
/// null) or read from a device_plan (device_tables, laid out as make_cuda_layout(p, 1, true)).
template <class T>
void run_cuda(const cuda_context& ctx, const plan& p, const unsigned char* device_tables,
              const cuda_layout* tables_layout, tensor3_view<const T> q, tensor3_view<const T> k,
              tensor3_view<const T> v, tensor3_view<T> out, void* workspace, std::size_t workspace_bytes,
              head_report* report) {
  namespace ck = ::basisattn::detail::cuda_kernels;
  constexpr const char* fn = "support::run(cuda)";
  const basisattn::detail::attention_shape sh = check_run_args<T>(fn, p, q, k, v, out);
  BASISATTN_REQUIRE(!p.options.accumulate_double, unsupported, fn,
                    ": options.accumulate_double is not supported on the GPU (fp32 arithmetic)");
  const cuda_layout L = make_cuda_layout(p, sh.d_v, device_tables == nullptr);
  BASISATTN_REQUIRE(L.r < INT_MAX && L.blk * std::max<index_t>(L.r, sh.d_qk) < INT_MAX && sh.d_v < INT_MAX, unsupported,
                    fn, ": ", L.r, " features x ", L.blk, " rows per block exceed cuBLAS's 32-bit range");
  const basisattn::detail::workspace_slices ws =
      basisattn::detail::slice_workspace(workspace, workspace_bytes, L.total, cuda_ws_align);
  BASISATTN_REQUIRE(ws.count >= 1, invalid_argument, fn, ": workspace of ", workspace_bytes, " bytes",
                    workspace ? "" : " (null)", " is too small; this problem needs ",
                    basisattn::detail::sliced_workspace_bytes(L.total, 1, cuda_ws_align),
                    " bytes (see support::workspace_bytes)");

  cuda_run c;
  c.ctx = &ctx;
  c.p = &p;
  c.L = L;
  c.base = ws.base;
  if (device_tables) {
    c.T = *tables_layout;
    c.tables = device_tables;
  } else {
    c.T = L;
    c.tables = ws.base;
    upload_tables(ctx, p, L, ws.base);
  }
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(ws.base + L.tables_end, 0, L.results_end - L.tables_end, ctx.stream()));
  if (p.options.check_finite) {
    auto* const cnt = c.at<unsigned long long>(L.nonfinite);
    ck::launch_support_count_nonfinite(v.data, v.extent[0], v.extent[1], v.extent[2], v.stride[0], v.stride[1],
                                       v.stride[2], cnt, ctx.stream());
    unsigned long long bad = 0;
    cuda_download(ctx, &bad, cnt, 1);
    BASISATTN_REQUIRE(bad == 0, non_finite, fn, ": v has a non-finite value (", bad, " NaN/Inf entries)");
  }
  for (index_t h = 0; h < sh.h_q; ++h) {
    c.h = h;
    c.hk = h / sh.group;
    run_head_cuda<T>(c, q, k, v, out);
  }
  const std::int64_t check_rows = p.options.check_rows;
  if (check_rows == 0 && !report) return;

  // Reports and the exact fallback (the first download waits for the whole head loop).
  const double tol = p.options.tolerance;
  for (index_t h = 0; h < sh.h_q; ++h) {
    c.h = h;
    c.hk = h / sh.group;
    head_report rep = p.report[static_cast<std::size_t>(h)];
    unsigned long long bad = 0, na = 0;
    cuda_download(ctx, &bad, c.at<unsigned long long>(L.bad) + h, 1);
    cuda_download(ctx, &na, c.at<unsigned long long>(L.na) + h, 1);
    rep.repaired_rows = static_cast<std::int64_t>(bad);
    rep.poly_rows = static_cast<std::int64_t>(na);
    rep.checked_rows = std::min<std::int64_t>(check_rows, rep.poly_rows);
    if (check_rows > 0) rep.estimated_error = rep.mean_estimated_error = 0;  // else disabled: NaN, as on the CPU
    if (rep.checked_rows > 0) {
      double summary[2] = {0, 0};
      cuda_download(ctx, summary, c.at<double>(L.summary) + 2 * h, 2);
      rep.estimated_error = summary[0];
      rep.mean_estimated_error = summary[1];
    }
    rep.fell_back = false;
    // As the CPU: the estimate is above the tolerance, or the polynomial guarantees nothing on its
    // range (poly_error >= 1) while a tolerance is set; only with the estimate enabled.
    const bool no_guarantee = rep.poly_error >= 1 && std::isfinite(tol);
    if (check_rows > 0 && (rep.estimated_error > tol || no_guarantee)) {
      load_head(c, q, k, v);
      ck::launch_support_exact(exact_params(c, 2), ctx.stream());
      store_head(c, out);
      rep.fell_back = true;
    }
    if (report) report[h] = rep;
  }
}

}  // namespace detail

/// Support-basis attention of device tensors with a plan made by make_plan(cpu{}, ...) from host copies
/// of the same q and k (see the header comment). `report`, when not null, receives H_q head reports.
/// Copies the plan's tables from the host into the workspace first: a plan run more than once is
/// better uploaded once (upload(ctx, plan), then the device_plan overload).
template <class T>
void run(const cuda_context& ctx, const plan& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
         tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
         tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out, void* workspace,
         std::size_t workspace_bytes, head_report* report = nullptr) {
  static_assert(supports_storage_v<cuda, T>, "support::run(cuda): T must be float, Eigen::half or Eigen::bfloat16");
  detail::run_cuda<T>(ctx, p, nullptr, nullptr, q, k, v, out, workspace, workspace_bytes, report);
}

/// The same on an uploaded plan: nothing is copied from the host. With options.check_rows = 0,
/// options.check_finite = false and report = nullptr the run only enqueues work on ctx's stream (no
/// host synchronisation, no allocation), so it can be captured in a CUDA graph.
template <class T>
void run(const cuda_context& ctx, const device_plan& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
         tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
         tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out, void* workspace,
         std::size_t workspace_bytes, head_report* report = nullptr) {
  static_assert(supports_storage_v<cuda, T>, "support::run(cuda): T must be float, Eigen::half or Eigen::bfloat16");
  BASISATTN_REQUIRE(p.tables() != nullptr, invalid_argument,
                    "support::run(cuda): the device_plan is empty (make it with support::upload)");
  detail::run_cuda<T>(ctx, p.host(), p.tables(), &p.tables_layout(), q, k, v, out, workspace, workspace_bytes, report);
}

namespace detail {
/// The host plan of a plan or of an uploaded one.
inline const plan& host_plan(const plan& p) { return p; }
inline const plan& host_plan(const device_plan& p) { return p.host(); }
}  // namespace detail

/// run(ctx, ...) with a device workspace it allocates (and frees after waiting for the stream);
/// returns the report (H_q heads). P is a plan or a device_plan.
template <class T, class P, class = std::enable_if_t<std::is_same_v<P, plan> || std::is_same_v<P, device_plan>>>
report run(const cuda_context& ctx, const P& p, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
           tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out) {
  BASISATTN_REQUIRE(v.extent[2] >= 1, invalid_argument, "support::run(cuda): v has d_v = ", v.extent[2],
                    "; must be >= 1");
  device_buffer<unsigned char> ws(static_cast<index_t>(workspace_bytes(ctx, p, v.extent[2])));
  const plan& hp = detail::host_plan(p);
  report rep;
  rep.heads.resize(static_cast<std::size_t>(hp.shape.h_q));
  run<T>(ctx, p, q, k, v, out, ws.data(), ws.bytes(), rep.heads.data());
  ctx.synchronize();  // the workspace is freed on return
  for (const head_report& h : rep.heads) rep.fallbacks += h.fell_back ? 1 : 0;
  return rep;
}

}  // namespace support
BASISATTN_END_NAMESPACE
