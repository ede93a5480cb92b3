// Exact attention: the double-precision oracle, the blocked CPU kernel, RoPE, and argument checks.
//
// Tolerances. Let T be the storage type (unit roundoff u_T), C the compute type of the blocked path
// (float, or double for double storage / accumulate_double; unit roundoff u_C). Both paths read the
// same T values and widening to C is exact, so the blocked result differs from the double oracle by
//   (a) score errors: s = scale q.k is a length-d_qk dot product. Each of its partial sums is at most
//       kappa' = max over the visible pairs of scale sum_e |q_e k_e| (computed from the data:
//       score_scale), so its rounding error is <= gamma_d kappa' in any summation order, FMA
//       or not (Higham, Accuracy and Stability, eq. 3.5), and about sqrt(d_qk) u_C kappa' as a root
//       mean square of independent roundings. Not |s|: where q.k cancels, |s| << kappa' and the error
//       keeps its size. Softmax turns independent score errors into output changes of the same
//       relative size (dy = sum_j p_j ds_j (v_j - y)), so kappa = max(1, kappa').
//   (b) the P V sums and the normaliser l, sums of n_kv non-negative weights: sqrt(n_kv) u_C as a root
//       mean square (worst case n_kv u_C),
//   (c) one final rounding of out to T: <= u_T relative, per element and so in the Frobenius norm.
// rel_error is a Frobenius norm over all n_q h_q d_v outputs, a root mean square of their errors, so the
// root-mean-square growth of (a) and (b) applies rather than the worst case. Hence, normwise,
//   rel_error <= u_T + u_C (kappa sqrt(d_qk) + sqrt(n_kv) + 4);
// the 4 counts the fixed roundings per element (the scale multiply, exp, the alpha rescale, the 1/l
// multiply). For the oracle against the brute force below, both in double and both with errors of that
// size: twice the bound with u_T = u_C = u_64. Measured (-march=native AVX-512 and baseline SSE2 builds,
// 1 and 2 threads), rel_error / bound: <= 0.43 for 16-bit storage and for float storage with
// accumulate_double, where the exact term u_T dominates; <= 0.08 with float compute, <= 0.18 with
// double compute and <= 0.18 for the oracle, where the model terms dominate.

#include <basisattn/attention.hpp>
#include <basisattn/attention/reference.hpp>
#include <basisattn/attention/rope.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <catch2/catch.hpp>

#include "test_util.hpp"
#include "expect_error.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace basisattn;
using test::rel_error;

namespace {

/// Owning [e0, e1, e2] tensor, contiguous or deliberately strided (head-major, padded rows, every
/// second element of a row: s2 = 2), so that no path can assume a layout.
template <class T>
struct tensor {
  std::vector<T> buf;
  tensor3_view<T> v;

  tensor(index_t e0, index_t e1, index_t e2, bool strided = false) {
    if (!strided) {
      buf.resize(static_cast<std::size_t>(e0 * e1 * e2));
      v = tensor3_view<T>(buf.data(), e0, e1, e2);
    } else {
      const index_t s2 = 2, s0 = 2 * e2 + 3, s1 = e0 * s0;
      buf.resize(static_cast<std::size_t>(e1 * s1));
      v = tensor3_view<T>(buf.data(), e0, e1, e2, s0, s1, s2);
    }
  }
  tensor(const tensor&) = delete;
  tensor& operator=(const tensor&) = delete;

  tensor3_view<const T> c() const { return v; }
  index_t count() const { return v.extent[0] * v.extent[1] * v.extent[2]; }

