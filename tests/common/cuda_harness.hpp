// The backend-vs-CPU harness of the CUDA tests (tests/cuda/test_cuda_projection.cpp, test_cuda_layers.cpp,
// test_cuda_conv.cpp, test_cuda_support.cpp), templated over the storage type T (float, Eigen::half,
// Eigen::bfloat16). Seeds, the skip rule, poison and the storage <-> double conversions are in
// cuda_test_util.hpp (included).
//   host_tensor<T>        owning contiguous [e0, e1, e2] host tensor (a matrix is [rows, 1, cols]);
//                         random_tensor / random_matrix / random_vector: N(mean, scale^2) values drawn from
//                         a generator in storage order, each rounded to T (once, or through fp32)
//   device_tensor<T>      a device copy with padded strides: padding{head, token} puts `head` elements after
//                         each e2-row and `token` after each token (stride[1] = e2 + head, stride[0] = e1
//                         stride[1] + token); its padding holds a value (NaN: a kernel that reads it makes
//                         its output non-finite; 7: a marker) or poison (all bytes 0xFF: NaN in fp32, fp16
//                         and bf16). A device tensor that a run writes is poisoned whole before the run;
//                         download() then counts, in a readback, the non-finite elements, those still
//                         holding poison (unwritten) and the padding elements that lost their poison;
//                         download_rows() does the same with 2-D copies (strides too large for a host
//                         image) and checks the padding of the given rows only
//   nerr / nerr_finite    ||got - want||_F / ||want||_F over every element / over the finite ones
//   run_both              the same call on the CPU backend (into a host tensor) and on the CUDA backend
//                         (into a poisoned device tensor, then downloaded): the caller compares the two
//                         with a bound it derives
//   code_of / message_of  the basisattn::error a call raises (errc::io / "" when it raises none)
#pragma once

#include "cuda_test_util.hpp"

#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/cuda/context.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace cudatest {

using basisattn::index_t;

// ---- host tensors ------------------------------------------------------------------------------------

/// Owning contiguous host [e0, e1, e2] tensor.
template <class T>
struct host_tensor {
  index_t e0, e1, e2;
  std::vector<T> buf;
  host_tensor(index_t a, index_t b, index_t c) : e0(a), e1(b), e2(c), buf(static_cast<std::size_t>(a * b * c)) {}
  T* data() { return buf.data(); }
  const T* data() const { return buf.data(); }
  basisattn::tensor3_view<T> view() { return basisattn::tensor3_view<T>(buf.data(), e0, e1, e2); }
  basisattn::tensor3_view<const T> cview() const { return basisattn::tensor3_view<const T>(buf.data(), e0, e1, e2); }
  T& at(index_t i, index_t j, index_t k) { return buf[static_cast<std::size_t>((i * e1 + j) * e2 + k)]; }
  const T& at(index_t i, index_t j, index_t k) const { return buf[static_cast<std::size_t>((i * e1 + j) * e2 + k)]; }
  /// Rows of N(0, scale^2) entries; a fraction `outliers` of the rows gets scale * big.
  void fill(std::mt19937_64& g, double scale, double outliers = 0, double big = 1) {
    std::uniform_real_distribution<double> u(0, 1);
    std::normal_distribution<double> nd(0, 1);
    for (index_t i = 0; i < e0; ++i)
      for (index_t j = 0; j < e1; ++j) {
        const double sc = u(g) < outliers ? scale * big : scale;
        for (index_t k = 0; k < e2; ++k) at(i, j, k) = from_d<T>(sc * nd(g));
      }
  }
  /// Row scales spread over two decades: max |entry| from ~0.01 to ~1 (support's multi-threshold data).
  void fill_spread(std::mt19937_64& g) {
    std::uniform_real_distribution<double> u(-2, 0);
    std::normal_distribution<double> nd(0, 1);
    for (index_t i = 0; i < e0; ++i)
      for (index_t j = 0; j < e1; ++j) {
        const double sc = 0.4 * std::pow(10.0, u(g));
        for (index_t k = 0; k < e2; ++k) at(i, j, k) = from_d<T>(sc * nd(g));
      }
  }
};

