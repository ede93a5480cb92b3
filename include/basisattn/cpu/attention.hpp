// basisattn/cpu/attention.hpp - blocked (flash-style) exact softmax attention on the CPU backend.
//
// Public entry points (documented in <basisattn/attention.hpp>, which includes this header):
//   workspace_bytes(cpu{}, q, k, v, opt)             workspace size read from the views
//   attention(cpu{}, q, k, v, out, opt, workspace, workspace_bytes)   allocates nothing
//   attention(cpu{}, q, k, v, out, opt = {})                           allocates its workspace
//
// Algorithm. Work items are (query head, query block) pairs, spread over detail::cpu_threads() OpenMP
// threads with a dynamic schedule (longest items first: late query blocks see the most keys when
// causal). Each thread owns one slice of the caller's workspace. For one item, in compute type C
// (float; double for double storage or opt.accumulate_double):
//   Qb = scale * q[block, h, :]                               (converted once)
//   for each key block (blocks entirely above the causal diagonal are never visited):
//     S = Qb Kb^T                                             (detail::cpu_gemm; Kb mapped in place when the
//                                                              storage is C with contiguous rows, else
//                                                              converted into the slice)
//     per row: m' = max(m, max S), alpha = exp(m - m'), P = exp(S - m'), l = alpha l + sum P
//              (columns past the causal diagonal get P = 0)
//     O = alpha O + P Vb                                      (detail::cpu_gemm)
//   out[block, h, :] = O / l                                  (rounded to the storage type)
// Inside the OpenMP region the GEMMs (Eigen's, or oneDNN's where the build enables it) run
// single-threaded; with one thread no region is opened and the GEMM may use its own threads.
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/cpu/gemm.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>

BASISATTN_BEGIN_NAMESPACE
namespace detail {

/// Tile sizes of the blocked CPU kernel for compute type C. Measured on Zen4 (fp32, d = 128, one
/// core): every choice in 64..256 x 128..512 runs at 55-70 GFLOP/s, within the machine's noise. These
/// are the largest tiles for which Eigen's GEMM packing buffers still fit its 128 KiB stack limit
/// (EIGEN_STACK_ALLOCATION_LIMIT) when d_qk, d_v <= 128, so that nothing touches the heap then.
template <class C>
struct attention_cpu_traits {
  static constexpr index_t block_q = 128;                          ///< query rows per work item
  static constexpr index_t block_kv = sizeof(C) == 4 ? 256 : 128;  ///< keys per inner step
  static constexpr std::size_t align = 64;                         ///< alignment of every buffer in a workspace slice
};

/// Byte layout of one thread's workspace slice.
struct attention_cpu_layout {
  index_t bq = 0, bk = 0;                                       ///< block sizes actually used (clipped to n_q, n_kv)
  std::size_t q = 0, s = 0, o = 0, m = 0, l = 0, k = 0, v = 0;  ///< buffer offsets in bytes
  std::size_t slice = 0;                                        ///< bytes per slice, a multiple of the alignment
};

template <class C>
attention_cpu_layout make_attention_cpu_layout(index_t n_q, index_t n_kv, index_t d_qk, index_t d_v) {
  using traits = attention_cpu_traits<C>;
  attention_cpu_layout lay;
  lay.bq = std::min(traits::block_q, n_q);
  lay.bk = std::min(traits::block_kv, n_kv);
  workspace_carver w = workspace_carver::relative(traits::align);
  auto take = [&](index_t elems) { return w.take(static_cast<std::size_t>(elems) * sizeof(C)); };
  lay.q = take(lay.bq * d_qk);
  lay.s = take(lay.bq * lay.bk);
  lay.o = take(lay.bq * d_v);
  lay.m = take(lay.bq);
  lay.l = take(lay.bq);
  lay.k = take(lay.bk * d_qk);
  lay.v = take(lay.bk * d_v);
  lay.slice = w.bytes();
  return lay;
}

/// Work items of a problem: (query head, query block) pairs.
inline index_t attention_cpu_items(index_t h_q, index_t n_q, index_t bq) { return h_q * ((n_q + bq - 1) / bq); }

/// Threads used for `items` work items: the backend's thread count, at most one per item.
inline index_t attention_cpu_threads(index_t items) {
  return std::max<index_t>(1, std::min<index_t>(cpu_threads(), items));
}

template <class C>
std::size_t attention_cpu_workspace_bytes(index_t n_q, index_t n_kv, index_t h_q, index_t d_qk, index_t d_v) {
  const attention_cpu_layout lay = make_attention_cpu_layout<C>(n_q, n_kv, d_qk, d_v);
  const index_t threads = attention_cpu_threads(attention_cpu_items(h_q, n_q, lay.bq));
  return sliced_workspace_bytes(lay.slice, static_cast<std::size_t>(threads), attention_cpu_traits<C>::align);
}

template <class C, class T>
struct attention_cpu_problem {
  tensor3_view<const T> q, k, v;
  tensor3_view<T> out;
  attention_shape shape;
  bool causal = true;
};

template <class C>
using attention_cmap = Eigen::Map<const rm_matrix<C>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Rows [k0, k0 + n) of head `head` of x as a compute-type matrix: mapped in place when possible,
/// else converted into buf (n x x.extent[2], contiguous).
template <class C, class T>
attention_cmap<C> attention_cpu_kv_block(const tensor3_view<const T>& x, index_t head, index_t k0, index_t n, C* buf) {
  const index_t d = x.extent[2];
  const matrix_view<const T> src = x.slice1(head).block(k0, 0, n, d);
  if constexpr (std::is_same_v<T, C>) {
    if (src.rows_contiguous() && (n == 1 || src.row_stride >= d))
      return attention_cmap<C>(src.data, n, d, Eigen::OuterStride<>(n > 1 ? src.row_stride : d));
  }
  Eigen::Map<rm_matrix<C>> dst(buf, n, d);
  if (src.rows_contiguous() && (n == 1 || src.row_stride >= d)) {
    dst = map_rows(src).template cast<C>();  // vectorised widening (half/bf16 -> float, float -> double)
  } else {
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < d; ++c) dst(i, c) = to_compute<C>(src(i, c));
  }
  return attention_cmap<C>(buf, n, d, Eigen::OuterStride<>(d));
}