  void fill_random(double scale = 1.0) {
    for (index_t i = 0; i < v.extent[0]; ++i)
      for (index_t j = 0; j < v.extent[1]; ++j)
        for (index_t k = 0; k < v.extent[2]; ++k) v(i, j, k) = detail::from_compute<T>(scale * test::normal());
  }
  /// Every element of the buffer (inside the view or not) becomes NaN.
  void poison() {
    for (auto& x : buf) x = detail::from_compute<T>(std::nanf(""));
  }
  double at(index_t i, index_t j, index_t k) const {
    if constexpr (std::is_same_v<T, double>)
      return v(i, j, k);
    else
      return static_cast<double>(detail::to_compute<float>(v(i, j, k)));
  }
  /// Values as a (e0 * e1) x e2 double matrix, row (i * e1 + j).
  Eigen::MatrixXd to_double() const {
    Eigen::MatrixXd m(v.extent[0] * v.extent[1], v.extent[2]);
    for (index_t i = 0; i < v.extent[0]; ++i)
      for (index_t j = 0; j < v.extent[1]; ++j)
        for (index_t k = 0; k < v.extent[2]; ++k) m(i * v.extent[1] + j, k) = at(i, j, k);
    return m;
  }
  /// Number of buffer elements that are not NaN.
  index_t finite_in_buffer() const {
    index_t n = 0;
    for (const auto& x : buf) n += !std::isnan(static_cast<double>(detail::to_compute<compute_t<T>>(x)));
    return n;
  }
};

struct attn_case {
  index_t n_q = 16, n_kv = 16, h_q = 2, h_kv = 2, d_qk = 16, d_v = 16;
  bool causal = true;
  double scale = 0;
  bool accumulate_double = false;
  bool strided = false;
  double input_scale = 1.0;  ///< q and k are N(0, input_scale^2)
};

std::string describe(const attn_case& c) {
  return detail::concat("n_q=", c.n_q, " n_kv=", c.n_kv, " h_q=", c.h_q, " h_kv=", c.h_kv, " d_qk=", c.d_qk,
                        " d_v=", c.d_v, " causal=", c.causal, " scale=", c.scale, " acc_double=", c.accumulate_double,
                        " strided=", c.strided, " input_scale=", c.input_scale);
}

/// Over the visible (query, key) pairs, in double: the largest |score| = scale |sum_e q_e k_e|, or
/// with `absolute` kappa' of the header comment, the largest scale sum_e |q_e k_e|, which bounds
/// every partial sum of the score's dot product.
template <class T>
double score_extent(const tensor<T>& q, const tensor<T>& k, const attn_case& c, bool absolute) {
  const double scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(double(c.d_qk));
  const index_t group = c.h_q / c.h_kv, off = c.n_kv - c.n_q;
  double mx = 0;
  for (index_t h = 0; h < c.h_q; ++h)
    for (index_t i = 0; i < c.n_q; ++i)
      for (index_t j = 0; j < (c.causal ? i + off + 1 : c.n_kv); ++j) {
        double s = 0;
        for (index_t e = 0; e < c.d_qk; ++e)
          s += absolute ? std::abs(q.at(i, h, e) * k.at(j, h / group, e)) : q.at(i, h, e) * k.at(j, h / group, e);
        mx = std::max(mx, scale * std::abs(s));
      }
  return mx;
}
template <class T>
double max_abs_score(const tensor<T>& q, const tensor<T>& k, const attn_case& c) {
  return score_extent(q, k, c, false);
}
template <class T>
double score_scale(const tensor<T>& q, const tensor<T>& k, const attn_case& c) {
  return score_extent(q, k, c, true);
}

/// The tolerance derived in the header comment (kappa: score_scale).
template <class T>
double blocked_tolerance(const attn_case& c, double kappa) {
  const double u_c = (std::is_same_v<T, double> || c.accumulate_double) ? test::u<double>() : test::u<float>();
  return test::u<T>() + u_c * (std::max(1.0, kappa) * std::sqrt(double(c.d_qk)) + std::sqrt(double(c.n_kv)) + 4);
}

attention_options options_of(const attn_case& c) {
  attention_options opt;
  opt.causal = c.causal;
  opt.scale = c.scale;
  opt.accumulate_double = c.accumulate_double;
  return opt;
}

/// Run the blocked kernel and the oracle on random data; returns rel_error / tolerance (must be <= 1).
template <class T>
double check_blocked(const attn_case& c) {
  tensor<T> q(c.n_q, c.h_q, c.d_qk, c.strided), k(c.n_kv, c.h_kv, c.d_qk, c.strided),
      v(c.n_kv, c.h_kv, c.d_v, c.strided), out(c.n_q, c.h_q, c.d_v, c.strided);
  tensor<double> ref(c.n_q, c.h_q, c.d_v);
  q.fill_random(c.input_scale);
  k.fill_random(c.input_scale);
  v.fill_random();
  out.poison();
  ref.poison();
  const attention_options opt = options_of(c);
  attention_reference<T, double>(q.c(), k.c(), v.c(), ref.v, opt);
  attention<T>(cpu{}, q.c(), k.c(), v.c(), out.v, opt);
  const double err = rel_error(out.to_double(), ref.to_double());
  const double tol = blocked_tolerance<T>(c, score_scale(q, k, c));
  INFO(describe(c) << " dtype=" << to_string(dtype_of_v<T>) << ": rel_error " << err << ", tolerance " << tol);
  CHECK(err <= tol);
  // Every output element written, nothing outside the view touched.
  CHECK(out.finite_in_buffer() == out.count());
  return err / tol;
}

/// Set the OpenMP thread count for one scope.
struct scoped_threads {
#if defined(_OPENMP)
  int saved = omp_get_max_threads();
  explicit scoped_threads(int n) { omp_set_num_threads(n); }
  ~scoped_threads() { omp_set_num_threads(saved); }
#else
  explicit scoped_threads(int) {}
#endif
};

/// Explicit-matrix softmax attention for one head in double, written independently of the library:
/// full score matrix, explicit 0/1 mask, softmax without the max shift (fine for small scores).
Eigen::MatrixXd brute_force_head(const Eigen::MatrixXd& q, const Eigen::MatrixXd& k, const Eigen::MatrixXd& v,
                                 bool causal, double scale) {
  const Eigen::MatrixXd s = scale * q * k.transpose();
  Eigen::MatrixXd mask = Eigen::MatrixXd::Ones(q.rows(), k.rows());
  const index_t off = k.rows() - q.rows();
  if (causal)
    for (index_t i = 0; i < q.rows(); ++i)
      for (index_t j = 0; j < k.rows(); ++j)
        if (j > i + off) mask(i, j) = 0;
  Eigen::MatrixXd p = s.array().exp() * mask.array();
  for (index_t i = 0; i < p.rows(); ++i) p.row(i) /= p.row(i).sum();
  return p * v;
}

/// Head h of a tensor as an n x d double matrix.
template <class T>
Eigen::MatrixXd head(const tensor<T>& t, index_t h) {
  Eigen::MatrixXd m(t.v.extent[0], t.v.extent[2]);
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t e = 0; e < m.cols(); ++e) m(i, e) = t.at(i, h, e);
  return m;
}

}  // namespace

