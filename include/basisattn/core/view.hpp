// basisattn/core/view.hpp - non-owning strided views and a small owning matrix.
//
// matrix_view<T>: rows x cols, element (i, j) at data[i * row_stride + j * col_stride]. The default
//   is row-major contiguous (row_stride = cols, col_stride = 1). `t()` gives the transpose for free,
//   so a PyTorch (out, in) weight becomes the (in, out) matrix of `y = x W` without a copy.
// tensor3_view<T>: extents (e0, e1, e2), element (i, j, k) at data[i*s0 + j*s1 + k*s2]. Attention uses
//   [tokens, heads, head_dim]; `slice1(j)` is the matrix_view of head j.
// matrix<T>: owning, row-major, contiguous storage (std::vector based, 64-byte aligned) with `view()`.
// Views never own memory and never check bounds on element access; every library entry point
// validates the extents it receives.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <cstddef>
#include <new>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE

namespace detail {
/// std::allocator with 64-byte (cache line, one AVX-512 register) alignment. The weights of prepared
/// projections live in matrix<T>: a GEMM library reads them fastest from aligned rows (oneDNN's sgemm
/// on Zen 4: 94% of the fp32 peak with the weight 64-byte aligned, 81% with it 16-byte aligned, as
/// plain malloc leaves large blocks).
template <class T>
struct aligned64_allocator {
  using value_type = T;
  static constexpr std::align_val_t align{64};
  aligned64_allocator() = default;
  template <class U>
  aligned64_allocator(const aligned64_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), align)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, align); }
  template <class U>
  bool operator==(const aligned64_allocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const aligned64_allocator<U>&) const noexcept {
    return false;
  }
};
}  // namespace detail

namespace detail {
template <class T>
struct type_identity {
  using type = T;
};
/// Blocks template argument deduction, so a matrix_view<T> argument converts to matrix_view<const T>.
template <class T>
using nondeduced_t = typename type_identity<T>::type;
}  // namespace detail

template <class T>
struct matrix_view {
  T* data = nullptr;
  index_t rows = 0, cols = 0;
  index_t row_stride = 0, col_stride = 1;

  constexpr matrix_view() = default;
  /// Row-major contiguous rows x cols.
  constexpr matrix_view(T* d, index_t r, index_t c) : data(d), rows(r), cols(c), row_stride(c), col_stride(1) {}
  /// Row-major with a row stride (leading dimension) ld >= cols.
  constexpr matrix_view(T* d, index_t r, index_t c, index_t ld)
      : data(d), rows(r), cols(c), row_stride(ld), col_stride(1) {}
  /// Fully strided.
  constexpr matrix_view(T* d, index_t r, index_t c, index_t rs, index_t cs)
      : data(d), rows(r), cols(c), row_stride(rs), col_stride(cs) {}
  /// A view of T converts to a view of const T.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr matrix_view(const matrix_view<U>& o)
      : data(o.data), rows(o.rows), cols(o.cols), row_stride(o.row_stride), col_stride(o.col_stride) {}

  constexpr T& operator()(index_t i, index_t j) const { return data[i * row_stride + j * col_stride]; }
  constexpr index_t size() const { return rows * cols; }
  constexpr bool empty() const { return rows == 0 || cols == 0; }
  /// True when each row is contiguous (col_stride == 1).
  constexpr bool rows_contiguous() const { return col_stride == 1 || cols <= 1; }
  constexpr matrix_view t() const { return matrix_view(data, cols, rows, col_stride, row_stride); }
  /// Sub-block starting at (r0, c0) of extent nr x nc (not bounds-checked; see checked_block).
  constexpr matrix_view block(index_t r0, index_t c0, index_t nr, index_t nc) const {
    return matrix_view(data + r0 * row_stride + c0 * col_stride, nr, nc, row_stride, col_stride);
  }
  matrix_view checked_block(index_t r0, index_t c0, index_t nr, index_t nc) const {
    BASISATTN_REQUIRE(r0 >= 0 && c0 >= 0 && nr >= 0 && nc >= 0 && r0 + nr <= rows && c0 + nc <= cols, invalid_argument,
                      "block (", r0, ",", c0, ") of extent ", nr, "x", nc, " is outside a ", rows, "x", cols,
                      " matrix");
    return block(r0, c0, nr, nc);
  }
};

template <class T>
struct tensor3_view {
  T* data = nullptr;
  index_t extent[3] = {0, 0, 0};
  index_t stride[3] = {0, 0, 1};

  constexpr tensor3_view() = default;
  /// Contiguous row-major e0 x e1 x e2.
  constexpr tensor3_view(T* d, index_t e0, index_t e1, index_t e2)
      : data(d), extent{e0, e1, e2}, stride{e1 * e2, e2, 1} {}
  constexpr tensor3_view(T* d, index_t e0, index_t e1, index_t e2, index_t s0, index_t s1, index_t s2)
      : data(d), extent{e0, e1, e2}, stride{s0, s1, s2} {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr tensor3_view(const tensor3_view<U>& o)
      : data(o.data), extent{o.extent[0], o.extent[1], o.extent[2]}, stride{o.stride[0], o.stride[1], o.stride[2]} {}
  /// View a row-major matrix [tokens, heads * dim] as [tokens, heads, dim].
  static tensor3_view from_matrix(const matrix_view<T>& m, index_t heads) {
    BASISATTN_REQUIRE(heads > 0 && m.cols % heads == 0, shape_mismatch, "cannot split ", m.cols, " columns into ",
                      heads, " heads");
    return tensor3_view(m.data, m.rows, heads, m.cols / heads, m.row_stride, (m.cols / heads) * m.col_stride,
                        m.col_stride);
  }

  constexpr T& operator()(index_t i, index_t j, index_t k) const {
    return data[i * stride[0] + j * stride[1] + k * stride[2]];
  }
  /// Matrix (e0 x e2) at fixed middle index j: for [tokens, heads, dim], the head-j matrix.
  constexpr matrix_view<T> slice1(index_t j) const {
    return matrix_view<T>(data + j * stride[1], extent[0], extent[2], stride[0], stride[2]);
  }
  /// Sub-range [j0, j0 + n) of the middle dimension.
  constexpr tensor3_view sub1(index_t j0, index_t n) const {
    return tensor3_view(data + j0 * stride[1], extent[0], n, extent[2], stride[0], stride[1], stride[2]);
  }
};

/// Owning row-major contiguous matrix; data() is 64-byte aligned.
template <class T>
class matrix {
 public:
  matrix() = default;
  matrix(index_t rows, index_t cols) : rows_(rows), cols_(cols) {
    BASISATTN_REQUIRE(rows >= 0 && cols >= 0, invalid_argument, "negative matrix extent ", rows, "x", cols);
    data_.resize(static_cast<std::size_t>(rows * cols));
  }
  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  index_t size() const { return rows_ * cols_; }
  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  T& operator()(index_t i, index_t j) { return data_[static_cast<std::size_t>(i * cols_ + j)]; }
  const T& operator()(index_t i, index_t j) const { return data_[static_cast<std::size_t>(i * cols_ + j)]; }
  matrix_view<T> view() { return matrix_view<T>(data_.data(), rows_, cols_); }
  matrix_view<const T> view() const { return matrix_view<const T>(data_.data(), rows_, cols_); }
  /// Bytes of element storage.
  std::size_t bytes() const { return data_.size() * sizeof(T); }

 private:
  index_t rows_ = 0, cols_ = 0;
  std::vector<T, detail::aligned64_allocator<T>> data_;
};

BASISATTN_END_NAMESPACE
