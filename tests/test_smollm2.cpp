// SmolLM2-135M-Instruct end to end (.cache/models/smollm2, GGUF Q4_1, Llama architecture: 30 layers,
// d 576, GQA 9/3, head dim 64, RoPE base 1e5, tied classifier): the byte-level BPE tokenizer built
// from the GGUF metadata (examples/models/bpe_tokenizer.hpp), the GGUF forward pass
// (llama_model::from_gguf), perplexity on the start of wikitext-2-raw's test split, and BD on V/O
// changing that perplexity only at rounding level in fp32 and fp16. Skipped, with a message, when
// the model or the text is absent.
//
// Independent references (throwaway scripts, not in the repository):
// - token ids: Hugging Face `tokenizers` (BPE from the same GGUF tokens and merges, pre-tokenizer
//   Digits(individual_digits) + ByteLevel(regex)) gives the very same 304,830 ids on the whole
//   wiki.test.raw and on 30 hand-picked strings (contractions, whitespace runs, CJK, emoji,
//   combining marks, non-ASCII digits); the expected ids below come from it.
// - logits: a numpy float64 forward (weights dequantized by the `gguf` package, written from the
//   model description, not from this code) on the first 24 wikitext tokens; the same logits come
//   out with the GGUF Q/K as stored + adjacent-pair RoPE and with the rows un-permuted to Hugging
//   Face order + rotate-half RoPE. The fp32 forward here agrees to 9.4e-5 (max |logit| 34.6).
#include "skip_main.hpp"

#include <basisattn/cpu/layers.hpp>
#include <basisattn/io/gguf.hpp>

#include "bpe_tokenizer.hpp"
#include "llama_model.hpp"
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

using namespace basisattn;
using models::bpe_tokenizer;