// ---- the oracle --------------------------------------------------------------------------------------

TEST_CASE("attention_reference matches an explicit score-matrix brute force (GQA, causal and not)") {
  test::seed(1);
  for (bool causal : {false, true}) {
    for (double scale : {0.0, 0.37}) {
      const index_t n_q = 5, n_kv = 7, h_q = 4, h_kv = 2, d_qk = 3, d_v = 2;
      tensor<double> q(n_q, h_q, d_qk), k(n_kv, h_kv, d_qk), v(n_kv, h_kv, d_v), out(n_q, h_q, d_v);
      q.fill_random();
      k.fill_random();
      v.fill_random();
      out.poison();
      attention_options opt;
      opt.causal = causal;
      opt.scale = scale;
      attention_reference<double, double>(q.c(), k.c(), v.c(), out.v, opt);
      const double eff_scale = scale > 0 ? scale : 1 / std::sqrt(double(d_qk));
      attn_case c;
      c.n_q = n_q;
      c.n_kv = n_kv;
      c.h_q = h_q;
      c.h_kv = h_kv;
      c.d_qk = d_qk;
      c.d_v = d_v;
      c.causal = causal;
      c.scale = scale;
      const double tol = 2 * blocked_tolerance<double>(c, score_scale(q, k, c));
      for (index_t h = 0; h < h_q; ++h) {
        const Eigen::MatrixXd want = brute_force_head(head(q, h), head(k, h / 2), head(v, h / 2), causal, eff_scale);
        const double err = rel_error(head(out, h), want);
        INFO("causal=" << causal << " scale=" << scale << " head " << h << ": rel_error " << err);
        CHECK(err <= tol);
      }
    }
  }
}

