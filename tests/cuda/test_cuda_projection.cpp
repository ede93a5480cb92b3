// CUDA backend vs the CPU oracle: dense and BD projections (every epilogue method, basis leading or
// gathered, with and without bias, padded row strides) and exact attention (causal / not, GQA, n_q <
// n_kv, d_qk != d_v, strided tensors), in fp32, fp16 and bf16. Every run uses fresh random inputs
// (the seed is printed on failure), poisons the output (all bytes 0xFF: NaN in every dtype) first, and
// checks that every element was written, that padding was left alone, and the normalised error
//   nerr = ||y_gpu - y_cpu||_F / ||y_cpu||_F
// against a per-dtype bound (a few units of roundoff: the two backends round the same fp32 sums, in a
// different summation order). Without a usable GPU the program exits 77 (CTest: Skipped).
#include "skip_main.hpp"

#include "cuda_test_util.hpp"

#include <basisattn/attention/attention.hpp>
#include <basisattn/bd/projection.hpp>
#include <basisattn/cpu/attention.hpp>
#include <basisattn/cpu/projection.hpp>
#include <basisattn/cuda/attention.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/projection.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace basisattn;

namespace {

using cudatest::comparison;
using cudatest::compare;
using cudatest::fresh_seed;
using cudatest::poison;

template <class T>
float to_f(T x) {
  return basisattn::detail::to_compute<float>(x);
}
template <class T>
T from_f(double x) {
  return basisattn::detail::from_compute<T>(static_cast<float>(x));
}

/// Bound on the normalised error of a GPU result against the CPU one, per storage type.
template <class T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 2e-5;
  return 6 * unit_roundoff(dtype_of_v<T>);
}

/// Host rows x ld buffer: the first `cols` columns N(0, scale^2), the rest a marker value.
template <class T>
std::vector<T> random_padded(std::mt19937_64& g, index_t rows, index_t cols, index_t ld, double scale = 1.0) {
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<T> v(static_cast<std::size_t>(rows * ld), from_f<T>(7.0));
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) v[static_cast<std::size_t>(i * ld + j)] = from_f<T>(nd(g));
  return v;
}


template <class T>
bd::bd_projection<T> random_bd(std::mt19937_64& g, index_t m, index_t r, index_t heads, bool leading, bool bias) {
  bd::bd_projection<T> p;
  p.in_dim = m;
  p.rank = r;
  p.heads = heads;
  std::vector<index_t> ch(static_cast<std::size_t>(m));
  std::iota(ch.begin(), ch.end(), index_t(0));
  if (!leading) std::shuffle(ch.begin(), ch.end(), g);
  p.basis.assign(ch.begin(), ch.begin() + r);
  p.rest.assign(ch.begin() + r, ch.end());
  if (!leading && p.basis_leading()) std::swap(p.basis[0], p.rest[0]);  // make sure a gather is needed
  p.coeff = matrix<T>(m - r, heads * r);
  std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(m)));
  for (index_t i = 0; i < p.coeff.size(); ++i) p.coeff.data()[i] = from_f<T>(nd(g));
  if (bias)
    for (index_t i = 0; i < heads * r; ++i) p.bias.push_back(from_f<T>(nd(g)));
  return p;
}

template <class T>
bd::dense_projection<T> random_dense(std::mt19937_64& g, index_t in, index_t out, bool bias) {
  bd::dense_projection<T> p;
  p.weight = matrix<T>(in, out);
  std::normal_distribution<double> nd(0.0, 1.0 / std::sqrt(double(in)));
  for (index_t i = 0; i < p.weight.size(); ++i) p.weight.data()[i] = from_f<T>(nd(g));
  if (bias)
    for (index_t i = 0; i < out; ++i) p.bias.push_back(from_f<T>(nd(g)));
  return p;
}

