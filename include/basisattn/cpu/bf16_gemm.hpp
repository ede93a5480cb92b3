// basisattn/cpu/bf16_gemm.hpp - bf16 x bf16 -> fp32 GEMM with the AVX512_BF16 dot-product
// instruction (internal, basisattn::detail).
//
// Used by the CPU projections (<basisattn/cpu/projection.hpp>) for bf16 weights and activations when
// the translation unit is compiled for AVX512_BF16 (GCC/Clang define __AVX512BF16__, e.g. with
// -march=native on Zen 4/5 and Sapphire Rapids; our own builds add the flag where GCC 12's native
// detection misses it, cmake/BasisattnIsa.cmake). Elsewhere bf16_dot_available is false and the
// projections convert bf16 to float around the float GEMM, as before.
//
//   bf16_packed_elems(k, n)                 bf16 elements of a packed k x n weight
//   bf16_pack_block(w, ldw, k, n, nb, dst)  pack column block nb of a row-major k x n bf16 matrix
//   bf16_gemm(m, n, k, a, lda, bp, c, ldc)  C (m x n fp32) = A (m x k bf16, row-major) * B (packed)
//
// Packing: columns in blocks of 32 (the last block padded with zeros), rows in pairs (an odd last row
// paired with zero); per (column block, row pair) 64 bf16: (B[2p][j], B[2p+1][j]) for the block's 32
// columns, i.e. two zmm registers of pairs, the operand layout of vdpbf16ps.
//
// Kernel: 12 rows x 32 columns of fp32 accumulators (24 zmm) per step; each step broadcasts a pair of
// A's bf16 values to all lanes and issues vdpbf16ps against the two packed B registers. Column blocks
// are the outer loop, so one block of B (k/2 x 128 bytes; 24 KiB for k = 384) stays in L1 while the
// rows stream past it.
//
// Rounding: every product of two bf16 values is exact in fp32; vdpbf16ps adds the two products of a
// pair to the accumulator in fp32 with round-to-nearest-even, so a sum of k products meets the same
// componentwise bound gamma_k |A||B| (u = 2^-24) as the float GEMM. Unlike the float GEMM, the
// instruction treats subnormal inputs and results as zero (DAZ/FTZ, whatever MXCSR says): a product
// with a subnormal factor (magnitude below 2^-126) is lost, an absolute error below
// 2^-126 |other factor| per product, far under the final rounding to bf16 of any normal result.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>

#include <Eigen/Core>

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define BASISATTN_BF16_DOT 1
#else
#define BASISATTN_BF16_DOT 0
#endif