TEST_CASE("hand-checkable cases: one key returns v, equal scores average the visible v") {
  SECTION("one key: out == v exactly, in every path and dtype") {
    tensor<float> q(1, 3, 4), k(1, 1, 4), v(1, 1, 5), out(1, 3, 5), ref(1, 3, 5);
    test::seed(2);
    q.fill_random(3);
    k.fill_random(3);
    v.fill_random();
    attention_reference<float, float>(q.c(), k.c(), v.c(), ref.v);
    attention<float>(cpu{}, q.c(), k.c(), v.c(), out.v);
    // Bitwise: with one key m = s, p = exp(s - m) = exp(0) = 1 and l = 1 exactly, o = 1 * v (+ 0) and
    // o * (1 / l) are exact, and v is already a T value: no rounding anywhere, in any path or ISA.
    for (index_t h = 0; h < 3; ++h)
      for (index_t e = 0; e < 5; ++e) {
        CHECK(ref.v(0, h, e) == v.v(0, 0, e));
        CHECK(out.v(0, h, e) == v.v(0, 0, e));
      }
    tensor<Eigen::half> qh(1, 2, 4), kh(1, 2, 4), vh(1, 2, 8), oh(1, 2, 8);
    qh.fill_random();
    kh.fill_random();
    vh.fill_random();
    attention<Eigen::half>(cpu{}, qh.c(), kh.c(), vh.c(), oh.v);
    // Bitwise, as above: half -> float -> half of 1 * v is exact.
    for (index_t h = 0; h < 2; ++h)
      for (index_t e = 0; e < 8; ++e) CHECK(float(oh.v(0, h, e)) == float(vh.v(0, h, e)));
  }
  SECTION("q = 0: all scores equal, out_i = mean of the visible v (causal, end-aligned)") {
    const index_t n_q = 3, n_kv = 300, d = 8;
    tensor<double> q(n_q, 1, d), k(n_kv, 1, d), v(n_kv, 1, d), out(n_q, 1, d), ref(n_q, 1, d);
    std::fill(q.buf.begin(), q.buf.end(), 0.0);
    test::seed(3);
    k.fill_random();
    v.fill_random();
    attention<double>(cpu{}, q.c(), k.c(), v.c(), out.v);
    attention_reference<double, double>(q.c(), k.c(), v.c(), ref.v);
    for (index_t i = 0; i < n_q; ++i) {
      const index_t visible = i + (n_kv - n_q) + 1;
      for (index_t e = 0; e < d; ++e) {
        double mean = 0;
        for (index_t j = 0; j < visible; ++j) mean += v.v(j, 0, e);
        mean /= double(visible);
        // sums of `visible` terms of size ~1: error <= visible * u_64 in the worst case.
        CHECK(std::abs(out.v(i, 0, e) - mean) <= 4 * double(visible) * test::u<double>());
        CHECK(std::abs(ref.v(i, 0, e) - mean) <= 4 * double(visible) * test::u<double>());
      }
    }
  }
}

// ---- the blocked kernel against the oracle -----------------------------------------------------------

TEMPLATE_TEST_CASE("blocked attention matches the reference", "", float, double, Eigen::half, Eigen::bfloat16) {
  using T = TestType;
  test::seed(10);
  for (bool causal : {false, true}) {
    for (index_t n : {1, 7, 129, 700}) {
      attn_case c;
      c.n_q = c.n_kv = n;
      c.h_q = 2;
      c.h_kv = 2;
      c.d_qk = c.d_v = 64;
      c.causal = causal;
      check_blocked<T>(c);
    }
    attn_case gqa;  // 8 query heads share 2 kv heads, d_qk != d_v, scale set by hand
    gqa.n_q = gqa.n_kv = 300;
    gqa.h_q = 8;
    gqa.h_kv = 2;
    gqa.d_qk = 40;
    gqa.d_v = 24;
    gqa.scale = 0.3;
    gqa.causal = causal;
    check_blocked<T>(gqa);
    attn_case mqa = gqa;  // one kv head
    mqa.h_kv = 1;
    mqa.scale = 0;
    mqa.n_q = mqa.n_kv = 257;
    check_blocked<T>(mqa);
    attn_case strided = gqa;  // every tensor non-contiguous (s2 = 2, padded rows, head-major)
    strided.strided = true;
    strided.n_q = strided.n_kv = 129;
    check_blocked<T>(strided);
    attn_case acc = gqa;  // all arithmetic in double
    acc.accumulate_double = true;
    check_blocked<T>(acc);
  }
  SECTION("causal with n_q < n_kv is end-aligned (KV cache), including one-token decode") {
    for (index_t n_q : {1, 100, 700}) {
      attn_case c;
      c.n_q = n_q;
      c.n_kv = 700;
      c.h_q = 4;
      c.h_kv = 2;
      c.d_qk = 32;
      c.d_v = 48;
      check_blocked<T>(c);
      c.causal = false;
      check_blocked<T>(c);
    }
  }
}

