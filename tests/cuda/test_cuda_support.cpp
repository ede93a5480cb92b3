// CUDA support-basis attention vs the CPU backend: support::run(ctx, plan, ...) against
// support::run(cpu{}, plan, ...) with the SAME plan (made by support::make_plan(cpu{}, ...) from the
// host copies), on fresh random inputs (the seed is printed on failure): rows of small entries with a
// fraction of outlier rows (as tests/test_support_basis.cpp fills them), causal (end-aligned, n_q <
// n_kv) and non-causal, MHA / GQA / MQA, degree 1, 2 and 3, exact monomial and sketched features,
// single and multi-threshold, all-exact (threshold 0) and all-polynomial (threshold above every entry),
// head dims above one warp (d_v = 40), blocks that do not divide n. Device tensors have padded strides
// whose padding holds NaN (a kernel reading it would make the output non-finite); the output and the
// whole workspace are poisoned (all bytes 0xFF: NaN in fp32, fp16 and bf16) before each run, so an
// unwritten output element or a workspace buffer read before it is written shows up as non-finite,
// and the output's padding must keep its poison. Reports must agree: bad_rows, poly_rows, fallback and
// checked_rows exactly (both backends follow the same row rules: see <basisattn/cuda/support.hpp>),
// est_error_max to the comparison tolerance (the estimate rows are the same approximated rows).
//
// Bound on nerr = ||y_gpu - y_cpu||_F / ||y_cpu||_F: both backends evaluate the same approximation
// (same plan, same polynomials, same sign matrices) in fp32 and differ only in the order of the fp32
// sums (cuBLAS GEMMs vs Eigen's, a warp-per-row exact part vs the CPU's blocks) and in where the
// feature products are rounded. On these inputs (scores |s| <~ 3, feature sums of a few hundred terms)
// that is a relative 1e-6 or so; 1e-4 leaves a factor ~100 and is still far below the approximation
// errors (>= 1e-3 when the polynomial part matters). 16-bit storage adds the final rounding of either
// side to T, which can differ by one unit in the last place: 2 u_T more.
// Without a usable GPU the program exits 77 (CTest: Skipped).
#include "skip_main.hpp"

#include "cuda_test_util.hpp"

#include <basisattn/attention/attention.hpp>
#include <basisattn/cpu/attention.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/support.hpp>
#include <basisattn/support/support_basis.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace basisattn;

