// Checkpoint readers: round trips and exact values on small files built here, and every kind of
// broken file (truncated at every length, flipped bytes, lying sizes and offsets) giving
// basisattn::error with errc::io (or errc::unsupported), never a crash or an out-of-bounds read.
#include <basisattn/io/gguf.hpp>
#include <basisattn/io/llama2c.hpp>
#include <basisattn/io/safetensors.hpp>

#include <catch2/catch.hpp>

#include "file_builders.hpp"
#include "expect_error.hpp"
#include "test_util.hpp"

#include <cmath>
#include <random>

using namespace basisattn;
using Catch::Contains;

namespace {
using test::expect_error;

/// Parse every prefix and some byte-flipped copies of a valid file: each must either parse or raise
/// basisattn::error (io or unsupported); nothing else may happen. Returns the number that parsed.
template <class Parse>
int abuse(const std::vector<unsigned char>& good, Parse&& parse) {
  int parsed = 0;
  for (std::size_t n = 0; n < good.size(); n += (n < 512 ? 1 : 7)) {
    std::vector<unsigned char> cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    try {
      parse(std::move(cut));
      ++parsed;
    } catch (const basisattn::error& e) {
      CHECK((e.code() == errc::io || e.code() == errc::unsupported));
    }
  }
  std::mt19937 g(42);
  for (int k = 0; k < 400; ++k) {
    std::vector<unsigned char> bad = good;
    const int flips = 1 + int(g() % 4);
    for (int f = 0; f < flips; ++f) bad[g() % bad.size()] ^= static_cast<unsigned char>(1u << (g() % 8));
    try {
      parse(std::move(bad));
      ++parsed;
    } catch (const basisattn::error& e) {
      CHECK((e.code() == errc::io || e.code() == errc::unsupported));
    }
  }
  return parsed;
}

struct sample {
  matrix<float> a;
  matrix<double> b;
  std::vector<unsigned char> bytes;
};

sample sample_safetensors() {
  test::seed(1);
  sample s{test::random_matrix<float>(3, 5), test::random_matrix<double>(2, 2), {}};
  std::vector<io::safetensors_tensor> t = {io::make_tensor("layer.0.a", s.a.view(), io::tensor_type::f32),
                                           io::make_tensor("layer.0.a_half", s.a.view(), io::tensor_type::f16),
                                           io::make_tensor("b", s.b.view(), io::tensor_type::bf16),
                                           io::make_tensor("b64", s.b.view(), io::tensor_type::f64)};
  io::safetensors_tensor ints{"ids", io::tensor_type::i32, {4}, {}};
  for (std::int32_t i = 0; i < 4; ++i) {
    const auto v = build::bytes().put(i * 7).v;
    ints.data.insert(ints.data.end(), v.begin(), v.end());
  }
  t.push_back(ints);
  s.bytes = io::serialize_safetensors(t, {{"format", "pt"}, {"basisattn.strategy", "shared_pivot"}});
  return s;
}

}  // namespace

TEST_CASE("safetensors: write then read gives the same tensors, values and metadata") {
  const auto s = sample_safetensors();
  const auto& a = s.a;
  const auto& b = s.b;
  std::uint64_t header = 0;
  std::memcpy(&header, s.bytes.data(), 8);
  CHECK((8 + header) % 8 == 0);  // data section aligned
  const auto f = io::parse_safetensors(s.bytes);
  REQUIRE(f.tensors.size() == 5);
  CHECK(f.metadata.at("basisattn.strategy") == "shared_pivot");
  const auto ma = io::as_matrix(f.get("layer.0.a"), f.bytes);
  CHECK(ma.rows() == 3);
  CHECK(ma.cols() == 5);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 5; ++j) {
      CHECK(ma(i, j) == a(i, j));
      CHECK(io::as_matrix(f.get("layer.0.a_half"), f.bytes)(i, j) == float(Eigen::half(a(i, j))));
    }
  const auto mb = io::as_matrix(f.get("b"), f.bytes);
  const auto mb64 = io::to_float(f.get("b64"), f.bytes);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      CHECK(mb(i, j) == float(detail::from_compute<Eigen::bfloat16>(b(i, j))));
      CHECK(mb64[std::size_t(i * 2 + j)] == float(b(i, j)));
    }
  CHECK(f.get("ids").type == io::tensor_type::i32);
  CHECK_THROWS_AS(io::to_float(f.get("ids"), f.bytes), basisattn::error);  // integers have no float meaning here
  CHECK(f.find("missing") == nullptr);
  expect_error([&] { f.get("missing"); }, errc::io, "no tensor named 'missing'");
}

