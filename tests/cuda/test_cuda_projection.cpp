// CUDA backend vs a double-precision oracle: dense and BD projections (every epilogue method, basis
// leading or gathered, with and without bias, padded row strides) and exact attention (causal / not,
// GQA, n_q < n_kv, d_qk != d_v, strided tensors), in fp32, fp16 and bf16, at small sizes and ([large])
// at 65536 tokens with row strides that put element offsets beyond 2^31. Every run uses fresh random
// inputs (the seed is printed at once and in the failure message; BASISATTN_TEST_SEED=N reruns it), poisons the output first (all bytes 0xFF: NaN in every
// dtype) and checks that every element was written and padding left alone. Without a usable GPU the
// program exits 77 (CTest: Skipped). Cases tagged [sanitize] are small and run under compute-sanitizer.
//
// Projection bounds (per element, against the exact product of the stored T values in double). The
// documented arithmetic is fp32 accumulation and one rounding to T. An element sums K = depth + 2
// terms (depth products x_l w_l, for BD also the basis channel, and the bias); in fp32, in any order,
// with or without FMA or split-K in fp32, its error is <= gamma_K(fp32) S, S = sum of |terms|
// (Higham eq. 3.13), with gamma_K = K u / (1 - K u) for round-to-nearest additions. Tensor cores may
// align and truncate inside an accumulation (Fasi, Higham, Mikaitis, Pranesh 2021: products exact,
// up to 2 u per addition), so the bounds below use gamma_2K: rigorous for either. One rounding to T
// (the epilogue's conversion, round to nearest) adds u_T |y| (+ eta_T below T's normal range):
//   one rounding (cublaslt, none):  |y - y*| <= u_T |y*| + (1 + u_T) gamma_2K S + eta_T.
// The prefill method first writes y1 = fl_T(fl_32(x_b + b)) (error <= (u_T + u_32)(1 + u_32) a + eta_T,
// a = |x_b| + |b|, |y1| <= 2a), then the GEMM adds the products to y1 in fp32 (gamma_2K (S + 2a))
// and rounds once more:
//   prefill:  |y - y*| <= u_T |y*| + (1 + u_T) (gamma_2K (S + 2a) + (u_T + u_32)(1 + u_32) a + eta_T) + eta_T.
// These bounds are too loose to see a split-K sum reduced in T (gamma_K S grows with K): the split-K
// test instead uses inputs on which fp32 arithmetic is exact in any order (see split_k_suite).
//
// Attention bound (normwise over the compared rows, as tests/test_attention.cpp derives it for the CPU
// kernel, which computes the same way in fp32): rel_error <= u_T + u_32 (kappa sqrt(d_qk) + sqrt(n_kv)
// + 8), kappa = max(1, max over visible pairs of scale sum_e |q_e k_e|). The constant is 8 rather than
// the CPU's 4: CUDA's expf is accurate to 2 ulp (CUDA C Programming Guide, table of single-precision
// functions), counted twice (the weight and the rescale), against 1 ulp each on the CPU.
#include "skip_main.hpp"

#include "cuda_harness.hpp"
#include "test_util.hpp"

#include <basisattn/attention.hpp>
#include <basisattn/attention/reference.hpp>
#include <basisattn/bd/projection.hpp>
#include <basisattn/cpu/attention.hpp>
#include <basisattn/cpu/projection.hpp>
#include <basisattn/cuda/attention.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/projection.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace basisattn;