namespace {

using cudatest::fresh_seed;
using cudatest::is_poison;
using cudatest::poison;

using cudatest::from_d;
using cudatest::to_d;

template <class T>
double tolerance() {
  return 1e-4 + (std::is_same_v<T, float> ? 0.0 : 2 * unit_roundoff(dtype_of_v<T>));
}

/// Owning contiguous host [e0, e1, e2] tensor.
template <class T>
struct host_tensor {
  index_t e0, e1, e2;
  std::vector<T> buf;
  host_tensor(index_t a, index_t b, index_t c) : e0(a), e1(b), e2(c), buf(static_cast<std::size_t>(a * b * c)) {}
  tensor3_view<T> view() { return tensor3_view<T>(buf.data(), e0, e1, e2); }
  tensor3_view<const T> cview() const { return tensor3_view<const T>(buf.data(), e0, e1, e2); }
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
  /// Row scales spread over two decades: max |entry| from ~0.01 to ~1 (the multi-threshold data).
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

/// A device copy with padded strides (head stride e2 + 1, token stride e1 (e2 + 1) + 3); the padding
/// holds `pad` (NaN for inputs).
template <class T>
struct device_tensor {
  index_t e0, e1, e2, s0, s1;
  device_buffer<T> buf;
  device_tensor(const cuda_context& ctx, const host_tensor<T>& h, double pad)
      : e0(h.e0), e1(h.e1), e2(h.e2), s0(h.e1 * (h.e2 + 1) + 3), s1(h.e2 + 1), buf(h.e0 * s0) {
    std::vector<T> x(static_cast<std::size_t>(e0 * s0), from_d<T>(pad));
    for (index_t i = 0; i < e0; ++i)
      for (index_t j = 0; j < e1; ++j)
        for (index_t k = 0; k < e2; ++k) x[static_cast<std::size_t>(i * s0 + j * s1 + k)] = h.at(i, j, k);
    buf.upload(ctx, x.data(), static_cast<index_t>(x.size()));
  }
  tensor3_view<T> view() const { return tensor3_view<T>(buf.data(), e0, e1, e2, s0, s1, 1); }
  tensor3_view<const T> cview() const { return tensor3_view<const T>(buf.data(), e0, e1, e2, s0, s1, 1); }
  /// Download; counts non-finite elements and padding that lost its poison.
  void download(const cuda_context& ctx, host_tensor<T>& h, index_t& non_finite, index_t& padding_touched) const {
    std::vector<T> x(static_cast<std::size_t>(e0 * s0));
    buf.download(ctx, x.data(), static_cast<index_t>(x.size()));
    non_finite = padding_touched = 0;
    for (index_t i = 0; i < e0; ++i)
      for (index_t r = 0; r < s0; ++r) {
        const T v = x[static_cast<std::size_t>(i * s0 + r)];
        const index_t j = r / s1, k = r % s1;
        if (j >= e1 || k >= e2) {
          if (!is_poison(v)) ++padding_touched;
          continue;
        }
        h.at(i, j, k) = v;
        if (!std::isfinite(to_d(v))) ++non_finite;
      }
  }
};

template <class T>
double nerr(const host_tensor<T>& got, const host_tensor<T>& want) {
  double num = 0, den = 0;
  for (std::size_t e = 0; e < want.buf.size(); ++e) {
    const double a = to_d(got.buf[e]), b = to_d(want.buf[e]);
    num += (a - b) * (a - b);
    den += b * b;
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

struct problem {
  index_t n_q = 96, n_kv = 96, h_q = 2, h_kv = 2, d = 16, d_v = 8;
};

enum class data_kind { outliers, small, large, spread };

/// Fill, plan on the host, run on both backends, compare (see the header comment).
template <class T>
void compare_backends(const cuda_context& ctx, const problem& pr, const support::support_options& o, data_kind kind,
                      std::mt19937_64& g, const std::string& what) {
  INFO(what << " | dtype " << to_string(dtype_of_v<T>) << ", n_q " << pr.n_q << ", n_kv " << pr.n_kv << ", heads "
            << pr.h_q << "/" << pr.h_kv << ", d " << pr.d << ", d_v " << pr.d_v << ", causal " << o.causal);
  host_tensor<T> q(pr.n_q, pr.h_q, pr.d), k(pr.n_kv, pr.h_kv, pr.d), v(pr.n_kv, pr.h_kv, pr.d_v);
  switch (kind) {
    case data_kind::outliers:
      q.fill(g, 0.1, 0.15, 20);  // 15% of rows with entries ~2
      k.fill(g, 0.1, 0.15, 20);
      break;
    case data_kind::small:
      q.fill(g, 0.3);
      k.fill(g, 0.3);
      break;
    case data_kind::large:
      q.fill(g, 1.0);
      k.fill(g, 1.0);
      break;
    case data_kind::spread:
      q.fill_spread(g);
      k.fill_spread(g);
      break;
  }
  v.fill(g, 1.0);
  const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
  host_tensor<T> want(pr.n_q, pr.h_q, pr.d_v), got(pr.n_q, pr.h_q, pr.d_v);
  const std::vector<support::head_report> cpu_rep = support::run(cpu{}, plan, q.cview(), k.cview(), v.cview(), want.view());

  const double nan = std::numeric_limits<double>::quiet_NaN();
  const device_tensor<T> dq(ctx, q, nan), dk(ctx, k, nan), dv(ctx, v, nan);
  device_tensor<T> dout(ctx, want, 0.0);
  device_buffer<unsigned char> ws(static_cast<index_t>(support::workspace_bytes(ctx, plan, pr.d_v)));
  for (int run = 0; run < 2; ++run) {  // the second run reuses the plan and a dirty (re-poisoned) workspace
    poison(ctx, dout.buf);
    poison(ctx, ws);
    std::vector<support::head_report> gpu_rep(static_cast<std::size_t>(pr.h_q));
    support::run<T>(ctx, plan, dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), ws.bytes(), gpu_rep.data());
    ctx.synchronize();
    index_t non_finite = 0, padding_touched = 0;
    dout.download(ctx, got, non_finite, padding_touched);
    const double e = nerr(got, want);
    INFO("run " << run << ": nerr " << e << " (bound " << tolerance<T>() << ")");
    CHECK(non_finite == 0);
    CHECK(padding_touched == 0);
    CHECK(e <= tolerance<T>());
    for (index_t h = 0; h < pr.h_q; ++h) {
      const auto& a = gpu_rep[static_cast<std::size_t>(h)];
      const auto& b = cpu_rep[static_cast<std::size_t>(h)];
      INFO("head " << h << ": est_error_max gpu " << a.est_error_max << " cpu " << b.est_error_max << ", bad rows "
                   << a.bad_rows << "/" << b.bad_rows << ", fallback " << a.fallback << "/" << b.fallback);
      CHECK(a.bad_rows == b.bad_rows);
      CHECK(a.poly_rows == b.poly_rows);
      CHECK(a.fallback == b.fallback);
      CHECK(a.checked_rows == b.checked_rows);
      CHECK(a.checked_rows == std::min<std::int64_t>(o.check_rows, a.poly_rows));
      CHECK(a.degree == b.degree);  // make_plan's part is copied from the plan
      CHECK(a.features == b.features);
      CHECK(a.query_support == b.query_support);
      CHECK(std::abs(a.est_error_max - b.est_error_max) <= 2 * tolerance<T>() * std::max(1.0, b.est_error_max) + 1e-6);
      CHECK(std::abs(a.est_error_mean - b.est_error_mean) <= 2 * tolerance<T>() * std::max(1.0, b.est_error_mean) + 1e-6);
    }
  }
}

template <class T>
void suite() {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;

  // Mixed supports (outlier rows), degree 2 and 1, causal and not, GQA and MQA, end-aligned n_q < n_kv.
  struct cfg {
    problem pr;
    bool causal;
    int degree;
    std::int64_t block;
  };
  const cfg mixed[] = {
      {{96, 96, 2, 2, 16, 8}, true, 2, 32},   {{96, 96, 2, 2, 16, 8}, false, 2, 32},
      {{70, 130, 4, 2, 16, 8}, true, 1, 32},  {{64, 100, 4, 1, 16, 40}, false, 2, 24},
      {{100, 100, 4, 1, 16, 8}, true, 2, 48}, {{50, 77, 2, 1, 48, 40}, true, 2, 16},
  };
  for (const cfg& c : mixed) {
    support::support_options o;
    o.causal = c.causal;
    o.threshold = 0.5;
    o.max_degree = c.degree;
    o.target_error = 1e-14;  // the maximal degree
    o.tolerance = INFINITY;
    o.block = c.block;
    compare_backends<T>(ctx, c.pr, o, data_kind::outliers, g, "mixed supports, degree " + std::to_string(c.degree));
  }

  // Polynomial part alone (nothing in the supports), both masks, degrees 1 and 2.
  for (const bool causal : {false, true})
    for (const int degree : {1, 2}) {
      support::support_options o;
      o.causal = causal;
      o.threshold = 100;
      o.max_degree = degree;
      o.target_error = 1e-14;
      o.tolerance = INFINITY;
      o.block = 40;
      compare_backends<T>(ctx, problem{}, o, data_kind::small, g, "polynomial only, degree " + std::to_string(degree));
    }

  // Everything exact (threshold 0: degree 0, no polynomial part).
  for (const bool causal : {false, true}) {
    support::support_options o;
    o.causal = causal;
    o.threshold = 0;
    compare_backends<T>(ctx, problem{70, 90, 3, 1, 16, 8}, o, data_kind::large, g, "all exact");
  }

  // Sketched features: degree 2 (one GEMM and one product per degree) and 3, causal and not.
  for (const bool causal : {false, true})
    for (const int degree : {2, 3}) {
      support::support_options o;
      o.causal = causal;
      o.threshold = 0.5;
      o.max_degree = degree;
      o.target_error = 1e-14;
      o.tolerance = INFINITY;
      o.sketch = true;
      o.sketch_size = 32;
      o.seed = 7;
      o.block = 48;
      compare_backends<T>(ctx, problem{128, 128, 2, 2, 16, 8}, o, data_kind::outliers, g,
                          "sketched, degree " + std::to_string(degree));
    }

  // Multi-threshold: six levels over two decades of row scales, causal; and three levels non-causal GQA.
  {
    support::support_options o;
    o.causal = true;
    o.max_degree = 2;
    o.target_error = 1e-14;
    o.tolerance = INFINITY;
    o.block = 32;
    o.levels = {0.02, 0.05, 0.1, 0.3, 0.6, 1.2};
    compare_backends<T>(ctx, problem{128, 128, 2, 2, 16, 8}, o, data_kind::spread, g, "six levels");
    o.causal = false;
    o.levels = {0.05, 0.3, 0.6};
    compare_backends<T>(ctx, problem{80, 112, 4, 2, 16, 8}, o, data_kind::spread, g, "three levels, GQA");
  }

  // Default options (automatic degree, error estimate on 16 rows, fallback tolerance 1e-2).
  compare_backends<T>(ctx, problem{}, support::support_options{}, data_kind::outliers, g, "default options");
}

template <class F>
errc code_of(F&& f) {
  try {
    f();
  } catch (const basisattn::error& e) {
    return e.code();
  }
  return errc::io;  // "no error" marker for these checks
}

template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const basisattn::error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("CUDA support-basis attention matches the CPU backend: fp32") { suite<float>(); }
TEST_CASE("CUDA support-basis attention matches the CPU backend: fp16") { suite<Eigen::half>(); }
TEST_CASE("CUDA support-basis attention matches the CPU backend: bf16") { suite<Eigen::bfloat16>(); }

TEST_CASE("CUDA support-basis: non-positive denominators are detected and recomputed as on the CPU") {
  // The CPU test's data: d = 1, scale 5, keys all +1; degree 1 on [-5, 5] is negative at -5, so every
  // query -1 has a negative polynomial denominator.
  cuda_context ctx;
  std::mt19937_64 g(fresh_seed());
  std::normal_distribution<double> nd(0, 1);
  for (const bool causal : {false, true}) {
    INFO("causal " << causal);
    const index_t n = 40, dv = 3;
    host_tensor<float> q(n, 1, 1), k(n, 1, 1), v(n, 1, dv), want(n, 1, dv), got(n, 1, dv);
    index_t negatives = 0;
    for (index_t i = 0; i < n; ++i) {
      const bool neg = i % 3 != 0;
      negatives += neg;
      q.at(i, 0, 0) = neg ? -1.0f : 1.0f;
      k.at(i, 0, 0) = 1.0f;
      for (index_t e = 0; e < dv; ++e) v.at(i, 0, e) = static_cast<float>(nd(g));
    }
    support::support_options o;
    o.causal = causal;
    o.scale = 5;
    o.threshold = 2;
    o.max_degree = 1;
    o.tolerance = INFINITY;
    o.block = 16;
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto cpu_rep = support::run(cpu{}, plan, q.cview(), k.cview(), v.cview(), want.view());
    REQUIRE(cpu_rep[0].bad_rows == negatives);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const device_tensor<float> dq(ctx, q, nan), dk(ctx, k, nan), dvv(ctx, v, nan);
    device_tensor<float> dout(ctx, want, 0.0);
    poison(ctx, dout.buf);
    const auto gpu_rep = support::run<float>(ctx, plan, dq.cview(), dk.cview(), dvv.cview(), dout.view());
    index_t non_finite = 0, padding_touched = 0;
    dout.download(ctx, got, non_finite, padding_touched);
    CHECK(gpu_rep[0].bad_rows == negatives);
    CHECK(gpu_rep[0].poly_rows == cpu_rep[0].poly_rows);
    CHECK(gpu_rep[0].checked_rows == cpu_rep[0].checked_rows);
    CHECK(non_finite == 0);
    CHECK(padding_touched == 0);
    CHECK(nerr(got, want) <= tolerance<float>());
  }
}

TEST_CASE("CUDA support-basis: error estimate and exact fallback as on the CPU") {
  cuda_context ctx;
  std::mt19937_64 g(fresh_seed());
  const problem pr;
  host_tensor<float> q(pr.n_q, pr.h_q, pr.d), k(pr.n_kv, pr.h_kv, pr.d), v(pr.n_kv, pr.h_kv, pr.d_v);
  q.fill(g, 1.0);  // large entries with a threshold that puts nothing in the supports
  k.fill(g, 1.0);
  v.fill(g, 1.0);
  support::support_options o;
  o.threshold = 100;
  o.max_degree = 2;
  o.target_error = 1e-3;
  o.check_rows = 8;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const device_tensor<float> dq(ctx, q, nan), dk(ctx, k, nan), dv(ctx, v, nan);
  host_tensor<float> want(pr.n_q, pr.h_q, pr.d_v), got(pr.n_q, pr.h_q, pr.d_v);
  device_tensor<float> dout(ctx, want, 0.0);
  index_t non_finite = 0, padding_touched = 0;
  // Without the fallback: a large estimate on both backends. (The polynomial is poor here, B ~ 9 at
  // degree 2, so rows with small positive denominators may amplify rounding differences: the outputs
  // and estimates of the two backends are not compared to the tight bound of the other tests.)
  o.tolerance = INFINITY;
  {
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto cpu_rep = support::run(cpu{}, plan, q.cview(), k.cview(), v.cview(), want.view());
    poison(ctx, dout.buf);
    const auto gpu_rep = support::run<float>(ctx, plan, dq.cview(), dk.cview(), dv.cview(), dout.view());
    dout.download(ctx, got, non_finite, padding_touched);
    CHECK(non_finite == 0);
    CHECK(padding_touched == 0);
    for (std::size_t h = 0; h < gpu_rep.size(); ++h) {
      CHECK(gpu_rep[h].checked_rows == 8);
      CHECK(cpu_rep[h].checked_rows == 8);
      CHECK(cpu_rep[h].est_error_max > 0.05);
      CHECK(gpu_rep[h].est_error_max > 0.05);
      CHECK(gpu_rep[h].est_error_mean <= gpu_rep[h].est_error_max);
      CHECK(!gpu_rep[h].fallback);
    }
  }
  // With the fallback: every head flagged on both, and the output is exact attention.
  o.tolerance = 0.05;
  {
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto cpu_rep = support::run(cpu{}, plan, q.cview(), k.cview(), v.cview(), want.view());
    poison(ctx, dout.buf);
    const auto gpu_rep = support::run<float>(ctx, plan, dq.cview(), dk.cview(), dv.cview(), dout.view());
    dout.download(ctx, got, non_finite, padding_touched);
    host_tensor<float> exact(pr.n_q, pr.h_q, pr.d_v);
    attention_options ao;
    ao.causal = o.causal;
    attention(cpu{}, q.cview(), k.cview(), v.cview(), exact.view(), ao);
    for (std::size_t h = 0; h < gpu_rep.size(); ++h) {
      CHECK(cpu_rep[h].fallback);
      CHECK(gpu_rep[h].fallback);
    }
    CHECK(non_finite == 0);
    CHECK(padding_touched == 0);
    CHECK(nerr(got, exact) <= 64 * unit_roundoff(dtype::f32));  // fp32 exact attention on both sides
  }
}

TEST_CASE("CUDA support-basis: a loose bound in float gives no non-finite output, as on the CPU") {
  // The CPU test's data (tests/test_support_basis.cpp): entries N(0, 5^2), d = 8, scale 1, degree 1:
  // B > 300, so the polynomial sums are 0, denormal or barely normal in fp32. Which rows end up bad
  // then depends on fp32 rounding (and on denormal flushing in cuBLAS), so bad_rows is not compared
  // with the CPU here; the row rules' invariants are. Key 0 is large (in C): causal row 0 sees only it,
  // has no visible polynomial key, so its shift restarts at -inf and its output is v_0 (not bad).
  cuda_context ctx;
  std::mt19937_64 g(fresh_seed());
  const index_t n = 64, d = 8, dv = 4;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  host_tensor<float> q(n, 1, d), k(n, 1, d), v(n, 1, dv), want(n, 1, dv), got(n, 1, dv);
  q.fill(g, 5.0);
  k.fill(g, 5.0);
  v.fill(g, 1.0);
  for (index_t e = 0; e < d; ++e) k.at(0, 0, e) = 100.0f;
  support::support_options o;
  o.threshold = 60;  // only key 0 is above it
  o.scale = 1;
  o.max_degree = 1;
  o.tolerance = INFINITY;
  o.block = 16;
  const device_tensor<float> dq(ctx, q, nan), dk(ctx, k, nan), dv_(ctx, v, nan);
  device_tensor<float> dout(ctx, want, 0.0);
  index_t non_finite = 0, padding_touched = 0;
  {
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto cpu_rep = support::run(cpu{}, plan, q.cview(), k.cview(), v.cview(), want.view());
    poison(ctx, dout.buf);
    const auto gpu_rep = support::run<float>(ctx, plan, dq.cview(), dk.cview(), dv_.cview(), dout.view());
    dout.download(ctx, got, non_finite, padding_touched);
    const support::head_report& h = gpu_rep[0];
    INFO("bound " << h.bound << ", poly_error " << h.poly_error << ", bad rows gpu " << h.bad_rows << " cpu "
                  << cpu_rep[0].bad_rows << ", poly rows gpu " << h.poly_rows << " cpu " << cpu_rep[0].poly_rows);
    REQUIRE(h.bound > 300);
    CHECK(non_finite == 0);
    CHECK(padding_touched == 0);
    CHECK(h.bad_rows + h.poly_rows <= n);
    CHECK(h.checked_rows == std::min<std::int64_t>(o.check_rows, h.poly_rows));
    CHECK(!h.fallback);
    for (index_t e = 0; e < dv; ++e) CHECK(std::abs(got.at(0, 0, e) - v.at(0, 0, e)) <= 1e-6 * std::abs(v.at(0, 0, e)) + 1e-30);
    // The polynomial guarantees nothing here (poly_error >= 1): with a finite tolerance the head falls
    // back on both backends, and both outputs are exact fp32 attention.
    REQUIRE(h.poly_error >= 1);
  }
  o.tolerance = 1e9;
  {
    const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    const auto cpu_rep = support::run(cpu{}, plan, q.cview(), k.cview(), v.cview(), want.view());
    poison(ctx, dout.buf);
    const auto gpu_rep = support::run<float>(ctx, plan, dq.cview(), dk.cview(), dv_.cview(), dout.view());
    dout.download(ctx, got, non_finite, padding_touched);
    CHECK(cpu_rep[0].fallback);
    CHECK(gpu_rep[0].fallback);
    CHECK(non_finite == 0);
    CHECK(padding_touched == 0);
    // scores up to ~|q_0| ||k_0|| ~ 1e3: fp32 score rounding of ~1e-4 absolute, in either order of sums
    CHECK(nerr(got, want) <= 1e-3);
  }

  // d = 1, every q and k entry 1, scale 320: every score is B = 320 and the degree-1 polynomial sums
  // are ~1e-41 or less, far below FLT_MIN on both backends: every row is bad and recomputed exactly,
  // none is approximated, nothing is checked.
  for (const bool causal : {true, false}) {
    INFO("equal scores, causal " << causal);
    host_tensor<float> q1(n, 1, 1), k1(n, 1, 1), w1(n, 1, dv), g1(n, 1, dv);
    for (index_t i = 0; i < n; ++i) {
      q1.at(i, 0, 0) = 1.0f;
      k1.at(i, 0, 0) = 1.0f;
    }
    support::support_options o3;
    o3.causal = causal;
    o3.scale = 320;
    o3.threshold = 2;
    o3.max_degree = 1;
    o3.tolerance = INFINITY;
    o3.block = 16;
    const support::plan plan = support::make_plan(cpu{}, q1.cview(), k1.cview(), o3);
    const auto cpu_rep = support::run(cpu{}, plan, q1.cview(), k1.cview(), v.cview(), w1.view());
    const device_tensor<float> dq1(ctx, q1, nan), dk1(ctx, k1, nan);
    device_tensor<float> do1(ctx, w1, 0.0);
    poison(ctx, do1.buf);
    const auto gpu_rep = support::run<float>(ctx, plan, dq1.cview(), dk1.cview(), dv_.cview(), do1.view());
    do1.download(ctx, g1, non_finite, padding_touched);
    REQUIRE(cpu_rep[0].bad_rows == n);
    CHECK(gpu_rep[0].bad_rows == n);
    CHECK(gpu_rep[0].poly_rows == 0);
    CHECK(cpu_rep[0].poly_rows == 0);
    CHECK(gpu_rep[0].checked_rows == 0);
    CHECK(gpu_rep[0].est_error_max == 0);
    CHECK(gpu_rep[0].est_error_mean == 0);
    CHECK(!gpu_rep[0].fallback);
    CHECK(non_finite == 0);
    CHECK(padding_touched == 0);
    CHECK(nerr(g1, w1) <= tolerance<float>());
  }
}

TEST_CASE("CUDA support-basis rejects bad arguments like the CPU run") {
  cuda_context ctx;
  std::mt19937_64 g(3);
  const problem pr;
  host_tensor<float> q(pr.n_q, pr.h_q, pr.d), k(pr.n_kv, pr.h_kv, pr.d), v(pr.n_kv, pr.h_kv, pr.d_v),
      out(pr.n_q, pr.h_q, pr.d_v);
  q.fill(g, 0.1);
  k.fill(g, 0.1);
  v.fill(g, 1.0);
  const support::plan plan = support::make_plan(cpu{}, q.cview(), k.cview());
  const device_tensor<float> dq(ctx, q, 0.0), dk(ctx, k, 0.0), dv(ctx, v, 0.0);
  device_tensor<float> dout(ctx, out, 0.0);
  const std::size_t need = support::workspace_bytes(ctx, plan, pr.d_v);
  device_buffer<unsigned char> ws(static_cast<index_t>(need));
  auto run = [&](tensor3_view<const float> a, tensor3_view<const float> b, tensor3_view<const float> c,
                 tensor3_view<float> o, void* w, std::size_t bytes, const support::plan& p) {
    support::run<float>(ctx, p, a, b, c, o, w, bytes);
    ctx.synchronize();
  };
  // the well-formed call runs
  CHECK(code_of([&] { run(dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), ws.bytes(), plan); }) == errc::io);
  // shapes (views over the same buffers with other extents: nothing is read before the checks)
  const auto v3 = dv.cview();
  const tensor3_view<const float> v_short(v3.data, pr.n_kv - 1, pr.h_kv, pr.d_v, v3.stride[0], v3.stride[1], 1);
  CHECK(code_of([&] { run(dq.cview(), dk.cview(), v_short, dout.view(), ws.data(), ws.bytes(), plan); }) ==
        errc::shape_mismatch);
  const auto o3 = dout.view();
  const tensor3_view<float> out_bad(o3.data, pr.n_q, pr.h_q, pr.d_v - 1, o3.stride[0], o3.stride[1], 1);
  CHECK(message_of([&] { run(dq.cview(), dk.cview(), dv.cview(), out_bad, ws.data(), ws.bytes(), plan); })
            .find("out has extents") != std::string::npos);
  const auto q3 = dq.cview();
  const tensor3_view<const float> q_short(q3.data, pr.n_q - 1, pr.h_q, pr.d, q3.stride[0], q3.stride[1], 1);
  const tensor3_view<float> out_short(o3.data, pr.n_q - 1, pr.h_q, pr.d_v, o3.stride[0], o3.stride[1], 1);
  CHECK(code_of([&] { run(q_short, dk.cview(), dv.cview(), out_short, ws.data(), ws.bytes(), plan); }) ==
        errc::shape_mismatch);
  CHECK(message_of([&] { run(q_short, dk.cview(), dv.cview(), out_short, ws.data(), ws.bytes(), plan); })
            .find("do not match the plan") != std::string::npos);
  // storage type other than the plan's
  {
    device_buffer<Eigen::half> hq(pr.n_q * pr.h_q * pr.d), hk(pr.n_kv * pr.h_kv * pr.d), hv(pr.n_kv * pr.h_kv * pr.d_v),
        ho(pr.n_q * pr.h_q * pr.d_v);
    const std::string msg = message_of([&] {
      support::run<Eigen::half>(ctx, plan, tensor3_view<const Eigen::half>(hq.data(), pr.n_q, pr.h_q, pr.d),
                                tensor3_view<const Eigen::half>(hk.data(), pr.n_kv, pr.h_kv, pr.d),
                                tensor3_view<const Eigen::half>(hv.data(), pr.n_kv, pr.h_kv, pr.d_v),
                                tensor3_view<Eigen::half>(ho.data(), pr.n_q, pr.h_q, pr.d_v), ws.data(), ws.bytes());
    });
    CHECK(msg.find("plan was made for f32") != std::string::npos);
  }
  // workspace
  CHECK(message_of([&] { run(dq.cview(), dk.cview(), dv.cview(), dout.view(), ws.data(), need - 300, plan); })
            .find("workspace") != std::string::npos);
  CHECK(message_of([&] { run(dq.cview(), dk.cview(), dv.cview(), dout.view(), nullptr, 0, plan); }).find("(null)") !=
        std::string::npos);
  // accumulate_double is CPU-only
  {
    support::support_options o;
    o.accumulate_double = true;
    const support::plan pd = support::make_plan(cpu{}, q.cview(), k.cview(), o);
    device_buffer<unsigned char> w2(static_cast<index_t>(support::workspace_bytes(ctx, pd, pr.d_v)));
    CHECK(code_of([&] { run(dq.cview(), dk.cview(), dv.cview(), dout.view(), w2.data(), w2.bytes(), pd); }) ==
          errc::unsupported);
  }
  // non-finite v (options.check_finite, the default)
  {
    host_tensor<float> vb = v;
    vb.at(7, 1, 0) = std::numeric_limits<float>::quiet_NaN();
    const device_tensor<float> dvb(ctx, vb, 0.0);
    CHECK(code_of([&] { run(dq.cview(), dk.cview(), dvb.cview(), dout.view(), ws.data(), ws.bytes(), plan); }) ==
          errc::non_finite);
    CHECK(message_of([&] { run(dq.cview(), dk.cview(), dvb.cview(), dout.view(), ws.data(), ws.bytes(), plan); })
              .find("v has a non-finite value") != std::string::npos);
  }
  // workspace_bytes validates d_v
  CHECK(code_of([&] { (void)support::workspace_bytes(ctx, plan, 0); }) == errc::invalid_argument);
}
