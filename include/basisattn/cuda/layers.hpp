// basisattn/cuda/layers.hpp - CUDA forward passes of prepared attention layers (dense or BD):
// MHA / GQA / MQA and MLA (DeepSeek-V2 layout).
//
// Host-side header (g++ compiles it). Programs using it link basisattn::cuda and include
// <basisattn/cuda/kernels.cuh> in exactly one .cu file (see <basisattn/cuda/kernel_launch.hpp>).
//
// Upload once, run many times:
//   auto dl = bd::upload(ctx, layer);         layer: bd::mha_layer<T> or bd::mla_layer<T> prepared on the
//                                             host (<basisattn/bd/layers.hpp>, T = float, Eigen::half,
//                                             Eigen::bfloat16); gives a bd::device_mha_layer<T> /
//                                             bd::device_mla_layer<T> (move-only) holding every
//                                             projection (dense or BD: bd::device_any_projection<T>),
//                                             its bias and the MLA latent RMSNorm weights. Validates
//                                             the layer against its config (errc::shape_mismatch),
//                                             RoPE settings (errc::invalid_argument) and the attention
//                                             kernel's head-dim limit of 256 (errc::unsupported).
//   bd::workspace_bytes(ctx, dl, tokens, popt = {})
//                                             device bytes forward() needs for `tokens` tokens
//                                             (intermediates + projection scratch; any alignment of
//                                             the workspace pointer is accepted)
//   bd::forward(ctx, dl, x, y, workspace, workspace_bytes, opt = {}, popt = {})
//       x: tokens x d_model, y: tokens x d_model, device memory, rows contiguous, any row strides;
//       y is written, not accumulated. opt: bd::forward_options (<basisattn/cpu/layers.hpp>): token t
//       sits at position opt.position_offset + t (RoPE); opt.check_finite is ignored (the data are
//       on the device). popt: bd::cuda_project_options used by every projection (epilogue method,
//       TF32 for fp32 storage). Enqueued on ctx's stream, returns without waiting, allocates
//       nothing: every intermediate lives in the caller's workspace.
//   Lower-level, also public:
//   bd::upload(ctx, const any_projection<T>&) -> device_any_projection<T>, and
//   bd::workspace_bytes / bd::project on a device_any_projection<T> (dispatch on the variant).
//
// Semantics: exactly those of bd::forward(cpu{}, layer, x, y, opt) (<basisattn/cpu/layers.hpp>), step
// for step, every intermediate stored in T:
//   MHA/GQA/MQA: q = x Wq + bq, k, v likewise (dense or BD); RoPE on q and k when config.use_rope
//     (config.rope's style/theta, position config.rope.position_offset + opt.position_offset + t);
//     exact attention (config.causal, config.scale; 0 = 1/sqrt(head_dim)); y = a Wo + bo.
//   MLA: q = x Wq; kva = x Wkv_a = [latent | shared rope key]; RMSNorm of the latent (fp32, weights
//     kv_a_norm, config.rms_eps); RoPE on the rope slice of every q head and on the shared rope key;
//     k_nope = latent K_up, v = latent V_up (dense or BD, reading the latent in place: row stride
//     L + rope); k = [k_nope_h | rope key] per head (the rope key shared by all heads); exact
//     attention (scale 0 = 1/sqrt(qk_nope + qk_rope)); y = a Wo.
// Arithmetic: fp32 accumulation everywhere (cuBLAS / cuBLASLt GEMMs, the attention kernel, RMSNorm),
// RoPE in double as on the CPU; each intermediate rounded once to T. The GPU and CPU layers hence
// differ by summation order only (a few units of roundoff after the chain of roundings).
//
// Workspace layout (each piece 256-byte aligned, in this order): MHA q, k, v, attention output,
// projection scratch; MLA q, kva, k_nope, k (only when qk_rope > 0), v, attention output, projection
// scratch. The projection scratch is the largest workspace_bytes of the layer's
// projections (they run one after another on the stream and share it).
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/attention/rope.hpp>
#include <basisattn/bd/layers.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/cuda/attention.hpp>
#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/kernel_launch.hpp>
#include <basisattn/cuda/projection.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <variant>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

// ------------------------------------------------------------------------------------------------
// Dense-or-BD projections on the device

/// A projection on the device that is either dense or BD (the device twin of any_projection<T>).
template <class T>
using device_any_projection = std::variant<device_dense_projection<T>, device_bd_projection<T>>;