TEST_CASE("safetensors: broken files are refused with a clear error") {
  auto with_header = [](const std::string& json, std::size_t data_bytes) {
    build::bytes b;
    b.put<std::uint64_t>(json.size());
    b.v.insert(b.v.end(), json.begin(), json.end());
    b.v.resize(b.v.size() + data_bytes, 0);
    return b.v;
  };
  expect_error([&] { io::parse_safetensors({1, 2, 3}); }, errc::io, "truncated reading header length");
  expect_error([&] { io::parse_safetensors(with_header("{", 0)); }, errc::io, "not valid JSON");
  expect_error([&] { io::parse_safetensors(with_header("[1]", 0)); }, errc::io, "not a JSON object");
  expect_error(
      [&] { io::parse_safetensors(with_header(R"({"x":{"dtype":"F7","shape":[1],"data_offsets":[0,4]}})", 4)); },
      errc::io, "unknown dtype 'F7'");
  expect_error(
      [&] { io::parse_safetensors(with_header(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4)); },
      errc::io, "non-negative integer");
  expect_error(
      [&] { io::parse_safetensors(with_header(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 8)); },
      errc::io, "has 4 bytes but dtype F32 and its shape need 8");
  expect_error(
      [&] { io::parse_safetensors(with_header(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4)); },
      errc::io, "outside the data section of 4 bytes");
  expect_error(
      [&] {
        io::parse_safetensors(with_header(
            R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
            12));
      },
      errc::io, "overlap");
  expect_error([&] { io::parse_safetensors(with_header(R"({"x":{"dtype":"F32","shape":[1]}})", 4)); }, errc::io,
               "needs data_offsets");
  expect_error([&] { io::parse_safetensors(with_header(R"({"__metadata__":{"a":1}})", 0)); }, errc::io,
               "metadata 'a' is not a string");
  // A header length that lies (longer than the file).
  auto good = sample_safetensors().bytes;
  good[0] = 0xFF, good[1] = 0xFF;
  expect_error([&] { io::parse_safetensors(good); }, errc::io, "truncated reading JSON header");
  // Huge shapes whose byte count overflows.
  expect_error(
      [&] {
        io::parse_safetensors(
            with_header(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}})", 4));
      },
      errc::io, "overflows");
  expect_error([&] { io::read_safetensors("/nonexistent/file.safetensors"); }, errc::io, "cannot open");
}

TEST_CASE("empty tensors decode to nothing") {
  const auto bytes = io::serialize_safetensors({{"e", io::tensor_type::f32, {0, 3}, {}}});
  const auto f = io::parse_safetensors(bytes);
  CHECK(io::to_float(f.get("e"), f.bytes).empty());
  CHECK(io::as_matrix(f.get("e"), f.bytes).rows() == 0);
  const auto g = io::parse_gguf(build::gguf({{"z", 2, {0}, {}}}));
  CHECK(io::to_float(g.get("z"), g.bytes).empty());
}

TEST_CASE("safetensors: every truncation and random corruption is handled") {
  const auto good = sample_safetensors().bytes;
  const int parsed = abuse(good, [](std::vector<unsigned char> b) {
    const auto f = io::parse_safetensors(std::move(b));
    for (const auto& t : f.tensors)
      if (t.type != io::tensor_type::i32) io::to_float(t, f.bytes);
  });
  CHECK(parsed >= 1);  // the whole file (and flips that only hit data bytes)
}

