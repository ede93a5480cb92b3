// basisattn/attention/rope.hpp - rotary position embedding (RoPE), applied in place.
//
// Public entry points:
//   rope_style          interleaved: pairs (2i, 2i+1) (llama2.c, GPT-J, Meta's Llama checkpoints);
//                       half: pairs (i, i + d/2) (GPT-NeoX, Hugging Face Llama).
//   rope_params         theta (base, > 0), style, position_offset (position of token 0; may be negative).
//   apply_rope(x, p)    x is [tokens, heads, d] (tensor3_view, any strides, any storage type), d even.
// Token t has position pos = p.position_offset + t; pair i (0 <= i < d/2) is rotated by the angle
// pos * theta^(-2i/d):  (x0, x1) -> (x0 cos a - x1 sin a, x0 sin a + x1 cos a).
// Angles, sines, cosines and the rotation are computed in double; the result is rounded to the
// storage type (through float for the 16-bit types). Applying with position_offset = -p undoes
// position p (for a single token).
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>

#include <cmath>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE

/// Which coordinates RoPE pairs up.
enum class rope_style {
  interleaved,  ///< pairs (2i, 2i+1): llama2.c, GPT-J
  half,         ///< pairs (i, i + d/2): GPT-NeoX / Hugging Face Llama
};

/// Parameters of rotary position embedding.
struct rope_params {
  double theta = 10000.0;                      ///< frequency base, finite and > 0
  rope_style style = rope_style::interleaved;  ///< pairing of coordinates
  index_t position_offset = 0;                 ///< position of token 0 (e.g. the KV-cache length)
};

/// Rotate x = [tokens, heads, d] in place: token t at position p.position_offset + t, pair i by angle
/// pos * theta^(-2i/d). Raises invalid_argument for odd d or a bad theta.
template <class T>
void apply_rope(tensor3_view<T> x, const rope_params& p = {}) {
  static_assert(is_storage_type_v<T> && !std::is_const_v<T>,
                "apply_rope: T must be a mutable storage type (float, double, Eigen::half, Eigen::bfloat16)");
  const index_t tokens = x.extent[0], heads = x.extent[1], d = x.extent[2];
  BASISATTN_REQUIRE(tokens >= 0 && heads >= 0 && d >= 0, invalid_argument, "apply_rope: x has negative extents [",
                    tokens, ", ", heads, ", ", d, "]");
  BASISATTN_REQUIRE(d % 2 == 0, invalid_argument, "apply_rope: x has head dim d = ", d,
                    "; RoPE rotates pairs of coordinates and needs an even d");
  BASISATTN_REQUIRE(std::isfinite(p.theta) && p.theta > 0, invalid_argument, "apply_rope: params.theta = ", p.theta,
                    " must be finite and > 0");
  if (tokens == 0 || heads == 0 || d == 0) return;
  BASISATTN_REQUIRE(x.data != nullptr, invalid_argument, "apply_rope: x.data is null");

  const index_t half = d / 2;
  const index_t partner = p.style == rope_style::interleaved ? 1 : half;  // x1 index = x0 index + partner
  std::vector<double> inv_freq(static_cast<std::size_t>(half)), c(inv_freq.size()), s(inv_freq.size());
  for (index_t i = 0; i < half; ++i)
    inv_freq[static_cast<std::size_t>(i)] = std::pow(p.theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));

  for (index_t t = 0; t < tokens; ++t) {
    const double pos = static_cast<double>(p.position_offset + t);
    for (std::size_t i = 0; i < inv_freq.size(); ++i) {
      const double a = pos * inv_freq[i];
      c[i] = std::cos(a);
      s[i] = std::sin(a);
    }
    for (index_t h = 0; h < heads; ++h) {
      for (index_t i = 0; i < half; ++i) {
        const index_t i0 = p.style == rope_style::interleaved ? 2 * i : i;
        T& e0 = x(t, h, i0);
        T& e1 = x(t, h, i0 + partner);
        const double x0 = static_cast<double>(detail::to_compute<compute_t<T>>(e0));
        const double x1 = static_cast<double>(detail::to_compute<compute_t<T>>(e1));
        const double ci = c[static_cast<std::size_t>(i)], si = s[static_cast<std::size_t>(i)];
        e0 = detail::from_compute<T>(x0 * ci - x1 * si);
        e1 = detail::from_compute<T>(x0 * si + x1 * ci);
      }
    }
  }
}

BASISATTN_END_NAMESPACE