/// One work item: query rows [q0, q0 + bq) of query head h, using the workspace slice at `slice`.
template <class C, class T>
void attention_cpu_item(const attention_cpu_problem<C, T>& p, const attention_cpu_layout& lay, index_t h, index_t q0,
                        unsigned char* slice) {
  using mat = rm_matrix<C>;
  using amap = Eigen::Map<mat, Eigen::Aligned64>;
  const attention_shape& sh = p.shape;
  const index_t nq = std::min(lay.bq, sh.n_q - q0);
  const index_t hk = h / sh.group;
  const C scale = static_cast<C>(sh.scale);

  amap qb(reinterpret_cast<C*>(slice + lay.q), nq, sh.d_qk);
  amap o(reinterpret_cast<C*>(slice + lay.o), nq, sh.d_v);
  C* const sbuf = reinterpret_cast<C*>(slice + lay.s);
  C* const m = reinterpret_cast<C*>(slice + lay.m);
  C* const l = reinterpret_cast<C*>(slice + lay.l);
  C* const kbuf = reinterpret_cast<C*>(slice + lay.k);
  C* const vbuf = reinterpret_cast<C*>(slice + lay.v);

  for (index_t i = 0; i < nq; ++i)
    for (index_t c = 0; c < sh.d_qk; ++c) qb(i, c) = scale * to_compute<C>(p.q(q0 + i, h, c));
  o.setZero();
  std::fill(m, m + nq, -std::numeric_limits<C>::infinity());
  std::fill(l, l + nq, C(0));

  // Row i (global q0 + i) sees keys j <= q0 + i + off when causal: keys past the last row's limit are
  // never visited, and only blocks reaching past the first row's limit need a mask.
  const index_t off = sh.causal_offset;
  const index_t kend = p.causal ? std::min(sh.n_kv, q0 + nq + off) : sh.n_kv;
  for (index_t k0 = 0; k0 < kend; k0 += lay.bk) {
    const index_t nk = std::min(lay.bk, kend - k0);
    const attention_cmap<C> kb = attention_cpu_kv_block<C>(p.k, hk, k0, nk, kbuf);
    const attention_cmap<C> vb = attention_cpu_kv_block<C>(p.v, hk, k0, nk, vbuf);
    amap s(sbuf, nq, nk);
    cpu_gemm<C>(false, true, nq, nk, sh.d_qk, C(1), qb.data(), sh.d_qk, kb.data(), kb.outerStride(), C(0), sbuf, nk);

    const bool masked = p.causal && k0 + nk - 1 > q0 + off;
    for (index_t i = 0; i < nq; ++i) {
      const index_t visible = masked ? std::clamp<index_t>(q0 + i + off - k0 + 1, 0, nk) : nk;
      auto row = s.row(i);
      if (visible < nk) row.tail(nk - visible).setZero();
      if (visible == 0) continue;  // nothing visible in this block: m, l and O unchanged
      auto sv = row.head(visible).array();
      const C m_new = std::max(m[i], sv.maxCoeff());
      const C alpha = std::exp(m[i] - m_new);  // 0 on the first visited block (m = -inf)
      sv = (sv - m_new).exp();
      l[i] = alpha * l[i] + sv.sum();
      m[i] = m_new;
      if (alpha != C(1)) o.row(i) *= alpha;
    }
    cpu_gemm<C>(false, false, nq, sh.d_v, nk, C(1), sbuf, nk, vb.data(), vb.outerStride(), C(1), o.data(), sh.d_v);
  }

  for (index_t i = 0; i < nq; ++i) {
    const C inv = C(1) / l[i];
    for (index_t c = 0; c < sh.d_v; ++c) p.out(q0 + i, h, c) = from_compute<T>(o(i, c) * inv);
  }
}