TEMPLATE_TEST_CASE("large scores stay finite and accurate (streaming softmax shift)", "", float, double,
                   Eigen::bfloat16) {
  using T = TestType;
  test::seed(20);
  for (double input_scale : {4.2, 6.0}) {  // max |score| about 80 and about 160 (exp(160) overflows float)
    attn_case c;
    c.n_q = c.n_kv = 400;
    c.h_q = c.h_kv = 2;
    c.d_qk = c.d_v = 64;
    c.input_scale = input_scale;
    for (bool causal : {false, true}) {
      c.causal = causal;
      check_blocked<T>(c);
    }
  }
  // The case really reaches the advertised magnitudes.
  tensor<T> q(400, 1, 64), k(400, 1, 64);
  q.fill_random(6.0);
  k.fill_random(6.0);
  attn_case c;
  c.n_q = c.n_kv = 400;
  c.h_q = c.h_kv = 1;
  c.d_qk = 64;
  c.causal = false;
  CHECK(max_abs_score(q, k, c) > 100);
}

#if defined(_OPENMP)  // without OpenMP both runs would be the same serial run: nothing to compare
TEST_CASE("two threads and one thread give the same result") {
  test::seed(30);
  const index_t n = 600, h_q = 8, h_kv = 2, d = 64;
  tensor<float> q(n, h_q, d), k(n, h_kv, d), v(n, h_kv, d), o1(n, h_q, d), o2(n, h_q, d);
  q.fill_random();
  k.fill_random();
  v.fill_random();
  for (bool causal : {false, true}) {
    attention_options opt;
    opt.causal = causal;
    o1.poison();
    o2.poison();
    {
      scoped_threads t(1);
      attention<float>(cpu{}, q.c(), k.c(), v.c(), o1.v, opt);
    }
    {
      scoped_threads t(2);
      REQUIRE(omp_get_max_threads() == 2);  // the second run really may use two threads
      attention<float>(cpu{}, q.c(), k.c(), v.c(), o2.v, opt);
    }
    // Bitwise: the items (head, 128-row query block) do not depend on the thread count, and each is
    // computed by the same code with single-threaded Eigen GEMMs of the same shapes and blocking
    // whichever thread runs it (inside the OpenMP region Eigen does not fork; with one thread
    // omp_get_max_threads() = 1 keeps it serial).
    const double err = rel_error(o2.to_double(), o1.to_double());
    INFO("causal=" << causal << ": rel_error " << err);
    CHECK(err == 0);
  }
}
#endif

