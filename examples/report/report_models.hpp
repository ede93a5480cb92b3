// The real models basisattn-report measures: where they are, their dense attention weights (for the
// reconstruction-error table), and their end-to-end fidelity runs (dense vs BD forward passes).
#pragma once

#include <basisattn/basisattn.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/convert.hpp>

#include "bert_model.hpp"
#include "bpe_tokenizer.hpp"
#include "gpt2_model.hpp"
#include "llama_model.hpp"
#include "wordpiece_tokenizer.hpp"

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace report {

using basisattn::index_t;
using basisattn::matrix;
namespace bd = basisattn::bd;
namespace io = basisattn::io;

inline const std::string shared_dir = BASISATTN_SHARED_DIR;
inline const std::string model_cache = BASISATTN_MODEL_CACHE;

inline bool exists(const std::string& p) { return std::ifstream(p).good(); }

/// Dense attention weights of one layer, PyTorch (out, in) layout; empty biases when absent.
struct dense_layer {
  matrix<float> wq, wk, wv, wo;
  std::vector<float> bq, bk, bv, bo;
  bd::mha_weights<float> weights() const {
    auto p = [](const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
    return {wq.view().t(), wk.view().t(), wv.view().t(), wo.view().t(), p(bq), p(bk), p(bv), p(bo)};
  }
};

struct model_weights {
  bd::mha_config config;
  std::vector<dense_layer> layers;
  bool qk_eligible() const { return !config.use_rope; }
};

inline std::vector<std::string> model_names() { return {"stories260K", "slm4096", "smollm2", "minilm"}; }

inline std::string model_path(const std::string& name) {
  if (name == "stories260K") return shared_dir + "/models/stories260K/stories260K.bin";
  if (name == "slm4096") return shared_dir + "/models/slm4096/slm4096.f32.bin";
  if (name == "smollm2") return model_cache + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
  return model_cache + "/minilm/model.safetensors";
}

/// slm4096's flat file (layout in its SOURCE.txt): the attention weights of each layer.
inline model_weights load_slm4096(const std::string& path) {
  const std::vector<unsigned char> bytes = io::read_file(path);
  io::byte_reader r(bytes.data(), bytes.size(), path);
  BASISATTN_REQUIRE(std::memcmp(r.take(4, "magic"), "GPT2", 4) == 0, io, path, ": not a GPT2 flat file");
  std::int32_t h[7];
  for (auto& x : h) x = r.i32("header");
  const index_t vocab = h[1], block = h[2], L = h[3], H = h[4], E = h[5], ff = h[6];
  BASISATTN_REQUIRE(h[0] == 1 && vocab > 0 && block > 0 && L > 0 && H > 0 && E > 0 && ff > 0 && E % H == 0, io, path,
                    ": bad header");
  auto mat = [&](index_t rows, index_t cols) {
    matrix<float> m(rows, cols);
    std::memcpy(m.data(), r.take(std::uint64_t(rows * cols) * 4, "tensor"), std::size_t(rows * cols) * 4);
    return m;
  };
  auto vec = [&](index_t n) {
    const matrix<float> m = mat(1, n);
    return std::vector<float>(m.data(), m.data() + n);
  };
  model_weights m;
  m.config = bd::mha_config{E, H, H, E / H};
  mat(vocab, E), mat(block, E);
  for (index_t l = 0; l < L; ++l) {
    vec(2 * E);  // ln_1
    const matrix<float> qkv = mat(3 * E, E);
    const std::vector<float> b = vec(3 * E);
    dense_layer d;
    d.wq = matrix<float>(E, E), d.wk = matrix<float>(E, E), d.wv = matrix<float>(E, E);
    for (index_t i = 0; i < E; ++i)
      for (index_t j = 0; j < E; ++j)
        d.wq(i, j) = qkv(i, j), d.wk(i, j) = qkv(E + i, j), d.wv(i, j) = qkv(2 * E + i, j);
    d.bq.assign(b.begin(), b.begin() + E), d.bk.assign(b.begin() + E, b.begin() + 2 * E),
        d.bv.assign(b.begin() + 2 * E, b.end());
    d.wo = mat(E, E);
    d.bo = vec(E);
    vec(2 * E), mat(ff, E), vec(ff), mat(E, ff), vec(E);  // ln_2, mlp
    m.layers.push_back(std::move(d));
  }
  return m;
}

/// The dense attention weights of a model, or nothing (with the reason) when its files are absent.
inline std::optional<model_weights> load_model(const std::string& name, std::string& why) {
  const std::string path = model_path(name);
  if (!exists(path)) {
    why = path + " not found" + (name == "smollm2" || name == "minilm" ? " (run scripts/fetch-models.sh)" : "");
    return std::nullopt;
  }
  if (name == "slm4096") return load_slm4096(path);
  const io::checkpoint c = io::open_checkpoint(path);
  model_weights m;
  m.config = c.attention;
  for (const auto& n : c.layers) {
    dense_layer d;
    d.wq = c.values(n.wq), d.wk = c.values(n.wk), d.wv = c.values(n.wv), d.wo = c.values(n.wo);
    auto bias = [&](const std::string& s) {
      return s.empty() ? std::vector<float>{} : io::to_float(c.get(s), c.bytes);
    };
    d.bq = bias(n.bq), d.bk = bias(n.bk), d.bv = bias(n.bv), d.bo = bias(n.bo);
    m.layers.push_back(std::move(d));
  }
  return m;
}

// ------------------------------------------------------------------------------------------------
// end to end

/// Negative log-likelihood and max |delta logit| of a BD model against its dense twin over sequences.
struct e2e_acc {
  double nll_dense = 0, nll_bd = 0, max_dlogit = 0;
  std::int64_t tokens = 0;
  void add(const matrix<float>& ld, const matrix<float>& lb, const std::vector<std::int32_t>& ids) {
    nll_dense += models::nll_sum(ld, ids);
    nll_bd += models::nll_sum(lb, ids);
    tokens += static_cast<std::int64_t>(ids.size()) - 1;
    for (index_t i = 0; i < ld.size(); ++i)
      max_dlogit = std::max(max_dlogit, double(std::abs(ld.data()[i] - lb.data()[i])));
  }
  double ppl_dense() const { return std::exp(nll_dense / double(tokens)); }
  double ppl_bd() const { return std::exp(nll_bd / double(tokens)); }
  double change() const { return ppl_bd() / ppl_dense() - 1; }
};

struct e2e_row {
  std::string model, dtype, metric, data;
  double dense = 0, bd = 0, change = 0, max_dlogit = 0;  ///< change: ppl_BD / ppl_dense - 1
  std::int64_t tokens = 0;
};

/// The non-blank lines of a text file, trimmed (stories260K's SOURCE.txt protocol).
inline std::vector<std::string> lines_of(const std::string& path) {
  std::ifstream f(path);
  std::vector<std::string> out;
  for (std::string s; std::getline(f, s);) {
    const auto b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
    if (b != std::string::npos) out.push_back(s.substr(b, e - b + 1));
  }
  return out;
}

template <class T>
e2e_row stories_e2e(const io::llama2c_checkpoint& ck, const io::llama2c_tokenizer& tok,
                    const std::vector<std::string>& lines) {
  const auto d = models::llama_model<T>::from_llama2c(ck, false), b = models::llama_model<T>::from_llama2c(ck, true);
  e2e_acc a;
  for (const auto& line : lines) {
    const auto ids = tok.encode(line, true, false);  // SOURCE.txt: code points split into bytes
    if (ids.size() < 2) continue;
    const std::vector<std::int32_t> in(ids.begin(), ids.end() - 1);
    a.add(d.logits(in), b.logits(in), ids);
  }
  return {"stories260K", basisattn::to_string(basisattn::dtype_of_v<T>),
          "perplexity",  "TinyStories sample, " + std::to_string(lines.size()) + " lines",
          a.ppl_dense(), a.ppl_bd(),
          a.change(),    a.max_dlogit,
          a.tokens};
}

template <class T>
e2e_row slm_e2e(const std::string& path, const std::vector<std::int32_t>& ids) {
  const auto d = models::gpt2_model<T>::from_flat_file(path, false),
             b = models::gpt2_model<T>::from_flat_file(path, true);
  e2e_acc a;
  for (std::size_t s = 0; s + 1 < ids.size(); s += 128) {
    const std::vector<std::int32_t> w(ids.begin() + std::ptrdiff_t(s),
                                      ids.begin() + std::ptrdiff_t(std::min(s + 129, ids.size())));
    const std::vector<std::int32_t> in(w.begin(), w.end() - 1);
    a.add(d.logits(in), b.logits(in), w);
  }
  return {"slm4096",     basisattn::to_string(basisattn::dtype_of_v<T>),
          "perplexity",  "corpus.txt, windows of 128",
          a.ppl_dense(), a.ppl_bd(),
          a.change(),    a.max_dlogit,
          a.tokens};
}

/// SmolLM2 on WikiText-2 (raw test split): `windows` windows of `len` + 1 tokens from its start.
template <class T>
e2e_row smollm2_e2e(const io::gguf_file& f, const std::vector<std::int32_t>& ids, std::size_t len) {
  const auto d = models::llama_model<T>::from_gguf(f, false), b = models::llama_model<T>::from_gguf(f, true);
  e2e_acc a;
  for (std::size_t s = 0; s + len + 1 <= ids.size(); s += len + 1) {
    const std::vector<std::int32_t> w(ids.begin() + std::ptrdiff_t(s), ids.begin() + std::ptrdiff_t(s + len + 1));
    const std::vector<std::int32_t> in(w.begin(), w.end() - 1);
    a.add(d.logits(in), b.logits(in), w);
  }
  return {"SmolLM2-135M", basisattn::to_string(basisattn::dtype_of_v<T>),
          "perplexity",   "WikiText-2 raw test, windows of " + std::to_string(len),
          a.ppl_dense(),  a.ppl_bd(),
          a.change(),     a.max_dlogit,
          a.tokens};
}

inline double cosine(const std::vector<float>& x, const std::vector<float>& y) {
  double xy = 0, xx = 0, yy = 0;
  for (std::size_t i = 0; i < x.size(); ++i)
    xy += double(x[i]) * y[i], xx += double(x[i]) * x[i], yy += double(y[i]) * y[i];
  return xy / std::sqrt(xx * yy);
}

/// MiniLM sentence embeddings: mean 1 - cos against the fp32 dense model, dense and BD in T; the
/// "change" is the mean 1 - cos between BD and dense in T, max_dlogit the max |delta| of the
/// embedding components between them.
template <class T>
e2e_row minilm_e2e(const io::safetensors_file& f, const models::bert_config& cfg,
                   const std::vector<std::vector<std::int32_t>>& sents, const std::vector<std::vector<float>>& ref) {
  const auto d = models::bert_model<T>::from_safetensors(f, cfg, false),
             b = models::bert_model<T>::from_safetensors(f, cfg, true);
  e2e_row r{"all-MiniLM-L6-v2",
            basisattn::to_string(basisattn::dtype_of_v<T>),
            "1 - cos(embedding, fp32 dense)",
            std::to_string(sents.size()) + " WikiText-2 sentences",
            0,
            0,
            0,
            0,
            0};
  for (std::size_t i = 0; i < sents.size(); ++i) {
    const auto ed = d.embed(sents[i]), eb = b.embed(sents[i]);
    r.dense += (1 - cosine(ed, ref[i])) / double(sents.size());
    r.bd += (1 - cosine(eb, ref[i])) / double(sents.size());
    r.change += (1 - cosine(eb, ed)) / double(sents.size());
    for (std::size_t k = 0; k < ed.size(); ++k) r.max_dlogit = std::max(r.max_dlogit, double(std::abs(ed[k] - eb[k])));
    r.tokens += static_cast<std::int64_t>(sents[i].size());
  }
  return r;
}

/// Lines of WikiText-2 raw test that are prose (not headings), cut to `max_chars`.
inline std::vector<std::string> wikitext_sentences(std::size_t count, std::size_t max_chars) {
  std::vector<std::string> out;
  for (const auto& l : lines_of(shared_dir + "/data/wikitext-2-raw/wiki.test.raw")) {
    if (l.size() < 40 || l.find(" = ") != std::string::npos) continue;
    out.push_back(l.substr(0, max_chars));
    if (out.size() == count) break;
  }
  return out;
}

template <class F>
void for_types(F&& f) {
  f(float{});
  f(Eigen::half{});
  f(Eigen::bfloat16{});
}

/// Dense vs BD runs of every model present; appends a Markdown table to `md` and writes e2e.csv.
inline void end_to_end(const std::string& out, std::ostream& md, const std::string& only) {
  auto wanted = [&](const std::string& n) {
    return only.empty() || ("," + only + ",").find("," + n + ",") != std::string::npos;
  };
  std::vector<e2e_row> rows;
  auto note = [&](const e2e_row& r) {
    std::printf("e2e %-16s %-5s %s: dense %.6g, BD %.6g, change %.3g, max |delta| %.3g (%lld tokens)\n",
                r.model.c_str(), r.dtype.c_str(), r.metric.c_str(), r.dense, r.bd, r.change, r.max_dlogit,
                (long long)r.tokens);
    std::fflush(stdout);
    rows.push_back(r);
  };
  if (wanted("stories260K") && exists(model_path("stories260K"))) {
    const auto ck = io::read_llama2c(model_path("stories260K"));
    const auto tok = io::read_llama2c_tokenizer(shared_dir + "/models/stories260K/tok512.bin", ck.config.vocab_size);
    const auto lines = lines_of(shared_dir + "/data/tinystories/tinystories_train_head.txt");
    for_types([&](auto t) { note(stories_e2e<decltype(t)>(ck, tok, lines)); });
  }
  if (wanted("slm4096") && exists(model_path("slm4096"))) {
    const std::string vocab = "\n ,-.026:?ABCDEFGHILMOPQRSTWabcdefghijklmnopqrstuvwxyz";
    std::vector<std::int32_t> ids;
    for (const auto& line : io::read_file(shared_dir + "/models/slm4096/corpus.txt")) {
      const auto id = vocab.find(char(line));
      BASISATTN_REQUIRE(id != std::string::npos, io, "slm4096 corpus: character outside the vocabulary");
      ids.push_back(std::int32_t(id));
    }
    for_types([&](auto t) { note(slm_e2e<decltype(t)>(model_path("slm4096"), ids)); });
  }
  const std::string wiki = shared_dir + "/data/wikitext-2-raw/wiki.test.raw";
  if (wanted("smollm2") && exists(model_path("smollm2")) && exists(wiki)) {
    const io::gguf_file f = io::read_gguf(model_path("smollm2"));
    const auto tok = models::bpe_tokenizer::from_gguf(f);
    std::ifstream in(wiki);
    std::string text((std::istreambuf_iterator<char>(in)), {});
    const std::size_t len = 512, windows = 16;  // 8,192 predicted tokens
    std::vector<std::int32_t> ids = tok.encode(text.substr(0, 8 * windows * (len + 1)));
    BASISATTN_REQUIRE(ids.size() >= windows * (len + 1), io, "wikitext: too few tokens");
    ids.resize(windows * (len + 1));
    for_types([&](auto t) { note(smollm2_e2e<decltype(t)>(f, ids, len)); });
  }
  if (wanted("minilm") && exists(model_path("minilm")) && exists(wiki)) {
    const io::safetensors_file f = io::read_safetensors(model_path("minilm"));
    const auto cfg = models::bert_config::from_json_file(model_cache + "/minilm/config.json");
    const auto tok = models::wordpiece_tokenizer::from_json_file(model_cache + "/minilm/tokenizer.json");
    std::vector<std::vector<std::int32_t>> sents;
    for (const auto& s : wikitext_sentences(64, 600)) sents.push_back(tok.encode(s));
    const auto ref_model = models::bert_model<float>::from_safetensors(f, cfg, false);
    std::vector<std::vector<float>> ref;
    for (const auto& s : sents) ref.push_back(ref_model.embed(s));
    for_types([&](auto t) { note(minilm_e2e<decltype(t)>(f, cfg, sents, ref)); });
  }
  md << "\n## End to end: dense vs BD\n\nPerplexity rows: change = ppl(BD) / ppl(dense) - 1 in the same weight type; "
        "the last two "
        "columns compare each with the fp32 dense model, i.e. how far storing the model in that type moves it with and "
        "without "
        "BD. MiniLM rows: mean 1 - cos of the sentence embeddings against the fp32 dense model.\n\n"
        "| model | weights | metric | data | tokens | dense | BD | change | max abs delta logit | dense vs fp32 | BD "
        "vs fp32 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n";
  std::ofstream csv(out + "/e2e.csv");
  csv << "model,dtype,metric,data,tokens,dense,bd,change,max_abs_delta_logit\n";
  for (const auto& r : rows) {
    char b[512];
    const bool ppl = r.metric == "perplexity";
    char change[64];
    if (ppl)
      std::snprintf(change, sizeof change, "%+.5f%%", 100 * r.change);
    else
      std::snprintf(change, sizeof change, "1 - cos(BD, dense) %.2e", r.change);
    double ref = 0;  // the fp32 dense perplexity of the same model
    for (const auto& x : rows)
      if (x.model == r.model && x.dtype == "f32") ref = x.dense;
    char vs32[96] = "| | |";
    if (ppl && ref > 0)
      std::snprintf(vs32, sizeof vs32, "| %+.5f%% | %+.5f%% |", 100 * (r.dense / ref - 1), 100 * (r.bd / ref - 1));
    std::snprintf(b, sizeof b,
                  ppl ? "| %s | %s | %s | %s | %lld | %.6f | %.6f | %s | %.3g %s\n"
                      : "| %s | %s | %s | %s | %lld | %.2e | %.2e | %s | %.3g %s\n",
                  r.model.c_str(), r.dtype.c_str(), r.metric.c_str(), r.data.c_str(), (long long)r.tokens, r.dense,
                  r.bd, change, r.max_dlogit, vs32);
    md << b;
    csv << r.model << "," << r.dtype << "," << r.metric << ",\"" << r.data << "\"," << r.tokens << "," << r.dense << ","
        << r.bd << "," << r.change << "," << r.max_dlogit << "\n";
  }
}

}  // namespace report
