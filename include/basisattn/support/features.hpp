// basisattn/support/features.hpp - polynomial feature maps for the linear-attention part.
//
// Public entry points (namespace basisattn::support):
//   monomial_feature_count(d, g)   C(d + g, g): features of all degrees 0..g (saturates at 2^62)
//   feature_map                    the layout of the features of every degree 0..max_degree
//   make_feature_map(d, g, sketch, m, seed)
//
// Layout. Features are ordered by degree, so the features of degrees 0..g' are a prefix of those of
// degrees 0..g for g' <= g (offset[t] is the first column of degree t, offset[g + 1] = features(g)).
//   degree 0: the constant 1;   degree 1: x itself (d features).
//   degree t >= 2, exact (monomial): one feature per multiset {i_1 <= ... <= i_t} of coordinates,
//     sqrt(t! / prod_l mult_l!) * x_{i_1} ... x_{i_t}, so that <phi_t(q), phi_t(k)> = (q.k)^t exactly.
//     Each is computed from its parent (the multiset without its last element) times x_{i_t} times
//     sqrt(t / mult), one vectorised column product per feature.
//   degree t >= 2, sketched: a tensorized random projection of size m,
//     phi_t(x) = (G_{t,1}^T x) o ... o (G_{t,t}^T x) / sqrt(m)   (o: elementwise product)
//     with independent d x m matrices of random signs, so E <phi_t(q), phi_t(k)> = (q.k)^t, with a
//     variance falling like 1/m. (A TensorSketch-style map: GEMM-friendly, no FFT.)
// With polynomial coefficients c_t put on the query side, <c o phi(q), phi(k)> = sum_t c_t (q.k)^t.
//
// Internal (basisattn::support::detail):
//   compute_features(map, width, x, phi, tmp)   phi (n x width, column-major) from x (n x d,
//                                               column-major); width must be features(g) for some g.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace support {

/// C(d + g, g), the number of monomials of degree <= g in d variables; saturates at 2^62.
inline std::int64_t monomial_feature_count(std::int64_t d, int g) {
  constexpr std::int64_t cap = std::int64_t(1) << 62;
  long double r = 1;
  for (int t = 1; t <= g; ++t) {
    r = r * static_cast<long double>(d + t) / t;
    if (r >= static_cast<long double>(cap)) return cap;
  }
  return static_cast<std::int64_t>(std::llround(static_cast<double>(r)));
}

/// Feature layout of every degree 0..max_degree.
struct feature_map {
  index_t d = 0;
  int max_degree = 0;
  bool sketch = false;
  index_t m = 0;                ///< sketch size (sketched degrees only)
  std::vector<index_t> offset;  ///< offset[t]: first column of degree t; offset[max_degree + 1]: total
  std::vector<int> degree_of;   ///< degree of every column
  // exact monomials, per column (entries of columns of degree < 2 unused)
  std::vector<index_t> parent;  ///< parent column (degree t - 1)
  std::vector<index_t> var;     ///< coordinate multiplied in
  std::vector<double> ratio;    ///< sqrt(t / multiplicity of var)
  std::vector<int> last_mult;   ///< multiplicity of the last coordinate (construction only)
  // sketch: for t = 2..max_degree, t column-major d x m sign matrices, stored one after the other
  std::vector<float> proj_f;
  std::vector<double> proj_d;
  std::vector<index_t> proj_offset;  ///< proj_offset[t]: first element of degree t's matrices

  /// Features of degrees 0..g.
  index_t features(int g) const { return offset[static_cast<std::size_t>(g + 1)]; }
};

