// basisattn/bd/projection.hpp - prepared projections of all heads of a layer side.
//
//   dense_projection<T>  y = x W + b                           (the baseline; W: in x out)
//   bd_projection<T>     y_g = x[:, basis] + x[:, rest] C_g + b'_g   for every head g
//                        stored as one coefficient matrix (in - r) x (heads * r), so the projection
//                        of all heads is one GEMM with inner dimension in - r plus a copy of the r
//                        basis channels into every head's slot.
//
//   make_dense_projection<T>(W, bias)         copy (and round) a weight (any storage, any strides;
//                                             bias: out_dim values or nullptr)
//   make_bd_projection<T>(basis, biases)      from a bd::shared_basis (bd/factorize.hpp); biases is
//                                             one pointer per head (nullptr: none), turned into b A_S^-1
//   slice_heads(p, first, count)              heads [first, first + count) as a self-contained
//                                             projection (tensor-parallel shards)
//   slice_columns(p, first, count)            columns [first, first + count) of a dense projection
//   p.bytes()                                 bytes of weights + bias, for size comparisons
//   basis_block(p, w_head)                    A_S of a head (its outputs are coordinates in it)
//
// The runtime lives with each backend: bd::project(cpu{}, p, x, y) in <basisattn/cpu/projection.hpp>.
#pragma once

#include <basisattn/bd/factorize.hpp>
#include <basisattn/bd/options.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/eigen.hpp>

#include <algorithm>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

/// y = x W + b: every head's projection in one matrix (W: in_dim x out_dim, row-major).
template <class T>
struct dense_projection {
  matrix<T> weight;
  std::vector<T> bias;  ///< out_dim values, or empty
  index_t in_dim() const { return weight.rows(); }
  index_t out_dim() const { return weight.cols(); }
  std::size_t bytes() const { return weight.bytes() + bias.size() * sizeof(T); }
};

/// BD projection of `heads` heads sharing one basis (see the top of this header).
template <class T>
struct bd_projection {
  index_t in_dim = 0;          ///< m: input channels
  index_t rank = 0;            ///< r: head dimension = basis size
  index_t heads = 0;           ///< G
  std::vector<index_t> basis;  ///< the r input channels copied into every head, in head-channel order
  std::vector<index_t> rest;   ///< the other m - r input channels, in the order of coeff's rows
  matrix<T> coeff;             ///< (m - r) x (G r); head g owns columns [g r, (g + 1) r)
  std::vector<T> bias;         ///< G r values (b_g A_S^-1 per head), or empty
  basis_report report;         ///< how the basis was chosen, conditioning per head

  index_t out_dim() const { return heads * rank; }
  std::size_t bytes() const { return coeff.bytes() + bias.size() * sizeof(T); }
  /// True when basis = {0..r-1} and rest = {r..m-1}: the input needs no gather (channels were
  /// permuted upstream at preparation, e.g. MLA's latent).
  bool basis_leading() const {
    for (index_t i = 0; i < rank; ++i)
      if (basis[static_cast<std::size_t>(i)] != i) return false;
    for (index_t l = 0; l < in_dim - rank; ++l)
      if (rest[static_cast<std::size_t>(l)] != rank + l) return false;
    return true;
  }
};

template <class T, class TV>
dense_projection<T> make_dense_projection(matrix_view<TV> w_in, const std::remove_const_t<TV>* bias = nullptr,
                                          bool check_finite = true) {
  using TI = std::remove_const_t<TV>;
  const matrix_view<const TI> w = w_in;
  BASISATTN_REQUIRE(w.rows >= 1 && w.cols >= 1 && w.data, invalid_argument, "dense projection: empty weight (", w.rows,
                    "x", w.cols, ")");
  if (check_finite) {
    ::basisattn::detail::require_finite(w, "projection weight");
    ::basisattn::detail::require_finite(bias, w.cols, "projection bias");
  }
  dense_projection<T> p;
  p.weight = matrix<T>(w.rows, w.cols);
  ::basisattn::detail::convert_into(p.weight.view(), w);
  if (bias) {
    p.bias.resize(static_cast<std::size_t>(w.cols));
    for (index_t j = 0; j < w.cols; ++j)
      p.bias[static_cast<std::size_t>(j)] =
          ::basisattn::detail::from_compute<T>(::basisattn::detail::to_compute<double>(bias[j]));
  }
  return p;
}

