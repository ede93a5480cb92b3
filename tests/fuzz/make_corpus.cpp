// Writes small valid files for each fuzz target's seed corpus: make_corpus <dir> creates
// <dir>/safetensors/, <dir>/gguf/, <dir>/llama2c/.
#include <basisattn/io/safetensors.hpp>

#include "file_builders.hpp"

#include <cstdio>
#include <filesystem>
#include <string>

using namespace basisattn;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  const std::filesystem::path root = argv[1];
  for (const char* d : {"safetensors", "gguf", "llama2c"}) std::filesystem::create_directories(root / d);
  try {
    matrix<float> a(3, 4);
    for (index_t i = 0; i < a.size(); ++i) a.data()[i] = 0.25f * float(i) - 1.0f;
    io::write_safetensors(
        (root / "safetensors" / "a.safetensors").string(),
        {io::make_tensor("a", a.view(), io::tensor_type::f32), io::make_tensor("h", a.view(), io::tensor_type::f16),
         io::make_tensor("b", a.view(), io::tensor_type::bf16)},
        {{"k", "v"}});
    std::vector<float> x(64);
    for (int i = 0; i < 64; ++i) x[std::size_t(i)] = 0.1f * float(i) - 3.0f;
    build::bytes f32;
    for (float v : x) f32.put(v);
    io::write_file((root / "gguf" / "a.gguf").string(),
                   build::gguf({{"w.f32", 0, {32, 2}, f32.v},
                                {"w.q4_0", 2, {32}, build::q4_0_block(x.data())},
                                {"w.q4_1", 3, {32}, build::q4_1_block(x.data())},
                                {"w.q8_0", 8, {32}, build::q8_0_block(x.data())}}));
    io::write_file((root / "llama2c" / "model.bin").string(), build::llama2c(8, 12, 1, 2, 1, 6, 4));
    std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
    std::vector<float> scores = {0, 0, 0};
    for (int b = 0; b < 256; ++b) pieces.push_back("<0x" + std::to_string(b) + ">"), scores.push_back(0);
    for (const char* p : {" ", "O", "n", "c", "e", "On", "nc", " O"}) pieces.push_back(p), scores.push_back(-1.0f);
    while (pieces.size() < 300) pieces.push_back("x" + std::to_string(pieces.size())), scores.push_back(-5.0f);
    auto tok = build::llama2c_tokenizer(pieces, scores);
    tok.insert(tok.begin(), 200);  // the fuzz target reads byte 0 >= 128 as "tokenizer"
    io::write_file((root / "llama2c" / "tok.bin").string(), tok);
  } catch (const basisattn::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