TEST_CASE("caller-owned workspace gives the same result, and too small a workspace is rejected") {
  test::seed(40);
  const index_t n = 300, h = 4, d = 32;
  tensor<Eigen::bfloat16> q(n, h, d), k(n, h, d), v(n, h, d), o1(n, h, d), o2(n, h, d);
  q.fill_random();
  k.fill_random();
  v.fill_random();
  o1.poison();
  o2.poison();
  const attention_options opt;
  const std::size_t bytes = workspace_bytes(cpu{}, q.c(), k.c(), v.c(), opt);
  std::vector<unsigned char> ws(bytes + 1);
  attention<Eigen::bfloat16>(cpu{}, q.c(), k.c(), v.c(), o1.v, opt, ws.data() + 1, bytes);  // misaligned on purpose
  attention<Eigen::bfloat16>(cpu{}, q.c(), k.c(), v.c(), o2.v, opt);
  // Bitwise: attention_cpu_run realigns any caller pointer to 64 bytes, so both calls carve identical
  // slices and run the same per-item arithmetic.
  CHECK(rel_error(o1.to_double(), o2.to_double()) == 0);
  // The storage type matters only through the compute type: bf16 and f32 both compute in float.
  auto sizes = [](index_t nq, index_t nkv, index_t hq, index_t dqk, index_t dv, dtype st, const attention_options& o) {
    return basisattn::detail::attention_cpu_workspace_bytes("test", nq, nkv, hq, dqk, dv, st, o);
  };
  CHECK(sizes(n, n, h, d, d, dtype::f32, opt) == bytes);
  attention_options acc;
  acc.accumulate_double = true;
  CHECK(sizes(n, n, h, d, d, dtype::bf16, acc) > bytes);
  test::expect_error([&] { attention<Eigen::bfloat16>(cpu{}, q.c(), k.c(), v.c(), o1.v, opt, ws.data(), 256); },
                     errc::invalid_argument, "workspace of 256 bytes");
  test::expect_error([&] { attention<Eigen::bfloat16>(cpu{}, q.c(), k.c(), v.c(), o1.v, opt, nullptr, 0); },
                     errc::invalid_argument, "too small");
  // From the views: every extent in its place (n_q != n_kv, d_qk != d_v, GQA), storage from the type.
  tensor<float> qs(37, 4, 32), ks(300, 2, 32), vs(300, 2, 24);
  CHECK(workspace_bytes(cpu{}, qs.c(), ks.c(), vs.c(), opt) == sizes(37, 300, 4, 32, 24, dtype::f32, opt));
  CHECK(workspace_bytes(cpu{}, q.c(), k.c(), v.c(), acc) == sizes(n, n, h, d, d, dtype::bf16, acc));
  test::expect_error([&] { workspace_bytes(cpu{}, tensor3_view<const float>(qs.c().data, 0, 4, 32), ks.c(), vs.c()); },
                     errc::invalid_argument, "n_q = 0");
}

// ---- argument checks ---------------------------------------------------------------------------------

