// The BD converter (io/convert.hpp): synthetic Hugging Face checkpoints (Llama-style GQA with RoPE
// and Q/K/V biases, and BERT-style MHA) written to a temporary folder, converted, written, read
// back and loaded. Checks: the loaded layers are bit-identical to prepare_mha on the same weights;
// their forward pass matches a double-precision reference of the dense layer; the recorded product
// errors agree with an independent computation (tests/common/bd_test_util.hpp); every tensor
// that BD does not touch survives the round trip; and lying or inconsistent files raise errc::io.
#include <basisattn/basisattn.hpp>
#include <basisattn/io/convert.hpp>
#include "instances.hpp"  // extern templates: compiled once in basisattn_test_instances

#include <catch2/catch.hpp>

#include "bd_test_util.hpp"
#include "expect_error.hpp"
#include "reference_layers.hpp"
#include "test_util.hpp"

#include <cstdio>
#include <filesystem>
#include <array>
#include <fstream>
#include <string>

using namespace basisattn;
using test::index_t;
namespace fs = std::filesystem;

namespace {

struct synthetic {
  std::string dir, model;
  bd::mha_config cfg;
  index_t layers = 2;
  bool bert = false;
  std::vector<matrix<float>> wq, wk, wv, wo;       // PyTorch (out, in)
  std::vector<std::vector<float>> bq, bk, bv, bo;  // empty when absent
  std::vector<float> extra;                        // a non-attention tensor
};

std::string attn_prefix(const synthetic& s, index_t l) {
  return s.bert ? "encoder.layer." + std::to_string(l) + ".attention."
                : "model.layers." + std::to_string(l) + ".self_attn.";
}
std::array<std::string, 4> weight_names(const synthetic& s, index_t l) {
  const std::string p = attn_prefix(s, l);
  if (s.bert) return {p + "self.query", p + "self.key", p + "self.value", p + "output.dense"};
  return {p + "q_proj", p + "k_proj", p + "v_proj", p + "o_proj"};
}

/// Random weights with the given shape, written as model.safetensors + config.json in a fresh folder.
synthetic make_checkpoint(const std::string& tag, bool bert, index_t dm, index_t H, index_t Hkv, index_t d,
                          bool biases) {
  synthetic s;
  s.bert = bert;
  s.cfg = bd::mha_config{dm, H, Hkv, d};
  s.cfg.use_rope = !bert;
  s.cfg.causal = !bert;
  s.dir = (fs::temp_directory_path() / ("basisattn_convert_" + tag)).string();
  fs::create_directories(s.dir);
  s.model = s.dir + "/model.safetensors";
  std::vector<io::safetensors_tensor> ts;
  test::seed(42);
  for (index_t l = 0; l < s.layers; ++l) {
    s.wq.push_back(test::random_matrix<float>(H * d, dm, 0.2));
    s.wk.push_back(test::random_matrix<float>(Hkv * d, dm, 0.2));
    s.wv.push_back(test::random_matrix<float>(Hkv * d, dm, 0.2));
    s.wo.push_back(test::random_matrix<float>(dm, H * d, 0.2));
    s.bq.push_back(biases ? test::random_vector<float>(H * d, 0.1) : std::vector<float>{});
    s.bk.push_back(biases ? test::random_vector<float>(Hkv * d, 0.1) : std::vector<float>{});
    s.bv.push_back(biases ? test::random_vector<float>(Hkv * d, 0.1) : std::vector<float>{});
    s.bo.push_back(bert ? test::random_vector<float>(dm, 0.1) : std::vector<float>{});
    const auto n = weight_names(s, l);
    const matrix<float>* w[4] = {&s.wq.back(), &s.wk.back(), &s.wv.back(), &s.wo.back()};
    const std::vector<float>* b[4] = {&s.bq.back(), &s.bk.back(), &s.bv.back(), &s.bo.back()};
    for (int i = 0; i < 4; ++i) {
      ts.push_back(io::make_tensor(n[i] + ".weight", w[i]->view(), io::tensor_type::f32));
      if (!b[i]->empty()) {
        auto t = io::make_tensor(n[i] + ".bias", matrix_view<const float>(b[i]->data(), 1, index_t(b[i]->size())),
                                 io::tensor_type::f32);
        t.shape = {b[i]->size()};
        ts.push_back(std::move(t));
      }
    }
  }
  s.extra = test::random_vector<float>(dm, 1.0);
  auto e = io::make_tensor("norm.weight", matrix_view<const float>(s.extra.data(), 1, dm), io::tensor_type::f32);
  e.shape = {std::uint64_t(dm)};
  ts.push_back(std::move(e));
  io::write_safetensors(s.model, ts);
  std::ofstream(s.dir + "/config.json") << "{\"hidden_size\": " << dm << ", \"num_attention_heads\": " << H
                                        << ", \"num_key_value_heads\": " << Hkv
                                        << ", \"num_hidden_layers\": " << s.layers << ", \"head_dim\": " << d << "}";
  return s;
}

template <class T>
bd::mha_weights<float> weights_of(const synthetic& s, index_t l) {
  auto p = [](const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
  return bd::mha_weights<float>{s.wq[l].view().t(), s.wk[l].view().t(), s.wv[l].view().t(), s.wo[l].view().t(),
                                p(s.bq[l]),         p(s.bk[l]),         p(s.bv[l]),         p(s.bo[l])};
}

template <class T>
bool same(const matrix<T>& a, const matrix<T>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (index_t i = 0; i < a.size(); ++i)
    if (!(detail::to_compute<float>(a.data()[i]) == detail::to_compute<float>(b.data()[i]))) return false;
  return true;
}
template <class T>
bool same(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(detail::to_compute<float>(a[i]) == detail::to_compute<float>(b[i]))) return false;
  return true;
}
template <class T>
bool same(const bd::any_projection<T>& a, const bd::any_projection<T>& b) {
  if (a.index() != b.index()) return false;
  if (const auto* x = std::get_if<bd::dense_projection<T>>(&a)) {
    const auto& y = std::get<bd::dense_projection<T>>(b);
    return same(x->weight, y.weight) && same(x->bias, y.bias);
  }
  const auto& x = std::get<bd::bd_projection<T>>(a);
  const auto& y = std::get<bd::bd_projection<T>>(b);
  return x.groups == y.groups && x.basis == y.basis && x.rest == y.rest && same(x.coeff, y.coeff) &&
         same(x.bias, y.bias);
}

/// Convert, write, read back, and compare every layer with prepare_mha on the same weights.
template <class T>
void round_trip(const synthetic& s, io::tensor_type type, bd::basis_grouping grouping = bd::basis_grouping::automatic) {
  const io::checkpoint c = io::open_checkpoint(s.model);
  CHECK(c.architecture == (s.bert ? "bert" : "llama"));
  CHECK(c.attention.use_rope == !s.bert);
  io::convert_options o;
  o.type = type;
  o.grouping = grouping;
  index_t calls = 0;
  o.progress = [&](index_t done, index_t total) {
    CHECK(done == ++calls);
    CHECK(total == s.layers);
  };
  const io::conversion cv = io::convert_to_bd(c, o);
  CHECK(calls == s.layers);
  const std::string out = s.dir + "/bd_" + io::to_string(type) + ".safetensors";
  io::write_conversion(out, cv);
  const io::safetensors_file f = io::read_safetensors(out);
  bool grouped = false;  // some side has a basis per kv head: the format says bd/2
  for (const auto& r : cv.layers) grouped = grouped || r.qk.groups > 1 || r.vo.groups > 1;
  CHECK(f.metadata.at("basisattn.format") == (grouped ? "bd/2" : "bd/1"));
  if (grouping == bd::basis_grouping::per_kv_head) CHECK(grouped == (s.cfg.n_kv_heads > 1));
  if (grouping == bd::basis_grouping::shared) CHECK(!grouped);
  // Untouched tensors survive (rounded once to the output type).
  const std::vector<float> extra = io::to_float(f.get("norm.weight"), f.bytes);
  for (std::size_t i = 0; i < extra.size(); ++i)
    CHECK(extra[i] == detail::to_compute<float>(detail::from_compute<T>(s.extra[i])));
  CHECK(cv.attention_output < cv.attention_dense);
  for (index_t l = 0; l < s.layers; ++l) {
    INFO("layer " << l << ", " << io::to_string(type));
    bd::mha_config settings = s.cfg;
    const bd::mha_layer<T> loaded = io::load_bd_layer<T>(f, l, settings);
    bd::mha_options mo;
    mo.bd_qk = s.bert;  // RoPE keeps Q/K dense
    mo.grouping = grouping;
    const auto w = weights_of<T>(s, l);
    const bd::mha_layer<T> direct = bd::prepare_mha<T>(w, s.cfg, mo);
    CHECK(same(loaded.q.weight, direct.q.weight));
    CHECK(same(loaded.q.bias, direct.q.bias));
    CHECK(same(loaded.o.weight, direct.o.weight));
    CHECK(same(loaded.o.bias, direct.o.bias));
    CHECK(same(loaded.k, direct.k));
    CHECK(same(loaded.v, direct.v));
    CHECK(bd::is_bd(loaded.v));
    CHECK(bd::is_bd(loaded.k) == s.bert);
    // The recorded errors: V/O against an independent computation of the same rounding (no V bias
    // enters the product).
    const auto& rep = cv.layers[std::size_t(l)];
    const bd::product_errors e = bd::measure_product_errors(w, loaded);
    CHECK(rep.vo.error == Approx(e.vo).epsilon(1e-12));
    CHECK(rep.qk.error == Approx(e.qk).epsilon(1e-12));
    {
      const index_t dm = s.cfg.d_model, d = s.cfg.head_dim, grp = s.cfg.n_heads / s.cfg.n_kv_heads;
      std::vector<matrix_view<const float>> a, b;
      std::vector<matrix<float>> bs;
      for (index_t g = 0; g < s.cfg.n_kv_heads; ++g) {
        a.push_back(w.wv.block(0, g * d, dm, d));
        matrix<float> bg(d, grp * dm);  // the rows of W_O of the group's heads, side by side
        for (index_t k = 0; k < grp; ++k)
          for (index_t i = 0; i < d; ++i)
            for (index_t j = 0; j < dm; ++j) bg(i, k * dm + j) = w.wo((g * grp + k) * d + i, j);
        bs.push_back(std::move(bg));
      }
      for (const auto& m : bs) b.push_back(m.view());
      bd::prepare_options po;
      const index_t groups = std::get<bd::bd_projection<T>>(loaded.v).groups;
      CHECK(rep.vo.groups == groups);
      if (groups == 1) {
        const auto sb = bd::factorize<T>(a, po);
        CHECK(rep.vo.error == Approx(test::bd_pair_error<T>(a, b, sb)).epsilon(1e-9));
      } else {  // a basis per kv head: the heads' squared errors add, weighted by ||A_g B_g||^2
        REQUIRE(groups == s.cfg.n_kv_heads);
        double num = 0, den = 0;
        for (index_t g = 0; g < groups; ++g) {
          const std::vector<matrix_view<const float>> ag{a[std::size_t(g)]}, bg{b[std::size_t(g)]};
          const double e = test::bd_pair_error<T>(ag, bg, bd::factorize<T>(ag, po));
          const double n2 = (test::to_double(ag[0]) * test::to_double(bg[0])).squaredNorm();
          num += e * e * n2, den += n2;
        }
        CHECK(rep.vo.error == Approx(std::sqrt(num / den)).epsilon(1e-9));
      }
      CHECK(rep.vo.dense_error == Approx(test::dense_rounding_error<T>(a, b)).epsilon(1e-9));
    }
    // BD costs at most a small multiple of the dense rounding in 16 bits, and is at rounding level in fp32.
    if (std::is_same_v<T, float>) {
      CHECK(rep.vo.error <= 2e-7);
      if (s.bert) CHECK(rep.qk.error <= 2e-7);
    } else {
      CHECK(rep.vo.error <= 3 * rep.vo.dense_error);
    }
    // The loaded layer computes the dense layer's attention (double reference) to the type's rounding.
    test::seed(7 + l);
    const index_t n = 24;
    const matrix<float> x = test::random_matrix<float>(n, s.cfg.d_model);
    matrix<T> xt(n, s.cfg.d_model), y(n, s.cfg.d_model);
    detail::convert_into(xt.view(), matrix_view<const float>(x.view()));
    test::poison(y);
    bd::forward(cpu{}, loaded, matrix_view<const T>(xt.view()), y.view());
    ref::mha_params rp;
    rp.wq = test::to_double(w.wq), rp.wk = test::to_double(w.wk), rp.wv = test::to_double(w.wv),
    rp.wo = test::to_double(w.wo);
    auto row = [](const std::vector<float>& b) {
      Eigen::RowVectorXd r(Eigen::Index(b.size()));
      for (std::size_t i = 0; i < b.size(); ++i) r(Eigen::Index(i)) = b[i];
      return r;
    };
    rp.bq = row(s.bq[l]), rp.bk = row(s.bk[l]), rp.bv = row(s.bv[l]), rp.bo = row(s.bo[l]);
    rp.heads = s.cfg.n_heads, rp.kv_heads = s.cfg.n_kv_heads, rp.d = s.cfg.head_dim;
    rp.causal = s.cfg.causal, rp.rope = s.cfg.use_rope, rp.interleaved = true;
    const Eigen::MatrixXd want = ref::mha(rp, test::to_double(matrix_view<const T>(xt.view())));
    const double err = test::rel_error(test::to_double(matrix_view<const T>(y.view())), want);
    CHECK(err <= (std::is_same_v<T, float> ? 1e-5 : 2e-2));
  }
}

}  // namespace

