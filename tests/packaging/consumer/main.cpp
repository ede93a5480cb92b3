// Consumer of the packaged library: factorize a pair, project through it, check the identity.
#include <basisattn/basisattn.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  using namespace basisattn;
  static_assert(BASISATTN_VERSION_MAJOR == 0, "version macros are visible");
  const index_t m = 12, r = 3, n = 5;
  std::vector<float> a(m * r), b(r * n), x(2 * m);
  unsigned state = 12345u;  // a small LCG: full-rank pseudo-random values in [-1, 1)
  auto next = [&state] {
    state = state * 1664525u + 1013904223u;
    return float(state >> 8) / float(1u << 23) - 1.0f;
  };
  for (auto& v : a) v = next();
  for (auto& v : b) v = next();
  for (auto& v : x) v = next();
  const matrix_view<const float> av(a.data(), m, r), bv(b.data(), r, n);
  const bd::shared_basis sb = bd::factorize<float>(std::vector<matrix_view<const float>>{av});
  const auto proj = bd::make_bd_projection<float>(sb);
  std::vector<float> k(2 * r);
  bd::project(cpu{}, proj, matrix_view<const float>(x.data(), 2, m), matrix_view<float>(k.data(), 2, r));
  const matrix<float> bp = sb.absorb_rows<float>(0, bv);
  double err = 0, ref = 0;
  for (index_t t = 0; t < 2; ++t)
    for (index_t j = 0; j < n; ++j) {
      double want = 0, got = 0;
      for (index_t i = 0; i < m; ++i)
        for (index_t l = 0; l < r; ++l) want += double(x[t * m + i]) * a[i * r + l] * b[l * n + j];
      for (index_t l = 0; l < r; ++l) got += double(k[t * r + l]) * bp(l, j);
      err += (got - want) * (got - want);
      ref += want * want;
    }
  const double rel = std::sqrt(err / ref);
  std::printf("basisattn %d.%d.%d consumer: relative error %.3g\n", BASISATTN_VERSION_MAJOR, BASISATTN_VERSION_MINOR,
              BASISATTN_VERSION_PATCH, rel);
  return rel < 1e-5 ? 0 : 1;
}