TEST_CASE("bad attention arguments raise basisattn::error naming the problem") {
  tensor<float> q(8, 4, 16), k(8, 2, 16), v(8, 2, 12), out(8, 4, 12);
  test::seed(50);
  q.fill_random();
  k.fill_random();
  v.fill_random();
  auto both = [&](auto&& qq, auto&& kk, auto&& vv, auto&& oo, const attention_options& opt, errc code,
                  const std::string& needle) {
    test::expect_error([&] { attention<float>(cpu{}, qq, kk, vv, oo, opt); }, code, needle);
    test::expect_error([&] { attention_reference<float, float>(qq, kk, vv, oo, opt); }, code, needle);
  };
  const attention_options def;
  tensor<float> k_d(8, 2, 15), v_n(9, 2, 12), v_h(8, 3, 12), k_h3(8, 3, 16), v_h3(8, 3, 12), out_d(8, 4, 11),
      out_h(8, 2, 12), out_n(7, 4, 12);
  k_h3.fill_random();
  v_h3.fill_random();
  k_d.fill_random();
  v_n.fill_random();
  v_h.fill_random();
  both(q.c(), k_d.c(), v.c(), out.v, def, errc::shape_mismatch, "has d_qk = 16 but k [8, 2, 15] has d_qk = 15");
  both(q.c(), k.c(), v_n.c(), out.v, def, errc::shape_mismatch, "k [8, 2, 16] has n_kv = 8 tokens but v [9, 2, 12]");
  both(q.c(), k.c(), v_h.c(), out.v, def, errc::shape_mismatch, "has H_kv = 2 heads but v [8, 3, 12]");
  both(q.c(), k_h3.c(), v_h3.c(), out.v, def, errc::shape_mismatch, "H_q = 4 heads, not a multiple of the H_kv = 3");
  both(q.c(), k.c(), v.c(), out_d.v, def, errc::shape_mismatch,
       "out has extents [8, 4, 11] but must be [n_q, H_q, d_v] = [8, 4, 12]");
  both(q.c(), k.c(), v.c(), out_h.v, def, errc::shape_mismatch, "out has extents [8, 2, 12]");
  both(q.c(), k.c(), v.c(), out_n.v, def, errc::shape_mismatch, "out has extents [7, 4, 12]");
  both(tensor3_view<const float>(q.buf.data(), 0, 4, 16), k.c(), v.c(), tensor3_view<float>(out.buf.data(), 0, 4, 12),
       def, errc::invalid_argument, "q has extents [0, 4, 16]");

  SECTION("causal needs n_q <= n_kv; non-causal does not") {
    tensor<float> q9(9, 4, 16), out9(9, 4, 12);
    q9.fill_random();
    both(q9.c(), k.c(), v.c(), out9.v, def, errc::invalid_argument,
         "causal attention needs n_q <= n_kv, but q has n_q = 9");
    attention_options nc;
    nc.causal = false;
    CHECK_NOTHROW(attention<float>(cpu{}, q9.c(), k.c(), v.c(), out9.v, nc));
  }
  SECTION("scale must be finite and non-negative") {
    for (double bad : {-1.0, double(NAN), double(INFINITY)}) {
      attention_options o;
      o.scale = bad;
      both(q.c(), k.c(), v.c(), out.v, o, errc::invalid_argument, "options.scale");
    }
  }
  SECTION("NaN or Inf in q, k or v is reported with its position") {
    tensor<float> bad(8, 2, 12);
    bad.fill_random();
    bad.v(5, 1, 3) = INFINITY;
    both(q.c(), k.c(), bad.c(), out.v, def, errc::non_finite, "v has a non-finite value at (5, 1, 3)");
    q.v(2, 3, 0) = NAN;
    both(q.c(), k.c(), v.c(), out.v, def, errc::non_finite, "q has a non-finite value at (2, 3, 0)");
    tensor<Eigen::half> qh(8, 4, 16), kh(8, 2, 16), vh(8, 2, 12), oh(8, 4, 12);
    qh.fill_random();
    kh.fill_random();
    vh.fill_random();
    kh.v(7, 0, 15) = Eigen::half(std::nanf(""));
    test::expect_error([&] { attention<Eigen::half>(cpu{}, qh.c(), kh.c(), vh.c(), oh.v); }, errc::non_finite,
                       "k has a non-finite value at (7, 0, 15)");
    attention_options unchecked;
    unchecked.check_finite = false;
    CHECK_NOTHROW(attention<Eigen::half>(cpu{}, qh.c(), kh.c(), vh.c(), oh.v, unchecked));
  }
}

// ---- RoPE ----------------------------------------------------------------------------------------------

namespace {

/// RoPE written as an explicit rotation in double, independently of the library: the frequency as
/// exp(-(2i/d) log theta), the pair indices spelled out per style.
template <class T>
Eigen::MatrixXd rope_explicit(const tensor<T>& x, const rope_params& p) {
  const index_t n = x.v.extent[0], h = x.v.extent[1], d = x.v.extent[2];
  Eigen::MatrixXd y = x.to_double();
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < d / 2; ++i) {
      const double a = double(p.position_offset + t) * std::exp(-(2.0 * double(i) / double(d)) * std::log(p.theta));
      const index_t i0 = p.style == rope_style::interleaved ? 2 * i : i;
      const index_t i1 = p.style == rope_style::interleaved ? 2 * i + 1 : i + d / 2;
      for (index_t j = 0; j < h; ++j) {
        const double x0 = x.at(t, j, i0), x1 = x.at(t, j, i1);
        y(t * h + j, i0) = std::cos(a) * x0 - std::sin(a) * x1;
        y(t * h + j, i1) = std::sin(a) * x0 + std::cos(a) * x1;
      }
    }
  return y;
}

// Tolerance of RoPE against the explicit rotation: the stored result is the double rotation rounded to
// T (<= u_T, plus a second rounding through float for 16-bit types: 2 u_T); the angles of the two
// computations differ by a few u_64 * |angle| (different frequency formulas), which moves the result by
// as much relative to its norm: tol = 2 u_T + 8 u_64 (1 + max |angle|).
template <class T>
double rope_tolerance(index_t max_pos) {
  return 2 * test::u<T>() + 8 * test::u<double>() * (1.0 + double(max_pos));
}

}  // namespace

