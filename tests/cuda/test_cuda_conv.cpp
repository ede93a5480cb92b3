// CUDA conv-basis attention vs the CPU conv-basis run with the same plan (made on the host from the
// same q, k): constructed cases of test_conv_basis.cpp (support/conv_cases.hpp) on fresh random
// inputs (the seed is printed on failure): exact structure (causal and not, GQA, both anchor rules),
// k = n on unstructured data, a wide logit range (repaired rows), float FFTs behind the range check,
// the error estimate and the exact fallback; float storage everywhere, fp16 / bf16 once. Device
// tensors have padded token rows; out and the whole workspace are poisoned (all bytes 0xFF: NaN)
// before each run, so an unwritten output, a touched padding element or a buffer read before it is
// written shows up.
//
// Bounds on nerr = ||out_gpu - out_cpu||_F / ||out_cpu||_F: both runs compute in double and round
// once to T; they differ by the FFT rounding (~1e-13 relative with double FFTs) and by rows one of
// them repaired (the GPU's error bound uses one FFT length for every block, so it may repair a few
// more rows; a repaired row differs from its FFT value by at most fft_tolerance relative to max|v|,
// 1e-11 here). So the outputs agree to one rounding of T: 4 u_T. Float FFTs (f32_checked): both
// are within fft_tolerance of the double result: 2 fft_tolerance. Heads that fell back run the fp32
// exact kernel on the GPU and the CPU's exact attention: 64 u (the bound of the CUDA attention tests).
// The estimated errors are computed in double from the same rows on both: they agree to 1e-9
// (absolute, plus 1e-9 relative), 2 fft_tolerance with float FFTs.
// Without a usable GPU the program exits 77 (CTest: Skipped).
#include "skip_main.hpp"

#include "conv_cases.hpp"
#include "cuda_test_util.hpp"
#include "expect_error.hpp"

#include <basisattn/conv/conv_basis.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/conv.hpp>
#include <basisattn/cuda/cufft.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

using namespace basisattn;

namespace {

using cudatest::comparison;
using cudatest::compare;
using cudatest::fresh_seed;
using cudatest::poison;

template <class T>
std::vector<T> to_storage(const std::vector<double>& x) {
  std::vector<T> r(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) r[i] = basisattn::detail::from_compute<T>(x[i]);
  return r;
}

/// A [n, h, d] tensor on the device with token rows of h * d + pad elements (the padding holds 7).
template <class T>
struct device3 {
  device_buffer<T> buf;
  index_t n = 0, h = 0, d = 0, ld = 0;
  device3(const cuda_context& ctx, const std::vector<T>& x, index_t n_, index_t h_, index_t d_, index_t pad)
      : n(n_), h(h_), d(d_), ld(h_ * d_ + pad) {
    std::vector<T> host(static_cast<std::size_t>(n * ld), basisattn::detail::from_compute<T>(7.0));
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < h * d; ++j) host[std::size_t(i * ld + j)] = x[std::size_t(i * h * d + j)];
    buf = to_device(ctx, host.data(), n * ld);
  }
  tensor3_view<const T> view() const { return {buf.data(), n, h, d, ld, d, 1}; }
};

struct outcome {
  conv::report cpu, gpu;
  std::vector<float> got;  // the GPU's output as float, for comparisons between runs
};

