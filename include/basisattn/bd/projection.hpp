// basisattn/bd/projection.hpp - prepared projections of all heads of a layer side.
//
//   dense_projection<T>  y = x W + b                           (the baseline; W: in x out)
//   bd_projection<T>     y_g = x[:, basis_q] + x[:, rest_q] C_g + b'_g   for every head g of basis
//                        group q. The heads are split into `groups` runs of equal length, each run
//                        sharing one basis (groups = 1: one basis shared by all heads, the default;
//                        groups = heads: a basis per head). The coefficients are one matrix
//                        (in - r) x (heads * r), so the projection of a group's heads is one GEMM with
//                        inner dimension in - r plus a copy of the r basis channels into every head's
//                        slot; each group gathers its own rest channels.
//
//   make_dense_projection<T>(W, bias)         copy (and round) a weight (any storage, any strides;
//                                             bias: out_dim values or nullptr)
//   make_bd_projection<T>(basis, biases)      from a bd::shared_basis (bd/factorize.hpp); biases is
//                                             one pointer per head (nullptr: none), turned into b A_S^-1
//   make_bd_projection<T>(bases, biases)      from several bases with the same head count, one basis
//                                             group each (biases: one pointer per head of all groups)
//   slice_heads(p, first, count)              heads [first, first + count) as a self-contained
//                                             projection (tensor-parallel shards)
//   slice_columns(p, first, count)            columns [first, first + count) of a dense projection
//   p.bytes()                                 bytes of weights + bias, for size comparisons
//   basis_block(p, w_head, g)                 A_S of head g (its outputs are coordinates in it)
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

/// BD projection of `heads` heads in `groups` basis groups (see the top of this header).
template <class T>
struct bd_projection {
  index_t in_dim = 0;          ///< m: input channels
  index_t rank = 0;            ///< r: head dimension = basis size
  index_t heads = 0;           ///< G
  index_t groups = 1;          ///< basis groups; heads [q G / groups, (q + 1) G / groups) share basis q
  std::vector<index_t> basis;  ///< groups x r: group q's r input channels at [q r, (q + 1) r), in
                               ///< head-channel order (copied into every head of the group)
  std::vector<index_t> rest;   ///< groups x (m - r): group q's other channels at [q (m - r), ...), in the
                               ///< order of the rows of its heads' coefficients
  matrix<T> coeff;             ///< (m - r) x (G r); head g owns columns [g r, (g + 1) r)
  std::vector<T> bias;         ///< G r values (b_g A_S^-1 per head), or empty
  basis_report report;         ///< how the bases were chosen, conditioning per head (all groups)

