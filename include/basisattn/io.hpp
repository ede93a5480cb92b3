// basisattn/io.hpp - checkpoint readers and the BD converter (module header; needs nlohmann-json:
// link basisattn::io).
//
//   <basisattn/io/bytes.hpp>           bounds-checked byte reading (every reader refuses truncated or lying files)
//   <basisattn/io/tensor.hpp>          host tensors read from a checkpoint (dtype, shape, data)
//   <basisattn/io/safetensors.hpp>     safetensors read and write
//   <basisattn/io/llama2c.hpp>         llama2.c checkpoints and tokenizer
//   <basisattn/io/gguf.hpp>            GGUF (F32/F16/BF16, Q4_0/Q4_1/Q8_0)
//   <basisattn/io/architectures.hpp>   io::checkpoint, io::open_checkpoint: the architectures and tensor names
//   <basisattn/io/bd_checkpoint.hpp>   the BD checkpoint format ("bd/1", "bd/2"), io::read_bd_info, io::load_bd_layer
//   <basisattn/io/convert.hpp>         io::convert_to_bd, io::write_conversion (includes the two above)
#pragma once

#include <basisattn/io/architectures.hpp>
#include <basisattn/io/bd_checkpoint.hpp>
#include <basisattn/io/bytes.hpp>
#include <basisattn/io/convert.hpp>
#include <basisattn/io/gguf.hpp>
#include <basisattn/io/llama2c.hpp>
#include <basisattn/io/safetensors.hpp>
#include <basisattn/io/tensor.hpp>