/// Values of a host tensor in double (the stored values), same layout.
template <class T>
std::vector<double> values_of(const host_tensor<T>& x) {
  return values_of(x.buf);
}

/// e0 x e1 x e2 values N(mean, scale^2), drawn from g in storage order and each rounded to T by `round`
/// (from_d<T>: once; from_f<T>: through fp32).
template <class T>
host_tensor<T> random_tensor(std::mt19937_64& g, index_t e0, index_t e1, index_t e2, double scale = 1.0,
                             double mean = 0.0, T (*round)(double) = from_d<T>) {
  std::normal_distribution<double> nd(mean, scale);
  host_tensor<T> t(e0, e1, e2);
  for (auto& x : t.buf) x = round(nd(g));
  return t;
}

/// rows x cols values N(0, scale^2) in storage order, each rounded once to T.
template <class T>
basisattn::matrix<T> random_matrix(std::mt19937_64& g, index_t rows, index_t cols, double scale) {
  std::normal_distribution<double> nd(0.0, scale);
  basisattn::matrix<T> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = from_d<T>(nd(g));
  return m;
}

/// n values N(mean, scale^2), each rounded once to T.
template <class T>
std::vector<T> random_vector(std::mt19937_64& g, index_t n, double scale, double mean = 0.0) {
  std::normal_distribution<double> nd(mean, scale);
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& x : v) x = from_d<T>(nd(g));
  return v;
}

// ---- padded device copies ----------------------------------------------------------------------------

/// Padding of a device tensor: `head` elements after each e2-row, `token` after each token.
struct padding {
  index_t head = 0;
  index_t token = 0;
};

/// What a device copy's padding holds: a value (rounded once to T) or poison (all bytes 0xFF).
struct pad_fill {
  pad_fill(double v) : value(v) {}  // NOLINT: implicit, so that a value reads as its fill
  static pad_fill poison() {
    pad_fill f(0.0);
    f.poisoned = true;
    return f;
  }
  double value = 0;
  bool poisoned = false;
};

/// What a download saw.
struct readback {
  index_t non_finite = 0;       ///< elements that are NaN or Inf (poison included)
  index_t unwritten = 0;        ///< elements that still hold the poison
  index_t padding_touched = 0;  ///< padding elements (of the rows checked) that lost their poison
};

/// A [e0, e1, e2] tensor in device memory with padded strides: stride[1] = s1 = e2 + head,
/// stride[0] = s0 = e1 s1 + token, stride[2] = 1; e0 s0 elements.
template <class T>
struct device_tensor {
  index_t e0 = 0, e1 = 0, e2 = 0, s0 = 0, s1 = 0;
  basisattn::device_buffer<T> buf;

  /// Storage only: the contents are unset (poison it before a run that must write every element).
  device_tensor(index_t a, index_t b, index_t c, padding p = {})
      : e0(a), e1(b), e2(c), s0(b * (c + p.head) + p.token), s1(c + p.head), buf(a * s0) {}

  /// A copy of the contiguous host values x ([a, b, c]) whose padding holds `fill`. With poison and no
  /// head padding the whole buffer is poisoned and the token rows copied in one 2-D copy (no host image
  /// of the padded tensor: strides may be large); otherwise the padded image is built on the host.
  device_tensor(const basisattn::cuda_context& ctx, const T* x, index_t a, index_t b, index_t c, padding p,
                pad_fill fill)
      : device_tensor(a, b, c, p) {
    const index_t w = e1 * e2;
    if (fill.poisoned && s1 == e2) {
      cudatest::poison(ctx, buf);
      if (e0 > 0 && w > 0)
        BASISATTN_CUDA_CHECK(cudaMemcpy2DAsync(buf.data(), sizeof(T) * static_cast<std::size_t>(s0), x,
                                               sizeof(T) * static_cast<std::size_t>(w),
                                               sizeof(T) * static_cast<std::size_t>(w), static_cast<std::size_t>(e0),
                                               cudaMemcpyHostToDevice, ctx.stream()));
      ctx.synchronize();
      return;
    }
    std::vector<T> img(static_cast<std::size_t>(e0 * s0));
    if (fill.poisoned)
      std::memset(static_cast<void*>(img.data()), 0xFF, img.size() * sizeof(T));
    else
      std::fill(img.begin(), img.end(), from_d<T>(fill.value));
    for (index_t i = 0; i < e0; ++i)
      for (index_t j = 0; j < e1; ++j)
        for (index_t k = 0; k < e2; ++k)
          img[static_cast<std::size_t>(i * s0 + j * s1 + k)] = x[static_cast<std::size_t>((i * e1 + j) * e2 + k)];
    buf.upload(ctx, img.data(), static_cast<index_t>(img.size()));
  }
  device_tensor(const basisattn::cuda_context& ctx, const host_tensor<T>& x, padding p, pad_fill fill)
      : device_tensor(ctx, x.data(), x.e0, x.e1, x.e2, p, fill) {}