BASISATTN_BEGIN_NAMESPACE
namespace detail {
// What this header defines depends on the translation unit's flags, so its names live in an inline
// namespace named after them: a program whose translation units differ (one file built with
// -mavx512bf16, one without) links two distinct sets of functions instead of one silently replacing
// the other. The projections that call them carry the choice as a template argument
// (<basisattn/cpu/projection.hpp>).
#if BASISATTN_BF16_DOT
inline namespace bf16_dot_on {
#else
inline namespace bf16_dot_off {
#endif

/// True when this translation unit was compiled with AVX512_BF16 (the bf16 GEMM below exists).
inline constexpr bool bf16_dot_available = BASISATTN_BF16_DOT == 1;

/// Columns per packed block and rows per kernel step.
inline constexpr index_t bf16_nr = 32;
inline constexpr index_t bf16_mr = 12;

/// bf16 elements of a packed k x n matrix (see the header comment).
inline index_t bf16_packed_elems(index_t k, index_t n) { return ((k + 1) / 2) * ((n + bf16_nr - 1) / bf16_nr) * 64; }

/// Pack column block `nb` (columns [32 nb, 32 nb + 32)) of the row-major k x n bf16 matrix w.
inline void bf16_pack_block(const Eigen::bfloat16* w, index_t ldw, index_t k, index_t n, index_t nb,
                            Eigen::bfloat16* dst) {
  const index_t pairs = (k + 1) / 2, j0 = nb * bf16_nr;
  std::uint16_t* out = reinterpret_cast<std::uint16_t*>(dst) + nb * pairs * 64;
  for (index_t p = 0; p < pairs; ++p, out += 64)
    for (index_t j = 0; j < bf16_nr; ++j)
      for (index_t h = 0; h < 2; ++h) {
        const index_t row = 2 * p + h, col = j0 + j;
        std::uint16_t bits = 0;
        if (row < k && col < n) std::memcpy(&bits, w + row * ldw + col, sizeof bits);
        out[2 * j + h] = bits;
      }
}

#if BASISATTN_BF16_DOT
/// MR rows x 32 columns: C[i][0..32) = A[i][0..k) * (packed block bp); masks select the valid columns.
template <int MR>
inline void bf16_kernel(index_t k, const std::uint16_t* a, index_t lda, const std::uint16_t* bp, float* c, index_t ldc,
                        __mmask16 m0, __mmask16 m1) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  const index_t full = k / 2;
  for (index_t p = 0; p < full; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bp + p * 64);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(bp + p * 64 + 32);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      std::uint32_t v;
      std::memcpy(&v, a + i * lda + 2 * p, sizeof v);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(v));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], av, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], av, b1);
    }
  }
  if (k % 2) {  // the last row of B is paired with a zero row; A's second element must be zero too
    const __m512bh b0 = (__m512bh)_mm512_load_si512(bp + full * 64);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(bp + full * 64 + 32);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const std::uint32_t v = a[i * lda + 2 * full];
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(v));
      acc0[i] = _mm512_dpbf16_ps(acc0[i], av, b0);
      acc1[i] = _mm512_dpbf16_ps(acc1[i], av, b1);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(c + i * ldc, m0, acc0[i]);
    _mm512_mask_storeu_ps(c + i * ldc + 16, m1, acc1[i]);
  }
}
#endif

/// C (m x n fp32, row stride ldc) = A (m x k bf16, row stride lda) * B (bp: every column block packed
/// by bf16_pack_block, 64-byte aligned). Only with bf16_dot_available; elsewhere it raises errc::unsupported (never reached from
/// the projections, which take the float path there).
inline void bf16_gemm(index_t m, index_t n, index_t k, const Eigen::bfloat16* a, index_t lda, const Eigen::bfloat16* bp,
                      float* c, index_t ldc) {
#if BASISATTN_BF16_DOT
  const auto* a16 = reinterpret_cast<const std::uint16_t*>(a);
  const auto* b16 = reinterpret_cast<const std::uint16_t*>(bp);
  const index_t pairs = (k + 1) / 2;
  for (index_t nb = 0; nb * bf16_nr < n; ++nb) {
    const index_t cols = n - nb * bf16_nr < bf16_nr ? n - nb * bf16_nr : bf16_nr;
    const __mmask16 m0 = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u);
    const __mmask16 m1 = cols >= 32   ? __mmask16(0xFFFF)
                         : cols <= 16 ? __mmask16(0)
                                      : __mmask16((1u << (cols - 16)) - 1u);
    const std::uint16_t* blk = b16 + nb * pairs * 64;
    float* cb = c + nb * bf16_nr;
    index_t i = 0;
    for (; i + bf16_mr <= m; i += bf16_mr) bf16_kernel<bf16_mr>(k, a16 + i * lda, lda, blk, cb + i * ldc, ldc, m0, m1);
    if (m - i >= 8) {
      bf16_kernel<8>(k, a16 + i * lda, lda, blk, cb + i * ldc, ldc, m0, m1);
      i += 8;
    }
    if (m - i >= 4) {
      bf16_kernel<4>(k, a16 + i * lda, lda, blk, cb + i * ldc, ldc, m0, m1);
      i += 4;
    }
    for (; i < m; ++i) bf16_kernel<1>(k, a16 + i * lda, lda, blk, cb + i * ldc, ldc, m0, m1);
  }
#else
  (void)m, (void)n, (void)k, (void)a, (void)lda, (void)bp, (void)c, (void)ldc;
  raise(errc::unsupported, "bf16_gemm: this translation unit was not compiled for AVX512_BF16");
#endif
}

}  // namespace bf16_dot_on / bf16_dot_off
}  // namespace detail
BASISATTN_END_NAMESPACE