/// Plan on the host, run on the CPU and on the GPU with the same plan, compare. chunk_bytes bounds
/// the FFT chunk (1: one block per chunk).
template <class T>
outcome check_case(const cuda_context& ctx, cufft_plan_cache& plans, const test::qkv& x, const conv::options& o,
                   double tol, double est_tol, std::size_t chunk_bytes = std::size_t(1) << 30) {
  const auto qh = to_storage<T>(x.q), kh = to_storage<T>(x.k), vh = to_storage<T>(x.v);
  const tensor3_view<const T> Q(qh.data(), x.n, x.hq, x.d), K(kh.data(), x.n, x.hkv, x.d), V(vh.data(), x.n, x.hkv, x.dv);
  const conv::plan p = conv::make_plan<T>(cpu{}, Q, K, o);
  matrix<T> want(x.n * x.hq, x.dv);
  outcome r;
  r.cpu = conv::attention<T>(cpu{}, p, Q, K, V, tensor3_view<T>(want.data(), x.n, x.hq, x.dv));

  const device3<T> dq(ctx, qh, x.n, x.hq, x.d, 3), dk(ctx, kh, x.n, x.hkv, x.d, 1), dv(ctx, vh, x.n, x.hkv, x.dv, 2);
  const index_t ldo = x.dv + 3;
  device_buffer<T> dout(x.n * x.hq * ldo);
  const std::size_t bytes = conv::workspace_bytes(ctx, p, x.dv, chunk_bytes);
  device_buffer<unsigned char> ws(static_cast<index_t>(bytes) + 5);
  poison(ctx, dout);
  poison(ctx, ws);
  // an odd workspace pointer: the run aligns it itself
  r.gpu = conv::attention<T>(ctx, p, dq.view(), dk.view(), dv.view(),
                             tensor3_view<T>(dout.data(), x.n, x.hq, x.dv, x.hq * ldo, ldo, 1), ws.data() + 5, bytes, plans);
  ctx.synchronize();
  std::vector<T> got(static_cast<std::size_t>(x.n * x.hq * ldo));
  dout.download(ctx, got.data(), x.n * x.hq * ldo);
  const comparison c = compare(got, ldo, want);
  INFO("dtype " << to_string(dtype_of_v<T>) << ": nerr " << c.nerr << " (bound " << tol << ")");
  CHECK(c.non_finite == 0);
  CHECK(c.padding_touched == 0);
  CHECK(c.nerr <= tol);
  REQUIRE(r.gpu.heads.size() == r.cpu.heads.size());
  CHECK(r.gpu.fallbacks == r.cpu.fallbacks);
  for (std::size_t h = 0; h < r.cpu.heads.size(); ++h) {
    const conv::head_report &a = r.gpu.heads[h], &b = r.cpu.heads[h];
    INFO("head " << h << ": estimated error gpu " << a.estimated_error << " cpu " << b.estimated_error << ", uniform gpu "
                  << a.uniform_error << " cpu " << b.uniform_error << ", repaired gpu " << a.repaired_rows << " cpu "
                  << b.repaired_rows << ", bound gpu " << a.fft_error_bound << " cpu " << b.fft_error_bound);
    CHECK(a.anchors == b.anchors);
    CHECK(a.upper_anchors == b.upper_anchors);
    CHECK(a.degenerate == b.degenerate);
    CHECK(a.sampled_rows == b.sampled_rows);
    CHECK(a.fell_back == b.fell_back);
    CHECK(a.fft_error_bound <= o.fft_tolerance);
    if (b.sampled_rows > 0) {
      CHECK(std::abs(a.estimated_error - b.estimated_error) <= est_tol * (1 + b.estimated_error));
      CHECK(std::abs(a.mean_estimated_error - b.mean_estimated_error) <= est_tol * (1 + b.mean_estimated_error));
      CHECK(std::abs(a.uniform_error - b.uniform_error) <= 1e-9 * (1 + b.uniform_error));
    } else {
      CHECK(std::isnan(a.estimated_error));
    }
  }
  for (index_t i = 0; i < x.n * x.hq; ++i)
    for (index_t j = 0; j < x.dv; ++j)
      r.got.push_back(basisattn::detail::to_compute<float>(got[std::size_t(i * ldo + j)]));
  return r;
}

constexpr double u32 = 5.9604644775390625e-08;

}  // namespace

TEST_CASE("CUDA conv-basis attention matches the CPU run: exact structure, causal and not, GQA") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  {
    INFO("3 switches, 2 query heads on 1 kv head, causal");
    conv::options o;
    o.k = 3;
    o.fft_tolerance = 1e-11;
    const auto r = check_case<float>(ctx, plans, test::switching(300, 2, 1, 16, {0, 77, 160}, 1.0, seed), o, 4 * u32, 1e-9);
    for (const auto& h : r.gpu.heads) CHECK(h.estimated_error < 1e-5);  // float inputs: ~u32 per logit
  }
  for (auto rule : {conv::anchor_rule::change_scan, conv::anchor_rule::search}) {
    INFO("5 switches, 3 query heads on 1 kv head, rule " << (rule == conv::anchor_rule::search ? "search" : "change_scan"));
    conv::options o;
    o.k = 5;
    o.rule = rule;
    o.delta = rule == conv::anchor_rule::search ? 1e-3 : 0;
    o.fft_tolerance = 1e-11;
    check_case<float>(ctx, plans, test::switching(320, 3, 1, 8, {0, 37, 90, 151, 230}, 1.0, seed + 1), o, 4 * u32, 1e-9);
  }
  for (double scale : {0.0, 0.7}) {
    INFO("non-causal, 4 query heads on 2 kv heads, scale " << scale);
    conv::options o;
    o.k = 1;
    o.causal = false;
    o.scale = scale;
    o.fft_tolerance = 1e-11;
    const auto r = check_case<float>(ctx, plans, test::switching(257, 4, 2, 8, {0}, 1.0, seed + 2), o, 4 * u32, 1e-9);
    for (const auto& h : r.gpu.heads) CHECK(h.upper_anchors == 1);
  }
}