const char* name_of(bd::cuda_epilogue e) {
  switch (e) {
    case bd::cuda_epilogue::automatic: return "automatic";
    case bd::cuda_epilogue::cublaslt: return "cublaslt";
    case bd::cuda_epilogue::prefill: return "prefill";
  }
  return "?";
}

/// Run projection p (host HP, device DP) on the GPU and on the CPU and compare. Returns false when
/// the method is unsupported by this cuBLASLt (only possible for cuda_epilogue::cublaslt).
template <class T, class HP>
bool check_projection(const cuda_context& ctx, const HP& hp, index_t in, index_t out, index_t tokens, index_t ldx,
                      index_t ldy, bd::cuda_epilogue epi, std::mt19937_64& g) {
  const auto dp = bd::upload(ctx, hp);
  const std::vector<T> x = random_padded<T>(g, tokens, in, ldx);
  matrix<T> xc(tokens, in);
  for (index_t i = 0; i < tokens; ++i)
    for (index_t j = 0; j < in; ++j) xc(i, j) = x[static_cast<std::size_t>(i * ldx + j)];
  matrix<T> want(tokens, out);
  bd::project(cpu{}, hp, xc.view(), want.view());

  const auto dx = to_device(ctx, x.data(), static_cast<index_t>(x.size()));
  device_buffer<T> dy(tokens * ldy);
  bd::cuda_project_options opt;
  opt.epilogue = epi;
  device_buffer<unsigned char> ws(static_cast<index_t>(bd::project_workspace_bytes(ctx, dp, tokens, opt)));
  for (int run = 0; run < 2; ++run) {  // the second run goes through the cached plan
    poison(ctx, dy);
    try {
      bd::project(ctx, dp, matrix_view<const T>(dx.data(), tokens, in, ldx), matrix_view<T>(dy.data(), tokens, out, ldy),
                  ws.data(), ws.bytes(), opt);
    } catch (const basisattn::error& e) {
      if (e.code() == errc::unsupported && epi == bd::cuda_epilogue::cublaslt) {
        WARN("cuBLASLt declined the epilogue GEMM: " << e.what());
        return false;
      }
      throw;
    }
    ctx.synchronize();
    std::vector<T> y(static_cast<std::size_t>(tokens * ldy));
    dy.download(ctx, y.data(), tokens * ldy);
    const comparison c = compare(y, ldy, want);
    INFO("dtype " << to_string(dtype_of_v<T>) << ", epilogue " << name_of(epi) << ", tokens " << tokens << ", ldx "
                  << ldx << ", ldy " << ldy << ", run " << run << ": nerr " << c.nerr << " (bound " << tolerance<T>()
                  << ")");
    CHECK(c.non_finite == 0);
    CHECK(c.padding_touched == 0);
    CHECK(c.nerr <= tolerance<T>());
  }
  return true;
}

template <class T>
void projection_suite() {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const bd::cuda_epilogue methods[] = {bd::cuda_epilogue::automatic, bd::cuda_epilogue::cublaslt,
                                       bd::cuda_epilogue::prefill};
  struct shape {
    index_t m, r, heads, tokens, x_pad, y_pad;
  };
  // DeepSeek-like (m 512, r 128, 16 heads) at a small token count, an odd-sized one, a single token.
  const shape shapes[] = {{512, 128, 16, 300, 0, 0}, {70, 12, 3, 129, 5, 3}, {40, 8, 2, 1, 0, 8}};
  for (const shape& s : shapes)
    for (bool leading : {true, false})
      for (bool bias : {false, true}) {
        const auto hp = random_bd<T>(g, s.m, s.r, s.heads, leading, bias);
        for (auto epi : methods) {
          INFO("bd: m " << s.m << ", r " << s.r << ", heads " << s.heads << ", leading " << leading << ", bias " << bias);
          check_projection<T>(ctx, hp, s.m, s.heads * s.r, s.tokens, s.m + s.x_pad, s.heads * s.r + s.y_pad, epi, g);
        }
        const auto hd = random_dense<T>(g, s.m, s.heads * s.r, bias);
        for (auto epi : methods) {
          INFO("dense: in " << s.m << ", out " << s.heads * s.r << ", bias " << bias);
          check_projection<T>(ctx, hd, s.m, s.heads * s.r, s.tokens, s.m + s.x_pad, s.heads * s.r + s.y_pad, epi, g);
        }
      }
}