/// Build the feature layout for dimension d and degrees 0..g (monomials, or sketches of size m).
inline feature_map make_feature_map(index_t d, int g, bool sketch, index_t m, std::uint64_t seed) {
  BASISATTN_REQUIRE(d >= 1 && g >= 0, invalid_argument, "support::make_feature_map: d = ", d, ", g = ", g,
                    " must be >= 1 and >= 0");
  feature_map f;
  f.d = d;
  f.max_degree = g;
  f.sketch = sketch;
  f.m = sketch ? m : 0;
  f.offset.assign(static_cast<std::size_t>(g + 2), 0);
  f.offset[0] = 0;
  f.offset[1] = 1;
  if (!sketch || g <= 1) {
    BASISATTN_REQUIRE(monomial_feature_count(d, g) <= (std::int64_t(1) << 31), invalid_argument,
                      "support::make_feature_map: ", monomial_feature_count(d, g), " monomial features for d = ", d,
                      ", g = ", g, " is too many");
  }
  // degree 0 and 1
  f.degree_of.push_back(0);
  f.parent.push_back(-1);
  f.var.push_back(-1);
  f.ratio.push_back(1.0);
  f.last_mult.push_back(0);
  if (g >= 1) {
    for (index_t i = 0; i < d; ++i) {
      f.degree_of.push_back(1);
      f.parent.push_back(0);
      f.var.push_back(i);
      f.ratio.push_back(1.0);
      f.last_mult.push_back(1);
    }
  }
  if (g >= 1) f.offset[2] = 1 + d;
  if (sketch) {
    std::mt19937_64 gen(seed);
    f.proj_offset.assign(static_cast<std::size_t>(g + 1), 0);
    for (int t = 2; t <= g; ++t) {
      f.proj_offset[static_cast<std::size_t>(t)] = static_cast<index_t>(f.proj_f.size());
      for (index_t e = 0; e < t * d * m; ++e) {
        const float s = (gen() >> 63) ? 1.0f : -1.0f;
        f.proj_f.push_back(s);
        f.proj_d.push_back(s);
      }
      for (index_t j = 0; j < m; ++j) f.degree_of.push_back(t);
      f.offset[static_cast<std::size_t>(t + 1)] = f.offset[static_cast<std::size_t>(t)] + m;
    }
    return f;
  }
  for (int t = 2; t <= g; ++t) {
    const index_t p0 = f.offset[static_cast<std::size_t>(t - 1)], p1 = f.offset[static_cast<std::size_t>(t)];
    for (index_t p = p0; p < p1; ++p) {
      const index_t last = f.var[static_cast<std::size_t>(p)];
      for (index_t i = last; i < d; ++i) {
        const int mult = i == last ? f.last_mult[static_cast<std::size_t>(p)] + 1 : 1;
        f.degree_of.push_back(t);
        f.parent.push_back(p);
        f.var.push_back(i);
        f.ratio.push_back(std::sqrt(static_cast<double>(t) / mult));
        f.last_mult.push_back(mult);
      }
    }
    f.offset[static_cast<std::size_t>(t + 1)] = static_cast<index_t>(f.degree_of.size());
  }
  return f;
}

namespace detail {

template <class C>
using cm_matrix = Eigen::Matrix<C, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
template <class C>
using cm_map = Eigen::Map<cm_matrix<C>>;

/// phi (n x width, column-major) = features of degrees 0..g of the rows of x (n x d, column-major),
/// width = map.features(g). tmp holds n * map.m values (sketch only).
template <class C>
void compute_features(const feature_map& map, index_t width, const cm_map<C>& x, cm_map<C> phi, C* tmp) {
  const index_t n = x.rows();
  phi.col(0).setOnes();
  if (width <= 1) return;
  phi.middleCols(1, map.d) = x;
  if (map.sketch) {
    cm_map<C> prod(tmp, n, map.m);
    const C norm = C(1) / std::sqrt(static_cast<C>(map.m));
    for (int t = 2; t <= map.max_degree && map.offset[static_cast<std::size_t>(t)] < width; ++t) {
      auto blk = phi.middleCols(map.offset[static_cast<std::size_t>(t)], map.m);
      for (int l = 0; l < t; ++l) {
        const C* g = nullptr;
        if constexpr (std::is_same_v<C, float>)
          g = map.proj_f.data() + map.proj_offset[static_cast<std::size_t>(t)] + l * map.d * map.m;
        else
          g = map.proj_d.data() + map.proj_offset[static_cast<std::size_t>(t)] + l * map.d * map.m;
        Eigen::Map<const cm_matrix<C>> gm(g, map.d, map.m);
        if (l == 0) {
          blk.noalias() = x * gm;
          blk *= norm;
        } else {
          prod.noalias() = x * gm;
          blk.array() *= prod.array();
        }
      }
    }
    return;
  }
  for (index_t c = 1 + map.d; c < width; ++c) {
    const auto cu = static_cast<std::size_t>(c);
    phi.col(c) = phi.col(map.parent[cu]).cwiseProduct(x.col(map.var[cu])) * static_cast<C>(map.ratio[cu]);
  }
}

}  // namespace detail
}  // namespace support
BASISATTN_END_NAMESPACE
