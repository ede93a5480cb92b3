// basisattn/cpu/layers.hpp - CPU forward passes of prepared attention layers (dense or BD).
//
//   bd::workspace_bytes(cpu{}, layer, tokens)                workspace for the current thread count
//   bd::forward(cpu{}, layer, x, out, workspace, bytes, options)   allocates nothing (Eigen's packing aside)
//   bd::forward(cpu{}, layer, x, out, options)                 convenience: allocates the workspace
//     layer: bd::mha_layer<T> or bd::mla_layer<T> (bd/layers.hpp); x: tokens x d_model;
//     out: tokens x d_model (written, not accumulated). Token t sits at position
//     options.position_offset + t (RoPE) and attends causally or not as the layer's config says.
//   The pass is: projections (bd::project), RoPE where configured, exact blocked attention
//   (basisattn::attention), output projection. Intermediates are stored in T; the dense and the
//   BD layer run the same code except for the K/V projections, so their outputs differ only by
//   rounding. The intermediates live in the workspace (each region 64-byte aligned; the scratch of
//   the projections and of the attention is one region, reused as they run one after another).
#pragma once

#include <basisattn/cpu/attention.hpp>
#include <basisattn/attention/rope.hpp>
#include <basisattn/bd/layers.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/cpu/projection.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <type_traits>
#include <variant>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

/// Workspace bytes project(cpu{}, p, x, y, workspace, bytes) needs for `tokens` rows.
template <class T>
std::size_t workspace_bytes(cpu c, const any_projection<T>& p, index_t tokens) {
  return std::visit([&](const auto& q) { return bd::workspace_bytes(c, q, tokens); }, p);
}

/// Run a dense or BD projection in caller-owned workspace (allocates nothing).
template <class T>
void project(cpu c, const any_projection<T>& p, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> y, void* workspace, std::size_t workspace_bytes, const project_options& opt = {}) {
  std::visit([&](const auto& q) { project(c, q, x, y, workspace, workspace_bytes, opt); }, p);
}

/// Run a dense or BD projection, allocating its workspace.
template <class T>
void project(cpu c, const any_projection<T>& p, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> y, const project_options& opt = {}) {
  std::visit([&](const auto& q) { project(c, q, x, y, opt); }, p);
}

namespace detail {
template <class T>
tensor3_view<const T> ct(const tensor3_view<T>& t) {
  return t;
}

/// The carver of a forward pass: 64-byte regions, counted (base null) or carved within `limit` bytes.
inline ::basisattn::detail::workspace_carver cpu_forward_carver(void* base, std::size_t limit) {
  return ::basisattn::detail::workspace_carver(::basisattn::detail::cpu_workspace_align, base, limit);
}

template <class T>
std::size_t cpu_attention_scratch(index_t n, index_t heads, index_t d_qk, index_t d_v, bool causal) {
  if (n == 0) return 0;
  attention_options ao;
  ao.causal = causal;
  return ::basisattn::detail::attention_cpu_workspace_bytes("bd::forward", n, n, heads, d_qk, d_v, dtype_of_v<T>, ao);
}

/// The forward pass's buffers (bd::detail::carve_forward) with the largest scratch of its projections
/// and its attention.
template <class T>
forward_buffers<T> carve_mha_cpu(const mha_layer<T>& L, index_t n, void* base, std::size_t limit) {
  const auto& c = L.config;
  std::size_t s = cpu_attention_scratch<T>(n, c.n_heads, c.head_dim, c.head_dim, c.causal);
  for (std::size_t p : {bd::workspace_bytes(cpu{}, L.q, n), bd::workspace_bytes(cpu{}, L.k, n),
                        bd::workspace_bytes(cpu{}, L.v, n), bd::workspace_bytes(cpu{}, L.o, n)})
    s = std::max(s, p);
  return carve_forward<T>(c, n, s, cpu_forward_carver(base, limit));
}

template <class T>
forward_buffers<T> carve_mla_cpu(const mla_layer<T>& L, index_t n, void* base, std::size_t limit) {
  const auto& c = L.config;
  std::size_t s = cpu_attention_scratch<T>(n, c.n_heads, c.qk_nope_dim + c.qk_rope_dim, c.v_head_dim, c.causal);
  for (std::size_t p : {bd::workspace_bytes(cpu{}, L.q, n), bd::workspace_bytes(cpu{}, L.kv_a, n),
                        bd::workspace_bytes(cpu{}, L.k_up, n), bd::workspace_bytes(cpu{}, L.v_up, n),
                        bd::workspace_bytes(cpu{}, L.o, n)})
    s = std::max(s, p);
  return carve_forward<T>(c, n, s, cpu_forward_carver(base, limit));
}
}  // namespace detail