/// Copy a host dense-or-BD projection to the device (waits for the copies).
template <class T>
device_any_projection<T> upload(const cuda_context& ctx, const any_projection<T>& p) {
  if (const auto* b = std::get_if<bd_projection<T>>(&p)) return device_any_projection<T>(upload(ctx, *b));
  return device_any_projection<T>(upload(ctx, std::get<dense_projection<T>>(p)));
}

/// Device workspace bytes project(ctx, p, ...) needs for `tokens` rows.
template <class T>
std::size_t workspace_bytes(const cuda_context& ctx, const device_any_projection<T>& p, index_t tokens,
                            const cuda_project_options& opt = {}) {
  return std::visit([&](const auto& q) { return bd::workspace_bytes(ctx, q, tokens, opt); }, p);
}

/// Run a dense or BD projection on the GPU (see <basisattn/cuda/projection.hpp>); returns the method
/// that ran.
template <class T>
cuda_epilogue project(const cuda_context& ctx, const device_any_projection<T>& p,
                      matrix_view<const ::basisattn::detail::nondeduced_t<T>> x, matrix_view<T> y, void* workspace,
                      std::size_t workspace_bytes, const cuda_project_options& opt = {}) {
  return std::visit([&](const auto& q) { return project(ctx, q, x, y, workspace, workspace_bytes, opt); }, p);
}

template <class T>
bool is_bd(const device_any_projection<T>& p) {
  return std::holds_alternative<device_bd_projection<T>>(p);
}
template <class T>
std::size_t bytes_of(const device_any_projection<T>& p) {
  return std::visit([](const auto& q) { return q.bytes(); }, p);
}

// ------------------------------------------------------------------------------------------------
// Device layers

/// An mha_layer<T> on the device (see bd::upload).
template <class T>
struct device_mha_layer {
  mha_config config;
  device_dense_projection<T> q;  ///< d_model -> n_heads head_dim
  device_any_projection<T> k;    ///< d_model -> n_kv_heads head_dim
  device_any_projection<T> v;    ///< d_model -> n_kv_heads head_dim
  device_dense_projection<T> o;  ///< n_heads head_dim -> d_model
  std::size_t bytes() const { return q.bytes() + bytes_of(k) + bytes_of(v) + o.bytes(); }
};

/// An mla_layer<T> on the device (see bd::upload).
template <class T>
struct device_mla_layer {
  mla_config config;
  device_dense_projection<T> q;     ///< d_model -> H (nope + rope)
  device_dense_projection<T> kv_a;  ///< d_model -> L + rope
  device_buffer<T> kv_a_norm;       ///< L RMSNorm weights
  device_any_projection<T> k_up;    ///< latent -> H nope
  device_any_projection<T> v_up;    ///< latent -> H v
  device_dense_projection<T> o;     ///< H v -> d_model
  std::size_t bytes() const {
    return q.bytes() + kv_a.bytes() + kv_a_norm.bytes() + bytes_of(k_up) + bytes_of(v_up) + o.bytes();
  }
};

namespace detail {

template <class T>
index_t in_dim_of(const any_projection<T>& p) {
  if (const auto* b = std::get_if<bd_projection<T>>(&p)) return b->in_dim;
  return std::get<dense_projection<T>>(p).in_dim();
}
template <class T>
index_t out_dim_of(const any_projection<T>& p) {
  if (const auto* b = std::get_if<bd_projection<T>>(&p)) return b->heads * b->rank;
  return std::get<dense_projection<T>>(p).out_dim();
}
inline void expect_projection(const char* what, const char* name, index_t in, index_t out, index_t want_in,
                              index_t want_out) {
  BASISATTN_REQUIRE(in == want_in && out == want_out, shape_mismatch, what, ": projection ", name, " maps ", in, " -> ",
                    out, " channels, the config says ", want_in, " -> ", want_out);
}
inline void check_rope_params(const char* what, const rope_params& rp, index_t d) {
  BASISATTN_REQUIRE(d % 2 == 0, invalid_argument, what, ": RoPE needs an even rotated dimension, got ", d);
  BASISATTN_REQUIRE(std::isfinite(rp.theta) && rp.theta > 0, invalid_argument, what, ": rope.theta = ", rp.theta,
                    " must be finite and > 0");
}

/// The workspace carver of a forward pass: 256-byte regions, counted (base null) or carved.
inline ::basisattn::detail::workspace_carver forward_carver(void* base) {
  return ::basisattn::detail::workspace_carver(::basisattn::detail::cuda_workspace_align, base);
}

template <class T>
void check_forward_io(const char* what, const matrix_view<const T>& x, const matrix_view<T>& y, index_t d_model) {
  ::basisattn::bd::detail::check_layer_io(x, y, d_model);
  BASISATTN_REQUIRE(x.data && y.data, invalid_argument, what, ": null x or y data");
  BASISATTN_REQUIRE(x.rows_contiguous() && y.rows_contiguous(), invalid_argument, what,
                    ": x and y rows must be contiguous (col_stride 1)");
}

/// The forward pass's buffers (bd::detail::carve_forward) with the projections' largest scratch.
template <class T>
forward_buffers<T> carve_mha(const cuda_context& ctx, const device_mha_layer<T>& L, index_t n, void* base,
                             const cuda_project_options& popt) {
  std::size_t s = 0;
  for (std::size_t p : {bd::workspace_bytes(ctx, L.q, n, popt), bd::workspace_bytes(ctx, L.k, n, popt),
                        bd::workspace_bytes(ctx, L.v, n, popt), bd::workspace_bytes(ctx, L.o, n, popt)})
    s = std::max(s, p);
  return carve_forward<T>(L.config, n, s, forward_carver(base));
}

template <class T>
forward_buffers<T> carve_mla(const cuda_context& ctx, const device_mla_layer<T>& L, index_t n, void* base,
                             const cuda_project_options& popt) {
  std::size_t s = 0;
  for (std::size_t p : {bd::workspace_bytes(ctx, L.q, n, popt), bd::workspace_bytes(ctx, L.kv_a, n, popt),
                        bd::workspace_bytes(ctx, L.k_up, n, popt), bd::workspace_bytes(ctx, L.v_up, n, popt),
                        bd::workspace_bytes(ctx, L.o, n, popt)})
    s = std::max(s, p);
  return carve_forward<T>(L.config, n, s, forward_carver(base));
}

}  // namespace detail