TEMPLATE_TEST_CASE("apply_rope matches an explicit rotation for both styles", "", float, double, Eigen::half,
                   Eigen::bfloat16) {
  using T = TestType;
  test::seed(60);
  for (rope_style style : {rope_style::interleaved, rope_style::half}) {
    for (index_t offset : {index_t(0), index_t(1000)}) {
      for (bool strided : {false, true}) {
        tensor<T> x(37, 3, 64, strided);
        x.fill_random();
        rope_params p;
        p.style = style;
        p.position_offset = offset;
        p.theta = offset ? 500000.0 : 10000.0;
        const Eigen::MatrixXd want = rope_explicit(x, p);
        const Eigen::MatrixXd before = x.to_double();
        apply_rope(x.v, p);
        const Eigen::MatrixXd got = x.to_double();
        const double err = rel_error(got, want);
        INFO("style=" << int(style) << " offset=" << offset << " strided=" << strided << ": rel_error " << err);
        CHECK(err <= rope_tolerance<T>(offset + 37));
        // A rotation preserves the norm of every (token, head) vector.
        const Eigen::VectorXd n0 = before.rowwise().norm(), n1 = got.rowwise().norm();
        // Rounding to T moves the norm by <= u_T (2 u_T through float); the double rotation
        // (cos^2 + sin^2 = 1 + O(u_64), two products and a sum) and the two norm evaluations add
        // <~ (3 + 2 sqrt(d)) u_64.
        const double norm_tol = 2 * test::u<T>() + (3 + 2 * std::sqrt(64.0)) * test::u<double>();
        CHECK(((n1 - n0).cwiseAbs().array() <= norm_tol * n0.array()).all());
      }
    }
  }
}

TEST_CASE("apply_rope: token 0 is untouched, position p is undone by offset -p, relative positions") {
  test::seed(61);
  for (rope_style style : {rope_style::interleaved, rope_style::half}) {
    rope_params p;
    p.style = style;
    tensor<double> x(1, 2, 32), x0(1, 2, 32);
    x.fill_random();
    x0.buf = x.buf;
    apply_rope(x.v, p);  // position 0: identity
    // Bitwise: the angles are 0 * inv_freq = 0, cos 0 = 1 and sin 0 = 0 exactly, and x0 * 1 - x1 * 0
    // (fused or not) is x0 exactly.
    CHECK(rel_error(x.to_double(), x0.to_double()) == 0);
    p.position_offset = 777;
    apply_rope(x.v, p);
    CHECK(rel_error(x.to_double(), x0.to_double()) > 0.1);
    p.position_offset = -777;
    apply_rope(x.v, p);
    CHECK(rel_error(x.to_double(), x0.to_double()) <= rope_tolerance<double>(777));

    // <rope(q, a), rope(k, b)> depends only on a - b.
    tensor<double> q1(1, 1, 32), k1(1, 1, 32), q2(1, 1, 32), k2(1, 1, 32);
    q1.fill_random();
    k1.fill_random();
    q2.buf = q1.buf;
    k2.buf = k1.buf;
    auto rot = [&](tensor<double>& t, index_t pos) {
      rope_params r;
      r.style = style;
      r.position_offset = pos;
      apply_rope(t.v, r);
    };
    rot(q1, 10);
    rot(k1, 3);
    rot(q2, 510);
    rot(k2, 503);
    const double d1 = head(q1, 0).row(0).dot(head(k1, 0).row(0)), d2 = head(q2, 0).row(0).dot(head(k2, 0).row(0));
    CHECK(std::abs(d1 - d2) <= rope_tolerance<double>(510) * head(q1, 0).norm() * head(k1, 0).norm());
  }
}

TEST_CASE("apply_rope rejects an odd head dim and a bad theta") {
  tensor<float> x(4, 2, 7);
  x.fill_random();
  test::expect_error([&] { apply_rope(x.v); }, errc::invalid_argument, "head dim d = 7");
  tensor<float> y(4, 2, 8);
  y.fill_random();
  rope_params p;
  p.theta = 0;
  test::expect_error([&] { apply_rope(y.v, p); }, errc::invalid_argument, "params.theta = 0");
}
