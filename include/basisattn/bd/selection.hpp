// basisattn/bd/selection.hpp - basis selection for BD (internal, bd::detail): row gathers, the
// complement of a basis, numerical rank, and the greedy joint-volume pivoting of the shared_pivot
// strategy (bd/options.hpp explains the strategies; bd/factorize.hpp uses them).
#pragma once

#include <basisattn/bd/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/eigen.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/parallel.hpp>
#include <basisattn/core/view.hpp>

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {
namespace detail {
using ::basisattn::detail::concat;
using ::basisattn::detail::raise;
using dmat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using lu_t = Eigen::PartialPivLU<Eigen::MatrixXd>;

/// Rows `idx` of A as a column-major double matrix.
inline Eigen::MatrixXd gather_rows(const dmat& a, const std::vector<index_t>& idx) {
  Eigen::MatrixXd out(static_cast<index_t>(idx.size()), a.cols());
  for (std::size_t i = 0; i < idx.size(); ++i) out.row(static_cast<index_t>(i)) = a.row(idx[i]);
  return out;
}

inline std::vector<index_t> complement(index_t m, const std::vector<index_t>& basis) {
  std::vector<char> in(static_cast<std::size_t>(m), 0);
  for (index_t s : basis) in[static_cast<std::size_t>(s)] = 1;
  std::vector<index_t> rest;
  rest.reserve(static_cast<std::size_t>(m) - basis.size());
  for (index_t j = 0; j < m; ++j)
    if (!in[static_cast<std::size_t>(j)]) rest.push_back(j);
  return rest;
}

/// Numerical rank of one head (error path only): singular values below `rel_tol` of the largest
/// count as zero; the caller passes a tolerance at the input's own rounding level.
inline index_t numerical_rank(const dmat& a, double rel_tol) {
  Eigen::ColPivHouseholderQR<Eigen::MatrixXd> qr(a);
  qr.setThreshold(rel_tol);
  return qr.rank();
}

/// Exact greedy joint-volume pivoting, blocked (see strategy::shared_pivot, step 1). Only the
/// choice of rows comes out of it, so it runs in the scalar type S (float is enough to rank rows;
/// everything that is stored is recomputed in double afterwards).
template <class S>
std::vector<index_t> greedy_joint_volume(
    const std::vector<Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>& heads) {
  using mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic>;
  using rmat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  const index_t G = static_cast<index_t>(heads.size());
  const index_t m = heads[0].rows(), r = heads[0].cols();
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  const index_t block = 32, max_cand = 2 * block + 8;
  // Residual squared norms per head and row. A residual below floor_g (relative 100 eps of S)
  // counts as floor_g, so the log stays finite and rows that add nothing to a head lose.
  const double rel_floor = 100.0 * std::numeric_limits<S>::epsilon();
  const S recompute_below = S(1000) * std::numeric_limits<S>::epsilon();
  mat norm2(m, G), orig2(m, G);
  std::vector<double> floor2(static_cast<std::size_t>(G)), log_floor(static_cast<std::size_t>(G));
  std::vector<mat> q(static_cast<std::size_t>(G), mat(r, r));
  for (index_t g = 0; g < G; ++g) {
    norm2.col(g) = heads[g].rowwise().squaredNorm();
    floor2[g] =
        std::max(static_cast<double>(norm2.col(g).maxCoeff()), static_cast<double>(std::numeric_limits<S>::min())) *
        rel_floor * rel_floor;
    log_floor[g] = std::log(floor2[g]);
  }
  orig2 = norm2;
  std::vector<char> taken(static_cast<std::size_t>(m), 0);
  std::vector<index_t> picked, remaining;
  picked.reserve(static_cast<std::size_t>(r));
  std::vector<double> score(static_cast<std::size_t>(m));
  std::vector<rmat> cand_rows(static_cast<std::size_t>(G), rmat(max_cand, r));
  mat cn2(G, max_cand), proj(m, block);
  vec v(r), h(r), d(max_cand);
  std::vector<char> used(static_cast<std::size_t>(max_cand));
  std::vector<index_t> cand(static_cast<std::size_t>(max_cand));
  while (static_cast<index_t>(picked.size()) < r) {
    const index_t k0 = static_cast<index_t>(picked.size());
    const index_t b = std::min(block, r - k0);
    remaining.clear();
    for (index_t j = 0; j < m; ++j) {
      if (taken[static_cast<std::size_t>(j)]) continue;
      double sc = 0;
      for (index_t g = 0; g < G; ++g) {
        const double n2 = static_cast<double>(norm2(j, g));
        sc += n2 > floor2[g] ? std::log(n2) : log_floor[g];
      }
      score[static_cast<std::size_t>(j)] = sc;
      remaining.push_back(j);
    }
    const index_t p = std::min<index_t>(static_cast<index_t>(remaining.size()), 2 * b + 8);  // <= max_cand
    auto better = [&](index_t x, index_t y) {
      const double sx = score[static_cast<std::size_t>(x)], sy = score[static_cast<std::size_t>(y)];
      return sx > sy || (sx == sy && x < y);
    };
    std::partial_sort(remaining.begin(), remaining.begin() + p, remaining.end(), better);
    // Upper bound on the current score of every row outside the candidates (scores only decrease).
    const double bound =
        static_cast<index_t>(remaining.size()) > p ? score[static_cast<std::size_t>(remaining[p])] : neg_inf;
    for (index_t c = 0; c < p; ++c) {
      cand[c] = remaining[c];
      used[c] = 0;
      for (index_t g = 0; g < G; ++g) {
        cand_rows[g].row(c) = heads[g].row(cand[c]);
        cn2(g, c) = norm2(cand[c], g);
      }
    }
    index_t t = 0;
    for (; t < b; ++t) {
      index_t best = -1;
      double best_s = neg_inf;
      for (index_t c = 0; c < p; ++c) {
        if (used[c]) continue;
        double sc = 0;
        for (index_t g = 0; g < G; ++g) {
          const double n2 = static_cast<double>(cn2(g, c));
          sc += n2 > floor2[g] ? std::log(n2) : log_floor[g];
        }
        if (best < 0 || sc > best_s) best = c, best_s = sc;
      }
      // A row outside the candidates could now beat the best candidate: end the block (exactness).
      if (best < 0 || (t > 0 && best_s < bound)) break;
      used[best] = 1;
      const index_t k = k0 + t;
      for (index_t g = 0; g < G; ++g) {
        v = cand_rows[g].row(best).transpose();
        // Classical Gram-Schmidt, repeated only when the first pass cancelled most of the vector
        // ("twice is enough": a second pass is needed when the norm drops below 1/sqrt(2)).
        for (int pass = 0; pass < 2 && k > 0; ++pass) {
          const S before = v.squaredNorm();
          h.head(k).noalias() = q[g].leftCols(k).transpose() * v;
          v.noalias() -= q[g].leftCols(k) * h.head(k);
          if (v.squaredNorm() > S(0.5) * before) break;
        }
        const double nv = static_cast<double>(v.norm());
        if (nv * nv > floor2[g]) {
          q[g].col(k) = v / static_cast<S>(nv);
        } else {
          // The row adds no direction to this head. Any unit vector orthogonal to the previous ones
          // keeps the bookkeeping consistent; the final double factorization rejects the basis.
          for (index_t i = 0; i < r; ++i) {
            v.setZero();
            v(i) = 1;
            h.head(k).noalias() = q[g].leftCols(k).transpose() * v;
            v.noalias() -= q[g].leftCols(k) * h.head(k);
            if (v.norm() > S(0.5)) break;
          }
          q[g].col(k) = v.normalized();
        }
        d.head(p).noalias() = cand_rows[g].topRows(p) * q[g].col(k);
        for (index_t c = 0; c < p; ++c) cn2(g, c) = std::max(cn2(g, c) - d(c) * d(c), S(0));
      }
      picked.push_back(cand[best]);
      taken[static_cast<std::size_t>(cand[best])] = 1;
    }
    // Every row's residual norms lose their components on the t new directions: one GEMM per head.
    const index_t k = k0 + t;
    for (index_t g = 0; g < G; ++g) {
      proj.leftCols(t).noalias() = heads[g] * q[g].middleCols(k0, t);
      norm2.col(g) -= proj.leftCols(t).rowwise().squaredNorm();
      for (index_t j = 0; j < m; ++j) {
        if (taken[static_cast<std::size_t>(j)]) continue;
        // Downdating loses relative accuracy once the residual is small against the original norm
        // (error ~ eps * orig2): recompute below 1000 eps * orig2, keeping ranks right to ~0.1%.
        if (norm2(j, g) < recompute_below * orig2(j, g)) {
          v = heads[g].row(j).transpose();
          h.head(k).noalias() = q[g].leftCols(k).transpose() * v;
          v.noalias() -= q[g].leftCols(k) * h.head(k);
          norm2(j, g) = v.squaredNorm();
          orig2(j, g) = norm2(j, g);  // the recomputed value is the new reference
        }
        if (norm2(j, g) < S(0)) norm2(j, g) = 0;
      }
    }
  }
  return picked;
}

}  // namespace detail
}  // namespace bd
BASISATTN_END_NAMESPACE
