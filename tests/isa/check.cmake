# The ISA choice of basisattn's own programs (cmake/BasisattnIsa.cmake) on a compiler whose native
# detection misses AVX-512: started from -march=znver3 (AVX2, no AVX-512: what GCC 12's -march=native
# gives on Zen 5), the result must hold -mavx512f exactly when this CPU reports avx512f, and it must
# compile. `cmake -DCXX=<compiler> -DSOURCE_DIR=<repo> -P check.cmake`.
set(CMAKE_CXX_COMPILER ${CXX})
include(${SOURCE_DIR}/cmake/BasisattnIsa.cmake)
basisattn_native_isa(flags -march=znver3)
set(cpu "")
if(EXISTS /proc/cpuinfo)
  file(STRINGS /proc/cpuinfo cpu REGEX "^flags[ \t]*:" LIMIT_COUNT 1)
endif()
list(FIND flags -mavx512f at)
if(cpu MATCHES "[ \t]avx512f([ \t]|$)")
  if(at EQUAL -1)
    message(FATAL_ERROR "isa: the CPU has avx512f but the flags are ${flags}")
  endif()
elseif(NOT at EQUAL -1)
  message(FATAL_ERROR "isa: the CPU has no avx512f but the flags are ${flags}")
endif()
file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/isa_check.cpp "int main() { return 0; }\n")
execute_process(COMMAND ${CXX} ${flags} -fsyntax-only ${CMAKE_CURRENT_BINARY_DIR}/isa_check.cpp RESULT_VARIABLE rc
                ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "isa: ${CXX} rejects ${flags}: ${err}")
endif()
message(STATUS "isa: ${flags}")