/// Copy a prepared MHA/GQA/MQA layer to the device (ctx's device; waits for the copies).
template <class T>
device_mha_layer<T> upload(const cuda_context& ctx, const mha_layer<T>& L) {
  constexpr const char* what = "upload(mha_layer)";
  const auto& c = L.config;
  const index_t dm = c.d_model, H = c.n_heads, Hkv = c.n_kv_heads, d = c.head_dim;
  BASISATTN_REQUIRE(dm >= 1 && H >= 1 && Hkv >= 1 && d >= 1, invalid_argument, what, ": d_model ", dm, ", n_heads ", H,
                    ", n_kv_heads ", Hkv, ", head_dim ", d, " must all be >= 1");
  BASISATTN_REQUIRE(H % Hkv == 0, invalid_argument, what, ": n_heads ", H, " is not a multiple of n_kv_heads ", Hkv);
  BASISATTN_REQUIRE(std::isfinite(c.scale) && c.scale >= 0, invalid_argument, what, ": scale ", c.scale,
                    " must be finite and >= 0");
  detail::expect_projection(what, "q", L.q.in_dim(), L.q.out_dim(), dm, H * d);
  detail::expect_projection(what, "k", detail::in_dim_of(L.k), detail::out_dim_of(L.k), dm, Hkv * d);
  detail::expect_projection(what, "v", detail::in_dim_of(L.v), detail::out_dim_of(L.v), dm, Hkv * d);
  detail::expect_projection(what, "o", L.o.in_dim(), L.o.out_dim(), H * d, dm);
  if (c.use_rope) {
    detail::check_rope_params(what, c.rope, d);
    BASISATTN_REQUIRE(
        !is_bd(L.k), invalid_argument, what,
        ": the K projection is BD but the layer applies RoPE to q and k (not exact; prepare_mha refuses it)");
  }
  constexpr index_t dmax = ::basisattn::detail::cuda_kernels::attention_kernel_max_dim;
  BASISATTN_REQUIRE(d <= dmax, unsupported, what, ": head_dim ", d, " exceeds the CUDA attention kernel's limit of ",
                    dmax);
  device_mha_layer<T> out;
  out.config = c;
  out.q = upload(ctx, L.q);
  out.k = upload(ctx, L.k);
  out.v = upload(ctx, L.v);
  out.o = upload(ctx, L.o);
  return out;
}

