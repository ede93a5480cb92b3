// basisattn/cpu/projection.hpp - CPU runtime of dense and BD projections.
//
//   bd::workspace_bytes(cpu{}, p, tokens)               workspace for the current thread count
//   bd::project(cpu{}, p, x, y, workspace, bytes)       allocates nothing (the GEMM's packing aside)
//   bd::project(cpu{}, p, x, y)                          convenience: allocates the workspace
// for p a bd::dense_projection<T> or bd::bd_projection<T>; x: tokens x in_dim, y: tokens x out_dim,
// both with contiguous rows (any row stride). T may be float, double, Eigen::half or
// Eigen::bfloat16; 16-bit data are converted to float around a float GEMM, except bf16 where the
// translation unit is compiled for AVX512_BF16 (<basisattn/cpu/bf16_gemm.hpp>: bf16 operands, fp32
// sums). Either way each output is one sum in float, rounded once to T.
//
// Tokens are processed in row chunks of up to 256, one chunk per thread at a time (OpenMP). Each
// chunk is one GEMM, y = x_rest C for BD (one per basis group, each after gathering its group's rest
// channels; y = x W dense; detail::cpu_gemm: Eigen, or oneDNN where the
// build enables it, see <basisattn/cpu/gemm.hpp>), then one pass over the chunk while it is in cache
// adds the r basis channels into every head's slot (BD) and the bias. Adding after the GEMM rather
// than handing the GEMM a prefilled y measured 1.26 -> 1.29x BD over oneDNN's dense GEMM on Zen 4
// (bench_bd, 4096 tokens). The two projections differ only in the GEMM's inner dimension (and BD's
// number of basis groups).
// Options: check_finite (default on) scans x for NaN/Inf first (errc::non_finite).
#pragma once

#include <basisattn/bd/projection.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/cpu/bf16_gemm.hpp>
#include <basisattn/cpu/gemm.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <variant>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

/// Options of a projection run.
struct project_options {
  bool check_finite = true;  ///< scan x for NaN/Inf (errc::non_finite)
};