TEST_CASE("CUDA conv-basis attention matches the CPU run: k = n on unstructured data, chunked FFTs") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  const test::qkv x = test::random_qkv(96, 4, 2, 8, 6, 1.0, seed);
  for (bool causal : {true, false}) {
    conv::options o;
    o.k = x.n;
    o.causal = causal;
    o.fft_tolerance = 1e-11;
    INFO("causal " << causal << ": all blocks of a head in one chunk, then one block per chunk");
    const auto all = check_case<float>(ctx, plans, x, o, 4 * u32, 1e-9);
    const auto one = check_case<float>(ctx, plans, x, o, 4 * u32, 1e-9, 1);
    double num = 0, den = 0;
    for (std::size_t i = 0; i < all.got.size(); ++i) {
      num += (all.got[i] - one.got[i]) * double(all.got[i] - one.got[i]);
      den += double(all.got[i]) * all.got[i];
    }
    CHECK(std::sqrt(num / den) <= 2 * u32);  // chunking changes the summation order only
  }
  // the same cache again: no new plan, and the same bits
  const std::size_t held = plans.size();
  conv::options o;
  o.k = 7;
  const auto a = check_case<float>(ctx, plans, x, o, 4 * u32, 1e-9);
  const std::size_t after_first = plans.size();
  const auto b = check_case<float>(ctx, plans, x, o, 4 * u32, 1e-9);
  CHECK(plans.size() == after_first);
  CHECK(after_first >= held);
  CHECK(a.got == b.got);
}

TEST_CASE("CUDA conv-basis attention: wide logit range (repaired rows) and float FFTs behind the check") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  {
    conv::options o;
    o.k = 3;
    o.fft_tolerance = 1e-11;
    const auto r = check_case<float>(ctx, plans, test::switching(256, 2, 1, 8, {0, 50, 120}, 6.0, seed), o, 4 * u32, 1e-9);
    for (const auto& h : r.gpu.heads) {
      CHECK(!h.float_fft);
      CHECK(h.repaired_rows > 0);
    }
  }
  {
    conv::options o;
    o.k = 2;
    o.precision = conv::fft_precision::f32_checked;
    o.fft_tolerance = 1e-2;
    const auto r = check_case<float>(ctx, plans, test::switching(256, 1, 1, 8, {0, 100}, 0.3, seed + 1), o,
                                     2 * o.fft_tolerance, 2 * o.fft_tolerance);
    INFO("cpu float FFTs " << r.cpu.heads[0].float_fft << ", gpu " << r.gpu.heads[0].float_fft);
    CHECK(r.gpu.heads[0].float_fft);
    o.fft_tolerance = 1e-11;  // far below float's reach: double FFTs
    const auto d = check_case<float>(ctx, plans, test::switching(256, 1, 1, 8, {0, 100}, 0.3, seed + 1), o, 4 * u32, 1e-9);
    CHECK(!d.gpu.heads[0].float_fft);
  }
}

TEST_CASE("CUDA conv-basis attention: error estimate and exact fallback agree with the CPU") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  const test::qkv x = test::random_qkv(300, 3, 1, 16, 8, 1.5, seed);  // no conv structure
  conv::options o;
  o.k = 4;
  o.sample_rows = 12;
  const auto r = check_case<float>(ctx, plans, x, o, 4 * u32, 1e-9);
  for (const auto& h : r.gpu.heads) {
    CHECK(h.sampled_rows == 12);
    CHECK(h.estimated_error > 0.05);
    CHECK(!h.fell_back);
  }
  o.tolerance = 0.05;
  const auto f = check_case<float>(ctx, plans, x, o, 64 * u32, 1e-9);
  CHECK(f.gpu.fallbacks == x.hq);
  o.sample_rows = 0;  // no estimate, no fallback
  check_case<float>(ctx, plans, x, o, 4 * u32, 1e-9);
}

