// basisattn/attention/options.hpp - options and argument checks shared by every attention entry point.
//
// Tensor layout of every attention function (tensor3_view, any strides):
//   q [n_q, H_q, d_qk], k [n_kv, H_kv, d_qk], v [n_kv, H_kv, d_v], out [n_q, H_q, d_v]
// GQA/MQA: H_q % H_kv == 0 and query head h uses kv head h / (H_q / H_kv).
//
// Public entry points:
//   attention_options   causal (end-aligned: query i sees keys j <= i + n_kv - n_q, as with a KV
//                       cache), scale (0 selects 1/sqrt(d_qk)), accumulate_double, check_finite.
//
// Internal (basisattn::detail):
//   check_attention_args(fn, q, k, v, out, opt) validates extents and options and returns the
//   problem's attention_shape; every failure raises basisattn::error (shape_mismatch for extents
//   that disagree, invalid_argument otherwise) with a message naming the tensors and extents.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>

#include <cmath>
#include <string>

BASISATTN_BEGIN_NAMESPACE

/// Options of exact softmax attention.
struct attention_options {
  /// Query i sees keys j <= i + (n_kv - n_q): the mask is end-aligned (KV cache). Requires n_q <= n_kv.
  bool causal = true;
  /// Softmax scale applied to q.k; 0 selects 1/sqrt(d_qk). Must be finite and >= 0.
  double scale = 0;
  /// Blocked CPU path: do all arithmetic in double, whatever the storage type.
  bool accumulate_double = false;
  /// Scan q, k and v for NaN/Inf first and raise errc::non_finite.
  bool check_finite = true;
};

namespace detail {

/// Extents of an attention problem, after validation.
struct attention_shape {
  index_t n_q = 0, n_kv = 0;  ///< query and key/value tokens
  index_t h_q = 0, h_kv = 0;  ///< query and key/value heads
  index_t d_qk = 0, d_v = 0;  ///< head dims of q/k and of v/out
  index_t group = 1;          ///< H_q / H_kv: query heads per kv head
  index_t causal_offset = 0;  ///< n_kv - n_q: query i sees keys j <= i + causal_offset when causal
  double scale = 0;           ///< the effective softmax scale
};

template <class T>
std::string extents_string(const tensor3_view<T>& t) {
  return concat("[", t.extent[0], ", ", t.extent[1], ", ", t.extent[2], "]");
}

/// Validate the arguments of an attention call named `fn`; returns the problem's shape.
template <class TQ, class TK, class TV, class TO>
attention_shape check_attention_args(const char* fn, const tensor3_view<TQ>& q, const tensor3_view<TK>& k,
                                     const tensor3_view<TV>& v, const tensor3_view<TO>& out,
                                     const attention_options& opt) {
  BASISATTN_REQUIRE(q.extent[0] >= 1 && q.extent[1] >= 1 && q.extent[2] >= 1, invalid_argument, fn, ": q has extents ",
                    extents_string(q), "; n_q, H_q and d_qk must be >= 1");
  BASISATTN_REQUIRE(k.extent[0] >= 1 && k.extent[1] >= 1 && k.extent[2] >= 1, invalid_argument, fn, ": k has extents ",
                    extents_string(k), "; n_kv, H_kv and d_qk must be >= 1");
  BASISATTN_REQUIRE(v.extent[0] >= 1 && v.extent[1] >= 1 && v.extent[2] >= 1, invalid_argument, fn, ": v has extents ",
                    extents_string(v), "; n_kv, H_kv and d_v must be >= 1");
  BASISATTN_REQUIRE(k.extent[2] == q.extent[2], shape_mismatch, fn, ": q ", extents_string(q),
                    " has d_qk = ", q.extent[2], " but k ", extents_string(k), " has d_qk = ", k.extent[2]);
  BASISATTN_REQUIRE(v.extent[0] == k.extent[0], shape_mismatch, fn, ": k ", extents_string(k),
                    " has n_kv = ", k.extent[0], " tokens but v ", extents_string(v), " has ", v.extent[0]);
  BASISATTN_REQUIRE(v.extent[1] == k.extent[1], shape_mismatch, fn, ": k ", extents_string(k),
                    " has H_kv = ", k.extent[1], " heads but v ", extents_string(v), " has ", v.extent[1]);
  BASISATTN_REQUIRE(q.extent[1] % k.extent[1] == 0, shape_mismatch, fn, ": q ", extents_string(q),
                    " has H_q = ", q.extent[1], " heads, not a multiple of the H_kv = ", k.extent[1], " heads of k ",
                    extents_string(k));
  BASISATTN_REQUIRE(out.extent[0] == q.extent[0] && out.extent[1] == q.extent[1] && out.extent[2] == v.extent[2],
                    shape_mismatch, fn, ": out has extents ", extents_string(out), " but must be [n_q, H_q, d_v] = [",
                    q.extent[0], ", ", q.extent[1], ", ", v.extent[2], "] (q ", extents_string(q), ", v ",
                    extents_string(v), ")");
  BASISATTN_REQUIRE(!opt.causal || q.extent[0] <= k.extent[0], invalid_argument, fn,
                    ": causal attention needs n_q <= n_kv, but q has n_q = ", q.extent[0],
                    " tokens and k has n_kv = ", k.extent[0]);
  BASISATTN_REQUIRE(std::isfinite(opt.scale) && opt.scale >= 0, invalid_argument, fn, ": options.scale = ", opt.scale,
                    " must be finite and >= 0 (0 selects 1/sqrt(d_qk))");
  BASISATTN_REQUIRE(q.data && k.data && v.data && out.data, invalid_argument, fn, ": ",
                    !q.data   ? "q"
                    : !k.data ? "k"
                    : !v.data ? "v"
                              : "out",
                    ".data is null");

  attention_shape s;
  s.n_q = q.extent[0];
  s.n_kv = k.extent[0];
  s.h_q = q.extent[1];
  s.h_kv = k.extent[1];
  s.d_qk = q.extent[2];
  s.d_v = v.extent[2];
  s.group = s.h_q / s.h_kv;
  s.causal_offset = s.n_kv - s.n_q;
  s.scale = opt.scale > 0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(s.d_qk));
  return s;
}

}  // namespace detail

BASISATTN_END_NAMESPACE