namespace detail {
using ::basisattn::detail::concat;
using ::basisattn::detail::raise;

constexpr std::size_t ws_align = ::basisattn::detail::cpu_workspace_align;
using arena = ::basisattn::detail::workspace_carver;

/// bf16 projections use the AVX512_BF16 GEMM (<basisattn/cpu/bf16_gemm.hpp>) where this translation
/// unit has it: weights packed as bf16, x read as bf16, fp32 accumulation. The choice is the
/// template argument `Dot` of every function whose code depends on it (workspace_bytes, project and
/// their helpers), so translation units built with and without AVX512_BF16 never share one.
template <class T>
inline constexpr bool use_bf16_dot = std::is_same_v<T, Eigen::bfloat16>&& ::basisattn::detail::bf16_dot_available;

/// Compute-type elements holding `n` bf16 elements.
inline index_t bf16_in_float(index_t n) { return (n + 1) / 2; }

struct chunking {
  index_t threads, rows;
};
inline chunking plan_chunks(index_t tokens) {
  const index_t threads = std::max<index_t>(1, ::basisattn::detail::cpu_threads());
  // Enough rows per chunk for an efficient GEMM, enough chunks for every thread.
  const index_t per_thread = (tokens + threads - 1) / threads;
  return {threads, std::max<index_t>(1, std::min<index_t>(256, per_thread))};
}

/// Sizes (in compute-type elements) of the shared and per-thread buffers.
struct ws_layout {
  index_t shared_w = 0;  // converted weight (16-bit storage only; packed bf16 with use_bf16_dot)
  index_t thread_x = 0;  // gathered / converted input chunk (bf16 with use_bf16_dot)
  index_t thread_y = 0;  // compute-type output chunk (16-bit storage only)
  index_t thread_s = 0;  // one row of basis channels
  index_t runs = 0;      // gathered BD, per group: the number of runs of consecutive rest channels, then
                         // (source channel, length) of each
};

template <class T, bool Dot, class P>
ws_layout layout_of(const P& p, const chunking& ch) {
  constexpr bool narrow = !std::is_same_v<T, compute_t<T>>;
  ws_layout l;
  if constexpr (Dot) {  // x read in place unless the basis must be gathered
    index_t nr = 0;     // the GEMM's inner dimension
    if constexpr (std::is_same_v<P, bd_projection<T>>) {
      nr = p.in_dim - p.rank;
      if (!p.basis_leading()) l.thread_x = bf16_in_float(ch.rows * nr), l.runs = p.groups * (2 * nr + 1);
      l.thread_s = p.rank;
    } else {
      nr = p.in_dim();
    }
    if constexpr (std::is_same_v<P, bd_projection<T>>)  // each basis group packed on its own
      l.shared_w = p.groups * bf16_in_float(::basisattn::detail::bf16_packed_elems(nr, p.out_dim() / p.groups));
    else
      l.shared_w = bf16_in_float(::basisattn::detail::bf16_packed_elems(nr, p.out_dim()));
    l.thread_y = ch.rows * p.out_dim();
    return l;
  }
  if constexpr (std::is_same_v<P, bd_projection<T>>) {
    const index_t nr = p.in_dim - p.rank;
    if (narrow) l.shared_w = nr * p.out_dim();
    if (narrow || !p.basis_leading()) l.thread_x = ch.rows * nr, l.runs = p.groups * (2 * nr + 1);
    if (narrow) l.thread_y = ch.rows * p.out_dim();
    l.thread_s = p.rank;
  } else {
    if (narrow) {
      l.shared_w = p.in_dim() * p.out_dim();
      l.thread_x = ch.rows * p.in_dim();
      l.thread_y = ch.rows * p.out_dim();
    }
  }
  return l;
}

/// Bytes of the workspace: the weight in C (when T is narrower), then each thread's x, y and scratch
/// blocks, in the order the run takes them.
template <class C>
std::size_t bytes_of(const ws_layout& l, index_t threads) {
  arena w(ws_align);
  w.take_elems<C>(l.shared_w);
  w.take_elems<index_t>(l.runs);
  for (index_t t = 0; t < threads; ++t) {
    w.take_elems<C>(l.thread_x);
    w.take_elems<C>(l.thread_y);
    w.take_elems<C>(l.thread_s);
  }
  return w.bytes();
}

template <class T, class P>
void check_io(const P& p, const matrix_view<const T>& x, const matrix_view<T>& y, index_t in, index_t out) {
  (void)p;
  BASISATTN_REQUIRE(x.cols == in, shape_mismatch, "project: x has ", x.cols, " columns, the projection takes ", in);
  BASISATTN_REQUIRE(y.cols == out, shape_mismatch, "project: y has ", y.cols, " columns, the projection gives ", out);
  BASISATTN_REQUIRE(x.rows == y.rows, shape_mismatch, "project: x has ", x.rows, " rows (tokens) but y has ", y.rows);
  BASISATTN_REQUIRE(x.rows == 0 || (x.data && y.data), invalid_argument, "project: null data");
  BASISATTN_REQUIRE(x.rows_contiguous() && y.rows_contiguous(), invalid_argument,
                    "project: x and y rows must be contiguous (col_stride 1)");
  BASISATTN_REQUIRE(x.rows <= 1 || (x.row_stride >= x.cols && y.row_stride >= y.cols), invalid_argument,
                    "project: row strides (", x.row_stride, ", ", y.row_stride, ") smaller than the row lengths");
}

/// Shared driver: for each row chunk, gather(chunk rows, thread x buffer) (input rows into the
/// thread's x buffer where the GEMM cannot read x in place), product(chunk rows, thread x buffer,
/// Y chunk, ldY) (Y = X W, one GEMM), then add(chunk rows, Y chunk, ldY, thread scratch) adds what is
/// not a product (bias, BD's basis channels) while the chunk is still in cache.
template <class T, class Gather, class Product, class Add>
void run_chunks(index_t tokens, const chunking& ch, const ws_layout& l, arena& ar, matrix_view<T> y, index_t w_cols,
                Gather&& gather, Product&& product, Add&& add) {
  using C = compute_t<T>;
  constexpr bool narrow = !std::is_same_v<T, C>;
  std::vector<C*> bx(static_cast<std::size_t>(ch.threads)), by(static_cast<std::size_t>(ch.threads)),
      bs(static_cast<std::size_t>(ch.threads));
  for (index_t t = 0; t < ch.threads; ++t) {
    bx[static_cast<std::size_t>(t)] = ar.template take_elems<C>(l.thread_x);
    by[static_cast<std::size_t>(t)] = ar.template take_elems<C>(l.thread_y);
    bs[static_cast<std::size_t>(t)] = ar.template take_elems<C>(l.thread_s);
  }
  const index_t nchunks = (tokens + ch.rows - 1) / ch.rows;
  ::basisattn::detail::parallel_for_slots(
      nchunks, static_cast<int>(ch.threads),
      [&](index_t c, int slot) {
        const std::size_t tid = static_cast<std::size_t>(slot);
        const index_t t0 = c * ch.rows, nt = std::min(ch.rows, tokens - t0);
        C* ydst;
        index_t ldy;
        if constexpr (narrow) {
          ydst = by[tid];
          ldy = w_cols;
        } else {
          ydst = y.data + t0 * y.row_stride;
          ldy = y.row_stride;
        }
        gather(t0, nt, bx[tid]);
        product(t0, nt, bx[tid], ydst, ldy);
        add(t0, nt, ydst, ldy, bs[tid]);
        if constexpr (narrow) {
          for (index_t t = 0; t < nt; ++t) {
            T* yr = y.data + (t0 + t) * y.row_stride;
            const C* src = ydst + t * ldy;
            for (index_t j = 0; j < w_cols; ++j) yr[j] = ::basisattn::detail::from_compute<T>(src[j]);
          }
        }
      },
      ::basisattn::detail::loop_schedule::fixed);
}

/// Common prologue of both projections: validates, scans x when asked, plans the chunks and checks
/// the workspace. Returns false when there is nothing to do (no tokens).
template <class T, bool Dot, class P>
bool begin_run(const P& p, const matrix_view<const T>& x, const matrix_view<T>& y, index_t in, index_t out,
               void* workspace, std::size_t workspace_bytes, const project_options& opt, chunking& ch, ws_layout& l,
               arena& ar) {
  check_io<T>(p, x, y, in, out);
  if (x.rows == 0) return false;
  if (opt.check_finite) ::basisattn::detail::require_finite(x, "project: x");
  ch = plan_chunks(x.rows);
  l = layout_of<T, Dot>(p, ch);
  const std::size_t need = bytes_of<compute_t<T>>(l, ch.threads);
  BASISATTN_REQUIRE(need == 0 || (workspace && workspace_bytes >= need), invalid_argument, "project: workspace of ",
                    workspace_bytes, " bytes, ", need, " needed (workspace_bytes)");
  ar = arena(ws_align, workspace, workspace_bytes);
  return true;
}

template <class C, class T>
const C* weight_in_compute(const matrix<T>& w, arena& ar, index_t n) {
  if constexpr (std::is_same_v<T, C>) {
    (void)ar;
    (void)n;
    return w.data();
  } else {
    C* dst = ar.template take_elems<C>(n);
    const T* src = w.data();
    constexpr index_t block = 16384;  // elements per work item
    ::basisattn::detail::parallel_for_slots((n + block - 1) / block, ::basisattn::detail::cpu_threads(),
                                            [&](index_t b, int) {
                                              const index_t end = std::min(n, (b + 1) * block);
                                              for (index_t i = b * block; i < end; ++i)
                                                dst[i] = ::basisattn::detail::to_compute<C>(src[i]);
                                            },
                                            ::basisattn::detail::loop_schedule::fixed);
    return dst;
  }
}

/// w (k x n, row-major bf16) packed for bf16_gemm into the workspace, column blocks in parallel; with
/// parts > 1, each of `parts` equal column ranges is packed on its own, one after another (part q at
/// q bf16_packed_elems(k, n / parts)).
template <class T>
const T* pack_bf16_weight(const matrix<T>& w, index_t k, index_t n, arena& ar, index_t parts = 1) {
  const index_t np = n / parts, per_part = ::basisattn::detail::bf16_packed_elems(k, np);
  T* dst = reinterpret_cast<T*>(ar.template take_elems<float>(parts * bf16_in_float(per_part)));
  const index_t blocks = (np + ::basisattn::detail::bf16_nr - 1) / ::basisattn::detail::bf16_nr;
  ::basisattn::detail::parallel_for_slots(
      parts * blocks, ::basisattn::detail::cpu_threads(),
      [&](index_t i, int) {
        const index_t q = i / blocks;
        ::basisattn::detail::bf16_pack_block(w.data() + q * np, n, k, np, i % blocks, dst + q * per_part);
      },
      ::basisattn::detail::loop_schedule::fixed);
  return dst;
}

/// Element type of the GEMM's operands: T itself for the bf16 GEMM (Dot), else the compute type.
template <class T, bool Dot>
using operand_t = std::conditional_t<Dot, T, compute_t<T>>;

/// One input element as a GEMM operand (a copy, or the widening to the compute type).
template <class X, class T>
X as_operand(const T& v) {
  if constexpr (std::is_same_v<X, T>)
    return v;
  else
    return ::basisattn::detail::to_compute<X>(v);
}

/// The weight (k x n, row-major) as the GEMM's B operand: packed into the workspace for the bf16
/// GEMM, converted into it for other 16-bit storage, else the stored matrix itself.
template <class T, bool Dot>
const operand_t<T, Dot>* weight_operand(const matrix<T>& w, index_t k, index_t n, arena& ar, index_t parts = 1) {
  if constexpr (Dot)
    return pack_bf16_weight(w, k, n, ar, parts);
  else
    return weight_in_compute<compute_t<T>>(w, ar, k * n);
}

/// One chunk's Y = X W (X: nt x k rows at x, row stride ldx; W as weight_operand gives it: packed
/// for Dot, else row-major with row stride ldw, n by default).
template <class T, bool Dot>
void chunk_product(index_t nt, index_t n, index_t k, const operand_t<T, Dot>* x, index_t ldx,
                   const operand_t<T, Dot>* w, compute_t<T>* yd, index_t ldy, index_t ldw = -1) {
  if constexpr (Dot) {
    (void)ldw;
    ::basisattn::detail::bf16_gemm(nt, n, k, x, ldx, w, yd, ldy);
  } else {
    ::basisattn::detail::cpu_gemm<compute_t<T>>(false, false, nt, n, k, compute_t<T>(1), x, ldx, w, ldw < 0 ? n : ldw,
                                                compute_t<T>(0), yd, ldy);
  }
}

}  // namespace detail

