// basisattn/conv.hpp - conv-basis attention (module header: the plan and the CPU backend).
//
// What it computes and when it is accurate: see <basisattn/conv/options.hpp> and the README. In short,
// the logits of each head are approximated by k convolution matrices (piecewise-constant
// diagonal-aligned columns) recovered from Q and K, and attention is applied with FFTs in
// O(k d n log n). The approximation is exact where the structure holds (e.g. RoPE-only heads, keys
// whose content switches at k positions) and can be far off otherwise: every run reports, per head,
// the structure diagnostic, an error estimate from exactly computed rows beside the error of uniform
// attention, and can fall back to exact attention above a tolerance.
//
// Shapes (tensor3_view, any strides), self-attention: q [n, H_q, d_qk], k [n, H_kv, d_qk],
// v [n, H_kv, d_v], out [n, H_q, d_v]; GQA/MQA when H_kv divides H_q (query head h uses kv head
// h / (H_q / H_kv)). T is float, double, Eigen::half or Eigen::bfloat16; all arithmetic is in double
// (FFTs in double, or float behind the dynamic-range check of fft_precision::f32_checked).
//
// Public entry points (namespace basisattn::conv; plan in <basisattn/conv/plan.hpp>, CPU run in
// <basisattn/cpu/conv.hpp>):
//   plan make_plan<T>(cpu{}, q, k, options = {})
//       Recovers anchors and kernels per query head (and the upper-triangle basis when
//       !options.causal) without forming the n x n logits, samples the structure diagnostic, and
//       records a checksum of q and k. Raises errc::invalid_argument for bad options (k outside
//       [1, n], probe < 1, search without delta > 0, bad given anchors, ...), shape_mismatch for
//       extents that disagree (n_q != n_kv included), non_finite for NaN/Inf in q or k.
//   std::size_t workspace_bytes(cpu{}, plan, d_v)
//       Caller-owned workspace of a run (O(threads (n d_v + n))).
//   report run<T, FFT = fft_eigen>(cpu{}, plan, q, k, v, out, workspace, workspace_bytes)
//   report run<T, FFT = fft_eigen>(cpu{}, plan, q, k, v, out)          allocates the workspace
//   report attention<T, FFT = fft_eigen>(cpu{}, q, k, v, out, options = {})   make_plan + run
//       Writes out in full and returns the per-head report (error estimate, uniform baseline,
//       repaired rows, float FFTs used, fallback). q and k must be those of the plan (checked by
//       checksum: errc::invalid_argument otherwise). The workspace holds every buffer; the FFT
//       engine may allocate its twiddle tables on first use (Eigen's FFT does), and a head that
//       falls back to exact attention allocates that call's workspace.
//       No row is ever returned from an FFT whose error bound exceeds options.fft_tolerance or
//       whose denominator is <= 0 / non-finite: such rows are recomputed directly from the basis.
//   void backward<T, FFT = fft_eigen>(cpu{}, plan, q, k, v, dy, dq, dk, dv)
//       Gradients of sum(dy * out) for causal conv-basis attention with the plan's anchors held
//       fixed (they are a discrete choice): O(k d n log n) with double FFTs. The logits of kernel i
//       depend on q_{s_i + t} and the anchor key k_{s_i} only, so non-anchor keys get dk = 0. dq, dk,
//       dv have the extents of q, k, v and are overwritten. No row repair: rows whose largest logit
//       lies far below the head's global maximum (beyond ~30 nats) lose accuracy. Allocates.
//       Non-causal plans raise errc::unsupported.
//
// CUDA backend: conv::workspace_bytes(ctx, plan, d_v) and conv::run<T>(ctx, plan, q, k, v, out, ...)
// in <basisattn/cuda/conv.hpp> (through <basisattn/cuda.hpp>) run the same plan (made on the host) on device tensors with cuFFT; no
// backward pass there.
//
// FFT engines of the CPU run (template argument FFT): fft_eigen (default, header-only) and fft_fftw
// (opt-in, GPL; include <basisattn/cpu/fftw.hpp>). See <basisattn/cpu/fft.hpp>.
#pragma once

#include <basisattn/conv/options.hpp>
#include <basisattn/conv/plan.hpp>
#include <basisattn/cpu/conv.hpp>
#include <basisattn/cpu/conv_backward.hpp>
#include <basisattn/cpu/fft.hpp>