template <class C, class T>
void attention_cpu_run(const attention_cpu_problem<C, T>& p, void* workspace, std::size_t workspace_bytes) {
  const attention_shape& sh = p.shape;
  const attention_cpu_layout lay = make_attention_cpu_layout<C>(sh.n_q, sh.n_kv, sh.d_qk, sh.d_v);
  const std::size_t align = attention_cpu_traits<C>::align;

  const workspace_slices ws = slice_workspace(workspace, workspace_bytes, lay.slice, align);
  BASISATTN_REQUIRE(ws.count >= 1, invalid_argument, "attention: workspace of ", workspace_bytes, " bytes",
                    workspace ? "" : " (null)", " is too small; this problem needs at least ",
                    sliced_workspace_bytes(lay.slice, 1, align), " bytes (see workspace_bytes)");

  const index_t nqb = (sh.n_q + lay.bq - 1) / lay.bq;
  const index_t items = sh.h_q * nqb;
  const index_t threads = std::min<index_t>(attention_cpu_threads(items), static_cast<index_t>(ws.count));
  // Item -> (head, block): the last query blocks (the most keys when causal) come first.
  parallel_for_slots(items, static_cast<int>(threads), [&](index_t it, int slot) {
    const index_t qblock = nqb - 1 - it / sh.h_q;
    attention_cpu_item(p, lay, it % sh.h_q, qblock * lay.bq, ws[static_cast<std::size_t>(slot)]);
  });
}

template <class C, class T>
void attention_cpu_dispatch(const attention_shape& sh, tensor3_view<const T> q, tensor3_view<const T> k,
                            tensor3_view<const T> v, tensor3_view<T> out, const attention_options& opt, void* workspace,
                            std::size_t workspace_bytes) {
  attention_cpu_problem<C, T> p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.shape = sh;
  p.causal = opt.causal;
  attention_cpu_run(p, workspace, workspace_bytes);
}

}  // namespace detail

namespace detail {

/// Workspace of attention(cpu{}, ...) from sizes and a runtime storage type (what both public forms use).
inline std::size_t attention_cpu_workspace_bytes(const char* fn, index_t n_q, index_t n_kv, index_t h_q, index_t d_qk,
                                                 index_t d_v, dtype storage, const attention_options& opt) {
  BASISATTN_REQUIRE(n_q >= 1 && n_kv >= 1 && h_q >= 1 && d_qk >= 1 && d_v >= 1, invalid_argument, fn, ": n_q = ", n_q,
                    ", n_kv = ", n_kv, ", h_q = ", h_q, ", d_qk = ", d_qk, ", d_v = ", d_v, " must all be >= 1");
  if (storage == dtype::f64 || opt.accumulate_double)
    return attention_cpu_workspace_bytes<double>(n_q, n_kv, h_q, d_qk, d_v);
  return attention_cpu_workspace_bytes<float>(n_q, n_kv, h_q, d_qk, d_v);
}

}  // namespace detail

/// Bytes of caller-owned workspace that attention(cpu{}, ...) needs for these views and options with
/// the current thread count (detail::cpu_threads()): q [n_q, H_q, d_qk], k [n_kv, H_kv, d_qk],
/// v [n_kv, H_kv, d_v] (the views the run will take; their data is not read).
template <class TQ, class TK, class TV>
std::size_t workspace_bytes(cpu, tensor3_view<TQ> q, tensor3_view<TK> k, tensor3_view<TV> v,
                            const attention_options& opt = {}) {
  using T = std::remove_const_t<TQ>;
  static_assert(std::is_same_v<T, std::remove_const_t<TK>> && std::is_same_v<T, std::remove_const_t<TV>>,
                "workspace_bytes(cpu{}, q, k, v): q, k and v must have the same storage type");
  static_assert(supports_storage_v<cpu, T>, "workspace_bytes(cpu{}, q, k, v): unsupported storage type");
  (void)k;
  return detail::attention_cpu_workspace_bytes("workspace_bytes(attention)", q.extent[0], v.extent[0], q.extent[1],
                                               q.extent[2], v.extent[2], dtype_of_v<T>, opt);
}