TEST_CASE("gguf: metadata, shapes and dequantized values of every supported type") {
  std::vector<float> x(64);
  for (int i = 0; i < 64; ++i) x[std::size_t(i)] = std::sin(0.37f * float(i)) * (1 + 0.1f * float(i % 5));
  build::bytes f32, f16;
  for (float v : x) f32.put(v), f16.put(build::half_bits(v));
  std::vector<unsigned char> q40, q41, q80;
  for (int b = 0; b < 2; ++b) {
    auto a = build::q4_0_block(&x[std::size_t(32 * b)]), c = build::q4_1_block(&x[std::size_t(32 * b)]),
         d = build::q8_0_block(&x[std::size_t(32 * b)]);
    q40.insert(q40.end(), a.begin(), a.end());
    q41.insert(q41.end(), c.begin(), c.end());
    q80.insert(q80.end(), d.begin(), d.end());
  }
  const auto bytes = build::gguf({{"w.f32", 0, {32, 2}, f32.v},
                                  {"w.f16", 1, {64}, f16.v},
                                  {"w.q4_0", 2, {32, 2}, q40},
                                  {"w.q4_1", 3, {32, 2}, q41},
                                  {"w.q8_0", 8, {64}, q80}});
  const auto f = io::parse_gguf(bytes);
  CHECK(f.version == 3);
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.get_u64("llama.block_count") == 2);
  CHECK(f.get_f64("llama.rope.freq_base") == 10000.0);
  CHECK(f.get_strings("tokenizer.ggml.tokens") == std::vector<std::string>{"<s>", "a", "b"});
  expect_error([&] { f.get_u64("general.architecture"); }, errc::io, "not a non-negative integer");
  REQUIRE(f.tensors.size() == 5);
  CHECK(f.get("w.f32").shape == std::vector<std::uint64_t>{2, 32});  // PyTorch order: ne reversed
  const auto m = io::as_matrix(f.get("w.f32"), f.bytes);
  CHECK(m(1, 3) == x[35]);
  const auto h = io::to_float(f.get("w.f16"), f.bytes);
  const auto a = io::to_float(f.get("w.q4_0"), f.bytes), c = io::to_float(f.get("w.q4_1"), f.bytes),
             d = io::to_float(f.get("w.q8_0"), f.bytes);
  double e40 = 0, e41 = 0, e80 = 0, ref = 0;
  for (int i = 0; i < 64; ++i) {
    CHECK(h[std::size_t(i)] == float(Eigen::half(x[std::size_t(i)])));
    e40 += std::pow(a[std::size_t(i)] - x[std::size_t(i)], 2),
        e41 += std::pow(c[std::size_t(i)] - x[std::size_t(i)], 2);
    e80 += std::pow(d[std::size_t(i)] - x[std::size_t(i)], 2), ref += x[std::size_t(i)] * x[std::size_t(i)];
  }
  // Quantisation error bounds of the formats: 4 bits ~ 1/16 of the range, 8 bits ~ 1/256.
  CHECK(std::sqrt(e40 / ref) < 0.15);
  CHECK(std::sqrt(e41 / ref) < 0.1);
  CHECK(std::sqrt(e80 / ref) < 0.01);
  // Exact decoding of a hand-made Q4_0 block: d = 0.5, nibbles j -> (j - 8) * 0.5.
  build::bytes blk;
  blk.put(build::half_bits(0.5f));
  for (int j = 0; j < 16; ++j) blk.v.push_back(static_cast<unsigned char>(j | ((15 - j) << 4)));
  float out[32];
  io::decode_to_float(io::tensor_type::q4_0, blk.v.data(), 32, out);
  for (int j = 0; j < 16; ++j) {
    CHECK(out[j] == float(j - 8) * 0.5f);
    CHECK(out[j + 16] == float(7 - j) * 0.5f);
  }
}

