// basisattn/cpu/layers.hpp - CPU forward passes of prepared attention layers (dense or BD).
//
//   bd::forward(cpu{}, layer, x, out, options)
//     layer: bd::mha_layer<T> or bd::mla_layer<T> (bd/layers.hpp); x: tokens x d_model;
//     out: tokens x d_model (written, not accumulated). Token t sits at position
//     options.position_offset + t (RoPE) and attends causally or not as the layer's config says.
//   The pass is: projections (bd::project), RoPE where configured, exact blocked attention
//   (basisattn::attention), output projection. Intermediates are stored in T; the dense and the
//   BD layer run the same code except for the K/V projections, so their outputs differ only by
//   rounding. It allocates its intermediates (this is the reference layer, not a serving kernel).
#pragma once

#include <basisattn/cpu/attention.hpp>
#include <basisattn/attention/rope.hpp>
#include <basisattn/bd/layers.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/cpu/projection.hpp>

#include <cmath>
#include <variant>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

/// Run a dense or BD projection.
template <class T>
void project(cpu c, const any_projection<T>& p, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> y, const project_options& opt = {}) {
  std::visit([&](const auto& q) { project(c, q, x, y, opt); }, p);
}

namespace detail {
template <class T>
matrix_view<const T> cview(const matrix<T>& m) {
  return m.view();
}
template <class T>
tensor3_view<const T> ct(const tensor3_view<T>& t) {
  return t;
}
}  // namespace detail

/// Forward pass of an MHA/GQA/MQA layer.
template <class T>
void forward(cpu c, const mha_layer<T>& L, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> out, const forward_options& opt = {}) {
  const auto& cfg = L.config;
  detail::check_layer_io(x, out, cfg.d_model);
  const index_t n = x.rows, H = cfg.n_heads, Hkv = cfg.n_kv_heads, d = cfg.head_dim;
  project_options po;
  po.check_finite = opt.check_finite;
  matrix<T> q(n, H * d), k(n, Hkv * d), v(n, Hkv * d), a(n, H * d);
  project(c, L.q, x, q.view(), po);
  po.check_finite = false;
  project(c, L.k, x, k.view(), po);
  project(c, L.v, x, v.view(), po);
  auto tq = tensor3_view<T>::from_matrix(q.view(), H);
  auto tk = tensor3_view<T>::from_matrix(k.view(), Hkv);
  if (cfg.use_rope) {
    rope_params rp = cfg.rope;
    rp.position_offset += opt.position_offset;
    apply_rope(tq, rp);
    apply_rope(tk, rp);
  }
  attention_options ao;
  ao.causal = cfg.causal;
  ao.scale = cfg.scale;
  ao.check_finite = false;
  attention(c, detail::ct(tq), detail::ct(tk), detail::ct(tensor3_view<T>::from_matrix(v.view(), Hkv)),
            tensor3_view<T>::from_matrix(a.view(), H), ao);
  project(c, L.o, detail::cview(a), out, po);
}

/// Forward pass of an MLA layer.
template <class T>
void forward(cpu c, const mla_layer<T>& L, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> out, const forward_options& opt = {}) {
  using C = compute_t<T>;
  const auto& cfg = L.config;
  detail::check_layer_io(x, out, cfg.d_model);
  const index_t n = x.rows, H = cfg.n_heads, Lr = cfg.kv_lora_rank, dn = cfg.qk_nope_dim, dr = cfg.qk_rope_dim,
                dv = cfg.v_head_dim, qd = dn + dr;
  project_options po;
  po.check_finite = opt.check_finite;
  matrix<T> q(n, H * qd), kva(n, Lr + dr);
  project(c, L.q, x, q.view(), po);
  po.check_finite = false;
  project(c, L.kv_a, x, kva.view(), po);
  // RMSNorm of the latent, in place (compute type).
  for (index_t t = 0; t < n; ++t) {
    T* row = kva.data() + t * (Lr + dr);
    C ss = 0;
    for (index_t j = 0; j < Lr; ++j) {
      const C z = ::basisattn::detail::to_compute<C>(row[j]);
      ss += z * z;
    }
    const C inv = C(1) / std::sqrt(ss / C(Lr) + C(cfg.rms_eps));
    for (index_t j = 0; j < Lr; ++j)
      row[j] = ::basisattn::detail::from_compute<T>(
          ::basisattn::detail::to_compute<C>(row[j]) * inv *
          ::basisattn::detail::to_compute<C>(L.kv_a_norm[static_cast<std::size_t>(j)]));
  }
  rope_params rp = cfg.rope;
  rp.position_offset += opt.position_offset;
  if (dr > 0) {
    apply_rope(tensor3_view<T>(q.data() + dn, n, H, dr, H * qd, qd, 1), rp);
    apply_rope(tensor3_view<T>(kva.data() + Lr, n, 1, dr, Lr + dr, dr, 1), rp);
  }
  const matrix_view<const T> latent(kva.data(), n, Lr, Lr + dr);
  matrix<T> knope(n, H * dn), v(n, H * dv), kfull(n, H * qd), a(n, H * dv);
  project(c, L.k_up, latent, knope.view(), po);
  project(c, L.v_up, latent, v.view(), po);
  for (index_t t = 0; t < n; ++t)
    for (index_t h = 0; h < H; ++h) {
      T* dst = kfull.data() + t * H * qd + h * qd;
      std::copy(knope.data() + t * H * dn + h * dn, knope.data() + t * H * dn + (h + 1) * dn, dst);
      std::copy(kva.data() + t * (Lr + dr) + Lr, kva.data() + (t + 1) * (Lr + dr), dst + dn);
    }
  attention_options ao;
  ao.causal = cfg.causal;
  ao.scale = cfg.scale > 0 ? cfg.scale : 1.0 / std::sqrt(static_cast<double>(qd));
  ao.check_finite = false;
  attention(c, detail::ct(tensor3_view<T>::from_matrix(q.view(), H)),
            detail::ct(tensor3_view<T>::from_matrix(kfull.view(), H)),
            detail::ct(tensor3_view<T>::from_matrix(v.view(), H)), tensor3_view<T>::from_matrix(a.view(), H), ao);
  project(c, L.o, detail::cview(a), out, po);
}

}  // namespace bd
BASISATTN_END_NAMESPACE