struct attn_case {
  index_t n_q, n_kv, h_q, h_kv, d_qk, d_v;
  bool causal;
  double scale;
  index_t pad;  // extra elements per token row of every tensor (non-contiguous heads)
};

template <class T>
void attention_suite() {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const attn_case cases[] = {
      {100, 100, 4, 4, 64, 64, true, 0, 0},      // MHA, causal
      {100, 100, 4, 4, 64, 64, false, 0, 0},     // MHA, bidirectional
      {77, 131, 8, 2, 96, 48, true, 0, 3},       // GQA, n_q < n_kv (KV cache), d_qk != d_v, padded
      {33, 65, 6, 1, 192, 128, false, 0.05, 1},  // MQA, DeepSeek MLA head dims, explicit scale
      {1, 40, 2, 2, 256, 256, true, 0, 0},       // one query (decode), largest dims
      {50, 50, 3, 3, 5, 7, true, 0, 2},          // tiny dims
  };
  for (const attn_case& c : cases) {
    INFO("n_q " << c.n_q << ", n_kv " << c.n_kv << ", h_q " << c.h_q << ", h_kv " << c.h_kv << ", d_qk " << c.d_qk
                << ", d_v " << c.d_v << ", causal " << c.causal << ", scale " << c.scale << ", pad " << c.pad);
    const index_t lq = c.h_q * c.d_qk + c.pad, lk = c.h_kv * c.d_qk + c.pad, lv = c.h_kv * c.d_v + c.pad,
                  lo = c.h_q * c.d_v + c.pad;
    const auto q = random_padded<T>(g, c.n_q, c.h_q * c.d_qk, lq);
    const auto k = random_padded<T>(g, c.n_kv, c.h_kv * c.d_qk, lk);
    const auto v = random_padded<T>(g, c.n_kv, c.h_kv * c.d_v, lv);
    attention_options opt;
    opt.causal = c.causal;
    opt.scale = c.scale;
    auto view3 = [](auto* p, index_t n, index_t h, index_t d, index_t ld) {
      return tensor3_view<std::remove_pointer_t<decltype(p)>>(p, n, h, d, ld, d, 1);
    };
    matrix<T> want(c.n_q, c.h_q * c.d_v);
    attention(cpu{}, view3(q.data(), c.n_q, c.h_q, c.d_qk, lq), view3(k.data(), c.n_kv, c.h_kv, c.d_qk, lk),
              view3(v.data(), c.n_kv, c.h_kv, c.d_v, lv), view3(want.data(), c.n_q, c.h_q, c.d_v, c.h_q * c.d_v), opt);

    const auto dq = to_device(ctx, q.data(), static_cast<index_t>(q.size()));
    const auto dk = to_device(ctx, k.data(), static_cast<index_t>(k.size()));
    const auto dv = to_device(ctx, v.data(), static_cast<index_t>(v.size()));
    device_buffer<T> dout(c.n_q * lo);
    poison(ctx, dout);
    CHECK(attention_workspace_bytes(ctx, c.n_q, c.n_kv, c.h_q, c.d_qk, c.d_v, dtype_of_v<T>, opt) == 0);
    attention<T>(ctx, view3(static_cast<const T*>(dq.data()), c.n_q, c.h_q, c.d_qk, lq),
                 view3(static_cast<const T*>(dk.data()), c.n_kv, c.h_kv, c.d_qk, lk),
                 view3(static_cast<const T*>(dv.data()), c.n_kv, c.h_kv, c.d_v, lv),
                 view3(dout.data(), c.n_q, c.h_q, c.d_v, lo), opt);
    ctx.synchronize();
    std::vector<T> out(static_cast<std::size_t>(c.n_q * lo));
    dout.download(ctx, out.data(), c.n_q * lo);
    const comparison r = compare(out, lo, want);
    INFO("dtype " << to_string(dtype_of_v<T>) << ": nerr " << r.nerr << " (bound " << tolerance<T>() << ")");
    CHECK(r.non_finite == 0);
    CHECK(r.padding_touched == 0);
    CHECK(r.nerr <= tolerance<T>());
  }
}

}  // namespace