namespace {

using cudatest::code_of;
using cudatest::device_tensor;
using cudatest::from_f;
using cudatest::host_tensor;
using cudatest::pad_fill;
using cudatest::padding;
using cudatest::poison;
using cudatest::random_tensor;
using cudatest::readback;
using cudatest::to_d;

/// A random BD projection; with groups > 1 (never leading) each basis group has its own channels.
template <class T>
bd::bd_projection<T> random_bd(std::mt19937_64& g, index_t m, index_t r, index_t heads, bool leading, bool bias,
                               index_t groups = 1) {
  bd::bd_projection<T> p;
  p.in_dim = m;
  p.rank = r;
  p.heads = heads;
  p.groups = groups;
  for (index_t q = 0; q < groups; ++q) {
    std::vector<index_t> ch(static_cast<std::size_t>(m));
    std::iota(ch.begin(), ch.end(), index_t(0));
    if (!leading) std::shuffle(ch.begin(), ch.end(), g);
    p.basis.insert(p.basis.end(), ch.begin(), ch.begin() + r);
    p.rest.insert(p.rest.end(), ch.begin() + r, ch.end());
  }
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

/// One output row of a projection in double: the exact value, S (sum of |terms|), a = |x_b| + |b| and
/// the sum of the products alone (want minus basis channel and bias).
struct oracle_row {
  std::vector<double> want, mag, basis_bias, sum_part;
};

template <class T>
oracle_row oracle(const bd::dense_projection<T>& p, const T* x) {
  const index_t in = p.in_dim(), out = p.out_dim();
  oracle_row o{std::vector<double>(out, 0.0), std::vector<double>(out, 0.0), std::vector<double>(out, 0.0), {}};
  for (index_t l = 0; l < in; ++l) {
    const double xl = to_d(x[l]);
    for (index_t j = 0; j < out; ++j) {
      const double t = xl * to_d(p.weight(l, j));
      o.want[j] += t;
      o.mag[j] += std::abs(t);
    }
  }
  o.sum_part = o.want;
  for (index_t j = 0; j < out && !p.bias.empty(); ++j) {
    const double b = to_d(p.bias[static_cast<std::size_t>(j)]);
    o.want[j] += b;
    o.mag[j] += std::abs(b);
    o.basis_bias[j] = std::abs(b);
  }
  return o;
}

template <class T>
oracle_row oracle(const bd::bd_projection<T>& p, const T* x) {
  const index_t r = p.rank, out = p.heads * p.rank;
  oracle_row o{std::vector<double>(out, 0.0), std::vector<double>(out, 0.0), std::vector<double>(out, 0.0), {}};
  for (index_t j = 0; j < out; ++j) {  // head j / r, with its group's channels
    const index_t* rest = p.rest_of(j / r);
    for (index_t l = 0; l < p.in_dim - r; ++l) {
      const double t = to_d(x[rest[l]]) * to_d(p.coeff(l, j));
      o.want[j] += t;
      o.mag[j] += std::abs(t);
    }
  }
  o.sum_part = o.want;
  for (index_t j = 0; j < out; ++j) {
    const double xb = to_d(x[p.basis_of(j / r)[j % r]]);
    const double b = p.bias.empty() ? 0.0 : to_d(p.bias[static_cast<std::size_t>(j)]);
    o.want[j] += xb + b;
    o.mag[j] += std::abs(xb) + std::abs(b);
    o.basis_bias[j] = std::abs(xb) + std::abs(b);
  }
  return o;
}

template <class T>
index_t depth_of(const bd::dense_projection<T>& p) {
  return p.in_dim();
}
template <class T>
index_t depth_of(const bd::bd_projection<T>& p) {
  return p.in_dim - p.rank;
}
template <class T>
index_t out_of(const bd::dense_projection<T>& p) {
  return p.out_dim();
}
template <class T>
index_t out_of(const bd::bd_projection<T>& p) {
  return p.heads * p.rank;
}
template <class T>
index_t in_of(const bd::dense_projection<T>& p) {
  return p.in_dim();
}
template <class T>
index_t in_of(const bd::bd_projection<T>& p) {
  return p.in_dim;
}

/// The bound of the header comment for one element.
template <class T>
double projection_bound(bd::cuda_epilogue ran, index_t depth, double want, double mag, double basis_bias) {
  const double uT = test::u<T>(), u32 = test::u<float>(), eT = test::eta<T>();
  const double gK = test::gamma<float>(2 * (depth + 2));  // gamma_2K: tensor-core truncation (header)
  if (ran != bd::cuda_epilogue::prefill) return uT * std::abs(want) + (1 + uT) * gK * mag + eT;
  return uT * std::abs(want) + (1 + uT) * (gK * (mag + 2 * basis_bias) + (uT + u32) * (1 + u32) * basis_bias + eT) + eT;
}

bool is_hopper() {
  int dev = 0, major = 0;
  BASISATTN_CUDA_CHECK(cudaGetDevice(&dev));
  BASISATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major == 9;
}

/// What one projection check saw.
struct projection_result {
  bool declined = false;  ///< forced cublaslt refused with errc::unsupported
  bd::cuda_epilogue ran = bd::cuda_epilogue::automatic;
  double worst = 0;  ///< max |error| / bound over the checked elements
};

/// Run projection hp on the GPU (x: tokens rows at stride ldx, y at stride ldy) and compare the rows
/// `rows` (all rows when empty) element by element with the double oracle. Runs twice (the second run
/// goes through the cached cuBLASLt plan). Large strides make the device buffers large; the host only
/// ever holds tokens x in and tokens x out elements (2-D copies).
template <class T, class HP>
projection_result check_projection(const cuda_context& ctx, const HP& hp, index_t tokens, index_t ldx, index_t ldy,
                                   bd::cuda_epilogue epi, std::mt19937_64& g, std::vector<index_t> rows = {}) {
  const index_t in = in_of(hp), out = out_of(hp);
  const auto dp = bd::upload(ctx, hp);
  // x: N(0, 1) values rounded through fp32; on the device with row stride ldx (the padding poisoned)
  const host_tensor<T> x = random_tensor<T>(g, tokens, 1, in, 1.0, 0.0, from_f<T>);
  const device_tensor<T> dx(ctx, x, padding{0, ldx - in}, pad_fill::poison());
  device_tensor<T> dy(tokens, 1, out, padding{0, ldy - out});
  host_tensor<T> y(tokens, 1, out);
  bd::cuda_project_options opt;
  opt.epilogue = epi;
  device_buffer<unsigned char> ws(static_cast<index_t>(bd::workspace_bytes(ctx, dp, tokens, opt)));
  if (rows.empty()) {
    rows.resize(static_cast<std::size_t>(tokens));
    std::iota(rows.begin(), rows.end(), index_t(0));
  }
  std::vector<oracle_row> want(rows.size());  // tokens x in x out double products: spread over the cores
#pragma omp parallel for schedule(dynamic, 8)
  for (index_t i = 0; i < static_cast<index_t>(rows.size()); ++i)
    want[static_cast<std::size_t>(i)] = oracle(hp, x.data() + rows[static_cast<std::size_t>(i)] * in);
  projection_result res;
  for (int run = 0; run < 2; ++run) {
    dy.poison(ctx);
    try {
      res.ran = bd::project(ctx, dp, dx.cmview(), dy.mview(), ws.data(), ws.bytes(), opt);
    } catch (const basisattn::error& e) {
      if (e.code() == errc::unsupported && epi == bd::cuda_epilogue::cublaslt) {
        res.declined = true;
        return res;
      }
      throw;
    }
    ctx.synchronize();
    // The method that ran is the one asked for, or (automatic) one of the two real methods.
    if (epi == bd::cuda_epilogue::automatic)
      CHECK((res.ran == bd::cuda_epilogue::cublaslt || res.ran == bd::cuda_epilogue::prefill ||
             res.ran == bd::cuda_epilogue::none));
    else if (res.ran != bd::cuda_epilogue::none)
      CHECK(res.ran == epi);
    // Every element written (no poison left in the tokens x out block); padding of the checked rows untouched.
    const readback rb = dy.download_rows(ctx, y, rows, ldy - out);
    double worst = 0;
    for (std::size_t i = 0; i < rows.size(); ++i)
      for (index_t j = 0; j < out; ++j) {
        const double got = to_d(y.buf[static_cast<std::size_t>(rows[i] * out + j)]);
        const oracle_row& o = want[i];
        const double e = std::abs(got - o.want[j]);
        const double b = projection_bound<T>(res.ran, depth_of(hp), o.want[j], o.mag[j], o.basis_bias[j]);
        worst = std::max(worst, std::isfinite(got) ? e / b : INFINITY);
      }
    INFO("dtype " << to_string(dtype_of_v<T>) << ", asked " << bd::to_string(epi) << ", ran " << bd::to_string(res.ran)
                  << ", tokens " << tokens << ", ldx " << ldx << ", ldy " << ldy << ", run " << run
                  << ": worst error / bound " << worst);
    CHECK(rb.unwritten == 0);
    CHECK(rb.padding_touched == 0);
    CHECK(worst <= 1.0);
    res.worst = std::max(res.worst, worst);
  }
  return res;
}

struct proj_shape {
  index_t m, r, heads, tokens, x_pad, y_pad;
  const char* name;
  index_t groups = 1;  ///< basis groups (> 1: gathered only, one basis per group of heads)
};

/// Every (leading, bias, method) combination of a BD projection of this shape and the dense
/// projection of the same size. On Hopper (sm_90) the DeepSeek-V2-Lite shape (latent 512 -> 16 x 128)
/// must run the cuBLASLt epilogue path when asked for automatically or explicitly: a silent fallback to
/// prefill fails here.
template <class T>
void projection_shape(const cuda_context& ctx, const proj_shape& s, std::mt19937_64& g) {
  const bd::cuda_epilogue methods[] = {bd::cuda_epilogue::automatic, bd::cuda_epilogue::cublaslt,
                                       bd::cuda_epilogue::prefill};
  const bool deepseek = s.m == 512 && s.r == 128 && s.heads == 16;
  const bool need_lt = deepseek && is_hopper();
  for (bool leading : {true, false})
    for (bool bias : {false, true}) {
      if (leading && s.groups > 1) continue;
      INFO("shape " << s.name << ": m " << s.m << ", r " << s.r << ", heads " << s.heads << " in " << s.groups
                    << " basis groups, tokens " << s.tokens << ", leading " << leading << ", bias " << bias);
      const auto hp = random_bd<T>(g, s.m, s.r, s.heads, leading, bias, s.groups);
      const auto hd = random_dense<T>(g, s.m, s.heads * s.r, bias);
      for (auto epi : methods) {
        INFO("bd, asked " << bd::to_string(epi));
        const projection_result rb =
            check_projection<T>(ctx, hp, s.tokens, s.m + s.x_pad, s.heads * s.r + s.y_pad, epi, g);
        INFO("dense, asked " << bd::to_string(epi));
        const projection_result rd =
            check_projection<T>(ctx, hd, s.tokens, s.m + s.x_pad, s.heads * s.r + s.y_pad, epi, g);
        if (epi == bd::cuda_epilogue::automatic)
          std::printf("projection %s %s leading %d bias %d: bd ran %s (error/bound %.3g), dense ran %s (%.3g)\n",
                      to_string(dtype_of_v<T>), s.name, int(leading), int(bias), bd::to_string(rb.ran), rb.worst,
                      bd::to_string(rd.ran), rd.worst);
        if (rb.declined || rd.declined)
          WARN("cuBLASLt declined the epilogue GEMM for shape " << s.name << " (bd " << rb.declined << ", dense "
                                                                << rd.declined << ")");
        if (need_lt) {
          CHECK(!rb.declined);
          CHECK(!rd.declined);
          if (epi == bd::cuda_epilogue::automatic) {
            CHECK(rb.ran == bd::cuda_epilogue::cublaslt);
            CHECK(rd.ran == (bias ? bd::cuda_epilogue::cublaslt : bd::cuda_epilogue::none));
          }
        }
        if (!bias && epi == bd::cuda_epilogue::automatic) CHECK(rd.ran == bd::cuda_epilogue::none);
      }
    }
}

template <class T>
void projection_suite(bool small_only) {
  const std::uint64_t seed = cudatest::test_seed("projection_suite");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  // r = 12 and r = 4 in 16-bit storage would put a packed head bias at 24 / 8-byte offsets (the device
  // layout pads each head's bias to 256 bytes); the single token and odd strides test edges.
  const proj_shape small[] = {{70, 12, 3, 129, 5, 3, "odd"},
                              {40, 8, 2, 1, 0, 8, "one-token"},
                              {64, 4, 5, 257, 0, 1, "r4"},
                              {70, 12, 3, 129, 5, 3, "odd, a basis per head", 3}};
  const proj_shape more[] = {{512, 128, 16, 300, 0, 0, "deepseek-v2-lite"},
                             {192, 12, 16, 200, 0, 0, "r12x16"},
                             {576, 64, 3, 300, 0, 0, "smollm2 gqa, a basis per kv head", 3},
                             {192, 12, 16, 200, 0, 0, "r12x16, 4 basis groups", 4}};
  for (const proj_shape& s : small) projection_shape<T>(ctx, s, g);
  if (small_only) return;
  for (const proj_shape& s : more) projection_shape<T>(ctx, s, g);
}

/// Split-K partial sums must be reduced in fp32, not in T. Deep-K, few-output shapes
/// (K = 16384, 64 outputs, 32 tokens), where cuBLAS and cuBLASLt choose split-K, on inputs for which
/// fp32 arithmetic is exact in ANY order: x = +-m 2^-10 (m in [128, 255]: exact in fp16 and bf16),
/// weights and coefficients +-1, biases multiples of 2^-3 in [-0.5, 0.5]. Every product and every
/// partial sum is then a multiple of 2^-10 below 16384 * 0.25 + 0.75 < 2^14 in magnitude, which fp32's 24
/// bits hold exactly, whatever the order, FMA or not, rounding to nearest or truncating (tensor cores):
/// every intermediate is representable. So the output must be exactly fl_T(y*), the exact sum rounded
/// once (prefill: fl_T(sum + fl_T(x_b + b)), its documented two roundings; x_b + b is exact in fp32 and
/// fl_T of it is again a multiple of 2^-10). Partial sums are random walks of size ~0.19 sqrt(K / s)
/// for s splits (~12 for s = 4), multiples of 2^-10: above 2 (fp16: 11 bits) or 0.25 (bf16: 8 bits)
/// they are not representable in T, so a split-K reduction in T changes the element with near
/// certainty over 2048 outputs. (Whether cuBLAS picks split-K for these shapes is its heuristic's
/// choice; the test cannot see it. It then checks that the deep sums are exact.)
template <class T>
void split_k_suite() {
  const std::uint64_t seed = cudatest::test_seed("split_k_suite");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const index_t K = 16384, out = 64, tokens = 32;
  std::uniform_int_distribution<int> mant(128, 255), sign(0, 1), bk(-4, 4);
  auto xval = [&] { return from_f<T>((sign(g) ? 1.0 : -1.0) * mant(g) * std::ldexp(1.0, -10)); };
  auto pm1 = [&] { return from_f<T>(sign(g) ? 1.0 : -1.0); };
  std::vector<T> x(static_cast<std::size_t>(tokens * K));
  for (T& v : x) v = xval();
  const auto dx = to_device(ctx, x.data(), static_cast<index_t>(x.size()));
  device_buffer<T> dy(tokens * out);
  auto run_and_compare = [&](const auto& hp, bd::cuda_epilogue epi) {
    const auto dp = bd::upload(ctx, hp);
    bd::cuda_project_options opt;
    opt.epilogue = epi;
    device_buffer<unsigned char> ws(static_cast<index_t>(bd::workspace_bytes(ctx, dp, tokens, opt)));
    poison(ctx, dy);
    const bd::cuda_epilogue ran = bd::project(ctx, dp, matrix_view<const T>(dx.data(), tokens, K),
                                              matrix_view<T>(dy.data(), tokens, out), ws.data(), ws.bytes(), opt);
    std::vector<T> y(static_cast<std::size_t>(tokens * out));
    dy.download(ctx, y.data(), tokens * out);
    index_t wrong = 0;
    double worst = 0;
    for (index_t t = 0; t < tokens; ++t) {
      const oracle_row o = oracle(hp, x.data() + t * K);
      for (index_t j = 0; j < out; ++j) {
        double want = o.want[j];
        if (ran == bd::cuda_epilogue::prefill) {  // y1 = fl_T(x_b + b), then the sum on top of it
          const double first = o.want[j] - o.sum_part[j];
          want = o.sum_part[j] + to_d(from_f<T>(first));
        }
        const T expect = basisattn::detail::from_compute<T>(want);  // want is exact in fp32: one rounding
        const T got = y[static_cast<std::size_t>(t * out + j)];
        if (std::memcmp(&got, &expect, sizeof(T)) != 0) {
          ++wrong;
          worst = std::max(worst, std::abs(to_d(got) - to_d(expect)));
        }
      }
    }
    INFO("asked " << bd::to_string(epi) << ", ran " << bd::to_string(ran) << ": " << wrong
                  << " elements differ from the correctly rounded exact sum (largest difference " << worst << ")");
    CHECK(wrong == 0);
  };
  for (bool bias : {false, true}) {
    INFO("bias " << bias);
    bd::dense_projection<T> hd;
    hd.weight = matrix<T>(K, out);
    for (index_t i = 0; i < hd.weight.size(); ++i) hd.weight.data()[i] = pm1();
    bd::bd_projection<T> hp = random_bd<T>(g, K, 8, 8, false, false);
    for (index_t i = 0; i < hp.coeff.size(); ++i) hp.coeff.data()[i] = pm1();
    if (bias)
      for (index_t j = 0; j < out; ++j) {
        hd.bias.push_back(from_f<T>(0.125 * bk(g)));
        hp.bias.push_back(from_f<T>(0.125 * bk(g)));
      }
    for (auto epi : {bd::cuda_epilogue::automatic, bd::cuda_epilogue::prefill}) {
      INFO("dense 16384 -> 64");
      run_and_compare(hd, epi);
      INFO("bd 16384 -> 8 x 8");
      run_and_compare(hp, epi);
    }
  }
}

/// Sampled rows of a long run: the first and last 8 and 48 random ones.
std::vector<index_t> sample_rows(std::mt19937_64& g, index_t n, index_t random_count = 48) {
  std::vector<index_t> rows;
  for (index_t i = 0; i < std::min<index_t>(8, n); ++i) rows.push_back(i);
  for (index_t i = std::max<index_t>(8, n - 8); i < n; ++i) rows.push_back(i);
  std::uniform_int_distribution<index_t> pick(0, n - 1);
  for (index_t i = 0; i < random_count; ++i) rows.push_back(pick(g));
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

/// 65536 tokens of the DeepSeek-V2-Lite shape with row strides of 40000 elements: the last row starts
/// at element 65535 * 40000 = 2.6e9 > 2^31 (64-bit offsets in the gather and broadcast kernels and in
/// cuBLAS / cuBLASLt), 5.2 GB per 16-bit operand on the device.
template <class T>
void projection_large() {
  const std::uint64_t seed = cudatest::test_seed("projection_large");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const index_t tokens = 65536, ld = 40000;
  const auto rows = sample_rows(g, tokens);
  for (bool leading : {true, false}) {
    const auto hp = random_bd<T>(g, 512, 128, 16, leading, true);
    for (auto epi : {bd::cuda_epilogue::automatic, bd::cuda_epilogue::prefill}) {
      INFO("bd, leading " << leading << ", asked " << bd::to_string(epi));
      const projection_result r = check_projection<T>(ctx, hp, tokens, ld, ld, epi, g, rows);
      // Informational at these strides (a 2.6e9-element D): declining them is cuBLASLt's right, and
      // the fallback is correct; the cuBLASLt requirement is tested at the plain strides above.
      if (epi == bd::cuda_epilogue::automatic && is_hopper() && r.ran != bd::cuda_epilogue::cublaslt)
        WARN("cuBLASLt declined the 65536-token, ld-40000 problem; prefill ran");
      std::printf("projection %s 65536 tokens, ld 40000, bd leading %d asked %s: ran %s, error/bound %.3g\n",
                  to_string(dtype_of_v<T>), int(leading), bd::to_string(epi), bd::to_string(r.ran), r.worst);
    }
  }
  const auto hd = random_dense<T>(g, 512, 2048, true);
  INFO("dense with bias");
  const projection_result r = check_projection<T>(ctx, hd, tokens, ld, ld, bd::cuda_epilogue::automatic, g, rows);
  std::printf("projection %s 65536 tokens, ld 40000, dense: ran %s, error/bound %.3g\n", to_string(dtype_of_v<T>),
              bd::to_string(r.ran), r.worst);
}

// ---- exact attention --------------------------------------------------------------------------------

struct attn_case {
  index_t n_q, n_kv, h_q, h_kv, d_qk, d_v;
  bool causal;
  double scale;
  index_t pad;  // extra elements per token row of every tensor (non-contiguous heads); large: the row stride
  bool large_stride = false;  // pad is the whole row stride of k, v and out (not an addition)
};

/// Run exact attention on the GPU and compare the query rows `rows` (all when empty) of every head
/// with attention_reference in double; returns rel_error / tolerance (header comment).
template <class T>
double check_attention(const cuda_context& ctx, const attn_case& c, std::mt19937_64& g,
                       std::vector<index_t> rows = {}) {
  const index_t wq = c.h_q * c.d_qk, wk = c.h_kv * c.d_qk, wv = c.h_kv * c.d_v, wo = c.h_q * c.d_v;
  const index_t lq = wq + (c.large_stride ? 0 : c.pad);
  const index_t lk = c.large_stride ? c.pad : wk + c.pad, lv = c.large_stride ? c.pad : wv + c.pad,
                lo = c.large_stride ? c.pad : wo + c.pad;
  // Host copies are compact (N(0, 1) values rounded through fp32); device tensors have the row strides
  // above, their padding poisoned (2-D copies).
  const host_tensor<T> q = random_tensor<T>(g, c.n_q, c.h_q, c.d_qk, 1.0, 0.0, from_f<T>),
                       k = random_tensor<T>(g, c.n_kv, c.h_kv, c.d_qk, 1.0, 0.0, from_f<T>),
                       v = random_tensor<T>(g, c.n_kv, c.h_kv, c.d_v, 1.0, 0.0, from_f<T>);
  const device_tensor<T> dq(ctx, q, padding{0, lq - wq}, pad_fill::poison()),
      dk(ctx, k, padding{0, lk - wk}, pad_fill::poison()), dv(ctx, v, padding{0, lv - wv}, pad_fill::poison());
  device_tensor<T> dout(c.n_q, c.h_q, c.d_v, padding{0, lo - wo});
  dout.poison(ctx);
  attention_options opt;
  opt.causal = c.causal;
  opt.scale = c.scale;
  auto view3 = [](auto* p, index_t n, index_t h, index_t d, index_t ld) {
    return tensor3_view<std::remove_pointer_t<decltype(p)>>(p, n, h, d, ld, d, 1);
  };
  CHECK(workspace_bytes(ctx, dq.cview(), dk.cview(), dv.cview(), opt) == 0);
  attention<T>(ctx, dq.cview(), dk.cview(), dv.cview(), dout.view(), opt);
  ctx.synchronize();
  if (rows.empty()) {
    rows.resize(static_cast<std::size_t>(c.n_q));
    std::iota(rows.begin(), rows.end(), index_t(0));
  }
  // Every element written (no poison left); padding of the compared rows untouched (the first 64
  // elements after the row when the stride is large).
  host_tensor<T> out(c.n_q, c.h_q, c.d_v);
  const readback rb = dout.download_rows(ctx, out, rows, 64);
  // Oracle per compared row: one query row against the keys it sees (causal: the first off + i + 1).
  const double scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(double(c.d_qk));
  const index_t off = c.n_kv - c.n_q, group = c.h_q / c.h_kv;
  const index_t nr = static_cast<index_t>(rows.size());
  std::vector<double> num(static_cast<std::size_t>(nr), 0.0), den(static_cast<std::size_t>(nr), 0.0),
      kap(static_cast<std::size_t>(nr), 0.0);
  bool oracle_failed = false;
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t ii = 0; ii < nr; ++ii) {
    const index_t i = rows[static_cast<std::size_t>(ii)];
    const index_t seen = c.causal ? off + i + 1 : c.n_kv;
    attention_options o1;
    o1.causal = false;
    o1.scale = scale;
    std::vector<double> ref(static_cast<std::size_t>(wo));
    try {
      attention_reference<T, double>(
          view3(q.data() + i * wq, 1, c.h_q, c.d_qk, wq), view3(k.data(), seen, c.h_kv, c.d_qk, wk),
          view3(v.data(), seen, c.h_kv, c.d_v, wv), view3(ref.data(), 1, c.h_q, c.d_v, wo), o1);
    } catch (...) {
#pragma omp critical
      oracle_failed = true;
      continue;
    }
    double kp = 0;
    for (index_t h = 0; h < c.h_q; ++h)
      for (index_t j = 0; j < seen; ++j) {
        double sabs = 0;
        for (index_t e = 0; e < c.d_qk; ++e)
          sabs += std::abs(to_d(q.buf[static_cast<std::size_t>(i * wq + h * c.d_qk + e)]) *
                           to_d(k.buf[static_cast<std::size_t>(j * wk + (h / group) * c.d_qk + e)]));
        kp = std::max(kp, scale * sabs);
      }
    double nm = 0, dn = 0;
    for (index_t e = 0; e < wo; ++e) {
      const double got = to_d(out.buf[static_cast<std::size_t>(i * wo + e)]), want = ref[static_cast<std::size_t>(e)];
      nm += std::isfinite(got) ? (got - want) * (got - want) : INFINITY;
      dn += want * want;
    }
    num[static_cast<std::size_t>(ii)] = nm;
    den[static_cast<std::size_t>(ii)] = dn;
    kap[static_cast<std::size_t>(ii)] = kp;
  }
  REQUIRE(!oracle_failed);
  const double err = std::sqrt(std::accumulate(num.begin(), num.end(), 0.0) /
                               std::max(std::accumulate(den.begin(), den.end(), 0.0), 1e-300));
  const double kappa = std::max(1.0, *std::max_element(kap.begin(), kap.end()));
  const double tol =
      test::u<T>() + test::u<float>() * (kappa * std::sqrt(double(c.d_qk)) + std::sqrt(double(c.n_kv)) + 8);
  INFO("dtype " << to_string(dtype_of_v<T>) << ": rel_error " << err << ", kappa " << kappa << ", tolerance " << tol);
  CHECK(rb.unwritten == 0);
  CHECK(rb.padding_touched == 0);
  CHECK(err <= tol);
  return err / tol;
}

const char* describe_flags(const attn_case& c) { return c.causal ? "causal" : "bidirectional"; }

template <class T>
void attention_suite(bool small_only) {
  const std::uint64_t seed = cudatest::test_seed("attention_suite");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  const attn_case small[] = {
      {77, 131, 8, 2, 96, 48, true, 0, 3},       // GQA, n_q < n_kv (KV cache), d_qk != d_v, padded
      {33, 65, 6, 1, 192, 128, false, 0.05, 1},  // MQA, DeepSeek MLA head dims, explicit scale
      {50, 50, 3, 3, 5, 7, true, 0, 2},          // tiny dims
  };
  const attn_case more[] = {
      {100, 100, 4, 4, 64, 64, true, 0, 0},     // MHA, causal
      {100, 100, 4, 4, 64, 64, false, 0, 0},    // MHA, bidirectional
      {1, 40, 2, 2, 256, 256, true, 0, 0},      // one query (decode), largest dims
      {600, 1500, 4, 2, 128, 128, true, 0, 0},  // several key tiles per block, GQA
  };
  for (const attn_case& c : small) {
    INFO("n_q " << c.n_q << ", n_kv " << c.n_kv << ", h_q " << c.h_q << ", h_kv " << c.h_kv << ", d_qk " << c.d_qk
                << ", d_v " << c.d_v << ", " << describe_flags(c) << ", scale " << c.scale << ", pad " << c.pad);
    check_attention<T>(ctx, c, g);
  }
  if (small_only) return;
  for (const attn_case& c : more) {
    INFO("n_q " << c.n_q << ", n_kv " << c.n_kv << ", h_q " << c.h_q << ", h_kv " << c.h_kv << ", d_qk " << c.d_qk
                << ", d_v " << c.d_v << ", " << describe_flags(c) << ", scale " << c.scale << ", pad " << c.pad);
    check_attention<T>(ctx, c, g);
  }
}

/// 65536 queries and keys, GQA (4 query heads over 2 kv heads, d 128), causal and not; k, v and out
/// with row strides of 40000 elements, so offsets reach 65535 * 40000 = 2.6e9 > 2^31. 32 sampled query
/// rows of every head against the double oracle.
template <class T>
void attention_large() {
  const std::uint64_t seed = cudatest::test_seed("attention_large");
  INFO("seed " << seed);
  std::mt19937_64 g(seed);
  cuda_context ctx;
  for (bool causal : {true, false}) {
    attn_case c{65536, 65536, 4, 2, 128, 128, causal, 0, 40000, true};
    INFO("65536 tokens, " << describe_flags(c) << ", row stride 40000");
    const double ratio = check_attention<T>(ctx, c, g, sample_rows(g, c.n_q, 16));
    std::printf("attention %s 65536 tokens %s, ld 40000: rel_error / tolerance %.3g\n", to_string(dtype_of_v<T>),
                describe_flags(c), ratio);
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
    BASISATTN_CUBLAS_CHECK(
        cublasSgemm(ctx.cublas(), CUBLAS_OP_N, CUBLAS_OP_N, -1, 1, 1, &one, nullptr, 1, nullptr, 1, &one, nullptr, 1));
    FAIL("cublasSgemm with m = -1 did not fail");
  } catch (const basisattn::error& e) {
    CHECK(e.code() == errc::backend);
    CHECK(std::string(e.what()).find("cublasSgemm") != std::string::npos);
    CHECK(std::string(e.what()).find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
  }
}

TEST_CASE("CUDA projections reject bad shapes") {
  cuda_context ctx;
  std::mt19937_64 g(1);
  const auto dp = bd::upload(ctx, random_bd<float>(g, 16, 4, 2, true, false));
  const auto dd = bd::upload(ctx, random_dense<float>(g, 16, 8, false));
  device_buffer<float> x(10 * 17), y(10 * 9);
  const std::size_t ws = bd::workspace_bytes(ctx, dp, 10);
  device_buffer<unsigned char> w(static_cast<index_t>(ws));
  CHECK(code_of([&] {
          bd::project(ctx, dp, matrix_view<const float>(x.data(), 10, 17), matrix_view<float>(y.data(), 10, 8),
                      w.data(), ws);
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
          bd::project(ctx, dp, matrix_view<const float>(x.data(), 10, 16), matrix_view<float>(y.data(), 10, 8),
                      w.data(), ws - 1);
        }) == errc::invalid_argument);  // workspace too small
  CHECK(code_of([&] {
          bd::project(ctx, dp, matrix_view<const float>(x.data(), 10, 16, 8), matrix_view<float>(y.data(), 10, 8),
                      w.data(), ws);
        }) == errc::invalid_argument);  // row stride below the row length
  bd::bd_projection<float> bad = random_bd<float>(g, 16, 4, 2, true, false);
  bad.rest[0] = 0;  // channel 0 twice
  CHECK(code_of([&] { (void)bd::upload(ctx, bad); }) == errc::invalid_argument);
  bd::bd_projection<float> grouped = random_bd<float>(g, 16, 4, 4, false, false, 2);
  grouped.groups = 3;  // does not divide 4 heads
  CHECK(code_of([&] { (void)bd::upload(ctx, grouped); }) == errc::invalid_argument);
  grouped.groups = 4;  // divides, but the channel lists hold 2 groups
  CHECK(code_of([&] { (void)bd::upload(ctx, grouped); }) == errc::shape_mismatch);
  grouped.groups = 2;
  grouped.rest[12] = grouped.basis[4];  // group 1: a basis channel also in its rest
  CHECK(code_of([&] { (void)bd::upload(ctx, grouped); }) == errc::invalid_argument);
}

TEST_CASE("CUDA attention rejects bad arguments") {
  cuda_context ctx;
  device_buffer<float> a(4 * 2 * 300), b(4 * 2 * 300), c(4 * 2 * 300), o(4 * 2 * 300);
  auto t = [](float* p, index_t n, index_t h, index_t d) { return tensor3_view<float>(p, n, h, d); };
  auto ct = [](const float* p, index_t n, index_t h, index_t d) { return tensor3_view<const float>(p, n, h, d); };
  attention_options opt;
  CHECK(code_of([&] {
          attention<float>(ctx, ct(a.data(), 4, 2, 8), ct(b.data(), 4, 2, 9), ct(c.data(), 4, 2, 8),
                           t(o.data(), 4, 2, 8), opt);
        }) == errc::shape_mismatch);  // d_qk of q and k differ
  CHECK(code_of([&] {
          attention<float>(ctx, ct(a.data(), 4, 3, 8), ct(b.data(), 4, 2, 8), ct(c.data(), 4, 2, 8),
                           t(o.data(), 4, 3, 8), opt);
        }) == errc::shape_mismatch);  // 3 query heads over 2 kv heads
  CHECK(code_of([&] {
          attention<float>(ctx, ct(a.data(), 2, 2, 300), ct(b.data(), 2, 2, 300), ct(c.data(), 2, 2, 8),
                           t(o.data(), 2, 2, 8), opt);
        }) == errc::unsupported);  // d_qk above the kernel's 256
  opt.accumulate_double = true;
  CHECK(code_of([&] {
          attention<float>(ctx, ct(a.data(), 4, 2, 8), ct(b.data(), 4, 2, 8), ct(c.data(), 4, 2, 8),
                           t(o.data(), 4, 2, 8), opt);
        }) == errc::unsupported);
}

TEST_CASE("CUDA projections match the double oracle: fp32") { projection_suite<float>(false); }
TEST_CASE("CUDA projections match the double oracle: fp16") { projection_suite<Eigen::half>(false); }
TEST_CASE("CUDA projections match the double oracle: bf16") { projection_suite<Eigen::bfloat16>(false); }
TEST_CASE("CUDA projections, small cases for compute-sanitizer", "[sanitize]") { projection_suite<Eigen::half>(true); }
TEST_CASE("CUDA projections reduce split-K sums in fp32: fp16") { split_k_suite<Eigen::half>(); }
TEST_CASE("CUDA projections reduce split-K sums in fp32: bf16") { split_k_suite<Eigen::bfloat16>(); }
TEST_CASE("CUDA projections at 65536 tokens with 64-bit offsets: fp16", "[large]") { projection_large<Eigen::half>(); }
TEST_CASE("CUDA projections at 65536 tokens with 64-bit offsets: bf16", "[large]") {
  projection_large<Eigen::bfloat16>();
}

TEST_CASE("CUDA attention matches the double oracle: fp32") { attention_suite<float>(false); }
TEST_CASE("CUDA attention matches the double oracle: fp16") { attention_suite<Eigen::half>(false); }
TEST_CASE("CUDA attention matches the double oracle: bf16") { attention_suite<Eigen::bfloat16>(false); }
TEST_CASE("CUDA attention, small cases for compute-sanitizer", "[sanitize]") { attention_suite<Eigen::half>(true); }
TEST_CASE("CUDA attention at 65536 tokens with 64-bit offsets: fp16", "[large]") { attention_large<Eigen::half>(); }
TEST_CASE("CUDA attention at 65536 tokens with 64-bit offsets: bf16", "[large]") { attention_large<Eigen::bfloat16>(); }