/// Copy a prepared MLA layer to the device (ctx's device; waits for the copies).
template <class T>
device_mla_layer<T> upload(const cuda_context& ctx, const mla_layer<T>& L) {
  constexpr const char* what = "upload(mla_layer)";
  const auto& c = L.config;
  const index_t dm = c.d_model, H = c.n_heads, Lr = c.kv_lora_rank, dn = c.qk_nope_dim, dr = c.qk_rope_dim,
                dv = c.v_head_dim;
  BASISATTN_REQUIRE(dm >= 1 && H >= 1 && Lr >= 1 && dn >= 1 && dv >= 1 && dr >= 0, invalid_argument, what, ": d_model ",
                    dm, ", n_heads ", H, ", kv_lora_rank ", Lr, ", qk_nope_dim ", dn, ", v_head_dim ", dv,
                    " must be >= 1 and qk_rope_dim ", dr, " >= 0");
  BASISATTN_REQUIRE(std::isfinite(c.rms_eps) && c.rms_eps > 0, invalid_argument, what, ": rms_eps ", c.rms_eps,
                    " must be finite and > 0");
  BASISATTN_REQUIRE(std::isfinite(c.scale) && c.scale >= 0, invalid_argument, what, ": scale ", c.scale,
                    " must be finite and >= 0");
  if (dr > 0) detail::check_rope_params(what, c.rope, dr);
  detail::expect_projection(what, "q", L.q.in_dim(), L.q.out_dim(), dm, H * (dn + dr));
  detail::expect_projection(what, "kv_a", L.kv_a.in_dim(), L.kv_a.out_dim(), dm, Lr + dr);
  detail::expect_projection(what, "k_up", detail::in_dim_of(L.k_up), detail::out_dim_of(L.k_up), Lr, H * dn);
  detail::expect_projection(what, "v_up", detail::in_dim_of(L.v_up), detail::out_dim_of(L.v_up), Lr, H * dv);
  detail::expect_projection(what, "o", L.o.in_dim(), L.o.out_dim(), H * dv, dm);
  BASISATTN_REQUIRE(static_cast<index_t>(L.kv_a_norm.size()) == Lr, shape_mismatch, what, ": kv_a_norm has ",
                    L.kv_a_norm.size(), " weights for a latent of ", Lr);
  constexpr index_t dmax = ::basisattn::detail::cuda_kernels::attention_kernel_max_dim;
  BASISATTN_REQUIRE(dn + dr <= dmax && dv <= dmax, unsupported, what, ": head dims (qk ", dn + dr, ", v ", dv,
                    ") exceed the CUDA attention kernel's limit of ", dmax);
  device_mla_layer<T> out;
  out.config = c;
  out.q = upload(ctx, L.q);
  out.kv_a = upload(ctx, L.kv_a);
  out.kv_a_norm = to_device(ctx, L.kv_a_norm.data(), Lr);
  out.k_up = upload(ctx, L.k_up);
  out.v_up = upload(ctx, L.v_up);
  out.o = upload(ctx, L.o);
  return out;
}

/// Device workspace bytes forward(ctx, L, ...) needs for `tokens` tokens with projection options popt.
template <class T>
std::size_t workspace_bytes(const cuda_context& ctx, const device_mha_layer<T>& L, index_t tokens,
                            const cuda_project_options& popt = {}) {
  BASISATTN_REQUIRE(tokens >= 0, invalid_argument, "workspace_bytes(mha_layer): negative token count ", tokens);
  return detail::carve_mha(ctx, L, tokens, nullptr, popt).total;
}
template <class T>
std::size_t workspace_bytes(const cuda_context& ctx, const device_mla_layer<T>& L, index_t tokens,
                            const cuda_project_options& popt = {}) {
  BASISATTN_REQUIRE(tokens >= 0, invalid_argument, "workspace_bytes(mla_layer): negative token count ", tokens);
  return detail::carve_mla(ctx, L, tokens, nullptr, popt).total;
}

/// Deprecated spelling of workspace_bytes(ctx, layer, tokens, popt).
template <class L>
[[deprecated("use workspace_bytes(ctx, layer, tokens, popt)")]] auto forward_workspace_bytes(
    const cuda_context& ctx, const L& layer, index_t tokens, const cuda_project_options& popt = {})
    -> decltype(bd::workspace_bytes(ctx, layer, tokens, popt)) {
  return bd::workspace_bytes(ctx, layer, tokens, popt);
}