/// Workspace bytes forward(cpu{}, L, x, out, workspace, bytes, ...) needs for `tokens` tokens with the
/// current thread count: the intermediates (q, k, v, attention output; MLA also the latent and the
/// assembled keys) in T, plus the largest scratch of its projections and its attention.
template <class T>
std::size_t workspace_bytes(cpu, const mha_layer<T>& L, index_t tokens) {
  BASISATTN_REQUIRE(tokens >= 0, invalid_argument, "workspace_bytes(mha_layer): negative token count ", tokens);
  return detail::carve_mha_cpu(L, tokens, nullptr, 0).total;
}
template <class T>
std::size_t workspace_bytes(cpu, const mla_layer<T>& L, index_t tokens) {
  BASISATTN_REQUIRE(tokens >= 0, invalid_argument, "workspace_bytes(mla_layer): negative token count ", tokens);
  return detail::carve_mla_cpu(L, tokens, nullptr, 0).total;
}

/// Forward pass of an MHA/GQA/MQA layer in caller-owned workspace (at least workspace_bytes(cpu{}, L,
/// x.rows) bytes, any alignment); allocates nothing (Eigen's GEMM packing aside).
template <class T>
void forward(cpu c, const mha_layer<T>& L, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> out, void* workspace, std::size_t workspace_bytes, const forward_options& opt = {}) {
  const auto& cfg = L.config;
  detail::check_layer_io(x, out, cfg.d_model);
  const index_t n = x.rows, H = cfg.n_heads, Hkv = cfg.n_kv_heads, d = cfg.head_dim;
  detail::check_forward_workspace("bd::forward", workspace, workspace_bytes,
                                  detail::carve_mha_cpu(L, n, nullptr, 0).total);
  const auto b = detail::carve_mha_cpu(L, n, workspace, workspace_bytes);
  void* const s = b.scratch;
  const std::size_t sb = b.scratch_bytes;
  project_options po;
  po.check_finite = opt.check_finite;
  const matrix_view<T> q(b.q, n, H * d), k(b.k, n, Hkv * d), v(b.v, n, Hkv * d), a(b.a, n, H * d);
  project(c, L.q, x, q, s, sb, po);
  po.check_finite = false;
  project(c, L.k, x, k, s, sb, po);
  project(c, L.v, x, v, s, sb, po);
  auto tq = tensor3_view<T>::from_matrix(q, H);
  auto tk = tensor3_view<T>::from_matrix(k, Hkv);
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
  attention(c, detail::ct(tq), detail::ct(tk), detail::ct(tensor3_view<T>::from_matrix(v, Hkv)),
            tensor3_view<T>::from_matrix(a, H), ao, s, sb);
  project(c, L.o, matrix_view<const T>(a), out, s, sb, po);
}