TEST_CASE("gguf: broken and unsupported files are refused with a clear error") {
  const std::vector<float> zeros(32, 0.0f);
  build::bytes z;
  for (float v : zeros) z.put(v);
  const auto good = build::gguf({{"w", 0, {32}, z.v}});
  auto bad = good;
  bad[0] = 'X';
  expect_error([&] { io::parse_gguf(bad); }, errc::io, "bad magic");
  bad = good;
  bad[4] = 1;
  expect_error([&] { io::parse_gguf(bad); }, errc::unsupported, "GGUF version 1");
  // Unsupported tensor type (Q4_K = 12).
  expect_error(
      [&] {
        io::parse_gguf(build::gguf({{"w", 12, {256}, std::vector<unsigned char>(144)}}));
      },
      errc::unsupported, "GGML type 12");
  // Tensor data beyond the end.
  auto cut = good;
  cut.resize(cut.size() - 4);
  expect_error([&] { io::parse_gguf(cut); }, errc::io, "lies outside the data section");
  // A block type whose element count is not a multiple of 32.
  expect_error(
      [&] {
        io::parse_gguf(build::gguf({{"w", 2, {33}, std::vector<unsigned char>(36)}}));
      },
      errc::io, "not a multiple of its block size 32");
  // Misaligned offset, too many dimensions, absurd counts.
  build::bytes b;
  b.v = {'G', 'G', 'U', 'F'};
  b.put<std::uint32_t>(3).put<std::uint64_t>(1).put<std::uint64_t>(0);
  b.str64("w").put<std::uint32_t>(1).put<std::uint64_t>(4).put<std::uint32_t>(0).put<std::uint64_t>(3);
  b.pad_to(32);
  b.v.resize(b.v.size() + 64);
  expect_error([&] { io::parse_gguf(b.v); }, errc::io, "not aligned");
  build::bytes c;
  c.v = {'G', 'G', 'U', 'F'};
  c.put<std::uint32_t>(3).put<std::uint64_t>(1).put<std::uint64_t>(0);
  c.str64("w").put<std::uint32_t>(7);
  c.v.resize(c.v.size() + 100);
  expect_error([&] { io::parse_gguf(c.v); }, errc::io, "has 7 dimensions");
  build::bytes d;
  d.v = {'G', 'G', 'U', 'F'};
  d.put<std::uint32_t>(3).put<std::uint64_t>(0).put<std::uint64_t>(std::uint64_t(1) << 40);
  expect_error([&] { io::parse_gguf(d.v); }, errc::io, "metadata entries cannot fit");
  build::bytes e;  // an array claiming 2^40 elements
  e.v = {'G', 'G', 'U', 'F'};
  e.put<std::uint32_t>(3).put<std::uint64_t>(0).put<std::uint64_t>(1);
  e.str64("k").put<std::uint32_t>(9).put<std::uint32_t>(4).put<std::uint64_t>(std::uint64_t(1) << 40);
  expect_error([&] { io::parse_gguf(e.v); }, errc::io, "cannot fit");
}

TEST_CASE("gguf: every truncation and random corruption is handled") {
  std::vector<float> x(64);
  for (int i = 0; i < 64; ++i) x[std::size_t(i)] = 0.1f * float(i);
  build::bytes f32;
  for (float v : x) f32.put(v);
  const auto good = build::gguf({{"a", 0, {64}, f32.v}, {"b", 8, {32}, build::q8_0_block(x.data())}});
  const int parsed = abuse(good, [](std::vector<unsigned char> b) {
    const auto f = io::parse_gguf(std::move(b));
    for (const auto& t : f.tensors) io::to_float(t, f.bytes);
  });
  CHECK(parsed >= 1);
}