/// Forward pass of an MHA/GQA/MQA layer on the GPU (see the top of this header).
template <class T>
void forward(const cuda_context& ctx, const device_mha_layer<T>& L,
             matrix_view<const ::basisattn::detail::nondeduced_t<T>> x, matrix_view<T> y, void* workspace,
             std::size_t workspace_bytes, const forward_options& opt = {}, const cuda_project_options& popt = {}) {
  constexpr const char* what = "forward(cuda, mha_layer)";
  const auto& c = L.config;
  detail::check_forward_io(what, x, y, c.d_model);
  const index_t n = x.rows, H = c.n_heads, Hkv = c.n_kv_heads, d = c.head_dim;
  detail::check_forward_workspace(what, workspace, workspace_bytes, bd::workspace_bytes(ctx, L, n, popt));
  const auto b = detail::carve_mha(ctx, L, n, workspace, popt);
  void* const s = b.scratch;
  const std::size_t sb = b.scratch_bytes;

  const matrix_view<T> q(b.q, n, H * d), k(b.k, n, Hkv * d), v(b.v, n, Hkv * d), a(b.a, n, H * d);
  project(ctx, L.q, x, q, s, sb, popt);
  project(ctx, L.k, x, k, s, sb, popt);
  project(ctx, L.v, x, v, s, sb, popt);
  if (c.use_rope) {
    const index_t pos = c.rope.position_offset + opt.position_offset;
    const bool inter = c.rope.style == rope_style::interleaved;
    ::basisattn::detail::cuda_kernels::launch_rope<T>(b.q, n, H, d, H * d, d, 1, c.rope.theta, inter, pos,
                                                      ctx.stream());
    ::basisattn::detail::cuda_kernels::launch_rope<T>(b.k, n, Hkv, d, Hkv * d, d, 1, c.rope.theta, inter, pos,
                                                      ctx.stream());
  }
  attention_options ao;
  ao.causal = c.causal;
  ao.scale = c.scale;
  ao.check_finite = false;
  attention<T>(ctx, tensor3_view<const T>(b.q, n, H, d), tensor3_view<const T>(b.k, n, Hkv, d),
               tensor3_view<const T>(b.v, n, Hkv, d), tensor3_view<T>(b.a, n, H, d), ao);
  project(ctx, L.o, matrix_view<const T>(a), y, s, sb, popt);
}

/// Forward pass of an MLA layer on the GPU (see the top of this header).
template <class T>
void forward(const cuda_context& ctx, const device_mla_layer<T>& L,
             matrix_view<const ::basisattn::detail::nondeduced_t<T>> x, matrix_view<T> y, void* workspace,
             std::size_t workspace_bytes, const forward_options& opt = {}, const cuda_project_options& popt = {}) {
  constexpr const char* what = "forward(cuda, mla_layer)";
  const auto& c = L.config;
  detail::check_forward_io(what, x, y, c.d_model);
  const index_t n = x.rows, H = c.n_heads, Lr = c.kv_lora_rank, dn = c.qk_nope_dim, dr = c.qk_rope_dim,
                dv = c.v_head_dim, qd = dn + dr;
  detail::check_forward_workspace(what, workspace, workspace_bytes, bd::workspace_bytes(ctx, L, n, popt));
  const auto b = detail::carve_mla(ctx, L, n, workspace, popt);
  void* const s = b.scratch;
  const std::size_t sb = b.scratch_bytes;
  namespace ck = ::basisattn::detail::cuda_kernels;

  project(ctx, L.q, x, matrix_view<T>(b.q, n, H * qd), s, sb, popt);
  project(ctx, L.kv_a, x, matrix_view<T>(b.kva, n, Lr + dr), s, sb, popt);
  ck::launch_rms_norm_rows<T>(b.kva, Lr + dr, n, Lr, L.kv_a_norm.data(), static_cast<float>(c.rms_eps), ctx.stream());
  if (dr > 0) {
    const index_t pos = c.rope.position_offset + opt.position_offset;
    const bool inter = c.rope.style == rope_style::interleaved;
    ck::launch_rope<T>(b.q + dn, n, H, dr, H * qd, qd, 1, c.rope.theta, inter, pos, ctx.stream());
    ck::launch_rope<T>(b.kva + Lr, n, 1, dr, Lr + dr, dr, 1, c.rope.theta, inter, pos, ctx.stream());
  }
  const matrix_view<const T> latent(b.kva, n, Lr, Lr + dr);
  project(ctx, L.k_up, latent, matrix_view<T>(b.knope, n, H * dn), s, sb, popt);
  project(ctx, L.v_up, latent, matrix_view<T>(b.v, n, H * dv), s, sb, popt);
  if (dr > 0)  // k = [k_nope_h | shared rope key] per head
    ck::launch_concat_heads<T>(b.knope, H * dn, dn, dn, b.kva + Lr, Lr + dr, 0, dr, n, H, b.k, H * qd, ctx.stream());
  attention_options ao;
  ao.causal = c.causal;
  ao.scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(qd));
  ao.check_finite = false;
  attention<T>(ctx, tensor3_view<const T>(b.q, n, H, qd), tensor3_view<const T>(b.k, n, H, qd),
               tensor3_view<const T>(b.v, n, H, dv), tensor3_view<T>(b.a, n, H, dv), ao);
  project(ctx, L.o, matrix_view<const T>(b.a, n, H * dv), y, s, sb, popt);
}

}  // namespace bd
BASISATTN_END_NAMESPACE
