// The library templates the tests instantiate most, declared `extern template` so that each test
// program compiles them once instead of once per translation unit: their definitions are explicit
// instantiations in tests/instances/*.cpp (one file per storage type, built in parallel into
// basisattn_test_instances). Test-only: the library's public headers do not include this, and the
// header check does not see it. A pair declared here and missing there is a link error; a pair used
// but not listed is simply compiled where it is used.
#pragma once

#include <basisattn/attention.hpp>
#include <basisattn/bd.hpp>

#include <vector>

// EXT is `extern` for the declarations and empty for the definitions; T the storage type, TI the
// type of the weights it is prepared from.
#define BASISATTN_TEST_PREPARE_INSTANCES(EXT, T, TI)                                                   \
  EXT template ::basisattn::bd::shared_basis basisattn::bd::factorize<T, TI>(                          \
      const std::vector<::basisattn::matrix_view<const TI>>&, const ::basisattn::bd::prepare_options&, \
      const std::vector<Eigen::MatrixXd>&);                                                            \
  EXT template ::basisattn::bd::mha_layer<T> basisattn::bd::prepare_mha<T, TI>(                        \
      const ::basisattn::bd::mha_weights<TI>&, const ::basisattn::bd::mha_config&,                     \
      const ::basisattn::bd::mha_options&);                                                            \
  EXT template ::basisattn::bd::mla_layer<T> basisattn::bd::prepare_mla<T, TI>(                        \
      const ::basisattn::bd::mla_weights<TI>&, const ::basisattn::bd::mla_config&,                     \
      const ::basisattn::bd::mla_options&);

#define BASISATTN_TEST_RUN_INSTANCES(EXT, T)                                                                         \
  EXT template void basisattn::bd::forward<T>(::basisattn::cpu, const ::basisattn::bd::mha_layer<T>&,                \
                                              ::basisattn::matrix_view<const T>, ::basisattn::matrix_view<T>,        \
                                              const ::basisattn::bd::forward_options&);                              \
  EXT template void basisattn::bd::forward<T>(::basisattn::cpu, const ::basisattn::bd::mla_layer<T>&,                \
                                              ::basisattn::matrix_view<const T>, ::basisattn::matrix_view<T>,        \
                                              const ::basisattn::bd::forward_options&);                              \
  EXT template void basisattn::bd::forward<T>(::basisattn::cpu, const ::basisattn::bd::mha_layer<T>&,                \
                                              ::basisattn::matrix_view<const T>, ::basisattn::matrix_view<T>, void*, \
                                              std::size_t, const ::basisattn::bd::forward_options&);                 \
  EXT template void basisattn::bd::forward<T>(::basisattn::cpu, const ::basisattn::bd::mla_layer<T>&,                \
                                              ::basisattn::matrix_view<const T>, ::basisattn::matrix_view<T>, void*, \
                                              std::size_t, const ::basisattn::bd::forward_options&);                 \
  EXT template void basisattn::attention<T>(::basisattn::cpu, ::basisattn::tensor3_view<const T>,                    \
                                            ::basisattn::tensor3_view<const T>, ::basisattn::tensor3_view<const T>,  \
                                            ::basisattn::tensor3_view<T>, const ::basisattn::attention_options&,     \
                                            void*, std::size_t);                                                     \
  EXT template void basisattn::attention<T>(::basisattn::cpu, ::basisattn::tensor3_view<const T>,                    \
                                            ::basisattn::tensor3_view<const T>, ::basisattn::tensor3_view<const T>,  \
                                            ::basisattn::tensor3_view<T>, const ::basisattn::attention_options&);

#define BASISATTN_TEST_MEASURE_INSTANCES(EXT, T, TI)                                         \
  EXT template ::basisattn::bd::product_errors basisattn::bd::measure_product_errors<T, TI>( \
      const ::basisattn::bd::mha_weights<TI>&, const ::basisattn::bd::mha_layer<T>&);

// Every storage type from itself; the 16-bit types also from float weights (checkpoints in fp32).
#define BASISATTN_TEST_INSTANCES_FLOAT(EXT)           \
  BASISATTN_TEST_PREPARE_INSTANCES(EXT, float, float) \
  BASISATTN_TEST_RUN_INSTANCES(EXT, float)            \
  BASISATTN_TEST_MEASURE_INSTANCES(EXT, float, float)
#define BASISATTN_TEST_INSTANCES_DOUBLE(EXT)            \
  BASISATTN_TEST_PREPARE_INSTANCES(EXT, double, double) \
  BASISATTN_TEST_RUN_INSTANCES(EXT, double)
#define BASISATTN_TEST_INSTANCES_HALF(EXT)                        \
  BASISATTN_TEST_PREPARE_INSTANCES(EXT, Eigen::half, Eigen::half) \
  BASISATTN_TEST_PREPARE_INSTANCES(EXT, Eigen::half, float)       \
  BASISATTN_TEST_RUN_INSTANCES(EXT, Eigen::half)                  \
  BASISATTN_TEST_MEASURE_INSTANCES(EXT, Eigen::half, float)
#define BASISATTN_TEST_INSTANCES_BFLOAT16(EXT)                            \
  BASISATTN_TEST_PREPARE_INSTANCES(EXT, Eigen::bfloat16, Eigen::bfloat16) \
  BASISATTN_TEST_PREPARE_INSTANCES(EXT, Eigen::bfloat16, float)           \
  BASISATTN_TEST_RUN_INSTANCES(EXT, Eigen::bfloat16)                      \
  BASISATTN_TEST_MEASURE_INSTANCES(EXT, Eigen::bfloat16, float)

// Declared everywhere, the instance files included: there an explicit instantiation definition
// follows the declaration, which C++ allows ([temp.explicit]), and the other types stay extern.
BASISATTN_TEST_INSTANCES_FLOAT(extern)
BASISATTN_TEST_INSTANCES_DOUBLE(extern)
BASISATTN_TEST_INSTANCES_HALF(extern)
BASISATTN_TEST_INSTANCES_BFLOAT16(extern)