static_assert(is_backend_v<basisattn::cuda>);

TEST_CASE("cuda_context owns or borrows a stream and device_buffer round-trips") {
  cuda_context ctx;
  CHECK(ctx.owns_stream());
  CHECK(ctx.cublas() != nullptr);
  CHECK(ctx.cublaslt() != nullptr);
  std::vector<float> h(1000), back(1000, -1.0f);
  std::iota(h.begin(), h.end(), 0.0f);
  auto d = to_device(ctx, h.data(), 1000);
  CHECK(d.size() == 1000);
  CHECK(d.bytes() == 4000);
  d.download(ctx, back.data(), 1000);
  CHECK(back == h);
  device_buffer<float> moved = std::move(d);
  CHECK(d.data() == nullptr);
  CHECK(moved.size() == 1000);

  cudaStream_t s = nullptr;
  BASISATTN_CUDA_CHECK(cudaStreamCreate(&s));
  {
    cuda_context borrowed = cuda_context::on_stream(s);
    CHECK(!borrowed.owns_stream());
    CHECK(borrowed.stream() == s);
    cuda_context moved_ctx = std::move(borrowed);
    CHECK(moved_ctx.stream() == s);
  }
  BASISATTN_CUDA_CHECK(cudaStreamSynchronize(s));  // still valid: the context did not destroy it
  BASISATTN_CUDA_CHECK(cudaStreamDestroy(s));
}