/// Build the runtime projection of heads [first, first + count) of a shared basis. `biases` holds
/// one pointer per head of the basis (nullptr for none) or is empty for no bias at all.
template <class T, class TI = T>
bd_projection<T> make_bd_projection(const shared_basis& sb, const std::vector<const TI*>& biases = {},
                                    index_t first = 0, index_t count = -1) {
  if (count < 0) count = sb.heads() - first;
  BASISATTN_REQUIRE(first >= 0 && count >= 1 && first + count <= sb.heads(), invalid_argument, "bd projection: heads [",
                    first, ", ", first + count, ") outside the basis's ", sb.heads(), " heads");
  BASISATTN_REQUIRE(biases.empty() || static_cast<index_t>(biases.size()) == sb.heads(), shape_mismatch,
                    "bd projection: ", biases.size(), " bias pointers for ", sb.heads(), " heads");
  const index_t m = sb.in_dim(), r = sb.rank();
  bd_projection<T> p;
  p.in_dim = m;
  p.rank = r;
  p.heads = count;
  p.basis = sb.basis();
  p.rest = sb.rest();
  p.report = sb.report();
  p.report.heads.assign(sb.report().heads.begin() + first, sb.report().heads.begin() + first + count);
  p.coeff = matrix<T>(m - r, count * r);
  bool any_bias = false;
  for (const TI* b : biases) any_bias = any_bias || b != nullptr;
  if (any_bias) p.bias.assign(static_cast<std::size_t>(count * r), ::basisattn::detail::from_compute<T>(0.0f));
  for (index_t g = 0; g < count; ++g) {
    const matrix<T> c = sb.template coefficients<T>(first + g);
    for (index_t i = 0; i < m - r; ++i)
      std::copy(c.data() + i * r, c.data() + (i + 1) * r, p.coeff.data() + i * (count * r) + g * r);
    if (any_bias && biases[static_cast<std::size_t>(first + g)]) {
      ::basisattn::detail::require_finite(biases[static_cast<std::size_t>(first + g)], r, "bias");
      const std::vector<T> b = sb.template inverse_bias<T>(first + g, biases[static_cast<std::size_t>(first + g)]);
      std::copy(b.begin(), b.end(), p.bias.begin() + g * r);
    }
  }
  return p;
}

/// Heads [first, first + count) of a BD projection, self-contained.
template <class T>
bd_projection<T> slice_heads(const bd_projection<T>& p, index_t first, index_t count) {
  BASISATTN_REQUIRE(first >= 0 && count >= 1 && first + count <= p.heads, invalid_argument, "slice_heads: heads [",
                    first, ", ", first + count, ") outside [0, ", p.heads, ")");
  bd_projection<T> s;
  s.in_dim = p.in_dim;
  s.rank = p.rank;
  s.heads = count;
  s.basis = p.basis;
  s.rest = p.rest;
  s.report = p.report;
  if (!p.report.heads.empty())
    s.report.heads.assign(p.report.heads.begin() + first, p.report.heads.begin() + first + count);
  const index_t r = p.rank, rows = p.in_dim - p.rank;
  s.coeff = matrix<T>(rows, count * r);
  for (index_t i = 0; i < rows; ++i)
    std::copy(p.coeff.data() + i * p.coeff.cols() + first * r,
              p.coeff.data() + i * p.coeff.cols() + (first + count) * r, s.coeff.data() + i * count * r);
  if (!p.bias.empty()) s.bias.assign(p.bias.begin() + first * r, p.bias.begin() + (first + count) * r);
  return s;
}

/// Columns [first, first + count) of a dense projection, self-contained.
template <class T>
dense_projection<T> slice_columns(const dense_projection<T>& p, index_t first, index_t count) {
  BASISATTN_REQUIRE(first >= 0 && count >= 1 && first + count <= p.out_dim(), invalid_argument,
                    "slice_columns: columns [", first, ", ", first + count, ") outside [0, ", p.out_dim(), ")");
  dense_projection<T> s;
  s.weight = matrix<T>(p.in_dim(), count);
  for (index_t i = 0; i < p.in_dim(); ++i)
    std::copy(p.weight.data() + i * p.out_dim() + first, p.weight.data() + i * p.out_dim() + first + count,
              s.weight.data() + i * count);
  if (!p.bias.empty()) s.bias.assign(p.bias.begin() + first, p.bias.begin() + first + count);
  return s;
}

/// Rows [first, first + count) of a dense projection (its inputs), self-contained; the bias is kept
/// only when keep_bias (a row-sharded output projection adds its bias in one shard only).
template <class T>
dense_projection<T> slice_rows(const dense_projection<T>& p, index_t first, index_t count, bool keep_bias) {
  BASISATTN_REQUIRE(first >= 0 && count >= 1 && first + count <= p.in_dim(), invalid_argument, "slice_rows: rows [",
                    first, ", ", first + count, ") outside [0, ", p.in_dim(), ")");
  dense_projection<T> s;
  s.weight = matrix<T>(count, p.out_dim());
  std::copy(p.weight.data() + first * p.out_dim(), p.weight.data() + (first + count) * p.out_dim(), s.weight.data());
  if (keep_bias) s.bias = p.bias;
  return s;
}

/// A_S of head g of a BD projection: the rows `p.basis` of that head's dense weight `w_head`
/// (in_dim x rank, y = x W form), in double. A BD projection returns each head's outputs in the
/// coordinates of that basis, y_g = x W_g A_S^-1 (+ b_g A_S^-1): y_g A_S is the dense head's output.
/// Engines that consume K or V themselves (not through the prepared layer's paired Q / O weights)
/// map them back with it. errc::shape_mismatch when w_head is not in_dim x rank.
template <class T, class TI>
matrix<double> basis_block(const bd_projection<T>& p, matrix_view<const TI> w_head) {
  BASISATTN_REQUIRE(w_head.rows == p.in_dim && w_head.cols == p.rank, shape_mismatch, "bd::basis_block: w_head is ",
                    w_head.rows, "x", w_head.cols, ", the projection's heads are ", p.in_dim, "x", p.rank);
  matrix<double> a(p.rank, p.rank);
  for (index_t i = 0; i < p.rank; ++i)
    for (index_t j = 0; j < p.rank; ++j)
      a(i, j) = static_cast<double>(
          ::basisattn::detail::to_compute<compute_t<TI>>(w_head(p.basis[static_cast<std::size_t>(i)], j)));
  return a;
}

}  // namespace bd
BASISATTN_END_NAMESPACE
