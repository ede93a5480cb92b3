// basisattn/attention/reference.hpp - exact softmax attention, written plainly: the test oracle.
//
// Public entry point:
//   attention_reference(q, k, v, out, opt)   TI/TO any storage types (out may be wider than the inputs)
// For every query head h (kv head h / (H_q / H_kv)) and query i, with off = n_kv - n_q:
//   s_j = scale * q_i . k_j                for the visible keys (j <= i + off when causal, else all)
//   out_i = sum_j exp(s_j - max s) v_j / sum_j exp(s_j - max s)
// Every operation is done in double, one query at a time, with no blocking and no threads: it is
// slow (O(n_q n_kv (d_qk + d_v)) scalar operations) and meant for tests and small problems.
// Shapes, options and errors are those of <basisattn/attention/options.hpp>; opt.accumulate_double is
// ignored (the reference always accumulates in double).
#pragma once

#include <basisattn/attention/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE

namespace detail {
template <class T>
inline double attention_reference_load(const T& x) {
  return static_cast<double>(to_compute<compute_t<T>>(x));
}
}  // namespace detail

/// Exact attention in double precision (the oracle). See the header comment for the definition.
template <class TI, class TO>
void attention_reference(tensor3_view<const TI> q, tensor3_view<const TI> k, tensor3_view<const TI> v,
                         tensor3_view<TO> out, const attention_options& opt = {}) {
  static_assert(is_storage_type_v<TI> && is_storage_type_v<TO> && !std::is_const_v<TO>,
                "attention_reference: TI and TO must be storage types (float, double, Eigen::half, Eigen::bfloat16)");
  const detail::attention_shape s = detail::check_attention_args("attention_reference", q, k, v, out, opt);
  if (opt.check_finite) {
    detail::require_finite(q, "attention_reference: q");
    detail::require_finite(k, "attention_reference: k");
    detail::require_finite(v, "attention_reference: v");
  }

  std::vector<double> p(static_cast<std::size_t>(s.n_kv));
  std::vector<double> o(static_cast<std::size_t>(s.d_v));
  for (index_t h = 0; h < s.h_q; ++h) {
    const index_t hk = h / s.group;
    for (index_t i = 0; i < s.n_q; ++i) {
      const index_t visible = opt.causal ? i + s.causal_offset + 1 : s.n_kv;  // keys 0 .. visible-1
      double m = -INFINITY;
      for (index_t j = 0; j < visible; ++j) {
        double dot = 0;
        for (index_t c = 0; c < s.d_qk; ++c)
          dot += detail::attention_reference_load(q(i, h, c)) * detail::attention_reference_load(k(j, hk, c));
        p[static_cast<std::size_t>(j)] = s.scale * dot;
        m = std::max(m, p[static_cast<std::size_t>(j)]);
      }
      double l = 0;
      for (index_t j = 0; j < visible; ++j) {
        p[static_cast<std::size_t>(j)] = std::exp(p[static_cast<std::size_t>(j)] - m);
        l += p[static_cast<std::size_t>(j)];
      }
      std::fill(o.begin(), o.end(), 0.0);
      for (index_t j = 0; j < visible; ++j)
        for (index_t c = 0; c < s.d_v; ++c)
          o[static_cast<std::size_t>(c)] +=
              p[static_cast<std::size_t>(j)] * detail::attention_reference_load(v(j, hk, c));
      for (index_t c = 0; c < s.d_v; ++c) out(i, h, c) = detail::from_compute<TO>(o[static_cast<std::size_t>(c)] / l);
    }
  }
}

BASISATTN_END_NAMESPACE