/// Deprecated spellings of workspace_bytes(cpu{}, q, k, v, opt).
[[deprecated("use workspace_bytes(cpu{}, q, k, v, opt)")]] inline std::size_t attention_workspace_bytes(
    cpu, index_t n_q, index_t n_kv, index_t h_q, index_t d_qk, index_t d_v, dtype storage,
    const attention_options& opt = {}) {
  return detail::attention_cpu_workspace_bytes("attention_workspace_bytes", n_q, n_kv, h_q, d_qk, d_v, storage, opt);
}
template <class TQ, class TK, class TV>
[[deprecated("use workspace_bytes(cpu{}, q, k, v, opt)")]] std::size_t attention_workspace_bytes(
    cpu c, tensor3_view<TQ> q, tensor3_view<TK> k, tensor3_view<TV> v, const attention_options& opt = {}) {
  return workspace_bytes(c, q, k, v, opt);
}

/// Blocked exact attention in caller-owned workspace (at least workspace_bytes(cpu{}, q, k, v, opt) bytes;
/// a smaller workspace that still holds one thread's slice runs on fewer threads, less than that
/// raises invalid_argument). Allocates nothing.
template <class T>
void attention(cpu, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v, tensor3_view<T> out,
               const attention_options& opt, void* workspace, std::size_t workspace_bytes) {
  static_assert(supports_storage_v<cpu, T> && !std::is_const_v<T>,
                "attention: T must be a storage type (float, double, Eigen::half, Eigen::bfloat16)");
  const detail::attention_shape sh = detail::check_attention_args("attention", q, k, v, out, opt);
  if (opt.check_finite) {
    detail::require_finite(q, "attention: q");
    detail::require_finite(k, "attention: k");
    detail::require_finite(v, "attention: v");
  }
  if constexpr (std::is_same_v<compute_t<T>, double>)
    detail::attention_cpu_dispatch<double>(sh, q, k, v, out, opt, workspace, workspace_bytes);
  else if (opt.accumulate_double)
    detail::attention_cpu_dispatch<double>(sh, q, k, v, out, opt, workspace, workspace_bytes);
  else
    detail::attention_cpu_dispatch<float>(sh, q, k, v, out, opt, workspace, workspace_bytes);
}

/// Blocked exact attention; allocates its workspace.
template <class T>
void attention(cpu, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v, tensor3_view<T> out,
               const attention_options& opt = {}) {
  static_assert(supports_storage_v<cpu, T> && !std::is_const_v<T>,
                "attention: T must be a storage type (float, double, Eigen::half, Eigen::bfloat16)");
  const detail::attention_shape sh = detail::check_attention_args("attention", q, k, v, out, opt);
  const std::size_t bytes =
      detail::attention_cpu_workspace_bytes("attention", sh.n_q, sh.n_kv, sh.h_q, sh.d_qk, sh.d_v, dtype_of_v<T>, opt);
  std::unique_ptr<unsigned char[]> workspace(new unsigned char[bytes]);
  attention(cpu{}, q, k, v, out, opt, workspace.get(), bytes);
}

namespace detail {
template <class Q, class K, class V, class O>
struct is_attention_views : std::false_type {};
template <class T>
struct is_attention_views<tensor3_view<const T>, tensor3_view<const T>, tensor3_view<const T>, tensor3_view<T>>
    : std::true_type {};
}  // namespace detail

/// Any other argument types (views of non-const data without attention<T>, mixed storage types,
/// something that is not a view): one plain error at the caller's line instead of a page of failed
/// deductions. Never selected when the arguments are views the two overloads above accept.
template <class Q, class K, class V, class O, class... Rest,
          std::enable_if_t<!detail::is_attention_views<Q, K, V, O>::value, int> = 0>
void attention(cpu, const Q&, const K&, const V&, const O&, const Rest&...) {
  static_assert(detail::is_attention_views<Q, K, V, O>::value,
                "attention(cpu{}, q, k, v, out, ...): q, k, v must be tensor3_view<const T> and out "
                "tensor3_view<T>, one storage type T for all four. Views of non-const data do not deduce T: "
                "write attention<T>(cpu{}, q, k, v, out, ...) or pass const views.");
}

BASISATTN_END_NAMESPACE