TEST_CASE("CUDA conv-basis attention: fp16 and bf16 storage") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  cuda_context ctx;
  cufft_plan_cache plans;
  const test::qkv x = test::switching(200, 2, 2, 8, {0, 64, 130}, 1.0, seed);
  conv::options o;
  o.k = 3;
  o.fft_tolerance = 1e-11;
  check_case<Eigen::half>(ctx, plans, x, o, 4 * unit_roundoff(dtype::f16), 1e-9);
  check_case<Eigen::bfloat16>(ctx, plans, x, o, 4 * unit_roundoff(dtype::bf16), 1e-9);
}

TEST_CASE("CUDA conv-basis attention rejects bad input like the CPU run") {
  cuda_context ctx;
  const test::qkv x = test::random_qkv(32, 2, 1, 8, 8, 1.0, 24);
  const auto qh = to_storage<float>(x.q), kh = to_storage<float>(x.k), vh = to_storage<float>(x.v);
  const conv::plan p = conv::make_plan<float>(cpu{}, tensor3_view<const float>(qh.data(), x.n, x.hq, x.d),
                                              tensor3_view<const float>(kh.data(), x.n, x.hkv, x.d));
  const device3<float> dq(ctx, qh, x.n, x.hq, x.d, 0), dk(ctx, kh, x.n, x.hkv, x.d, 0), dv(ctx, vh, x.n, x.hkv, x.dv, 0);
  device_buffer<float> dout(x.n * x.hq * x.dv);
  const tensor3_view<float> O(dout.data(), x.n, x.hq, x.dv);
  const std::size_t bytes = conv::workspace_bytes(ctx, p, x.dv);
  device_buffer<unsigned char> ws(static_cast<index_t>(bytes));
  auto run = [&](const device3<float>& q, const device3<float>& k, const device3<float>& v, tensor3_view<float> out,
                 std::size_t b) { conv::attention<float>(ctx, p, q.view(), k.view(), v.view(), out, ws.data(), b); };

  run(dq, dk, dv, O, bytes);  // well formed
  ctx.synchronize();
  test::expect_error([&] { run(dq, dk, dv, O, 128); }, errc::invalid_argument, "workspace");
  test::expect_error([&] { run(dq, dk, dv, tensor3_view<float>(dout.data(), x.n, x.hq, x.dv - 1), bytes); },
                     errc::shape_mismatch, "out");
  // q or k other than the plan's
  test::qkv other = x;
  other.k[5] += 0.25f;
  const device3<float> dk2(ctx, to_storage<float>(other.k), x.n, x.hkv, x.d, 0);
  test::expect_error([&] { run(dq, dk2, dv, O, bytes); }, errc::invalid_argument, "differ from those the plan");
  // a plan of other extents
  const test::qkv y = test::random_qkv(32, 4, 1, 8, 8, 1.0, 25);
  const device3<float> yq(ctx, to_storage<float>(y.q), y.n, y.hq, y.d, 0);
  device_buffer<float> yout(y.n * y.hq * y.dv);
  test::expect_error([&] { run(yq, dk, dv, tensor3_view<float>(yout.data(), y.n, y.hq, y.dv), bytes); },
                     errc::shape_mismatch, "plan was made for");
  // n_q != n_kv
  test::expect_error([&] {
    conv::attention<float>(ctx, p, tensor3_view<const float>(dq.buf.data(), x.n - 1, x.hq, x.d), dk.view(), dv.view(),
                           tensor3_view<float>(dout.data(), x.n - 1, x.hq, x.dv), ws.data(), bytes);
  }, errc::shape_mismatch, "self-attention");
  // NaN/Inf in v
  test::qkv bad = x;
  bad.v[3] = INFINITY;
  const device3<float> dvb(ctx, to_storage<float>(bad.v), x.n, x.hkv, x.dv, 0);
  test::expect_error([&] { run(dq, dk, dvb, O, bytes); }, errc::non_finite, "v");
  // head dims above the CUDA limit
  const test::qkv wide = test::random_qkv(8, 1, 1, 300, 4, 1.0, 26);
  const auto wq = to_storage<float>(wide.q), wk = to_storage<float>(wide.k);
  const conv::plan pw = conv::make_plan<float>(cpu{}, tensor3_view<const float>(wq.data(), wide.n, 1, wide.d),
                                               tensor3_view<const float>(wk.data(), wide.n, 1, wide.d));
  test::expect_error([&] { (void)conv::workspace_bytes(ctx, pw, 4); }, errc::unsupported, "256");
}