namespace {

const std::string smollm2_path = std::string(BASISATTN_MODEL_CACHE) + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const std::string wikitext_path = std::string(BASISATTN_SHARED_DIR) + "/data/wikitext-2-raw/wiki.test.raw";

const io::gguf_file& smollm2() {
  static const io::gguf_file f = io::read_gguf(smollm2_path);
  return f;
}
const bpe_tokenizer& tokenizer() {
  static const bpe_tokenizer t = bpe_tokenizer::from_gguf(smollm2());
  return t;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

/// The first n tokens of wiki.test.raw (bytes as stored: CRLF line ends, " = Title = " headings).
std::vector<std::int32_t> wikitext_tokens(std::size_t n) {
  std::vector<std::int32_t> ids = tokenizer().encode(read_text(wikitext_path).substr(0, 8 * n));
  REQUIRE(ids.size() >= n);
  ids.resize(n);
  return ids;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// FNV-1a over token ids (xor the id, multiply), as the throwaway reference computed it.
std::uint64_t fnv1a(const std::vector<std::int32_t>& ids) {
  std::uint64_t h = 1469598103934665603ull;
  for (const std::int32_t id : ids) h = (h ^ std::uint64_t(id)) * 1099511628211ull;
  return h;
}

/// Logits of window [s, s + len] (its first len tokens, positions from 0) and their NLL on tokens
/// s + 1 .. s + len.
template <class M>
matrix<float> window_logits(const M& m, const std::vector<std::int32_t>& ids, std::size_t s, std::size_t len,
                            double& nll) {
  const std::vector<std::int32_t> w(ids.begin() + std::ptrdiff_t(s), ids.begin() + std::ptrdiff_t(s + len + 1));
  matrix<float> lg = m.logits(std::vector<std::int32_t>(w.begin(), w.end() - 1));
  nll += models::nll_sum(lg, w);
  return lg;
}

/// NLL of every predicted token of window [s, s + len] (its first len tokens, positions from 0),
/// appended to `out`; returns the logits.
template <class M>
matrix<float> window_nll(const M& m, const std::vector<std::int32_t>& ids, std::size_t s, std::size_t len,
                         std::vector<double>& out) {
  const std::vector<std::int32_t> w(ids.begin() + std::ptrdiff_t(s), ids.begin() + std::ptrdiff_t(s + len + 1));
  matrix<float> lg = m.logits(std::vector<std::int32_t>(w.begin(), w.end() - 1));
  for (index_t t = 0; t < index_t(len); ++t) {  // as models::nll_sum, one token at a time
    double mx = -INFINITY, z = 0;
    for (index_t v = 0; v < lg.cols(); ++v) mx = std::max(mx, double(lg(t, v)));
    for (index_t v = 0; v < lg.cols(); ++v) z += std::exp(double(lg(t, v)) - mx);
    out.push_back(-(double(lg(t, w[std::size_t(t + 1)])) - mx - std::log(z)));
  }
  return lg;
}

/// Dense and BD per-token NLL over non-overlapping windows of len + 1 tokens, and
/// max |logit_BD - logit_dense|.
struct pair_result {
  std::vector<double> dense, bd;
  double max_dlogit = 0;
  static double mean(const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x;
    return s / double(v.size());
  }
  double dense_ppl() const { return std::exp(mean(dense)); }
  double bd_ppl() const { return std::exp(mean(bd)); }
  double change() const { return bd_ppl() / dense_ppl() - 1; }
};
template <class T>
pair_result compare_bd(const std::vector<std::int32_t>& ids, std::size_t len) {
  const auto dense = models::llama_model<T>::from_gguf(smollm2(), false);
  const auto bd = models::llama_model<T>::from_gguf(smollm2(), true);
  pair_result r;
  for (std::size_t s = 0; s + len + 1 <= ids.size(); s += len + 1) {
    const matrix<float> a = window_nll(dense, ids, s, len, r.dense), b = window_nll(bd, ids, s, len, r.bd);
    for (index_t i = 0; i < a.size(); ++i)
      r.max_dlogit = std::max(r.max_dlogit, double(std::abs(a.data()[i] - b.data()[i])));
  }
  return r;
}

/// A paired statistic: per-token differences x_t - y_t, their mean, RMS, and the standard error of
/// the mean estimated from the means of consecutive blocks of `block` tokens (neighbouring tokens
/// share context, so per-token differences are not independent; block means nearly are).
struct paired {
  double mean = 0, rms = 0, se = 0;
  std::size_t blocks = 0;
  std::vector<double> block_rms;  ///< RMS of the differences within each block
};
inline paired paired_difference(const std::vector<double>& x, const std::vector<double>& y, std::size_t block) {
  REQUIRE(x.size() == y.size());
  paired p;
  const std::size_t n = x.size();
  for (std::size_t t = 0; t < n; ++t)
    p.mean += (x[t] - y[t]) / double(n), p.rms += (x[t] - y[t]) * (x[t] - y[t]) / double(n);
  p.rms = std::sqrt(p.rms);
  p.blocks = n / block;
  double var = 0;
  for (std::size_t b = 0; b < p.blocks; ++b) {
    double m = 0, sq = 0;
    for (std::size_t t = b * block; t < (b + 1) * block; ++t)
      m += (x[t] - y[t]) / double(block), sq += (x[t] - y[t]) * (x[t] - y[t]);
    var += (m - p.mean) * (m - p.mean) / double(p.blocks - 1);
    p.block_rms.push_back(std::sqrt(sq / double(block)));
  }
  p.se = std::sqrt(var / double(p.blocks));
  return p;
}

}  // namespace

bool test_prerequisites(std::string& why) {
  if (std::ifstream(smollm2_path) && std::ifstream(wikitext_path)) return true;
  why = "SmolLM2 GGUF (" + smollm2_path + ", scripts/fetch-models.sh) or wikitext-2-raw (" + wikitext_path + ") absent";
  return false;
}

TEST_CASE("SmolLM2 tokenizer: GGUF metadata, hand-checked merges, ids of an independent BPE, round trips") {
  const bpe_tokenizer& tok = tokenizer();
  CHECK(tok.vocab_size() == 49152);
  CHECK(smollm2().get_string("tokenizer.ggml.pre") == "smollm");
  CHECK(tok.split() == bpe_tokenizer::pre_split::digits_then_gpt2);
  // Merge rank 0 is "Ġ t", rank 1 "Ġ a": " t" and " a" are one token each; "Ġthe" is in the vocabulary.
  CHECK(smollm2().get_strings("tokenizer.ggml.merges")[0] == "Ġ t");
  CHECK(tok.encode(" t") == std::vector<std::int32_t>{tok.id_of("Ġt")});
  CHECK(tok.encode(" a") == std::vector<std::int32_t>{tok.id_of("Ġa")});
  CHECK(tok.encode(" the") == std::vector<std::int32_t>{tok.id_of("Ġthe")});
  // Digits stand alone; the space before them is its own piece.
  CHECK(tok.pre_tokenize(" in 2000.") == std::vector<std::string>{" in", " ", "2", "0", "0", "0", "."});
  // '\s+(?!\S)' leaves the last white space before a non-space to the next piece ('\s+' then takes a lone '\n').
  CHECK(tok.pre_tokenize("a  b\n\nc  ") == std::vector<std::string>{"a", " ", " b", "\n", "\n", "c", "  "});
  CHECK(tok.pre_tokenize("I'm they'll x'S") == std::vector<std::string>{"I", "'m", " they", "'ll", " x", "'", "S"});
  // Ids from Hugging Face `tokenizers` with the same vocabulary, merges and pre-tokenizer.
  CHECK(tok.encode("Hello world") == std::vector<std::int32_t>{19556, 905});
  CHECK(tok.encode("naïve café résumé façade") ==
        std::vector<std::int32_t>{3546, 46494, 37366, 412, 2756, 5422, 2756, 40852});
  CHECK(tok.encode("numbers 2000 and 3.14159 and 1,000,000") ==
        std::vector<std::int32_t>{28707, 216, 34,  32,  32, 32, 284, 216, 35, 30, 33, 36, 33,
                                  37,    41,  284, 216, 33, 28, 32,  32,  32, 28, 32, 32, 32});
  CHECK(tok.encode("  leading   spaces\tand\ttabs  ") ==
        std::vector<std::int32_t>{216, 2899, 256, 5600, 197, 397, 197, 100, 7366, 256});
  CHECK(tok.encode("<|im_start|>user\nhi<|im_end|>") ==  // special tokens are plain text here
        std::vector<std::int32_t>{44, 108, 306, 79, 3738, 108, 46, 4093, 198, 6004, 44, 108, 306, 79, 486, 108, 46});
  // The whole test split: 304,830 ids, the same sequence (FNV-1a) as the independent BPE.
  const std::string all = read_text(wikitext_path);
  const std::vector<std::int32_t> ids = tok.encode(all);
  CHECK(ids.size() == 304830);
  CHECK(fnv1a(ids) == 0x416277b5a58221d1ull);
  CHECK(tok.decode(ids) == all);
  for (const std::string s :
       {"", " ", "Zürich – Genève — “quotes” …", "日本語のテキスト、句読点。", "emoji 😀👍🏽 ok",
        "e\u0301 combining, NBSP\u00a0and\u2009thin", "def f(a, b):\n    return a**b\n\n\n"})
    CHECK(tok.decode(tok.encode(s)) == s);
  // A byte without a one-byte token (SmolLM2 has none for 0x04) takes part in no merge and is dropped
  // ("ab" alone is one token); the independent BPE gives the same a, b.
  CHECK(tok.encode("ab") == std::vector<std::int32_t>{tok.id_of("ab")});
  CHECK(tok.encode("a\x04"
                   "b") == std::vector<std::int32_t>{tok.id_of("a"), tok.id_of("b")});
}

TEST_CASE("SmolLM2 tokenizer: malformed metadata raises errc::io or errc::unsupported") {
  const std::vector<std::uint32_t> map = models::detail::gpt2_byte_map();
  std::vector<std::string> bytes;
  for (std::uint32_t b = 0; b < 256; ++b) {
    std::string s;
    models::detail::append_utf8(s, map[b]);
    bytes.push_back(s);
  }
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> t = bytes;
    t.insert(t.end(), extra.begin(), extra.end());
    return t;
  };
  const auto split = bpe_tokenizer::pre_split::gpt2;
  auto code_of = [](auto&& make) {
    try {
      make();
    } catch (const basisattn::error& e) {
      return e.code();
    }
    return errc::backend;  // "no error"
  };
  // A working toy: "a b" then "ab c".
  const bpe_tokenizer toy(with({"ab", "abc"}), {"a b", "ab c"}, split);
  CHECK(toy.encode("abcab") == std::vector<std::int32_t>{257, 256});
  CHECK(code_of([&] { bpe_tokenizer(with({"ab"}), {"ab"}, split); }) == errc::io);    // no separating space
  CHECK(code_of([&] { bpe_tokenizer(with({"ab"}), {"a  b"}, split); }) == errc::io);  // two spaces
  CHECK(code_of([&] { bpe_tokenizer(with({}), {"a b"}, split); }) == errc::io);       // result not a token
  CHECK(code_of([&] { bpe_tokenizer(with({"ab", "ab"}), {}, split); }) == errc::io);  // duplicate token
  CHECK(code_of([&] { bpe_tokenizer(with({""}), {}, split); }) == errc::io);          // empty token
  std::vector<std::string> no_a = bytes;
  no_a['a'] = "zz";
  CHECK(code_of([&] { bpe_tokenizer(no_a, {}, split); }) == errc::io);  // printable byte missing
  io::gguf_file f;
  CHECK(code_of([&] { bpe_tokenizer::from_gguf(f); }) == errc::io);  // no tokenizer.ggml.model
  f.metadata["tokenizer.ggml.model"].type = io::gguf_value::kind::string;
  f.metadata["tokenizer.ggml.model"].s = "llama";
  CHECK(code_of([&] { bpe_tokenizer::from_gguf(f); }) == errc::unsupported);
  f.metadata["tokenizer.ggml.model"].s = "gpt2";
  f.metadata["tokenizer.ggml.pre"] = f.metadata["tokenizer.ggml.model"];
  f.metadata["tokenizer.ggml.pre"].s = "qwen2";
  CHECK(code_of([&] { bpe_tokenizer::from_gguf(f); }) == errc::unsupported);
  f.metadata["tokenizer.ggml.pre"].s = "smollm";
  CHECK(code_of([&] { bpe_tokenizer::from_gguf(f); }) == errc::io);  // no tokens array
}

TEST_CASE(
    "SmolLM2 forward: logits match an independent float64 reference, shuffled tokens and the other RoPE pairing are "
    "far worse") {
  const auto t0 = std::chrono::steady_clock::now();
  auto m = models::llama_model<float>::from_gguf(smollm2(), false);
  std::printf("SmolLM2 fp32 load + prepare: %.2f s\n", seconds_since(t0));
  CHECK(m.cfg.n_layers == 30);
  CHECK(m.cfg.dim == 576);
  CHECK(m.cfg.hidden_dim == 1536);
  CHECK(m.cfg.n_heads == 9);
  CHECK(m.cfg.n_kv_heads == 3);
  CHECK(m.cfg.vocab_size == 49152);
  CHECK(m.cfg.shared_classifier);
  CHECK(m.rope_theta == 100000.0);
  CHECK(m.rms_eps == Approx(1e-5).epsilon(1e-6));
  // The numpy float64 reference (see the top): argmax and logits at 5 positions of 24 tokens.
  const std::vector<std::int32_t> ids24 = wikitext_tokens(24);
  CHECK(ids24 == std::vector<std::int32_t>{446, 6356, 389,  9226, 352,  446,  216, 2738,  6356,  389,  9226, 352,
                                           314, 354,  2321, 4771, 3297, 8552, 284, 16984, 17523, 1673, 909,  761});
  const matrix<float> lg = m.logits(ids24);
  struct ref {
    index_t t, v;
    double logit;
    bool is_argmax;
  };
  const ref refs[] = {{0, 29, 25.16301712, true},    {0, 6356, 15.17240379, false}, {5, 216, 15.08686268, true},
                      {11, 365, 16.17286017, true},  {11, 314, 15.89937216, false}, {17, 3297, 24.45689707, true},
                      {17, 284, 24.04215377, false}, {23, 253, 17.86405899, true}};
  for (const ref& r : refs) {
    INFO("position " << r.t << ", token " << r.v);
    CHECK(lg(r.t, r.v) == Approx(r.logit).margin(1e-3));
    index_t arg = 0;
    for (index_t v = 1; v < lg.cols(); ++v)
      if (lg(r.t, v) > lg(r.t, arg)) arg = v;
    if (r.is_argmax) CHECK(arg == r.v);
  }
  // Controls on the first 256 tokens: shuffled tokens, and RoPE on the other pairing (i, i + 32).
  const std::size_t len = 255;
  const std::vector<std::int32_t> ids = wikitext_tokens(len + 1);
  double nll = 0;
  window_logits(m, ids, 0, len, nll);
  std::vector<std::int32_t> shuffled = ids;
  std::mt19937 g(7);
  for (std::size_t i = shuffled.size() - 1; i > 0; --i) std::swap(shuffled[i], shuffled[std::size_t(g() % (i + 1))]);
  double nll_s = 0;
  window_logits(m, shuffled, 0, len, nll_s);
  for (auto& a : m.attn) a.config.rope.style = rope_style::half;
  double nll_h = 0;
  window_logits(m, ids, 0, len, nll_h);
  const double ppl = std::exp(nll / double(len)), ppl_s = std::exp(nll_s / double(len)),
               ppl_h = std::exp(nll_h / double(len));
  std::printf(
      "SmolLM2 fp32, first %zu tokens: ppl %.4f; shuffled tokens %.2f; rotate-half RoPE pairing %.2f (%.1f s in all)\n",
      ids.size(), ppl, ppl_s, ppl_h, seconds_since(t0));
  CHECK(ppl_s > 5 * ppl);
  CHECK(ppl_h > 3 * ppl);
}

TEST_CASE(
    "SmolLM2 on wikitext-2: sane dense perplexity, and BD on V/O (shared pivot) changes it at rounding level in fp32 "
    "and fp16") {
  // The first 1,024 tokens of the test split, 2 windows of 512 (positions from 0), 1,022 predictions.
  const std::vector<std::int32_t> ids = wikitext_tokens(2 * 512);
  const auto t0 = std::chrono::steady_clock::now();
  const pair_result r32 = compare_bd<float>(ids, 511);
  const double s32 = seconds_since(t0);
  const pair_result r16 = compare_bd<Eigen::half>(ids, 511);
  const std::size_t n = r32.dense.size();
  // Paired per-token statistics (blocks of 73 tokens: 7 per window, 14 in all).
  const paired p32 = paired_difference(r32.bd, r32.dense, 73), p16 = paired_difference(r16.bd, r16.dense, 73),
               e16 = paired_difference(r16.dense, r32.dense, 73);
  std::printf("SmolLM2 fp32, %zu predicted tokens: dense ppl %.6f, BD %.6f (%+.6f%%), max |dlogit| %.3g (%.1f s)\n", n,
              r32.dense_ppl(), r32.bd_ppl(), 100 * r32.change(), r32.max_dlogit, s32);
  std::printf(
      "SmolLM2 fp16, %zu predicted tokens: dense ppl %.6f (%+.4f%% vs fp32), BD %.6f (%+.6f%%), max |dlogit| %.3g "
      "(%.1f s)\n",
      n, r16.dense_ppl(), 100 * (r16.dense_ppl() / r32.dense_ppl() - 1), r16.bd_ppl(), 100 * r16.change(),
      r16.max_dlogit, seconds_since(t0) - s32);
  std::printf(
      "per-token NLL differences (mean +- standard error over %zu blocks, RMS):\n"
      "  BD - dense, fp32:          %+.3e +- %.3e, RMS %.3e\n"
      "  BD - dense, fp16:          %+.3e +- %.3e, RMS %.3e (mean / SE %+.2f)\n"
      "  dense fp16 - dense fp32:   %+.3e +- %.3e, RMS %.3e (BD fp16 RMS / this RMS: %.3f)\n",
      p16.blocks, p32.mean, p32.se, p32.rms, p16.mean, p16.se, p16.rms, p16.mean / p16.se, e16.mean, e16.se, e16.rms,
      p16.rms / e16.rms);
  double lo = INFINITY, hi = 0;
  for (std::size_t b = 0; b < p16.blocks; ++b)
    lo = std::min(lo, p16.block_rms[b] / e16.block_rms[b]), hi = std::max(hi, p16.block_rms[b] / e16.block_rms[b]);
  std::printf("  BD fp16 RMS / dense fp16 RMS per block: %.3f to %.3f\n", lo, hi);
  CHECK(r32.dense_ppl() > 5);
  CHECK(r32.dense_ppl() < 60);
  // fp32: BD is an exact reparametrisation. The paper's FP32 figure, +0.0004%, as the bound
  // (measured +0.00001% and -0.00001%, mean +-1e-7 +- 2e-7 nats per token: 40x below); the noise
  // of the paired mean must be far below it for the check to mean anything (4 SE: 1.1e-6).
  CHECK(std::abs(r32.change()) <= 4e-6);
  CHECK(4 * p32.se <= 4e-6);
  // fp16: on 1,022 tokens the change itself is mostly noise (SE ~2e-4 of the mean NLL, as large as
  // the paper's 0.02%), so a fixed bound on it holds or fails by the machine's rounding. Asserted
  // instead, on the paired per-token differences:
  // (a) the change within the paper's FP16 figure, +0.02%, plus 4 standard errors of sampling noise
  //     (14 block means). Not |mean| <= 4 SE alone: part of the mean is common to all blocks and
  //     moves with the machine's arithmetic, which the SE does not see (tests/test_real_weights.cpp
  //     measured such moves of up to 2 SE between builds); test_real_weights, on 98K and 4K tokens,
  //     asserts the stricter |mean| + 4 SE <= 2e-4, which 1,022 tokens cannot resolve. Measured
  //     mean / SE -0.42 (AVX-512) and -0.04 (SSE2): the change, -0.0082% and -0.0007%, is noise;
  CHECK(std::abs(p16.mean) <= 2e-4 + 4 * p16.se);
  // (b) its size stays at the rounding level: the RMS of BD's per-token perturbation (V/O rounded
  //     as C and B' instead of W_V, W_O) against that of storing the whole dense model in fp16.
  //     Measured ratio 1.33 (Zen 4, -march=native with AVX-512) and 1.29 (same machine, baseline
  //     x86-64: SSE2, no FMA); per 73-token block it ranges 1.07 to 1.65. It exceeds 1 because
  //     this Q4_1 model's dequantized weights are nearly fp16 numbers already (fp16 storage costs
  //     them little), while BD's C and B' are new reals rounded to fp16. Bound 2: 1.5x the measured ratio, above every block's, and close to the
  //     error model of tests/test_real_weights.cpp (sqrt(1 + g^2) = 2.09 with this model's worst
  //     fp16 product-error ratio g = 1.84, docs/fidelity); a wrong coefficient or basis moves the
  //     RMS by orders of magnitude (fp32: 6.7e-6).
  CHECK(p16.rms <= 2 * e16.rms);
}
