// libFuzzer targets for the checkpoint readers. Built three times (BASISATTN_FUZZ_FORMAT = 1, 2, 3
// for safetensors, GGUF, llama2.c + its tokenizer): every input must either parse (and then decode
// every tensor) or raise basisattn::error; anything else (crash, sanitizer report, other exception)
// is a bug. Build with clang: -fsanitize=fuzzer,address,undefined (scripts/ci-fuzz.sh).
#include <basisattn/io/gguf.hpp>
#include <basisattn/io/llama2c.hpp>
#include <basisattn/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

using namespace basisattn;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<unsigned char> bytes(data, data + size);
  try {
#if BASISATTN_FUZZ_FORMAT == 1
    const auto f = io::parse_safetensors(std::move(bytes));
    for (const auto& t : f.tensors)
      if (t.type == io::tensor_type::f32 || t.type == io::tensor_type::f16 || t.type == io::tensor_type::bf16 ||
          t.type == io::tensor_type::f64)
        io::to_float(t, f.bytes);
#elif BASISATTN_FUZZ_FORMAT == 2
    const auto f = io::parse_gguf(std::move(bytes));
    for (const auto& t : f.tensors)
      if (t.type != io::tensor_type::i8 && t.type != io::tensor_type::i16 && t.type != io::tensor_type::i32 &&
          t.type != io::tensor_type::i64)
        io::to_float(t, f.bytes);
    for (const auto& [k, v] : f.metadata) (void)k, (void)v.items.size();
#elif BASISATTN_FUZZ_FORMAT == 3
    if (size > 0 && data[0] < 128) {  // first byte picks checkpoint or tokenizer
      const auto c = io::parse_llama2c(std::move(bytes));
      (void)c.layer_matrix("wq", 0);
    } else if (size > 0) {
      const std::vector<unsigned char> rest(data + 1, data + size);
      const auto t = io::parse_llama2c_tokenizer(rest, 300);
      (void)t.encode("Once upon a time \xC3\xA9", true);
    }
#else
#error "define BASISATTN_FUZZ_FORMAT"
#endif
  } catch (const basisattn::error&) {
  }
  return 0;
}