  index_t out_dim() const { return heads * rank; }
  std::size_t bytes() const { return coeff.bytes() + bias.size() * sizeof(T); }
  index_t heads_per_group() const { return heads / groups; }
  index_t group_of(index_t head) const { return head / heads_per_group(); }
  /// The r basis channels of head g's group.
  const index_t* basis_of(index_t g) const { return basis.data() + group_of(g) * rank; }
  /// The m - r other channels of head g's group, in the order of its coefficients' rows.
  const index_t* rest_of(index_t g) const { return rest.data() + group_of(g) * (in_dim - rank); }
  /// True when there is one group with basis = {0..r-1} and rest = {r..m-1}: the input needs no
  /// gather (channels were permuted upstream at preparation, e.g. MLA's latent).
  bool basis_leading() const {
    if (groups != 1) return false;
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

namespace detail {
/// The layout a bd_projection promises (sizes agree, groups divide the heads, channels in range);
/// every runtime checks it before reading through the channel lists. errc::invalid_argument for bad
/// extents or channels, errc::shape_mismatch for lists or matrices of the wrong size.
template <class T>
void check_bd_layout(const bd_projection<T>& p, const char* where) {
  const index_t m = p.in_dim, r = p.rank, G = p.heads, Q = p.groups;
  BASISATTN_REQUIRE(r >= 1 && m > r && G >= 1 && Q >= 1 && G % Q == 0, invalid_argument, where,
                    ": bd projection with in_dim ", m, ", rank ", r, ", ", G, " heads in ", Q,
                    " basis groups (need 1 <= rank < in_dim and groups dividing heads)");
  BASISATTN_REQUIRE(static_cast<index_t>(p.basis.size()) == Q * r && static_cast<index_t>(p.rest.size()) == Q * (m - r),
                    shape_mismatch, where, ": bd projection has ", p.basis.size(), " basis and ", p.rest.size(),
                    " rest channels for ", Q, " groups of rank ", r, " from ", m, " inputs");
  BASISATTN_REQUIRE(p.coeff.rows() == m - r && p.coeff.cols() == G * r, shape_mismatch, where, ": coefficients are ",
                    p.coeff.rows(), "x", p.coeff.cols(), ", expected ", m - r, "x", G * r);
  BASISATTN_REQUIRE(p.bias.empty() || static_cast<index_t>(p.bias.size()) == G * r, shape_mismatch, where,
                    ": bias has ", p.bias.size(), " values for ", G * r, " outputs");
  for (const std::vector<index_t>* list : {&p.basis, &p.rest})
    for (index_t c : *list)
      BASISATTN_REQUIRE(c >= 0 && c < m, invalid_argument, where, ": channel ", c, " outside [0, ", m, ")");
}

/// Head g's coefficients and bias (from head `hb` of basis `sb`) into the columns of head g of p.
template <class T, class TI>
void fill_bd_head(bd_projection<T>& p, index_t g, const shared_basis& sb, index_t hb, const TI* bias) {
  const index_t r = p.rank, m = p.in_dim;
  const matrix<T> c = sb.template coefficients<T>(hb);
  for (index_t i = 0; i < m - r; ++i)
    std::copy(c.data() + i * r, c.data() + (i + 1) * r, p.coeff.data() + i * p.coeff.cols() + g * r);
  if (bias) {
    ::basisattn::detail::require_finite(bias, r, "bias");
    const std::vector<T> b = sb.template inverse_bias<T>(hb, bias);
    std::copy(b.begin(), b.end(), p.bias.begin() + g * r);
  }
}
template <class T, class TI>
bd_projection<T> empty_bd_projection(index_t m, index_t r, index_t heads, const std::vector<const TI*>& biases) {
  bd_projection<T> p;
  p.in_dim = m;
  p.rank = r;
  p.heads = heads;
  p.coeff = matrix<T>(m - r, heads * r);
  bool any_bias = false;
  for (const TI* b : biases) any_bias = any_bias || b != nullptr;
  if (any_bias) p.bias.assign(static_cast<std::size_t>(heads * r), ::basisattn::detail::from_compute<T>(0.0f));
  return p;
}
}  // namespace detail

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
  bd_projection<T> p = detail::empty_bd_projection<T>(sb.in_dim(), sb.rank(), count, biases);
  p.basis = sb.basis();
  p.rest = sb.rest();
  p.report = sb.report();
  p.report.heads.assign(sb.report().heads.begin() + first, sb.report().heads.begin() + first + count);
  for (index_t g = 0; g < count; ++g)
    detail::fill_bd_head(p, g, sb, first + g, biases.empty() ? nullptr : biases[static_cast<std::size_t>(first + g)]);
  return p;
}

/// Build the runtime projection of all heads of several bases, one basis group each, in order
/// (e.g. one basis per kv head). Every basis must have the same input width, rank and head count;
/// `biases` holds one pointer per head of all groups (nullptr for none) or is empty. The report
/// merges the groups' (strategy of the first, worst conditioning, summed volume and swaps).
template <class T, class TI = T>
bd_projection<T> make_bd_projection(const std::vector<shared_basis>& bases, const std::vector<const TI*>& biases = {}) {
  BASISATTN_REQUIRE(!bases.empty(), invalid_argument, "bd projection: no bases");
  const shared_basis& b0 = bases.front();
  const index_t Q = static_cast<index_t>(bases.size()), hpq = b0.heads();
  for (const shared_basis& sb : bases)
    BASISATTN_REQUIRE(sb.in_dim() == b0.in_dim() && sb.rank() == b0.rank() && sb.heads() == hpq, shape_mismatch,
                      "bd projection: bases of ", sb.in_dim(), "x", sb.rank(), " with ", sb.heads(), " heads and of ",
                      b0.in_dim(), "x", b0.rank(), " with ", hpq, " heads cannot be grouped");
  BASISATTN_REQUIRE(biases.empty() || static_cast<index_t>(biases.size()) == Q * hpq, shape_mismatch,
                    "bd projection: ", biases.size(), " bias pointers for ", Q * hpq, " heads");
  bd_projection<T> p = detail::empty_bd_projection<T>(b0.in_dim(), b0.rank(), Q * hpq, biases);
  p.groups = Q;
  p.report = b0.report();
  p.report.heads.clear();
  p.report.log_volume = 0;
  p.report.swaps = 0;
  for (index_t q = 0; q < Q; ++q) {
    const shared_basis& sb = bases[static_cast<std::size_t>(q)];
    p.basis.insert(p.basis.end(), sb.basis().begin(), sb.basis().end());
    p.rest.insert(p.rest.end(), sb.rest().begin(), sb.rest().end());
    const basis_report& r = sb.report();
    p.report.heads.insert(p.report.heads.end(), r.heads.begin(), r.heads.end());
    p.report.min_rcond = std::min(p.report.min_rcond, r.min_rcond);
    p.report.max_abs_coeff = std::max(p.report.max_abs_coeff, r.max_abs_coeff);
    p.report.error_growth = std::max(p.report.error_growth, r.error_growth);
    p.report.log_volume += r.log_volume;
    p.report.swaps += r.swaps;
    p.report.swap_limit_hit = p.report.swap_limit_hit || r.swap_limit_hit;
    for (index_t h = 0; h < hpq; ++h)
      detail::fill_bd_head(
          p, q * hpq + h, sb, h,
          biases.empty() ? static_cast<const TI*>(nullptr) : biases[static_cast<std::size_t>(q * hpq + h)]);
  }
  return p;
}

/// Heads [first, first + count) of a BD projection, self-contained.
/// With several basis groups the heads must be whole groups (errc::invalid_argument otherwise).
template <class T>
bd_projection<T> slice_heads(const bd_projection<T>& p, index_t first, index_t count) {
  detail::check_bd_layout(p, "slice_heads");
  BASISATTN_REQUIRE(first >= 0 && count >= 1 && first + count <= p.heads, invalid_argument, "slice_heads: heads [",
                    first, ", ", first + count, ") outside [0, ", p.heads, ")");
  // One basis: any heads keep it. Several: whole groups, with their bases.
  const index_t hpq = p.groups == 1 ? count : p.heads_per_group();
  BASISATTN_REQUIRE(p.groups == 1 || (first % hpq == 0 && count % hpq == 0), invalid_argument, "slice_heads: heads [",
                    first, ", ", first + count, ") split a basis group of ", hpq, " heads");
  bd_projection<T> s;
  s.in_dim = p.in_dim;
  s.rank = p.rank;
  s.heads = count;
  s.groups = count / hpq;
  const index_t q0 = p.groups == 1 ? 0 : first / hpq, nb = p.rank, nrest = p.in_dim - p.rank;
  s.basis.assign(p.basis.begin() + q0 * nb, p.basis.begin() + (q0 + s.groups) * nb);
  s.rest.assign(p.rest.begin() + q0 * nrest, p.rest.begin() + (q0 + s.groups) * nrest);
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

/// A_S of head g of a BD projection (g may be left out when there is one basis group, errc::invalid_argument
/// otherwise): the basis rows of g's group of that head's dense weight `w_head`
/// (in_dim x rank, y = x W form), in double. A BD projection returns each head's outputs in the
/// coordinates of that basis, y_g = x W_g A_S^-1 (+ b_g A_S^-1): y_g A_S is the dense head's output.
/// Engines that consume K or V themselves (not through the prepared layer's paired Q / O weights)
/// map them back with it. errc::shape_mismatch when w_head is not in_dim x rank.
template <class T, class TI>
matrix<double> basis_block(const bd_projection<T>& p, matrix_view<const TI> w_head, index_t g = -1) {
  detail::check_bd_layout(p, "bd::basis_block");
  BASISATTN_REQUIRE(g >= 0 || p.groups == 1, invalid_argument, "bd::basis_block: the projection has ", p.groups,
                    " basis groups: name the head (basis_block(p, w_head, g))");
  if (g < 0) g = 0;
  BASISATTN_REQUIRE(w_head.rows == p.in_dim && w_head.cols == p.rank, shape_mismatch, "bd::basis_block: w_head is ",
                    w_head.rows, "x", w_head.cols, ", the projection's heads are ", p.in_dim, "x", p.rank);
  BASISATTN_REQUIRE(g >= 0 && g < p.heads, invalid_argument, "bd::basis_block: head ", g, " outside [0, ", p.heads,
                    ")");
  const index_t* basis = p.basis_of(g);
  matrix<double> a(p.rank, p.rank);
  for (index_t i = 0; i < p.rank; ++i)
    for (index_t j = 0; j < p.rank; ++j)
      a(i, j) = static_cast<double>(::basisattn::detail::to_compute<compute_t<TI>>(w_head(basis[i], j)));
  return a;
}

}  // namespace bd
BASISATTN_END_NAMESPACE
