# The macros the compiler defines with these options (GCC and Clang both print them with -dM -E).
macro(_basisattn_macros var)
  execute_process(COMMAND ${CMAKE_CXX_COMPILER} ${ARGN} -dM -E -x c++ /dev/null OUTPUT_VARIABLE ${var} ERROR_QUIET
                  RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    set(${var} "")
  endif()
endmacro()

# basisattn_native_isa(<out_var>): the compile options basisattn's own programs (tests, benchmarks,
# examples) use with BASISATTN_NATIVE: -march=native, plus every AVX-512 extension the CPU reports
# (Linux /proc/cpuinfo) that the compiler's native detection left off. GCC before 13 does not know
# Zen 5 (and GCC before 12.3 not Zen 4): -march=native then means znver3 with AVX-512 disabled, which
# leaves half of such a machine's vector width unused. An extension is added only when the compiler,
# given it, defines its macro (so a compiler that lacks one is never passed a flag it rejects).
# Prints what it chose and the widest vector ISA that results. Never exported: the library's users
# choose their own flags (README: "Compiler flags that matter").
# An optional second argument replaces -march=native (to check the logic: -march=znver3 on a Zen 4/5).
function(basisattn_native_isa out)
  set(flags -march=native)
  if(ARGC GREATER 1)
    set(flags ${ARGV1})
  endif()
  # cpuinfo flag -> compiler macro -> option
  set(ext
      "avx512f;__AVX512F__;-mavx512f"
      "avx512cd;__AVX512CD__;-mavx512cd"
      "avx512bw;__AVX512BW__;-mavx512bw"
      "avx512dq;__AVX512DQ__;-mavx512dq"
      "avx512vl;__AVX512VL__;-mavx512vl"
      "avx512ifma;__AVX512IFMA__;-mavx512ifma"
      "avx512vbmi;__AVX512VBMI__;-mavx512vbmi"
      "avx512_vbmi2;__AVX512VBMI2__;-mavx512vbmi2"
      "avx512_vnni;__AVX512VNNI__;-mavx512vnni"
      "avx512_bitalg;__AVX512BITALG__;-mavx512bitalg"
      "avx512_vpopcntdq;__AVX512VPOPCNTDQ__;-mavx512vpopcntdq"
      "avx512_bf16;__AVX512BF16__;-mavx512bf16")
  set(cpu "")
  if(EXISTS /proc/cpuinfo)
    file(STRINGS /proc/cpuinfo cpu REGEX "^flags[ \t]*:" LIMIT_COUNT 1)
  endif()
  _basisattn_macros(native ${flags})
  set(added "")
  list(LENGTH ext n)
  set(i 0)
  while(i LESS n)
    list(GET ext ${i} cpuflag)
    math(EXPR j "${i} + 1")
    list(GET ext ${j} macro)
    math(EXPR j "${i} + 2")
    list(GET ext ${j} option)
    math(EXPR i "${i} + 3")
    if(cpu MATCHES "[ \t]${cpuflag}([ \t]|$)" AND NOT native MATCHES "#define ${macro} ")
      _basisattn_macros(with ${flags} ${added} ${option})
      if(with MATCHES "#define ${macro} ")
        list(APPEND added ${option})
      endif()
    endif()
  endwhile()
  list(APPEND flags ${added})
  _basisattn_macros(final ${flags})
  if(final MATCHES "#define __AVX512F__ ")
    set(widest "AVX-512")
    foreach(m BF16 VNNI)
      if(final MATCHES "#define __AVX512${m}__ ")
        string(APPEND widest " +${m}")
      endif()
    endforeach()
  elseif(final MATCHES "#define __AVX2__ ")
    set(widest "AVX2")
  elseif(final MATCHES "#define __AVX__ ")
    set(widest "AVX")
  elseif(final MATCHES "#define __SSE4_2__ ")
    set(widest "SSE4.2")
  else()
    set(widest "SSE2 or unknown")
  endif()
  string(REPLACE ";" " " shown "${flags}")
  if(added)
    list(LENGTH added k)
    message(STATUS "basisattn: own programs compile with ${shown} (${k} extensions the CPU has and the "
                   "compiler's native detection left off); widest vector ISA: ${widest}")
  else()
    message(STATUS "basisattn: own programs compile with ${shown}; widest vector ISA: ${widest}")
  endif()
  set(${out} ${flags} PARENT_SCOPE)
endfunction()