/// Workspace bytes project(cpu, p, x, y, ...) needs for `tokens` rows with the current thread count.
template <class T, bool Dot = detail::use_bf16_dot<T>>
std::size_t workspace_bytes(cpu, const bd_projection<T>& p, index_t tokens) {
  detail::check_bd_layout(p, "workspace_bytes");
  const auto ch = detail::plan_chunks(tokens);
  return detail::bytes_of<compute_t<T>>(detail::layout_of<T, Dot>(p, ch), ch.threads);
}
template <class T, bool Dot = detail::use_bf16_dot<T>>
std::size_t workspace_bytes(cpu, const dense_projection<T>& p, index_t tokens) {
  const auto ch = detail::plan_chunks(tokens);
  return detail::bytes_of<compute_t<T>>(detail::layout_of<T, Dot>(p, ch), ch.threads);
}

/// Deprecated spelling of workspace_bytes(cpu{}, p, tokens).
template <class P>
[[deprecated("use workspace_bytes(cpu{}, p, tokens)")]] auto project_workspace_bytes(cpu c, const P& p, index_t tokens)
    -> decltype(workspace_bytes(c, p, tokens)) {
  return workspace_bytes(c, p, tokens);
}

/// BD projection of all heads: y = [x_S + x_rest C_g + b_g]_g (see the top of this header).
template <class T, bool Dot = detail::use_bf16_dot<T>>
void project(cpu, const bd_projection<T>& p, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> y, void* workspace, std::size_t workspace_bytes, const project_options& opt = {}) {
  using C = compute_t<T>;
  detail::chunking ch;
  detail::ws_layout l;
  detail::arena ar(detail::ws_align);
  detail::check_bd_layout(p, "project");
  if (!detail::begin_run<T, Dot>(p, x, y, p.in_dim, p.out_dim(), workspace, workspace_bytes, opt, ch, l, ar)) return;
  const index_t r = p.rank, G = p.heads, nr = p.in_dim - r, Q = p.groups, hq = G / Q, nq = hq * r;
  const bool lead = p.basis_leading();
  using X = detail::operand_t<T, Dot>;
  const X* w = detail::weight_operand<T, Dot>(p.coeff, nr, G * r, ar, Dot ? Q : 1);
  const bool in_place = lead && std::is_same_v<X, T>;  // the GEMM reads x's rest channels where they are
  const T* bias = p.bias.empty() ? nullptr : p.bias.data();
  // The rest channels of each group as runs of consecutive channels (source channel, length): the
  // gather copies runs (contiguous, vectorizable) instead of one indexed element at a time. A
  // complement of r ascending channels has at most r + 1 runs (a leading basis: one, r..m-1); any
  // order has at most m - r.
  index_t* runs = ar.template take_elems<index_t>(l.runs);
  if (!in_place) {
    for (index_t q = 0; q < Q; ++q) {
      const index_t* rest = p.rest.data() + q * nr;
      index_t* rq = runs + q * (2 * nr + 1) + 1;
      index_t k = 0;
      for (index_t l2 = 0; l2 < nr; ++l2) {
        const index_t c = rest[l2];
        if (k > 0 && rq[2 * (k - 1)] + rq[2 * (k - 1) + 1] == c)
          ++rq[2 * (k - 1) + 1];
        else
          rq[2 * k] = c, rq[2 * k + 1] = 1, ++k;
      }
      rq[-1] = k;
    }
  }
  // Basis group q: its heads' columns [q nq, (q + 1) nq) of y and of the coefficients.
  auto gather = [&](index_t t0, index_t nt, C* bx, index_t q) {
    if (in_place) return;
    const index_t* rq = runs + q * (2 * nr + 1) + 1;
    const index_t k = rq[-1];
    for (index_t t = 0; t < nt; ++t) {
      const T* xr = x.data + (t0 + t) * x.row_stride;
      X* xo = reinterpret_cast<X*>(bx) + t * nr;
      for (index_t i = 0; i < k; ++i) {
        const T* src = xr + rq[2 * i];
        const index_t len = rq[2 * i + 1];
        for (index_t j = 0; j < len; ++j) xo[j] = detail::as_operand<X>(src[j]);
        xo += len;
      }
    }
  };
  auto add = [&](index_t t0, index_t nt, C* yd, index_t ldy, C* bs) {
    for (index_t t = 0; t < nt; ++t) {
      const T* xr = x.data + (t0 + t) * x.row_stride;
      C* yr = yd + t * ldy;
      for (index_t q = 0; q < Q; ++q) {
        const index_t* basis = p.basis.data() + q * r;
        for (index_t k = 0; k < r; ++k) bs[k] = ::basisattn::detail::to_compute<C>(xr[lead ? k : basis[k]]);
        for (index_t g = q * hq; g < (q + 1) * hq; ++g) {
          if (bias) {
            for (index_t k = 0; k < r; ++k)
              yr[g * r + k] += bs[k] + ::basisattn::detail::to_compute<C>(bias[g * r + k]);
          } else {
            for (index_t k = 0; k < r; ++k) yr[g * r + k] += bs[k];
          }
        }
      }
    }
  };
  auto product = [&](index_t t0, index_t nt, C* bx, C* yd, index_t ldy) {
    for (index_t q = 0; q < Q; ++q) {
      gather(t0, nt, bx, q);
      const X* xo = reinterpret_cast<const X*>(bx);  // gathered
      index_t ld = nr;
      if constexpr (std::is_same_v<X, T>)
        if (in_place) xo = x.data + t0 * x.row_stride + r, ld = x.row_stride;
      const X* wq = Dot ? w + q * ::basisattn::detail::bf16_packed_elems(nr, nq) : w + q * nq;
      detail::chunk_product<T, Dot>(nt, nq, nr, xo, ld, wq, yd + q * nq, ldy, G * r);
    }
  };
  auto no_gather = [](index_t, index_t, C*) {};  // each group gathers inside product
  detail::run_chunks<T>(x.rows, ch, l, ar, y, G * r, no_gather, product, add);
}