TEST_CASE("a failing cuBLAS call becomes a basisattn::error with errc::backend") {
  cuda_context ctx;
  const float one = 1.0f;
  try {
    BASISATTN_CUBLAS_CHECK(cublasSgemm(ctx.cublas(), CUBLAS_OP_N, CUBLAS_OP_N, -1, 1, 1, &one, nullptr, 1, nullptr, 1,
                                       &one, nullptr, 1));
    FAIL("cublasSgemm with m = -1 did not fail");
  } catch (const basisattn::error& e) {
    CHECK(e.code() == errc::backend);
    CHECK(std::string(e.what()).find("cublasSgemm") != std::string::npos);
    CHECK(std::string(e.what()).find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
  }
}

TEST_CASE("CUDA projections match the CPU backend: fp32") { projection_suite<float>(); }
TEST_CASE("CUDA projections match the CPU backend: fp16") { projection_suite<Eigen::half>(); }
TEST_CASE("CUDA projections match the CPU backend: bf16") { projection_suite<Eigen::bfloat16>(); }

TEST_CASE("CUDA projections reject bad shapes") {
  cuda_context ctx;
  std::mt19937_64 g(1);
  const auto dp = bd::upload(ctx, random_bd<float>(g, 16, 4, 2, true, false));
  const auto dd = bd::upload(ctx, random_dense<float>(g, 16, 8, false));
  device_buffer<float> x(10 * 17), y(10 * 9);
  auto code_of = [](auto&& f) {
    try {
      f();
    } catch (const basisattn::error& e) {
      return e.code();
    }
    return errc::io;  // "no error" marker for these checks
  };
  const std::size_t ws = bd::project_workspace_bytes(ctx, dp, 10);
  device_buffer<unsigned char> w(static_cast<index_t>(ws));
  CHECK(code_of([&] {
          bd::project(ctx, dp, matrix_view<const float>(x.data(), 10, 17), matrix_view<float>(y.data(), 10, 8), w.data(),
                      ws);
        }) == errc::shape_mismatch);  // x has 17 columns, the projection takes 16
  CHECK(code_of([&] {
          bd::project(ctx, dp, matrix_view<const float>(x.data(), 10, 16), matrix_view<float>(y.data(), 9, 8), w.data(),
                      ws);
        }) == errc::shape_mismatch);  // tokens disagree
  CHECK(code_of([&] {
          bd::project(ctx, dd, matrix_view<const float>(x.data(), 10, 16), matrix_view<float>(y.data(), 10, 9), nullptr,
                      0);
        }) == errc::shape_mismatch);  // y has 9 columns, the projection gives 8
  CHECK(code_of([&] {
          bd::project(ctx, dp, matrix_view<const float>(x.data(), 10, 16), matrix_view<float>(y.data(), 10, 8), w.data(),
                      ws - 1);
        }) == errc::invalid_argument);  // workspace too small
  CHECK(code_of([&] {
          bd::project(ctx, dp, matrix_view<const float>(x.data(), 10, 16, 8), matrix_view<float>(y.data(), 10, 8),
                      w.data(), ws);
        }) == errc::invalid_argument);  // row stride below the row length
  bd::bd_projection<float> bad = random_bd<float>(g, 16, 4, 2, true, false);
  bad.rest[0] = 0;  // channel 0 twice
  CHECK(code_of([&] { (void)bd::upload(ctx, bad); }) == errc::invalid_argument);
}

TEST_CASE("CUDA attention matches the CPU backend: fp32") { attention_suite<float>(); }
TEST_CASE("CUDA attention matches the CPU backend: fp16") { attention_suite<Eigen::half>(); }
TEST_CASE("CUDA attention matches the CPU backend: bf16") { attention_suite<Eigen::bfloat16>(); }

TEST_CASE("CUDA attention rejects bad arguments") {
  cuda_context ctx;
  device_buffer<float> a(4 * 2 * 300), b(4 * 2 * 300), c(4 * 2 * 300), o(4 * 2 * 300);
  auto t = [](float* p, index_t n, index_t h, index_t d) { return tensor3_view<float>(p, n, h, d); };
  auto ct = [](const float* p, index_t n, index_t h, index_t d) { return tensor3_view<const float>(p, n, h, d); };
  auto code_of = [](auto&& f) {
    try {
      f();
    } catch (const basisattn::error& e) {
      return e.code();
    }
    return errc::io;
  };
  attention_options opt;
  CHECK(code_of([&] { attention<float>(ctx, ct(a.data(), 4, 2, 8), ct(b.data(), 4, 2, 9), ct(c.data(), 4, 2, 8), t(o.data(), 4, 2, 8), opt); }) ==
        errc::shape_mismatch);  // d_qk of q and k differ
  CHECK(code_of([&] { attention<float>(ctx, ct(a.data(), 4, 3, 8), ct(b.data(), 4, 2, 8), ct(c.data(), 4, 2, 8), t(o.data(), 4, 3, 8), opt); }) ==
        errc::shape_mismatch);  // 3 query heads over 2 kv heads
  CHECK(code_of([&] { attention<float>(ctx, ct(a.data(), 2, 2, 300), ct(b.data(), 2, 2, 300), ct(c.data(), 2, 2, 8), t(o.data(), 2, 2, 8), opt); }) ==
        errc::unsupported);  // d_qk above the kernel's 256
  opt.accumulate_double = true;
  CHECK(code_of([&] { attention<float>(ctx, ct(a.data(), 4, 2, 8), ct(b.data(), 4, 2, 8), ct(c.data(), 4, 2, 8), t(o.data(), 4, 2, 8), opt); }) ==
        errc::unsupported);
}