  basisattn::tensor3_view<T> view() const { return basisattn::tensor3_view<T>(buf.data(), e0, e1, e2, s0, s1, 1); }
  basisattn::tensor3_view<const T> cview() const {
    return basisattn::tensor3_view<const T>(buf.data(), e0, e1, e2, s0, s1, 1);
  }
  /// As an e0 x (e1 e2) matrix with row stride s0 (no head padding).
  basisattn::matrix_view<T> mview() const {
    require_no_head_padding("mview");
    return basisattn::matrix_view<T>(buf.data(), e0, e1 * e2, s0);
  }
  basisattn::matrix_view<const T> cmview() const {
    require_no_head_padding("cmview");
    return basisattn::matrix_view<const T>(buf.data(), e0, e1 * e2, s0);
  }

  /// All of it, padding included: every byte 0xFF.
  void poison(const basisattn::cuda_context& ctx) { cudatest::poison(ctx, buf); }

  /// Download all of it (padding included) into `into`: counts non-finite and unwritten elements and
  /// padding that lost its poison.
  readback download(const basisattn::cuda_context& ctx, host_tensor<T>& into) const {
    require_extents(into);
    std::vector<T> x(static_cast<std::size_t>(e0 * s0));
    buf.download(ctx, x.data(), static_cast<index_t>(x.size()));
    readback c;
    for (index_t i = 0; i < e0; ++i)
      for (index_t r = 0; r < s0; ++r) {
        const T v = x[static_cast<std::size_t>(i * s0 + r)];
        const index_t j = r / s1, k = r % s1;
        if (j >= e1 || k >= e2) {
          if (!is_poison(v)) ++c.padding_touched;
          continue;
        }
        into.at(i, j, k) = v;
        if (is_poison(v)) ++c.unwritten;
        if (!std::isfinite(to_d(v))) ++c.non_finite;
      }
    return c;
  }

  /// Download the e0 x (e1 e2) elements with one 2-D copy (no head padding) and count non-finite and
  /// unwritten ones; the padding is checked only after the token rows `rows`, its first max_pad
  /// elements each (one copy per row: for strides too large to download whole).
  readback download_rows(const basisattn::cuda_context& ctx, host_tensor<T>& into, const std::vector<index_t>& rows,
                         index_t max_pad) const {
    require_extents(into);
    require_no_head_padding("download_rows");
    const index_t w = e1 * e2;
    if (e0 > 0 && w > 0)
      BASISATTN_CUDA_CHECK(cudaMemcpy2DAsync(
          into.data(), sizeof(T) * static_cast<std::size_t>(w), buf.data(), sizeof(T) * static_cast<std::size_t>(s0),
          sizeof(T) * static_cast<std::size_t>(w), static_cast<std::size_t>(e0), cudaMemcpyDeviceToHost, ctx.stream()));
    ctx.synchronize();
    readback c;
    for (const T& v : into.buf) {
      if (is_poison(v)) ++c.unwritten;
      if (!std::isfinite(to_d(v))) ++c.non_finite;
    }
    if (s0 > w) {
      std::vector<T> pad(static_cast<std::size_t>(std::min<index_t>(s0 - w, max_pad)));
      for (index_t t : rows) {
        BASISATTN_CUDA_CHECK(cudaMemcpyAsync(pad.data(), buf.data() + t * s0 + w, pad.size() * sizeof(T),
                                             cudaMemcpyDeviceToHost, ctx.stream()));
        ctx.synchronize();
        for (const T& v : pad) c.padding_touched += is_poison(v) ? 0 : 1;
      }
    }
    return c;
  }