/// Dense projection y = x W + b, same chunked structure as the BD one.
template <class T, bool Dot = detail::use_bf16_dot<T>>
void project(cpu, const dense_projection<T>& p, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> y, void* workspace, std::size_t workspace_bytes, const project_options& opt = {}) {
  using C = compute_t<T>;
  detail::chunking ch;
  detail::ws_layout l;
  detail::arena ar(detail::ws_align);
  if (!detail::begin_run<T, Dot>(p, x, y, p.in_dim(), p.out_dim(), workspace, workspace_bytes, opt, ch, l, ar)) return;
  const index_t in = p.in_dim(), out = p.out_dim();
  using X = detail::operand_t<T, Dot>;
  const X* w = detail::weight_operand<T, Dot>(p.weight, in, out, ar);
  constexpr bool in_place = std::is_same_v<X, T>;  // else x is converted chunk by chunk
  const T* bias = p.bias.empty() ? nullptr : p.bias.data();
  auto gather = [&](index_t t0, index_t nt, C* bx) {
    if constexpr (!in_place) {
      for (index_t t = 0; t < nt; ++t) {
        const T* xr = x.data + (t0 + t) * x.row_stride;
        for (index_t j = 0; j < in; ++j) bx[t * in + j] = detail::as_operand<X>(xr[j]);
      }
    } else {
      (void)t0, (void)nt, (void)bx;
    }
  };
  auto add = [&](index_t, index_t nt, C* yd, index_t ldy, C*) {
    if (!bias) return;
    for (index_t t = 0; t < nt; ++t) {
      C* yr = yd + t * ldy;
      for (index_t j = 0; j < out; ++j) yr[j] += ::basisattn::detail::to_compute<C>(bias[j]);
    }
  };
  auto product = [&](index_t t0, index_t nt, C* bx, C* yd, index_t ldy) {
    if constexpr (in_place)
      detail::chunk_product<T, Dot>(nt, out, in, x.data + t0 * x.row_stride, x.row_stride, w, yd, ldy);
    else
      detail::chunk_product<T, Dot>(nt, out, in, bx, in, w, yd, ldy);
  };
  detail::run_chunks<T>(x.rows, ch, l, ar, y, out, gather, product, add);
}

