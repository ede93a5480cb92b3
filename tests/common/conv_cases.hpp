// Constructed inputs of conv-basis attention, shared by the CPU test (test_conv_basis.cpp) and the CUDA
// test (cuda/test_cuda_conv.cpp): q, k, v in double, [n, H, d] contiguous, from test::normal().
//   switching(n, hq, hkv, d, switches, mag, seed)   RoPE-only heads whose key content switches at the
//       given positions (first entry 0): logit(r, c) depends on r - c and on the segment of c only, so
//       the heads have an exact conv basis with anchors at the switches
//   random_qkv(n, hq, hkv, d, dv, mag, seed)        no structure at all
//   periodic(n, hq, hkv, d, switches, gmax, seed)   an exact conv basis in every storage type: q, k hold
//       small integers (exact in fp16 and bf16) and every logit is one product of them, so the basis
//       logits equal the true ones bit for bit in double (no RoPE rounding): for oracles at any size
#pragma once

#include "test_util.hpp"

#include <basisattn/conv/options.hpp>
#include <basisattn/core/view.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace test {

struct qkv {
  index_t n, hq, hkv, d, dv;
  std::vector<double> q, k, v;
  qkv(index_t n_, index_t hq_, index_t hkv_, index_t d_, index_t dv_)
      : n(n_),
        hq(hq_),
        hkv(hkv_),
        d(d_),
        dv(dv_),
        q(static_cast<std::size_t>(n * hq * d)),
        k(static_cast<std::size_t>(n * hkv * d)),
        v(std::size_t(n * hkv * dv)) {}
  basisattn::tensor3_view<const double> Q() const { return {q.data(), n, hq, d}; }
  basisattn::tensor3_view<const double> K() const { return {k.data(), n, hkv, d}; }
  basisattn::tensor3_view<const double> V() const { return {v.data(), n, hkv, dv}; }
  double& qa(index_t i, index_t h, index_t c) { return q[std::size_t((i * hq + h) * d + c)]; }
  double& ka(index_t i, index_t h, index_t c) { return k[std::size_t((i * hkv + h) * d + c)]; }
  double& va(index_t i, index_t h, index_t c) { return v[std::size_t((i * hkv + h) * dv + c)]; }
  double qa(index_t i, index_t h, index_t c) const { return q[std::size_t((i * hq + h) * d + c)]; }
  double ka(index_t i, index_t h, index_t c) const { return k[std::size_t((i * hkv + h) * d + c)]; }
  double va(index_t i, index_t h, index_t c) const { return v[std::size_t((i * hkv + h) * dv + c)]; }
};

/// Rotate pairs (2i, 2i+1) of x (length d) by pos * theta^(-2i/d).
inline void rotate(double* x, index_t d, double pos, double theta = 10000.0) {
  for (index_t i = 0; i < d / 2; ++i) {
    const double a = pos * std::pow(theta, -2.0 * double(i) / double(d));
    const double x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
    x[2 * i + 1] = x0 * std::sin(a) + x1 * std::cos(a);
  }
}

/// RoPE-only heads: q_i = R(i) q0, k_j = R(j) k_seg(j), with key content switching at `switches`
/// (first entry 0). logit(r, c) depends on r - c and on the segment of c only: a conv basis with
/// anchors at the switches. Values random.
inline qkv switching(index_t n, index_t hq, index_t hkv, index_t d, const std::vector<index_t>& switches, double mag,
                     std::uint64_t seed) {
  test::seed(seed);
  qkv x(n, hq, hkv, d, d);
  for (index_t h = 0; h < hq; ++h) {
    std::vector<double> q0(static_cast<std::size_t>(d));
    for (auto& e : q0) e = mag * normal();
    for (index_t i = 0; i < n; ++i) {
      for (index_t c = 0; c < d; ++c) x.qa(i, h, c) = q0[std::size_t(c)];
      rotate(&x.qa(i, h, 0), d, double(i));
    }
  }
  for (index_t h = 0; h < hkv; ++h) {
    std::vector<std::vector<double>> seg(switches.size(), std::vector<double>(std::size_t(d)));
    for (auto& s : seg)
      for (auto& e : s) e = mag * normal();
    for (index_t j = 0; j < n; ++j) {
      const std::size_t si = std::size_t(std::upper_bound(switches.begin(), switches.end(), j) - switches.begin() - 1);
      for (index_t c = 0; c < d; ++c) x.ka(j, h, c) = seg[si][std::size_t(c)];
      rotate(&x.ka(j, h, 0), d, double(j));
    }
  }
  for (auto& e : x.v) e = normal();
  return x;
}

/// Heads whose conv structure survives any storage type. q_r = c_h e_{r mod d} (one-hot, c_h = 1 + h % 2),
/// k_c = the integer pattern g of c's segment rotated by c: k(c, e) = g_seg(c)[(e - c) mod d], with
/// g's entries integers in [-gmax, gmax] (gmax <= 256: exact in fp16 and bf16). Then q_r . k_c =
/// c_h g_seg(c)[(r - c) mod d]: a function of r - c and of c's segment only, with one non-zero product,
/// so every logit (and every basis logit, which is some other logit) is exact in double whenever the
/// scale is a power of two (the default 1/sqrt(d) for d = 4^m). The first `switches` entry must be 0;
/// consecutive segments differ at lag 0 (g[0] steps by 1 at each switch, wrapping within [-gmax, gmax]),
/// so change_scan finds every switch. With one segment the upper triangle is exact too (non-causal).
/// Values N(0, 1).
inline qkv periodic(index_t n, index_t hq, index_t hkv, index_t d, const std::vector<index_t>& switches, int gmax,
                    std::uint64_t seed) {
  test::seed(seed);
  qkv x(n, hq, hkv, d, d);
  for (index_t i = 0; i < n; ++i)
    for (index_t h = 0; h < hq; ++h) x.qa(i, h, i % d) = double(1 + h % 2);
  std::uniform_int_distribution<int> pick(-gmax, gmax);
  for (index_t h = 0; h < hkv; ++h) {
    std::vector<std::vector<int>> g(switches.size(), std::vector<int>(static_cast<std::size_t>(d)));
    for (std::size_t s = 0; s < g.size(); ++s) {
      for (auto& e : g[s]) e = pick(rng());
      if (s > 0) g[s][0] = g[s - 1][0] == gmax ? -gmax : g[s - 1][0] + 1;
    }
    for (index_t j = 0; j < n; ++j) {
      const std::size_t si = std::size_t(std::upper_bound(switches.begin(), switches.end(), j) - switches.begin() - 1);
      for (index_t e = 0; e < d; ++e) x.ka(j, h, e) = double(g[si][std::size_t(((e - j) % d + d) % d)]);
    }
  }
  for (auto& e : x.v) e = normal();
  return x;
}

inline qkv random_qkv(index_t n, index_t hq, index_t hkv, index_t d, index_t dv, double mag, std::uint64_t seed) {
  test::seed(seed);
  qkv x(n, hq, hkv, d, dv);
  for (auto* a : {&x.q, &x.k})
    for (auto& e : *a) e = mag * normal();
  for (auto& e : x.v) e = normal();
  return x;
}

/// Options that measure the conv-basis approximation itself: no fallback to exact attention (the
/// library's default tolerance, 1e-2, would replace inaccurate heads by exact ones). Tests of the
/// fallback set their own tolerance.
inline basisattn::conv::options no_fallback() {
  basisattn::conv::options o;
  o.tolerance = std::numeric_limits<double>::infinity();
  return o;
}

}  // namespace test