TEST_CASE("llama2.c: shapes, values and size checks") {
  const auto bytes = build::llama2c(16, 24, 2, 4, 2, 10, 8);
  const auto c = io::parse_llama2c(bytes);
  CHECK(c.config.dim == 16);
  CHECK(c.config.kv_dim() == 8);
  CHECK(c.config.shared_classifier);
  CHECK(c.get("wk").shape == std::vector<std::uint64_t>{2, 8, 16});
  const auto wq1 = c.layer_matrix("wq", 1);
  // wq layer 1 starts after token_embedding (160), rms_att (32), wq layer 0 (256).
  CHECK(wq1(0, 0) == build::llama2c_value(160 + 32 + 256));
  CHECK(wq1(7, 3) == build::llama2c_value(160 + 32 + 256 + 7 * 16 + 3));
  CHECK(c.vector("rms_att", 1).size() == 16);
  const auto unshared = io::parse_llama2c(build::llama2c(16, 24, 2, 4, 2, 10, 8, false));
  CHECK_FALSE(unshared.config.shared_classifier);
  CHECK(unshared.get("wcls").shape == std::vector<std::uint64_t>{10, 16});
  auto trunc = bytes;
  trunc.pop_back();
  expect_error([&] { io::parse_llama2c(trunc); }, errc::io, "the header promises");
  auto padded = bytes;
  padded.push_back(0);
  expect_error([&] { io::parse_llama2c(padded); }, errc::io, "the header promises");
  auto neg = bytes;
  neg[0] = 0xFF, neg[1] = 0xFF, neg[2] = 0xFF, neg[3] = 0xFF;  // dim = -1
  expect_error([&] { io::parse_llama2c(neg); }, errc::io, "non-positive field");
  std::vector<unsigned char> versioned = {'a', 'k', '4', '2', 0, 0, 0, 0};
  versioned.resize(256);
  expect_error([&] { io::parse_llama2c(versioned); }, errc::unsupported, "ak42");
  const int parsed = abuse(bytes, [](std::vector<unsigned char> b) { io::parse_llama2c(std::move(b)); });
  CHECK(parsed >= 1);
}

TEST_CASE("llama2.c tokenizer: byte fallback, dummy prefix and best-score merges") {
  // ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 bytes, then pieces with scores.
  std::vector<std::string> pieces = {"<unk>", "\n<s>\n", "\n</s>\n"};
  std::vector<float> scores = {0, 0, 0};
  for (int b = 0; b < 256; ++b) pieces.push_back("<0x" + std::to_string(b) + ">"), scores.push_back(0);
  for (const char* p : {" ", "a", "b", "ab", " a", " ab"}) pieces.push_back(p), scores.push_back(0);
  scores[pieces.size() - 3] = -1.0f;  // "ab"
  scores[pieces.size() - 2] = -2.0f;  // " a"
  scores[pieces.size() - 1] = -0.5f;  // " ab"
  const auto t =
      io::parse_llama2c_tokenizer(build::llama2c_tokenizer(pieces, scores), static_cast<index_t>(pieces.size()));
  const std::int32_t sp = 259, a = 260, b = 261, ab = 262, sab = 264;
  // " a b" pieces: ' ' 'a' 'b' -> merge "ab" (-1) beats " a" (-2) -> ' ' 'ab' -> " ab" (-0.5)
  CHECK(t.encode("ab") == std::vector<std::int32_t>{1, sab});
  CHECK(t.encode("ba", false) == std::vector<std::int32_t>{sp, b, a});
  CHECK(t.encode("", true) == std::vector<std::int32_t>{1});
  // A character not in the vocabulary falls back to its UTF-8 bytes + 3.
  CHECK(t.encode("\xC3\xA9", false) == std::vector<std::int32_t>{sp, 0xC3 + 3, 0xA9 + 3});
  CHECK(t.decode(ab) == "ab");
  expect_error([&] { t.decode(9999); }, errc::invalid_argument, "outside the vocabulary");
  auto bytes = build::llama2c_tokenizer(pieces, scores);
  bytes.pop_back();
  expect_error([&] { io::parse_llama2c_tokenizer(bytes, static_cast<index_t>(pieces.size())); }, errc::io, "truncated");
}