/// Convenience overloads that allocate the workspace.
template <class T, class P>
auto project(cpu c, const P& p, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x, matrix_view<T> y,
             const project_options& opt = {}) -> decltype(bd::workspace_bytes(c, p, x.rows), void()) {
  const std::size_t n = bd::workspace_bytes(c, p, x.rows);
  std::unique_ptr<unsigned char[]> ws(n ? new unsigned char[n] : nullptr);
  project(c, p, x, y, ws.get(), n, opt);
}

namespace detail {
template <class P, class Y>
struct is_projection_io : std::false_type {};
template <class T>
struct is_projection_io<bd_projection<T>, matrix_view<T>> : std::true_type {};
template <class T>
struct is_projection_io<dense_projection<T>, matrix_view<T>> : std::true_type {};
template <class T>
struct is_projection_io<std::variant<dense_projection<T>, bd_projection<T>>, matrix_view<T>> : std::true_type {};
}  // namespace detail

/// Any other argument types (activations of another storage type than the projection's, something
/// that is not a view): one plain error at the caller's line instead of a page of failed deductions.
/// Never selected when y is a matrix_view<T> of the projection's T.
template <class P, class X, class Y, class... Rest, std::enable_if_t<!detail::is_projection_io<P, Y>::value, int> = 0>
void project(cpu, const P&, const X&, const Y&, const Rest&...) {
  static_assert(detail::is_projection_io<P, Y>::value,
                "bd::project(cpu{}, p, x, y, ...): x and y must be matrix_view<const T> and matrix_view<T> of the "
                "projection's storage type T (a bd_projection<Eigen::half> takes and gives Eigen::half "
                "activations: convert float activations to T first).");
}

}  // namespace bd
BASISATTN_END_NAMESPACE