TEST_CASE("convert: HF Llama-style GQA with RoPE and Q/K/V biases round-trips through safetensors (V/O BD)") {
  const synthetic s = make_checkpoint("llama", false, 48, 6, 2, 8, true);
  round_trip<float>(s, io::tensor_type::f32);
  round_trip<Eigen::half>(s, io::tensor_type::f16);
  round_trip<Eigen::bfloat16>(s, io::tensor_type::bf16);
  round_trip<Eigen::half>(s, io::tensor_type::f16, bd::basis_grouping::shared);
  round_trip<Eigen::half>(s, io::tensor_type::f16, bd::basis_grouping::per_kv_head);
  fs::remove_all(s.dir);
}

TEST_CASE("convert: HF BERT-style MHA round-trips with BD on Q/K and V/O") {
  const synthetic s = make_checkpoint("bert", true, 40, 4, 4, 8, true);
  round_trip<float>(s, io::tensor_type::f32);
  round_trip<Eigen::half>(s, io::tensor_type::f16);
  round_trip<Eigen::half>(s, io::tensor_type::f16, bd::basis_grouping::per_kv_head);
  fs::remove_all(s.dir);
}

TEST_CASE("convert: bad checkpoints and lying BD files raise clear errors") {
  const synthetic s = make_checkpoint("bad", true, 40, 4, 4, 8, false);
  // config.json that disagrees with the tensors
  std::ofstream(s.dir + "/wrong.json") << "{\"hidden_size\": 40, \"num_attention_heads\": 5, \"num_hidden_layers\": 2}";
  test::expect_error([&] { io::open_checkpoint(s.model, s.dir + "/wrong.json"); }, errc::io, "shape");
  std::ofstream(s.dir + "/broken.json") << "{\"hidden_size\": 40, ";
  test::expect_error([&] { io::open_checkpoint(s.model, s.dir + "/broken.json"); }, errc::io, "not a JSON object");
  std::ofstream(s.dir + "/nolayers.json") << "{\"hidden_size\": 40, \"num_attention_heads\": 4}";
  test::expect_error([&] { io::open_checkpoint(s.model, s.dir + "/nolayers.json"); }, errc::io, "num_hidden_layers");
  // unknown tensor names
  std::vector<float> v(16, 1.0f);
  io::write_safetensors(s.dir + "/other.safetensors",
                        {io::make_tensor("x.weight", matrix_view<const float>(v.data(), 4, 4), io::tensor_type::f32)});
  test::expect_error([&] { io::open_checkpoint(s.dir + "/other.safetensors", s.dir + "/config.json"); },
                     errc::unsupported, "neither");
  // bad options
  io::convert_options o;
  o.type = io::tensor_type::i32;
  const io::checkpoint c = io::open_checkpoint(s.model);
  test::expect_error([&] { io::convert_to_bd(c, o); }, errc::invalid_argument, "not F32, F16 or BF16");
  // A valid BD file, then lies in it.
  o.type = io::tensor_type::f16;
  io::conversion cv = io::convert_to_bd(c, o);
  const auto good = io::parse_safetensors(io::serialize_safetensors(cv.tensors, cv.metadata));
  test::expect_error([&] { io::load_bd_layer<float>(good, 0); }, errc::invalid_argument, "stores F16");
  test::expect_error([&] { io::load_bd_layer<Eigen::half>(good, 2); }, errc::invalid_argument, "layer 2");
  bd::mha_config wrong;
  wrong.n_heads = 8;
  test::expect_error([&] { io::load_bd_layer<Eigen::half>(good, 0, wrong); }, errc::shape_mismatch, "settings ask");
  auto lie = [&](auto&& edit, const std::string& fragment) {
    io::conversion bad = cv;
    edit(bad);
    const auto f = io::parse_safetensors(io::serialize_safetensors(bad.tensors, bad.metadata));
    test::expect_error([&] { io::load_bd_layer<Eigen::half>(f, 0); }, errc::io, fragment);
  };
  auto find = [](io::conversion& x, const std::string& suffix) -> io::safetensors_tensor& {
    for (auto& t : x.tensors)
      if (t.name.size() >= suffix.size() && t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) == 0)
        return t;
    throw std::runtime_error("no tensor " + suffix);
  };
  lie([&](io::conversion& x) { x.metadata.erase("basisattn.format"); }, "bd/1");
  lie([&](io::conversion& x) { x.metadata["basisattn.layers"] = "[{"; }, "not valid JSON");
  lie([&](io::conversion& x) { x.metadata["basisattn.config"] = "{\"d_model\": 40}"; }, "n_heads");
  lie([&](io::conversion& x) { find(x, ".bd_basis").data[0] = 200; }, "out of range");
  lie(
      [&](io::conversion& x) {
        auto& b = find(x, ".bd_basis");
        std::copy(b.data.begin(), b.data.begin() + 4, b.data.begin() + 4);  // entry 1 repeats entry 0
      },
      "repeated");
  lie(
      [&](io::conversion& x) {
        auto& t = find(x, ".bd_coeff");
        t.shape[0] -= 1;
        t.data.resize(t.data.size() - t.shape[1] * 2);
      },
      "bd_coeff");
  lie([&](io::conversion& x) { x.tensors.erase(x.tensors.begin()); }, "no tensor");
  // A basis per kv head (bd/2, bd_basis I32 [4, 8]), then lies about it.
  o.grouping = bd::basis_grouping::per_kv_head;
  cv = io::convert_to_bd(c, o);
  REQUIRE(cv.metadata.at("basisattn.format") == "bd/2");
  REQUIRE(find(cv, ".bd_basis").shape == std::vector<std::uint64_t>{4, 8});
  lie([&](io::conversion& x) { x.metadata["basisattn.format"] = "bd/1"; }, "must be I32 [8], it is I32 [4,8]");
  lie(
      [&](io::conversion& x) {
        auto& b = find(x, ".bd_basis");  // 3 groups for 4 kv heads
        b.shape[0] = 3;
        b.data.resize(3 * 8 * 4);
      },
      "groups dividing the kv heads");
  lie(
      [&](io::conversion& x) {
        auto& b = find(x, ".bd_basis");  // group 1's first entry repeats its second
        std::copy(b.data.begin() + 36, b.data.begin() + 40, b.data.begin() + 32);
      },
      "group 1 entry 1");
  fs::remove_all(s.dir);
}
