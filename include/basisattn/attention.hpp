// basisattn/attention.hpp - exact softmax attention (module header: options, oracle, RoPE, CPU backend).
//
// Shapes (tensor3_view, any strides): q [n_q, H_q, d_qk], k [n_kv, H_kv, d_qk], v [n_kv, H_kv, d_v],
// out [n_q, H_q, d_v]; GQA/MQA when H_kv divides H_q (query head h uses kv head h / (H_q / H_kv)).
// Options, masking and errors: <basisattn/attention/options.hpp>. Oracle: <basisattn/attention/reference.hpp>.
//
// Public entry points (CPU backend, implemented in <basisattn/cpu/attention.hpp>):
//   std::size_t workspace_bytes(cpu{}, q, k, v, opt = {})
//       Caller-owned workspace size for the current thread count (detail::cpu_threads()), read from
//       the views the run takes (their data is not read). The older attention_workspace_bytes
//       spellings remain, deprecated.
//   attention<T>(cpu{}, q, k, v, out, opt, workspace, workspace_bytes)
//       Blocked streaming-softmax (flash-style) attention; allocates nothing. A workspace smaller than
//       one thread's slice raises errc::invalid_argument; one that holds fewer slices than threads runs
//       on fewer threads. (Eigen's GEMM packs into stack buffers while d_qk, d_v <= 128; for larger
//       head dims its packing exceeds EIGEN_STACK_ALLOCATION_LIMIT and Eigen itself uses the heap.)
//   attention<T>(cpu{}, q, k, v, out, opt = {})
//       Same, allocating the workspace.
// T is float, double, Eigen::half or Eigen::bfloat16 (all four views share it; out is written in full).
// Arithmetic is in float, or in double when T is double or opt.accumulate_double is set. Views of
// non-const data do not deduce T: write attention<float>(cpu{}, q, k, v, out) or pass const views.
//
// CUDA backend: attention(ctx, q, k, v, out, opt, ...) in <basisattn/cuda/attention.hpp> (through
// <basisattn/cuda.hpp>).
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/attention/reference.hpp>
#include <basisattn/attention/rope.hpp>
#include <basisattn/cpu/attention.hpp>
