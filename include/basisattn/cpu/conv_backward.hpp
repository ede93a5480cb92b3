// basisattn/cpu/conv_backward.hpp - the backward pass of causal conv-basis attention on the CPU
// backend (entry point documented in <basisattn/conv.hpp>): with the plan's anchors held fixed, the
// gradients of q, k and v, in double FFTs. Shares the run's helpers (<basisattn/cpu/conv.hpp>).
#pragma once

#include <basisattn/cpu/conv.hpp>

#include <basisattn/conv/options.hpp>
#include <basisattn/conv/plan.hpp>
#include <basisattn/cpu/attention.hpp>
#include <basisattn/cpu/fft.hpp>
#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/core/workspace.hpp>

#include <algorithm>
#include <cmath>
#include <complex>
#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace conv {

/// See <basisattn/conv.hpp>.
template <class T, class FFT = fft_eigen>
void backward(cpu, const plan& p, tensor3_view<const T> q, tensor3_view<const T> k, tensor3_view<const T> v,
              tensor3_view<const T> dy, tensor3_view<T> dq, tensor3_view<T> dk, tensor3_view<T> dv) {
  static_assert(supports_storage_v<cpu, T> && !std::is_const_v<T>, "conv::backward: T must be a storage type");
  static_assert(is_fft_engine_v<FFT>, "conv::backward: unknown FFT engine (include its header)");
  using basisattn::detail::extents_string;
  const char* fn = "conv::backward";
  BASISATTN_REQUIRE(p.opt.causal, unsupported, fn, ": only causal conv-basis attention has a backward pass");
  attention_options aopt;
  aopt.scale = p.scale;
  const basisattn::detail::attention_shape sh = basisattn::detail::check_attention_args(fn, q, k, v, dy, aopt);
  detail::check_qk(fn, q, k);
  BASISATTN_REQUIRE(sh.n_q == p.n && sh.h_q == p.h_q && sh.h_kv == p.h_kv && sh.d_qk == p.d_qk, shape_mismatch, fn,
                    ": the plan was made for n = ", p.n, ", H_q = ", p.h_q, ", H_kv = ", p.h_kv, ", d_qk = ", p.d_qk,
                    " but q ", extents_string(q), " and k ", extents_string(k), " were passed");
  auto same = [](const auto& a, const auto& b) {
    return a.extent[0] == b.extent[0] && a.extent[1] == b.extent[1] && a.extent[2] == b.extent[2];
  };
  BASISATTN_REQUIRE(same(dq, q) && same(dk, k) && same(dv, v), shape_mismatch, fn, ": dq ", extents_string(dq), ", dk ",
                    extents_string(dk), ", dv ", extents_string(dv), " must have the extents of q ", extents_string(q),
                    ", k ", extents_string(k), ", v ", extents_string(v));
  BASISATTN_REQUIRE(dq.data && dk.data && dv.data, invalid_argument, fn, ": a gradient's data is null");
  if (p.opt.check_finite) {
    basisattn::detail::require_finite(q, "conv::backward: q");
    basisattn::detail::require_finite(k, "conv::backward: k");
    basisattn::detail::require_finite(v, "conv::backward: v");
    basisattn::detail::require_finite(dy, "conv::backward: dy");
  }
  const index_t n = p.n, d = p.d_qk, d_v = sh.d_v;
  std::vector<detail::mat_d> gq(std::size_t(p.h_q), detail::mat_d::Zero(n, d)),
      gk(std::size_t(p.h_kv), detail::mat_d::Zero(n, d)), gv(std::size_t(p.h_kv), detail::mat_d::Zero(n, d_v));
  std::unique_ptr<unsigned char[]> ws(new unsigned char[detail::run_workspace_bytes(n, d_v, 1)]);
  const detail::run_slice s = detail::carve_slice(ws.get(), n, d_v);  // moves the pointer up to 64 bytes
  const index_t nf_max = detail::run_fft_max(n);
  std::vector<double> dyb(static_cast<std::size_t>(n * d_v)), dn(static_cast<std::size_t>(n * d_v)),
      pd(static_cast<std::size_t>(n + 1)), du(static_cast<std::size_t>(n)), a(static_cast<std::size_t>(nf_max)),
      xb(static_cast<std::size_t>(nf_max));
  std::vector<std::complex<double>> as(static_cast<std::size_t>(nf_max / 2 + 1)), ys(as.size()), xs(as.size()),
      cs(as.size());
  typename fft_traits<FFT>::template engine<double> eng;
  for (index_t h = 0; h < p.h_q; ++h) {
    const index_t hk = h / sh.group;
    const detail::mat_d Q = detail::head_to_double(q, h), K = detail::head_to_double(k, hk),
                        V = detail::head_to_double(v, hk), dY = detail::head_to_double(dy, h);
    BASISATTN_REQUIRE(
        basisattn::detail::same_checksum(detail::qk_checksum(q, k, h, h / sh.group), p.checksums[std::size_t(h)]),
        invalid_argument, fn, ": q or k of head ", h, " differ from those the plan was made from");
    const basis& b = p.heads[std::size_t(h)].lower;
    const double g = detail::global_shift(p.heads[std::size_t(h)], n, true);
    // forward: numerators by FFT (double), denominators by prefix sums
    for (index_t r = 0; r < n; ++r)
      for (index_t j = 0; j < d_v; ++j) s.v[r * d_v + j] = V(r, j);
    std::fill(s.num, s.num + n * d_v, 0.0);
    std::fill(s.den, s.den + n, 0.0);
    detail::fft_numerators<double>(p.heads[std::size_t(h)], n, true, d_v, g, s, eng);
    for (index_t i = 0; i < b.size(); ++i) {
      const index_t s0 = b.begin(i), e0 = b.end(i, n);
      double* P = s.prefix;
      P[0] = 0;
      for (index_t t = 0; t < n - s0; ++t) P[t + 1] = P[t] + std::exp(b.kernel(i)[t] - g);
      for (index_t r = s0; r < n; ++r) s.den[r] += P[r - s0 + 1] - P[std::max<index_t>(0, r - e0 + 1)];
    }
    // dN = dY / D, dD_r = -(dY_r . Y_r) / D_r
    pd[0] = 0;
    for (index_t r = 0; r < n; ++r) {
      double dot = 0;
      for (index_t j = 0; j < d_v; ++j) {
        const double y = s.num[r * d_v + j] / s.den[r];
        dot += dY(r, j) * y;
        dn[std::size_t(r * d_v + j)] = dY(r, j) / s.den[r];
      }
      pd[std::size_t(r + 1)] = pd[std::size_t(r)] - dot / s.den[r];
    }
    for (index_t i = 0; i < b.size(); ++i) {
      const index_t s0 = b.begin(i), e0 = b.end(i, n), L = n - s0, w = e0 - s0;
      const index_t nf = fft_size(L + w - 1), nb = nf / 2 + 1;
      const double* u = b.kernel(i);
      for (index_t t = 0; t < nf; ++t) a[std::size_t(t)] = t < L ? std::exp(u[t] - g) : 0.0;
      eng.forward(as.data(), a.data(), nf);
      std::fill(cs.begin(), cs.begin() + nb, std::complex<double>(0));
      for (index_t j = 0; j < d_v; ++j) {
        for (index_t t = 0; t < nf; ++t) xb[std::size_t(t)] = t < L ? dn[std::size_t((s0 + t) * d_v + j)] : 0.0;
        eng.forward(ys.data(), xb.data(), nf);
        for (index_t t = 0; t < nf; ++t) xb[std::size_t(t)] = t < w ? V(s0 + t, j) : 0.0;
        eng.forward(xs.data(), xb.data(), nf);
        for (index_t f = 0; f < nb; ++f) {
          cs[std::size_t(f)] += std::conj(xs[std::size_t(f)]) * ys[std::size_t(f)];
          xs[std::size_t(f)] = std::conj(as[std::size_t(f)]) * ys[std::size_t(f)];
        }
        eng.inverse(xb.data(), xs.data(), nf);  // dV[s0 + rho] = sum_t a[t] dN[s0 + rho + t]
        for (index_t r = 0; r < w; ++r) gv[std::size_t(hk)](s0 + r, j) += xb[std::size_t(r)];
      }
      eng.inverse(xb.data(), cs.data(), nf);  // sum_m V[s0 + m] . dN[s0 + m + t]
      for (index_t t = 0; t < L; ++t) {
        const index_t r_hi = std::min(s0 + t + w, n);
        du[std::size_t(t)] = a[std::size_t(t)] * (xb[std::size_t(t)] + pd[std::size_t(r_hi)] - pd[std::size_t(s0 + t)]);
      }
      // u_i[t] = scale q_{s0 + t} . k_{s0}
      for (index_t t = 0; t < L; ++t) {
        gq[std::size_t(h)].row(s0 + t) += (p.scale * du[std::size_t(t)]) * K.row(s0);
        gk[std::size_t(hk)].row(s0) += (p.scale * du[std::size_t(t)]) * Q.row(s0 + t);
      }
    }
  }
  using basisattn::detail::from_compute;
  for (index_t h = 0; h < p.h_q; ++h)
    for (index_t r = 0; r < n; ++r)
      for (index_t c = 0; c < d; ++c) dq(r, h, c) = from_compute<T>(gq[std::size_t(h)](r, c));
  for (index_t h = 0; h < p.h_kv; ++h)
    for (index_t r = 0; r < n; ++r) {
      for (index_t c = 0; c < d; ++c) dk(r, h, c) = from_compute<T>(gk[std::size_t(h)](r, c));
      for (index_t c = 0; c < d_v; ++c) dv(r, h, c) = from_compute<T>(gv[std::size_t(h)](r, c));
    }
}

}  // namespace conv
BASISATTN_END_NAMESPACE
