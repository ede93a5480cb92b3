// basisattn/cuda/attention.hpp - exact softmax attention on the CUDA backend.
//
// Host-side header (g++ compiles it); the kernel is in <basisattn/cuda/kernels/attention.cuh>, compiled
// into the program by including <basisattn/cuda/kernels.cuh> in one .cu file.
//
//   workspace_bytes(ctx, q, k, v, opt)                                         0: no workspace needed
//   attention(ctx, q, k, v, out, opt = {})
//       Same argument conventions as attention(cpu{}, ...) (<basisattn/attention/options.hpp>):
//       q [n_q, H_q, d_qk], k [n_kv, H_kv, d_qk], v [n_kv, H_kv, d_v], out [n_q, H_q, d_v], any
//       element strides, device memory; GQA/MQA (H_q % H_kv == 0, query head h reads kv head
//       h / (H_q / H_kv)); causal masking end-aligned (query i sees keys j <= i + n_kv - n_q);
//       opt.scale = 0 selects 1/sqrt(d_qk). T = float, Eigen::half or Eigen::bfloat16 with fp32
//       arithmetic (exp, running max/sum and the output accumulator in fp32; one rounding to T).
//       Enqueued on ctx's stream; returns without waiting; allocates nothing.
//       Not offered on the GPU: opt.accumulate_double (errc::unsupported) and opt.check_finite (the
//       data are on the device; the option is ignored). d_qk and d_v must be <= 256 (errc::unsupported).
//       Bad extents raise errc::shape_mismatch / invalid_argument exactly as on the CPU.
//
// The kernel is a correctness-first tiled streaming-softmax (flash-style) kernel without tensor cores;
// see the .cuh for the tiling.
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/kernel_launch.hpp>

#include <climits>
#include <cstddef>
#include <type_traits>

BASISATTN_BEGIN_NAMESPACE

/// Device workspace bytes attention(ctx, q, k, v, out, opt) needs for these (device) views: always 0
/// (the kernel keeps its tiles in shared memory). Validates the extents like the CPU overload.
template <class TQ, class TK, class TV>
std::size_t workspace_bytes(const cuda_context&, tensor3_view<TQ> q, tensor3_view<TK> k, tensor3_view<TV> v,
                            const attention_options& = {}) {
  using T = std::remove_const_t<TQ>;
  static_assert(std::is_same_v<T, std::remove_const_t<TK>> && std::is_same_v<T, std::remove_const_t<TV>>,
                "workspace_bytes(ctx, q, k, v): q, k and v must have the same storage type");
  static_assert(supports_storage_v<cuda, T>,
                "workspace_bytes(ctx, q, k, v): T must be float, Eigen::half or "
                "Eigen::bfloat16");
  BASISATTN_REQUIRE(q.extent[0] >= 1 && k.extent[0] >= 1 && q.extent[1] >= 1 && q.extent[2] >= 1 && v.extent[2] >= 1,
                    invalid_argument, "workspace_bytes(attention, cuda): n_q = ", q.extent[0], ", n_kv = ", k.extent[0],
                    ", h_q = ", q.extent[1], ", d_qk = ", q.extent[2], ", d_v = ", v.extent[2], " must all be >= 1");
  return 0;
}

/// Deprecated: workspace_bytes(ctx, q, k, v, opt).
[[deprecated("use workspace_bytes(ctx, q, k, v, opt)")]] inline std::size_t attention_workspace_bytes(
    const cuda_context&, index_t n_q, index_t n_kv, index_t h_q, index_t d_qk, index_t d_v, dtype storage,
    const attention_options& = {}) {
  BASISATTN_REQUIRE(n_q >= 1 && n_kv >= 1 && h_q >= 1 && d_qk >= 1 && d_v >= 1, invalid_argument,
                    "attention_workspace_bytes(cuda): n_q = ", n_q, ", n_kv = ", n_kv, ", h_q = ", h_q,
                    ", d_qk = ", d_qk, ", d_v = ", d_v, " must all be >= 1");
  BASISATTN_REQUIRE(storage != dtype::f64, unsupported, "attention(cuda): f64 storage is not supported");
  return 0;
}

/// Exact softmax attention on the GPU (see the top of this header).
template <class T>
void attention(const cuda_context& ctx, tensor3_view<const ::basisattn::detail::nondeduced_t<T>> q,
               tensor3_view<const ::basisattn::detail::nondeduced_t<T>> k,
               tensor3_view<const ::basisattn::detail::nondeduced_t<T>> v, tensor3_view<T> out,
               const attention_options& opt = {}) {
  static_assert(supports_storage_v<cuda, T>, "attention(cuda): T must be float, Eigen::half or Eigen::bfloat16");
  const detail::attention_shape sh = detail::check_attention_args("attention(cuda)", q, k, v, out, opt);
  BASISATTN_REQUIRE(!opt.accumulate_double, unsupported,
                    "attention(cuda): accumulate_double is not supported on the GPU (fp32 accumulation)");
  constexpr index_t dmax = detail::cuda_kernels::attention_kernel_max_dim;
  BASISATTN_REQUIRE(sh.d_qk <= dmax && sh.d_v <= dmax, unsupported, "attention(cuda): head dims d_qk = ", sh.d_qk,
                    ", d_v = ", sh.d_v, " exceed the kernel's limit of ", dmax);
  BASISATTN_REQUIRE((sh.n_q + 15) / 16 <= INT_MAX && sh.h_q <= 65535, unsupported, "attention(cuda): ", sh.n_q,
                    " queries x ", sh.h_q, " heads exceed the kernel's grid limits (heads <= 65535)");
  detail::cuda_kernels::attention_kernel_params<T> p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.n_q = sh.n_q, p.n_kv = sh.n_kv, p.h_q = sh.h_q, p.h_kv = sh.h_kv, p.d_qk = sh.d_qk, p.d_v = sh.d_v;
  p.group = sh.group;
  p.causal_offset = sh.causal_offset;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride[i];
    p.k_stride[i] = k.stride[i];
    p.v_stride[i] = v.stride[i];
    p.o_stride[i] = out.stride[i];
  }
  p.scale = static_cast<float>(sh.scale);
  p.causal = opt.causal;
  detail::cuda_kernels::launch_attention(p, ctx.stream());
}

BASISATTN_END_NAMESPACE