/// Forward pass of an MLA layer in caller-owned workspace (as above).
template <class T>
void forward(cpu c, const mla_layer<T>& L, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x,
             matrix_view<T> out, void* workspace, std::size_t workspace_bytes, const forward_options& opt = {}) {
  using C = compute_t<T>;
  const auto& cfg = L.config;
  detail::check_layer_io(x, out, cfg.d_model);
  const index_t n = x.rows, H = cfg.n_heads, Lr = cfg.kv_lora_rank, dn = cfg.qk_nope_dim, dr = cfg.qk_rope_dim,
                dv = cfg.v_head_dim, qd = dn + dr;
  detail::check_forward_workspace("bd::forward", workspace, workspace_bytes,
                                  detail::carve_mla_cpu(L, n, nullptr, 0).total);
  const auto b = detail::carve_mla_cpu(L, n, workspace, workspace_bytes);
  void* const s = b.scratch;
  const std::size_t sb = b.scratch_bytes;
  project_options po;
  po.check_finite = opt.check_finite;
  const matrix_view<T> q(b.q, n, H * qd), kva(b.kva, n, Lr + dr);
  project(c, L.q, x, q, s, sb, po);
  po.check_finite = false;
  project(c, L.kv_a, x, kva, s, sb, po);
  // RMSNorm of the latent, in place (compute type).
  for (index_t t = 0; t < n; ++t) {
    T* row = b.kva + t * (Lr + dr);
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
    apply_rope(tensor3_view<T>(b.q + dn, n, H, dr, H * qd, qd, 1), rp);
    apply_rope(tensor3_view<T>(b.kva + Lr, n, 1, dr, Lr + dr, dr, 1), rp);
  }
  const matrix_view<const T> latent(b.kva, n, Lr, Lr + dr);
  const matrix_view<T> knope(b.knope, n, H * dn), v(b.v, n, H * dv), kfull(b.k, n, H * qd), a(b.a, n, H * dv);
  project(c, L.k_up, latent, knope, s, sb, po);
  project(c, L.v_up, latent, v, s, sb, po);
  if (dr > 0)  // the keys [k_nope, k_rope] per head (without rope, b.k is k_nope itself)
    for (index_t t = 0; t < n; ++t)
      for (index_t h = 0; h < H; ++h) {
        T* dst = b.k + t * H * qd + h * qd;
        std::copy(b.knope + t * H * dn + h * dn, b.knope + t * H * dn + (h + 1) * dn, dst);
        std::copy(b.kva + t * (Lr + dr) + Lr, b.kva + (t + 1) * (Lr + dr), dst + dn);
      }
  attention_options ao;
  ao.causal = cfg.causal;
  ao.scale = cfg.scale > 0 ? cfg.scale : 1.0 / std::sqrt(static_cast<double>(qd));
  ao.check_finite = false;
  attention(c, detail::ct(tensor3_view<T>::from_matrix(q, H)), detail::ct(tensor3_view<T>::from_matrix(kfull, H)),
            detail::ct(tensor3_view<T>::from_matrix(v, H)), tensor3_view<T>::from_matrix(a, H), ao, s, sb);
  project(c, L.o, matrix_view<const T>(a), out, s, sb, po);
}

/// Forward pass of an MHA/GQA/MQA or MLA layer, allocating its workspace (the reference layer: one
/// call, no sizes to manage).
template <class T, class Layer,
          class = std::enable_if_t<std::is_same_v<Layer, mha_layer<T>> || std::is_same_v<Layer, mla_layer<T>>>>
void forward(cpu c, const Layer& L, matrix_view<const ::basisattn::detail::nondeduced_t<T>> x, matrix_view<T> out,
             const forward_options& opt = {}) {
  const std::size_t bytes = bd::workspace_bytes(c, L, x.rows);
  std::unique_ptr<unsigned char[]> ws(bytes ? new unsigned char[bytes] : nullptr);
  forward(c, L, x, out, ws.get(), bytes, opt);
}

namespace detail {
template <class L, class Y>
struct is_forward_io : std::false_type {};
template <class T>
struct is_forward_io<mha_layer<T>, matrix_view<T>> : std::true_type {};
template <class T>
struct is_forward_io<mla_layer<T>, matrix_view<T>> : std::true_type {};
}  // namespace detail

/// Any other argument types (activations of another storage type than the layer's, something that is
/// not a layer or a view): one plain error at the caller's line instead of a page of failed
/// deductions. Never selected when y is a matrix_view<T> of the layer's T.
template <class L, class X, class Y, class... Rest, std::enable_if_t<!detail::is_forward_io<L, Y>::value, int> = 0>
void forward(cpu, const L&, const X&, const Y&, const Rest&...) {
  static_assert(detail::is_forward_io<L, Y>::value,
                "bd::forward(cpu{}, layer, x, y, ...): layer must be a bd::mha_layer<T> or bd::mla_layer<T>, and x, y "
                "matrix_view<const T> and matrix_view<T> of the layer's storage type T (an mha_layer<Eigen::half> "
                "takes and gives Eigen::half activations: convert float activations to T first).");
}

}  // namespace bd
BASISATTN_END_NAMESPACE