 private:
  void require_extents(const host_tensor<T>& h) const {
    if (h.e0 != e0 || h.e1 != e1 || h.e2 != e2)
      throw std::invalid_argument("device_tensor: download into a host tensor of other extents");
  }
  void require_no_head_padding(const char* what) const {
    if (s1 != e2) throw std::invalid_argument(std::string("device_tensor::") + what + ": the tensor has head padding");
  }
};

// ---- comparisons ------------------------------------------------------------------------------------

/// A storage value as double; a double as it is.
template <class T>
double as_double(const T& x) {
  return to_d(x);
}
inline double as_double(double x) { return x; }

/// ||got - want||_F / ||want||_F over every element (a non-finite element of got makes it NaN or Inf).
template <class T>
double nerr(const host_tensor<T>& got, const host_tensor<T>& want) {
  if (got.buf.size() != want.buf.size()) throw std::invalid_argument("nerr: tensors of other sizes");
  double num = 0, den = 0;
  for (std::size_t e = 0; e < want.buf.size(); ++e) {
    const double a = to_d(got.buf[e]), b = to_d(want.buf[e]);
    num += (a - b) * (a - b);
    den += b * b;
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

/// ||got - want||_F / ||want||_F over the elements where got is finite (a readback counts the others);
/// want is the (e0 e1) x e2 matrix of the same values: a basisattn::matrix of a storage type or an
/// Eigen::MatrixXd (a double reference).
template <class T, class M>
double nerr_finite(const host_tensor<T>& got, const M& want) {
  if (static_cast<index_t>(want.rows()) != got.e0 * got.e1 || static_cast<index_t>(want.cols()) != got.e2)
    throw std::invalid_argument("nerr_finite: want is not (e0 e1) x e2");
  double num = 0, den = 0;
  for (index_t i = 0; i < got.e0 * got.e1; ++i)
    for (index_t j = 0; j < got.e2; ++j) {
      const double a = to_d(got.buf[static_cast<std::size_t>(i * got.e2 + j)]);
      const double b = as_double(want(i, j));
      if (!std::isfinite(a)) continue;
      num += (a - b) * (a - b);
      den += b * b;
    }
  return std::sqrt(num / std::max(den, 1e-300));
}

// ---- both backends ----------------------------------------------------------------------------------

template <class C, class G>
struct both_results {
  C cpu;        ///< what the CPU call returned
  G gpu;        ///< what the CUDA call returned
  readback rb;  ///< the CUDA output's download
};

/// The same call on both backends: cpu_run(want.view()) writes the CPU backend's output into the host
/// tensor `want`; then `out` is poisoned whole, gpu_run(out.view()) runs the CUDA backend into it, and
/// after a synchronisation it is downloaded into `got`. The callables hold the inputs (host views for
/// the one, device views of copies of the same values for the other) and return non-void results.
template <class T, class CpuRun, class GpuRun>
auto run_both(const basisattn::cuda_context& ctx, CpuRun&& cpu_run, host_tensor<T>& want, GpuRun&& gpu_run,
              device_tensor<T>& out, host_tensor<T>& got) {
  auto c = cpu_run(want.view());
  out.poison(ctx);
  auto g = gpu_run(out.view());
  ctx.synchronize();
  const readback rb = out.download(ctx, got);
  return both_results<decltype(c), decltype(g)>{std::move(c), std::move(g), rb};
}

// ---- errors -----------------------------------------------------------------------------------------

/// The code of the basisattn::error that f() raises; errc::io ("no error" marker) when it raises none.
template <class F>
basisattn::errc code_of(F&& f) {
  try {
    f();
  } catch (const basisattn::error& e) {
    return e.code();
  }
  return basisattn::errc::io;
}

/// The message of the basisattn::error that f() raises; "" when it raises none.
template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const basisattn::error& e) {
    return e.what();
  }
  return "";
}

}  // namespace cudatest
