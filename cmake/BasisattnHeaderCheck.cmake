# basisattn_add_header_check(<target>): an object library with one translation unit per public
# header, each including that header (twice, to test its include guard) and nothing else, plus the
# umbrella header compiled with -fno-exceptions. Headers
# under basisattn/cuda/ are checked only when basisattn::cuda exists; *.cuh files need nvcc and are
# left to the CUDA targets.
function(basisattn_add_header_check target)
  file(GLOB_RECURSE headers RELATIVE ${PROJECT_SOURCE_DIR}/include CONFIGURE_DEPENDS
       ${PROJECT_SOURCE_DIR}/include/basisattn/*.hpp)
  set(sources)
  foreach(h IN LISTS headers)
    if(h MATCHES "^basisattn/cuda(/|[.]hpp$)" AND NOT BASISATTN_HAS_CUDA)
      continue()
    endif()
    if(h MATCHES "^basisattn/io(/|[.]hpp$)" AND NOT BASISATTN_HAS_IO)
      continue()
    endif()
    if(h STREQUAL "basisattn/cpu/fftw.hpp" AND NOT BASISATTN_HAS_FFTW)
      continue()
    endif()
    string(MAKE_C_IDENTIFIER "${h}" id)
    set(src ${CMAKE_CURRENT_BINARY_DIR}/header_check/${id}.cpp)
    file(CONFIGURE OUTPUT ${src} CONTENT "#include <${h}>\n#include <${h}>\n")
    list(APPEND sources ${src})
  endforeach()
  # The CPU library must also build without exceptions (errors then print and abort).
  set(noexc ${CMAKE_CURRENT_BINARY_DIR}/header_check/umbrella_no_exceptions.cpp)
  file(CONFIGURE OUTPUT ${noexc} CONTENT "#include <basisattn/basisattn.hpp>\n")
  set_source_files_properties(${noexc} PROPERTIES COMPILE_OPTIONS "-fno-exceptions")
  list(APPEND sources ${noexc})
  add_library(${target} OBJECT ${sources})
  target_link_libraries(${target} PRIVATE basisattn)
  # Only whether each header compiles matters here: skip the optimiser.
  target_compile_options(${target} PRIVATE -O0)
  if(BASISATTN_HAS_CUDA)
    target_link_libraries(${target} PRIVATE basisattn_cuda)
  endif()
  if(BASISATTN_HAS_IO)
    target_link_libraries(${target} PRIVATE basisattn_io)
  endif()
  if(BASISATTN_HAS_FFTW)
    target_link_libraries(${target} PRIVATE basisattn_fftw)
  endif()
  target_compile_options(${target} PRIVATE $<$<CXX_COMPILER_ID:GNU,Clang>:-Wall -Wextra -Wno-psabi>)
endfunction()
