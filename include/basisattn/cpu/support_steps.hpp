// basisattn/cpu/support_steps.hpp - internal: the steps of a support-basis head on the CPU backend
// (workspace slice layout, the exact part, the polynomial part as streamed linear attention, the
// double-precision rows of the error estimate). The run that chains them, and the algorithm, are in
// <basisattn/cpu/support.hpp>.
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/cpu/attention.hpp>
#include <basisattn/cpu/gemm.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/support/features.hpp>
#include <basisattn/support/options.hpp>
#include <basisattn/support/plan.hpp>
#include <basisattn/support/polynomial.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <type_traits>

BASISATTN_BEGIN_NAMESPACE
namespace support {
namespace detail {

inline constexpr std::size_t ws_align = basisattn::detail::cpu_workspace_align;

/// Byte offsets of one thread's workspace slice.
struct slice_layout {
  index_t blk = 0, r = 0, g = 0, nl = 0;
  std::size_t q = 0, k = 0, v = 0, num = 0, den = 0, m = 0, dpoly = 0;
  std::size_t xg = 0, phi = 0, psi = 0, sk = 0, vx = 0, tmp = 0, st = 0, sc = 0;
  std::size_t s = 0, qg = 0, kg = 0, vg = 0, o = 0, l = 0, mm = 0, coef = 0;
  std::size_t rows = 0, flag = 0, pos = 0, kidx = 0, est = 0, exact = 0, exact_bytes = 0;
  std::size_t slice = 0;
};

template <class C>
slice_layout make_slice_layout(const plan& p, index_t dv) {
  const auto& sh = p.shape;
  slice_layout lay;
  lay.blk = std::min<index_t>(static_cast<index_t>(p.options.block), std::max(sh.n_q, sh.n_kv));
  lay.r = p.max_width;
  lay.g = p.features.max_degree;
  lay.nl = p.levels;
  const index_t b = lay.blk, d = sh.d_qk, r = lay.r, ms = p.features.sketch ? p.features.m : 0;
  basisattn::detail::workspace_carver w = basisattn::detail::workspace_carver::relative(ws_align);
  auto take = [&](std::size_t bytes) { return w.take(bytes); };
  auto c = [&](index_t n) { return take(static_cast<std::size_t>(n) * sizeof(C)); };
  lay.q = c(sh.n_q * d);
  lay.k = c(sh.n_kv * d);
  lay.v = c(sh.n_kv * dv);
  lay.num = c(sh.n_q * dv);
  lay.den = c(sh.n_q);
  lay.m = c(sh.n_q);
  lay.dpoly = c(sh.n_q);
  lay.xg = c(b * d);
  lay.phi = c(b * r);
  lay.psi = c(b * r);
  lay.sk = c(b * ms);
  lay.vx = c(b * (dv + 1));
  lay.tmp = c(b * (dv + 1));
  lay.st = c(lay.nl * r * (dv + 1));
  lay.sc = c(r * (dv + 1));
  lay.s = c(b * b);
  lay.qg = c(b * d);
  lay.kg = c(b * d);
  lay.vg = c(b * dv);
  lay.o = c(b * dv);
  lay.l = c(b);
  lay.mm = c(b);
  lay.coef = c(lay.nl * lay.nl * (lay.g + 1));
  lay.rows = take(static_cast<std::size_t>(sh.n_q) * sizeof(index_t));
  lay.flag = take(static_cast<std::size_t>(sh.n_q));
  lay.pos = take(static_cast<std::size_t>(b) * sizeof(index_t));
  lay.kidx = take(static_cast<std::size_t>(b) * sizeof(index_t));
  lay.est = take(static_cast<std::size_t>(sh.n_kv + dv) * sizeof(double));
  lay.exact_bytes = basisattn::detail::sliced_workspace_bytes(
      basisattn::detail::make_attention_cpu_layout<C>(sh.n_q, sh.n_kv, d, dv).slice, 1,
      basisattn::detail::attention_cpu_traits<C>::align);
  lay.exact = take(lay.exact_bytes);
  lay.slice = w.bytes();
  return lay;
}

/// Threads (and slices) run uses at most.
inline index_t support_threads(const plan& p) {
  return std::max<index_t>(1, std::min<index_t>(basisattn::detail::cpu_threads(), p.shape.h_q));
}

/// State of one head's computation.
template <class C, class T>
struct head_ctx {
  using rmat = basisattn::detail::rm_matrix<C>;
  using rmap = Eigen::Map<rmat>;
  using cmap = cm_map<C>;

  const plan* p = nullptr;
  const slice_layout* lay = nullptr;
  unsigned char* base = nullptr;
  index_t h = 0, hk = 0, nq = 0, nkv = 0, d = 0, dv = 0, off = 0, blk = 0, nl = 0, g = 0;
  bool causal = true;

  template <class U>
  U* at(std::size_t o) const {
    return reinterpret_cast<U*>(base + o);
  }
  rmap Q() const { return rmap(at<C>(lay->q), nq, d); }
  rmap K() const { return rmap(at<C>(lay->k), nkv, d); }
  rmap V() const { return rmap(at<C>(lay->v), nkv, dv); }
  rmap num() const { return rmap(at<C>(lay->num), nq, dv); }
  C* den() const { return at<C>(lay->den); }
  C* m() const { return at<C>(lay->m); }
  C* dpoly() const { return at<C>(lay->dpoly); }
  index_t pos(index_t i) const { return causal ? i + off : std::numeric_limits<index_t>::max(); }
  const C* coef(int bq, int bk) const { return at<C>(lay->coef) + (bq * nl + bk) * (g + 1); }
};

/// x (n x d, column-major) = rows idx[0..n) of src (row-major).
template <class C, class M>
void gather_cm(const M& src, const index_t* idx, index_t n, cm_map<C> x) {
  for (index_t c = 0; c < src.cols(); ++c)
    for (index_t i = 0; i < n; ++i) x(i, c) = src(idx[i], c);
}

/// Exact flash-style update of the accumulators of rows[0..nrows) against keys (ascending global
/// indices; nullptr: all keys 0..nkeys-1), causal mask by position.
template <class C, class T>
void exact_rows(const head_ctx<C, T>& c, const index_t* rows, index_t nrows, const index_t* keys, index_t nkeys) {
  using rmap = typename head_ctx<C, T>::rmap;
  const auto Q = c.Q();
  const auto K = c.K();
  const auto V = c.V();
  auto num = c.num();
  for (index_t r0 = 0; r0 < nrows; r0 += c.blk) {
    const index_t nr = std::min(c.blk, nrows - r0);
    rmap qg(c.template at<C>(c.lay->qg), nr, c.d);
    rmap o(c.template at<C>(c.lay->o), nr, c.dv);
    C* const l = c.template at<C>(c.lay->l);
    C* const mm = c.template at<C>(c.lay->mm);
    index_t pmax = -1;
    for (index_t i = 0; i < nr; ++i) {
      const index_t row = rows[r0 + i];
      qg.row(i) = Q.row(row);
      o.row(i) = num.row(row);
      l[i] = c.den()[row];
      mm[i] = c.m()[row];
      pmax = std::max(pmax, c.pos(row));
    }
    for (index_t k0 = 0; k0 < nkeys; k0 += c.blk) {
      const index_t nk = std::min(c.blk, nkeys - k0);
      const index_t first = keys ? keys[k0] : k0;
      if (c.causal && first > pmax) break;
      rmap kg(c.template at<C>(c.lay->kg), nk, c.d);
      rmap vg(c.template at<C>(c.lay->vg), nk, c.dv);
      rmap s(c.template at<C>(c.lay->s), nr, nk);
      if (keys) {
        for (index_t j = 0; j < nk; ++j) {
          kg.row(j) = K.row(keys[k0 + j]);
          vg.row(j) = V.row(keys[k0 + j]);
        }
        ::basisattn::detail::cpu_gemm<C>(false, true, nr, nk, c.d, C(1), qg.data(), c.d, kg.data(), c.d, C(0), s.data(),
                                         nk);
      } else {
        ::basisattn::detail::cpu_gemm<C>(false, true, nr, nk, c.d, C(1), qg.data(), c.d, K.data() + k0 * c.d, c.d, C(0),
                                         s.data(), nk);
      }
      for (index_t i = 0; i < nr; ++i) {
        index_t visible = nk;
        if (c.causal) {
          const index_t pi = c.pos(rows[r0 + i]);
          visible = keys ? static_cast<index_t>(std::upper_bound(keys + k0, keys + k0 + nk, pi) - (keys + k0))
                         : std::clamp<index_t>(pi - k0 + 1, 0, nk);
        }
        auto row = s.row(i);
        if (visible < nk) row.tail(nk - visible).setZero();
        if (visible == 0) continue;
        auto sv = row.head(visible).array();
        const C m_new = std::max(mm[i], sv.maxCoeff());
        const C alpha = std::exp(mm[i] - m_new);
        sv = (sv - m_new).exp();
        l[i] = alpha * l[i] + sv.sum();
        mm[i] = m_new;
        if (alpha != C(1)) o.row(i) *= alpha;
      }
      const C* vb = keys ? vg.data() : V.data() + k0 * c.dv;
      ::basisattn::detail::cpu_gemm<C>(false, false, nr, c.dv, nk, C(1), s.data(), nk, vb, c.dv, C(1), o.data(), c.dv);
    }
    for (index_t i = 0; i < nr; ++i) {
      const index_t row = rows[r0 + i];
      num.row(row) = o.row(i);
      c.den()[row] = l[i];
      c.m()[row] = mm[i];
    }
  }
}

/// psi[:, :w] = phi[:, :w] scaled per row i and column col by coef(bucket of row i, bk)[degree(col)].
template <class C, class T>
void scale_query_features(const head_ctx<C, T>& c, const index_t* rows, index_t n, int bk, index_t w,
                          const cm_map<C>& phi, cm_map<C> psi) {
  const auto& qb = c.p->q_bucket[static_cast<std::size_t>(c.h)];
  const auto& deg = c.p->features.degree_of;
  for (index_t col = 0; col < w; ++col) {
    const int t = deg[static_cast<std::size_t>(col)];
    for (index_t i = 0; i < n; ++i) psi(i, col) = phi(i, col) * c.coef(qb[static_cast<std::size_t>(rows[i])], bk)[t];
  }
}

/// Add the keys rows[0..n) (all of bucket bk) to the state of bucket bk.
template <class C, class T>
void add_keys(const head_ctx<C, T>& c, const index_t* keys, index_t n, int bk) {
  const index_t w = c.p->key_width[static_cast<std::size_t>(c.h)][static_cast<std::size_t>(bk)];
  if (w == 0 || n == 0) return;
  const auto K = c.K();
  const auto V = c.V();
  cm_map<C> st(c.template at<C>(c.lay->st) + bk * c.lay->r * (c.dv + 1), w, c.dv + 1);
  for (index_t j0 = 0; j0 < n; j0 += c.blk) {
    const index_t nb = std::min(c.blk, n - j0);
    cm_map<C> x(c.template at<C>(c.lay->xg), nb, c.d);
    cm_map<C> vx(c.template at<C>(c.lay->vx), nb, c.dv + 1);
    cm_map<C> phi(c.template at<C>(c.lay->phi), nb, w);
    gather_cm<C>(K, keys + j0, nb, x);
    gather_cm<C>(V, keys + j0, nb, cm_map<C>(vx.data(), nb, c.dv));
    vx.col(c.dv).setOnes();
    compute_features<C>(c.p->features, w, x, phi, c.template at<C>(c.lay->sk));
    // st += phi^T vx, as its row-major transpose: st^T += vx^T phi (column-major maps, ld = rows).
    ::basisattn::detail::cpu_gemm<C>(false, true, c.dv + 1, w, nb, C(1), vx.data(), nb, phi.data(), nb, C(1), st.data(),
                                     w);
  }
}

/// Polynomial part, non-causal.
template <class C, class T>
void poly_noncausal(const head_ctx<C, T>& c) {
  const auto& pl = *c.p;
  const auto hu = static_cast<std::size_t>(c.h), hku = static_cast<std::size_t>(c.hk);
  const index_t r = c.lay->r;
  for (int bk = 0; bk < c.nl; ++bk) {
    const auto& keys = pl.k_rows[hku][static_cast<std::size_t>(bk)];
    const index_t w = pl.key_width[hu][static_cast<std::size_t>(bk)];
    if (w == 0) continue;
    cm_map<C>(c.template at<C>(c.lay->st) + bk * r * (c.dv + 1), w, c.dv + 1).setZero();
    add_keys(c, keys.data(), static_cast<index_t>(keys.size()), bk);
  }
  const auto Q = c.Q();
  auto num = c.num();
  for (int bq = 0; bq < c.nl; ++bq) {
    const auto& rows = pl.q_rows[hu][static_cast<std::size_t>(bq)];
    index_t w = 0;
    for (int bk = 0; bk < c.nl; ++bk) w = std::max(w, pl.pairs[hu][static_cast<std::size_t>(bq * c.nl + bk)].width);
    if (w == 0 || rows.empty()) continue;
    // Combined state: sum_bk diag(coef_{bq,bk}) S_bk.
    cm_map<C> sc(c.template at<C>(c.lay->sc), w, c.dv + 1);
    sc.setZero();
    for (int bk = 0; bk < c.nl; ++bk) {
      const index_t pw = pl.pairs[hu][static_cast<std::size_t>(bq * c.nl + bk)].width;
      if (pw == 0) continue;
      cm_map<C> st(c.template at<C>(c.lay->st) + bk * r * (c.dv + 1), pl.key_width[hu][static_cast<std::size_t>(bk)],
                   c.dv + 1);
      const C* cf = c.coef(bq, bk);
      for (index_t col = 0; col < pw; ++col)
        sc.row(col) += cf[pl.features.degree_of[static_cast<std::size_t>(col)]] * st.row(col);
    }
    const index_t n = static_cast<index_t>(rows.size());
    for (index_t i0 = 0; i0 < n; i0 += c.blk) {
      const index_t nb = std::min(c.blk, n - i0);
      cm_map<C> x(c.template at<C>(c.lay->xg), nb, c.d);
      cm_map<C> phi(c.template at<C>(c.lay->phi), nb, w);
      cm_map<C> out(c.template at<C>(c.lay->tmp), nb, c.dv + 1);
      gather_cm<C>(Q, rows.data() + i0, nb, x);
      compute_features<C>(pl.features, w, x, phi, c.template at<C>(c.lay->sk));
      // out = phi sc, as its row-major transpose: out^T = sc^T phi^T (column-major maps, ld = rows).
      ::basisattn::detail::cpu_gemm<C>(false, false, c.dv + 1, nb, w, C(1), sc.data(), w, phi.data(), nb, C(0),
                                       out.data(), nb);
      for (index_t i = 0; i < nb; ++i) {
        const index_t row = rows[static_cast<std::size_t>(i0 + i)];
        num.row(row) = out.row(i).head(c.dv);
        c.dpoly()[row] = out(i, c.dv);
      }
    }
  }
}

/// Polynomial part, causal (block lower-triangular).
template <class C, class T>
void poly_causal(const head_ctx<C, T>& c) {
  using rmap = typename head_ctx<C, T>::rmap;
  const auto& pl = *c.p;
  const auto hu = static_cast<std::size_t>(c.h), hku = static_cast<std::size_t>(c.hk);
  const auto& qb = pl.q_bucket[hu];
  const auto& kb = pl.k_bucket[hku];
  const index_t r = c.lay->r, hw = pl.head_width[hu];
  if (hw == 0) return;
  for (int bk = 0; bk < c.nl; ++bk)
    cm_map<C>(c.template at<C>(c.lay->st) + bk * r * (c.dv + 1), pl.key_width[hu][static_cast<std::size_t>(bk)],
              c.dv + 1)
        .setZero();
  const auto Q = c.Q();
  const auto K = c.K();
  const auto V = c.V();
  auto num = c.num();
  index_t* const sel = c.template at<index_t>(c.lay->pos);
  index_t* const kidx = c.template at<index_t>(c.lay->kidx);  // per block: the keys of one bucket
  index_t seen = 0;                                           // keys already in the states
  for (index_t k0 = 0; k0 < c.nkv; k0 += c.blk) {
    const index_t k1 = std::min(c.nkv, k0 + c.blk), nk = k1 - k0;
    const index_t i0 = std::max<index_t>(0, k0 - c.off), i1 = std::min<index_t>(c.nq, k1 - c.off);
    index_t ni = 0;
    for (index_t i = i0; i < i1; ++i)
      if (qb[static_cast<std::size_t>(i)] < c.nl) sel[ni++] = i;
    if (ni > 0) {
      cm_map<C> tmp(c.template at<C>(c.lay->tmp), ni, c.dv + 1);
      tmp.setZero();
      if (seen > 0) {
        cm_map<C> x(c.template at<C>(c.lay->xg), ni, c.d);
        cm_map<C> phi(c.template at<C>(c.lay->phi), ni, hw);
        gather_cm<C>(Q, sel, ni, x);
        compute_features<C>(pl.features, hw, x, phi, c.template at<C>(c.lay->sk));
        for (int bk = 0; bk < c.nl; ++bk) {
          const index_t w = pl.key_width[hu][static_cast<std::size_t>(bk)];
          if (w == 0) continue;
          cm_map<C> psi(c.template at<C>(c.lay->psi), ni, w);
          scale_query_features(c, sel, ni, bk, w, phi, psi);
          cm_map<C> st(c.template at<C>(c.lay->st) + bk * r * (c.dv + 1), w, c.dv + 1);
          // tmp += psi st, as its row-major transpose (column-major maps, ld = rows).
          ::basisattn::detail::cpu_gemm<C>(false, false, c.dv + 1, ni, w, C(1), st.data(), w, psi.data(), ni, C(1),
                                           tmp.data(), ni);
        }
      }
      // Inside the block: exact products P(s_ij) for visible non-top keys.
      rmap qg(c.template at<C>(c.lay->qg), ni, c.d);
      for (index_t i = 0; i < ni; ++i) qg.row(i) = Q.row(sel[i]);
      rmap s(c.template at<C>(c.lay->s), ni, nk);
      ::basisattn::detail::cpu_gemm<C>(false, true, ni, nk, c.d, C(1), qg.data(), c.d, K.data() + k0 * c.d, c.d, C(0),
                                       s.data(), nk);
      for (index_t i = 0; i < ni; ++i) {
        const index_t pi = sel[i] + c.off;
        const int bq = qb[static_cast<std::size_t>(sel[i])];
        for (index_t j = 0; j < nk; ++j) {
          const int bk = kb[static_cast<std::size_t>(k0 + j)];
          s(i, j) = (k0 + j <= pi && bk < c.nl) ? horner<C>(c.coef(bq, bk), static_cast<int>(c.g), s(i, j)) : C(0);
        }
      }
      // tmp[:, :dv] += s V_block, as its row-major transpose: tmp^T[:dv] += V_block^T s^T.
      ::basisattn::detail::cpu_gemm<C>(true, true, c.dv, ni, nk, C(1), V.data() + k0 * c.dv, c.dv, s.data(), nk, C(1),
                                       tmp.data(), ni);
      tmp.col(c.dv) += s.rowwise().sum();
      for (index_t i = 0; i < ni; ++i) {
        num.row(sel[i]) = tmp.row(i).head(c.dv);
        c.dpoly()[sel[i]] = tmp(i, c.dv);
      }
    }
    // Keys of this block enter the states.
    for (int bk = 0; bk < c.nl; ++bk) {
      if (pl.key_width[hu][static_cast<std::size_t>(bk)] == 0) continue;
      index_t n = 0;
      for (index_t j = k0; j < k1; ++j)
        if (kb[static_cast<std::size_t>(j)] == bk) kidx[n++] = j;
      add_keys(c, kidx, n, bk);
      seen += n;
    }
  }
}

/// Exact output row i in double from the storage values (the error estimate).
template <class T>
void exact_row_double(const plan& pl, const tensor3_view<const T>& q, const tensor3_view<const T>& k,
                      const tensor3_view<const T>& v, index_t h, index_t i, double* s, double* y) {
  const auto& sh = pl.shape;
  const index_t hk = h / sh.group, dv = v.extent[2];
  const index_t visible = pl.options.causal ? i + sh.causal_offset + 1 : sh.n_kv;
  auto ld = [](const T& x) { return static_cast<double>(basisattn::detail::to_compute<compute_t<T>>(x)); };
  double mx = -INFINITY;
  for (index_t j = 0; j < visible; ++j) {
    double dot = 0;
    for (index_t e = 0; e < sh.d_qk; ++e) dot += ld(q(i, h, e)) * ld(k(j, hk, e));
    s[j] = sh.scale * dot;
    mx = std::max(mx, s[j]);
  }
  double l = 0;
  for (index_t e = 0; e < dv; ++e) y[e] = 0;
  for (index_t j = 0; j < visible; ++j) {
    const double w = std::exp(s[j] - mx);
    l += w;
    for (index_t e = 0; e < dv; ++e) y[e] += w * ld(v(j, hk, e));
  }
  for (index_t e = 0; e < dv; ++e) y[e] /= l;
}

}  // namespace detail
}  // namespace support
BASISATTN_END_NAMESPACE
