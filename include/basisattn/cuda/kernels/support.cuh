// basisattn/cuda/kernels/support.cuh - internal: kernels of support-basis attention on the GPU (nvcc only).
//
// Definitions of the launchers declared in <basisattn/cuda/support_launch.hpp> and the explicit
// instantiations of the storage-typed ones for float, Eigen::half and Eigen::bfloat16. Included by
// <basisattn/cuda/kernels.cuh>. Correctness first: simple grid-stride element kernels, one warp per
// query row for the exact part, one block per sampled row for the double-precision estimate; the
// heavy products (features x states) are cuBLAS GEMMs issued by <basisattn/cuda/support.hpp>.
#pragma once

#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/kernels/common.cuh>
#include <basisattn/cuda/support_launch.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

/// Tile sizes of the support-basis kernels.
struct support_kernel_traits {
  static constexpr int threads = 256;           ///< element kernels
  static constexpr int exact_warps = 4;         ///< exact part: warps (query rows) per block
  static constexpr int estimate_threads = 128;  ///< estimate: threads per sampled row (power of two)
};

namespace support_dev {

__device__ __forceinline__ float warp_max_f(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum_f(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/// Block-wide reduction over support_kernel_traits::estimate_threads threads (sum or max) in `buf`.
template <bool Max>
__device__ double block_reduce(double x, double* buf) {
  constexpr int n = support_kernel_traits::estimate_threads;
  __syncthreads();  // buf may still be read by a previous reduction
  buf[threadIdx.x] = x;
  __syncthreads();
  for (int s = n / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s)
      buf[threadIdx.x] = Max ? fmax(buf[threadIdx.x], buf[threadIdx.x + s]) : buf[threadIdx.x] + buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

/// Horner's rule with double coefficients c[0..g] in fp32.
__device__ __forceinline__ float horner_f(const double* c, int g, float x) {
  float y = static_cast<float>(c[g]);
  for (int t = g - 1; t >= 0; --t) y = y * x + static_cast<float>(c[t]);
  return y;
}

}  // namespace support_dev

// ---------------------------------------------------------------------------------------------------
// Storage-typed kernels.

template <class D>
__global__ void support_load_head_kernel(const D* __restrict__ x, long long n, long long d, long long s0, long long s2,
                                         float* __restrict__ dst) {
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < n * d;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long i = e / d, c = e - i * d;
    dst[e] = load_f(x[i * s0 + c * s2]);
  }
}

template <class T>
void launch_support_load_head(const T* x, index_t n, index_t d, index_t s0, index_t s2, float* dst,
                              cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (n <= 0 || d <= 0) return;
  support_load_head_kernel<<<grid_for(n * d, tr::threads), tr::threads, 0, stream>>>(as_device(x), n, d, s0, s2, dst);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class D>
__global__ void support_store_kernel(const float* __restrict__ num, const float* __restrict__ den, long long n,
                                     long long dv, D* __restrict__ out, long long s0, long long s2,
                                     const int* __restrict__ flags) {
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < n * dv;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long i = e / dv, c = e - i * dv;
    if (flags && flags[i] != 2) continue;
    const float inv = 1.0f / den[i];
    out[i * s0 + c * s2] = store_f<D>(num[e] * inv);
  }
}

template <class T>
void launch_support_store(const float* num, const float* den, index_t n, index_t dv, T* out, index_t s0, index_t s2,
                          const int* flags, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (n <= 0 || dv <= 0) return;
  support_store_kernel<<<grid_for(n * dv, tr::threads), tr::threads, 0, stream>>>(num, den, n, dv, as_device(out), s0,
                                                                                  s2, flags);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class D>
__global__ void support_count_nonfinite_kernel(const D* __restrict__ x, long long e0, long long e1, long long e2,
                                               long long s0, long long s1, long long s2, unsigned long long* count) {
  unsigned long long bad = 0;
  const long long total = e0 * e1 * e2;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long i = e / (e1 * e2), r = e - i * e1 * e2, j = r / e2, c = r - j * e2;
    if (!isfinite(load_f(x[i * s0 + j * s1 + c * s2]))) ++bad;
  }
  if (bad) atomicAdd(count, bad);
}

template <class T>
void launch_support_count_nonfinite(const T* x, index_t e0, index_t e1, index_t e2, index_t s0, index_t s1, index_t s2,
                                    unsigned long long* count, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (e0 <= 0 || e1 <= 0 || e2 <= 0) return;
  support_count_nonfinite_kernel<<<grid_for(e0 * e1 * e2, tr::threads), tr::threads, 0, stream>>>(
      as_device(x), e0, e1, e2, s0, s1, s2, count);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

/// One block per sampled row j < s = min(p.samples, *p.n_rows) (blocks j >= s return at once): row
/// i = p.rows[floor((j + 1) na / s) - 1] of the na approximated rows; two passes over the visible keys
/// (max, then weights in chunks of the block size kept in shared memory), all in double.
template <class D>
__global__ void __launch_bounds__(support_kernel_traits::estimate_threads)
    support_estimate_kernel(support_estimate_params<D> p) {
  constexpr int nt = support_kernel_traits::estimate_threads;
  __shared__ double w[nt];
  __shared__ double red[nt];
  const long long na = static_cast<long long>(*p.n_rows);
  const long long s = p.samples < na ? p.samples : na;
  const long long j = blockIdx.x;
  if (j >= s) return;  // block-uniform, before any barrier
  const long long i = static_cast<long long>(p.rows[((j + 1) * na) / s - 1]);
  const long long vis = p.causal ? i + p.causal_offset + 1 : p.n_kv;
  const int t = threadIdx.x;
  auto score = [&](long long key) {
    double dot = 0;
    for (long long e = 0; e < p.d; ++e)
      dot += static_cast<double>(load_f(p.q[i * p.q_s0 + e * p.q_s2])) *
             static_cast<double>(load_f(p.k[key * p.k_s0 + e * p.k_s2]));
    return p.scale * dot;
  };
  double mx = -INFINITY;
  for (long long key = t; key < vis; key += nt) mx = fmax(mx, score(key));
  mx = support_dev::block_reduce<true>(mx, red);
  double* const y = p.y + j * p.dv;
  for (long long c = t; c < p.dv; c += nt) y[c] = 0;
  double l = 0;
  for (long long k0 = 0; k0 < vis; k0 += nt) {
    const long long key = k0 + t;
    const double wk = key < vis ? exp(score(key) - mx) : 0.0;
    l += wk;
    __syncthreads();  // the previous chunk's weights are consumed
    w[t] = wk;
    __syncthreads();
    const long long nk = vis - k0 < nt ? vis - k0 : nt;
    for (long long c = t; c < p.dv; c += nt) {
      double acc = y[c];
      for (long long jj = 0; jj < nk; ++jj)
        acc += w[jj] * static_cast<double>(load_f(p.v[(k0 + jj) * p.v_s0 + c * p.v_s2]));
      y[c] = acc;
    }
  }
  l = support_dev::block_reduce<false>(l, red);
  double e2 = 0, y2 = 0;
  for (long long c = t; c < p.dv; c += nt) {
    const double yc = y[c] / l;
    const double got = static_cast<double>(load_f(p.out[i * p.o_s0 + c * p.o_s2]));
    e2 += (got - yc) * (got - yc);
    y2 += yc * yc;
  }
  e2 = support_dev::block_reduce<false>(e2, red);
  y2 = support_dev::block_reduce<false>(y2, red);
  if (t == 0) p.err[j] = isfinite(e2) ? (y2 > 0 ? sqrt(e2 / y2) : sqrt(e2)) : INFINITY;
}

template <class T>
void launch_support_estimate(const support_estimate_params<T>& p, cudaStream_t stream) {
  using D = device_type_t<T>;
  if (p.samples <= 0) return;
  support_estimate_params<D> dp;
  dp.q = as_device(p.q);
  dp.k = as_device(p.k);
  dp.v = as_device(p.v);
  dp.out = as_device(p.out);
  dp.q_s0 = p.q_s0, dp.q_s2 = p.q_s2, dp.k_s0 = p.k_s0, dp.k_s2 = p.k_s2;
  dp.v_s0 = p.v_s0, dp.v_s2 = p.v_s2, dp.o_s0 = p.o_s0, dp.o_s2 = p.o_s2;
  dp.n_q = p.n_q, dp.n_kv = p.n_kv, dp.d = p.d, dp.dv = p.dv, dp.samples = p.samples;
  dp.causal_offset = p.causal_offset;
  dp.causal = p.causal;
  dp.scale = p.scale;
  dp.rows = p.rows;
  dp.n_rows = p.n_rows;
  dp.y = p.y;
  dp.err = p.err;
  support_estimate_kernel<D>
      <<<static_cast<unsigned>(p.samples), support_kernel_traits::estimate_threads, 0, stream>>>(dp);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------------
// fp32 kernels.

#define BASISATTN_SUPPORT_GRID_LOOP(e, n)                                                    \
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < (n); \
       e += static_cast<long long>(gridDim.x) * blockDim.x)

__global__ void support_gather_cm_kernel(const float* __restrict__ src, long long ld, long long row0, long long nrows,
                                         long long cols, float mult, float* __restrict__ dst) {
  BASISATTN_SUPPORT_GRID_LOOP(e, nrows * cols) {
    const long long c = e / nrows, i = e - c * nrows;
    dst[e] = mult * src[(row0 + i) * ld + c];
  }
}

void launch_support_gather_cm(const float* src, index_t ld, index_t row0, index_t nrows, index_t cols, float mult,
                              float* dst, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (nrows <= 0 || cols <= 0) return;
  support_gather_cm_kernel<<<grid_for(nrows * cols, tr::threads), tr::threads, 0, stream>>>(src, ld, row0, nrows, cols,
                                                                                            mult, dst);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_features_base_kernel(const float* __restrict__ x, long long nb, long long d,
                                             float* __restrict__ phi) {
  BASISATTN_SUPPORT_GRID_LOOP(e, nb * (d + 1)) phi[e] = e < nb ? 1.0f : x[e - nb];
}

void launch_support_features_base(const float* x, index_t nb, index_t d, float* phi, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (nb <= 0) return;
  support_features_base_kernel<<<grid_for(nb * (d + 1), tr::threads), tr::threads, 0, stream>>>(x, nb, d, phi);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_monomials_kernel(const float* __restrict__ x, long long nb,
                                         const long long* __restrict__ parent, const long long* __restrict__ var,
                                         const double* __restrict__ ratio, long long c0, long long c1, float* phi) {
  BASISATTN_SUPPORT_GRID_LOOP(e, nb * (c1 - c0)) {
    const long long c = c0 + e / nb, i = e - (c - c0) * nb;
    phi[c * nb + i] = phi[parent[c] * nb + i] * x[var[c] * nb + i] * static_cast<float>(ratio[c]);
  }
}

void launch_support_monomials(const float* x, index_t nb, const index_t* parent, const index_t* var,
                              const double* ratio, index_t c0, index_t c1, float* phi, cudaStream_t stream) {
  using tr = support_kernel_traits;
  static_assert(sizeof(index_t) == sizeof(long long), "index_t is 64-bit");
  if (nb <= 0 || c1 <= c0) return;
  support_monomials_kernel<<<grid_for(nb * (c1 - c0), tr::threads), tr::threads, 0, stream>>>(
      x, nb, reinterpret_cast<const long long*>(parent), reinterpret_cast<const long long*>(var), ratio, c0, c1, phi);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_mul_kernel(float* __restrict__ a, const float* __restrict__ b, long long n) {
  BASISATTN_SUPPORT_GRID_LOOP(e, n) a[e] *= b[e];
}

void launch_support_mul(float* a, const float* b, index_t n, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (n <= 0) return;
  support_mul_kernel<<<grid_for(n, tr::threads), tr::threads, 0, stream>>>(a, b, n);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_scale_features_kernel(const float* __restrict__ phi, long long nb, long long w,
                                              const std::uint8_t* __restrict__ qb, const double* __restrict__ coef,
                                              int nl, int g, int bk, const int* __restrict__ degree_of,
                                              float* __restrict__ psi) {
  BASISATTN_SUPPORT_GRID_LOOP(e, nb * w) {
    const long long c = e / nb, i = e - c * nb;
    const float cf = static_cast<float>(coef[(static_cast<long long>(qb[i]) * nl + bk) * (g + 1) + degree_of[c]]);
    psi[e] = cf == 0.0f ? 0.0f : phi[e] * cf;  // rows in R (zero coefficients) stay 0 even for huge features
  }
}

void launch_support_scale_features(const float* phi, index_t nb, index_t w, const std::uint8_t* qb, const double* coef,
                                   int nl, int g, int bk, const int* degree_of, float* psi, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (nb <= 0 || w <= 0) return;
  support_scale_features_kernel<<<grid_for(nb * w, tr::threads), tr::threads, 0, stream>>>(phi, nb, w, qb, coef, nl, g,
                                                                                           bk, degree_of, psi);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_key_values_kernel(const float* __restrict__ V, long long k0, long long nk, long long dv,
                                          const std::uint8_t* __restrict__ kb, int bk, float* __restrict__ vx) {
  BASISATTN_SUPPORT_GRID_LOOP(e, nk * (dv + 1)) {
    const long long c = e / nk, j = e - c * nk;
    const bool in = bk < 0 || kb[j] == bk;
    vx[e] = !in ? 0.0f : (c == dv ? 1.0f : V[(k0 + j) * dv + c]);
  }
}

void launch_support_key_values(const float* V, index_t k0, index_t nk, index_t dv, const std::uint8_t* kb, int bk,
                               float* vx, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (nk <= 0) return;
  support_key_values_kernel<<<grid_for(nk * (dv + 1), tr::threads), tr::threads, 0, stream>>>(V, k0, nk, dv, kb, bk,
                                                                                              vx);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_block_poly_kernel(float* __restrict__ s, long long ni, long long nk, long long i0, long long k0,
                                          long long off, const std::uint8_t* __restrict__ qb,
                                          const std::uint8_t* __restrict__ kb, const double* __restrict__ coef, int nl,
                                          int g) {
  BASISATTN_SUPPORT_GRID_LOOP(e, ni * nk) {
    const long long j = e / ni, i = e - j * ni;
    const int bk = kb[j];
    float r = 0.0f;
    if (k0 + j <= i0 + i + off && bk < nl && qb[i] < nl)
      r = support_dev::horner_f(coef + (static_cast<long long>(qb[i]) * nl + bk) * (g + 1), g, s[e]);
    s[e] = r;
  }
}

void launch_support_block_poly(float* s, index_t ni, index_t nk, index_t i0, index_t k0, index_t off,
                               const std::uint8_t* qb, const std::uint8_t* kb, const double* coef, int nl, int g,
                               cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (ni <= 0 || nk <= 0) return;
  support_block_poly_kernel<<<grid_for(ni * nk, tr::threads), tr::threads, 0, stream>>>(s, ni, nk, i0, k0, off, qb, kb,
                                                                                        coef, nl, g);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_scatter_poly_kernel(const float* __restrict__ tmp, long long ni, long long i0, long long dv,
                                            float* __restrict__ num, float* __restrict__ dpoly) {
  BASISATTN_SUPPORT_GRID_LOOP(e, ni * (dv + 1)) {
    const long long c = e / ni, i = e - c * ni;
    if (c < dv)
      num[(i0 + i) * dv + c] = tmp[e];
    else
      dpoly[i0 + i] = tmp[e];
  }
}

void launch_support_scatter_poly(const float* tmp, index_t ni, index_t i0, index_t dv, float* num, float* dpoly,
                                 cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (ni <= 0) return;
  support_scatter_poly_kernel<<<grid_for(ni * (dv + 1), tr::threads), tr::threads, 0, stream>>>(tmp, ni, i0, dv, num,
                                                                                                dpoly);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_init_kernel(const std::uint8_t* __restrict__ qb, const double* __restrict__ shift, int nl,
                                    long long n_q, long long dv, float* __restrict__ num, float* __restrict__ dpoly,
                                    float* __restrict__ m) {
  BASISATTN_SUPPORT_GRID_LOOP(e, n_q * dv) num[e] = 0.0f;
  BASISATTN_SUPPORT_GRID_LOOP(i, n_q) {
    dpoly[i] = 0.0f;
    m[i] = qb[i] < nl ? static_cast<float>(shift[qb[i]]) : -INFINITY;
  }
}

void launch_support_init(const std::uint8_t* qb, const double* shift, int nl, index_t n_q, index_t dv, float* num,
                         float* dpoly, float* m, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (n_q <= 0) return;
  support_init_kernel<<<grid_for(n_q * dv, tr::threads), tr::threads, 0, stream>>>(qb, shift, nl, n_q, dv, num, dpoly,
                                                                                   m);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

/// Rows after the polynomial part (header comment of support_launch.hpp, launch_support_post_poly).
__global__ void support_post_poly_kernel(const std::uint8_t* __restrict__ qb, int nl,
                                         const long long* __restrict__ kpre, long long n_q, long long n_kv,
                                         long long dv, bool causal, long long off, float* __restrict__ num,
                                         float* __restrict__ dpoly, float* __restrict__ m, int* __restrict__ flags) {
  BASISATTN_SUPPORT_GRID_LOOP(i, n_q) {
    int f = 0;
    if (qb[i] < nl) {
      const long long vis = causal ? (i + off + 1 < n_kv ? i + off + 1 : n_kv) : n_kv;
      if (kpre[vis] == 0) {
        m[i] = -INFINITY;  // no visible polynomial key: the exact part's online max starts fresh
      } else {
        const float dp = dpoly[i];
        bool bad = !(dp >= FLT_MIN) || !isfinite(dp);
        for (long long c = 0; c < dv && !bad; ++c) bad = !isfinite(num[i * dv + c]);
        if (bad) {
          f = 2;
        } else {  // the same value num e^m with dpoly = 1
          m[i] += logf(dp);
          for (long long c = 0; c < dv; ++c) num[i * dv + c] /= dp;
          dpoly[i] = 1.0f;
          f = 1;
        }
      }
    }
    flags[i] = f;
  }
}

void launch_support_post_poly(const std::uint8_t* qb, int nl, const index_t* kpre, index_t n_q, index_t n_kv,
                              index_t dv, bool causal, index_t off, float* num, float* dpoly, float* m, int* flags,
                              cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (n_q <= 0) return;
  support_post_poly_kernel<<<grid_for(n_q, tr::threads), tr::threads, 0, stream>>>(
      qb, nl, reinterpret_cast<const long long*>(kpre), n_q, n_kv, dv, causal, off, num, dpoly, m, flags);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

/// One warp per query row; lane t scores key t of each chunk of 32 keys; the row's (m, den, num) are
/// updated flash-style in place (num in global memory, columns spread over the lanes).
__global__ void __launch_bounds__(32 * support_kernel_traits::exact_warps)
    support_exact_kernel(support_exact_params p) {
  const long long warps_total = static_cast<long long>(gridDim.x) * support_kernel_traits::exact_warps;
  const int lane = threadIdx.x & 31;
  const long long first = static_cast<long long>(blockIdx.x) * support_kernel_traits::exact_warps + (threadIdx.x >> 5);
  const long long* const ckeys = reinterpret_cast<const long long*>(p.ckeys);
  for (long long i = first; i < p.n_q; i += warps_total) {  // warp-uniform
    if (p.mode == 0 && p.flags[i] == 2) continue;           // bad after the polynomial part: recomputed in mode 1
    if (p.mode == 1 && p.flags[i] != 3) continue;
    float* const num = p.num + i * p.dv;
    float mrow, l;
    if (p.mode == 0) {
      mrow = p.m[i];
      l = p.dpoly[i];
    } else {
      mrow = -INFINITY;
      l = 0.0f;
      for (long long c = lane; c < p.dv; c += 32) num[c] = 0.0f;
    }
    const bool all = p.mode != 0 || p.qb[i] == p.nl;
    const long long pos = p.causal ? i + p.causal_offset : p.n_kv;  // last visible key (causal)
    const long long count = all ? (p.causal ? (pos + 1 < p.n_kv ? pos + 1 : p.n_kv) : p.n_kv) : p.n_ckeys;
    const float* const qrow = p.Q + i * p.d;
    for (long long t0 = 0; t0 < count; t0 += 32) {
      const long long t = t0 + lane;
      long long key = -1;
      if (t < count) key = all ? t : ckeys[t];
      const bool visible = key >= 0 && (!p.causal || key <= pos);
      // keys in C are ascending: once the chunk's first key is past the diagonal, so are the rest
      const long long head = __shfl_sync(0xffffffffu, key, 0);
      if (p.causal && head > pos) break;  // warp-uniform
      float s = -INFINITY;
      if (visible) {
        const float* const krow = p.K + key * p.d;
        float acc = 0.0f;
        for (long long c = 0; c < p.d; ++c) acc = fmaf(p.scale * qrow[c], krow[c], acc);
        s = acc;
      }
      const float tile_max = support_dev::warp_max_f(s);
      if (tile_max == -INFINITY) continue;  // warp-uniform
      const float m_new = fmaxf(mrow, tile_max);
      const float alpha = expf(mrow - m_new);
      const float pj = visible ? expf(s - m_new) : 0.0f;
      l = alpha * l + support_dev::warp_sum_f(pj);
      mrow = m_new;
      for (long long c0 = 0; c0 < p.dv; c0 += 32) {  // uniform trip count: every lane takes part in the shuffles
        const long long c = c0 + lane;
        float acc = c < p.dv ? num[c] * alpha : 0.0f;
        for (int jj = 0; jj < 32; ++jj) {
          const float pjj = __shfl_sync(0xffffffffu, pj, jj);
          const long long kj = __shfl_sync(0xffffffffu, key, jj);
          if (c < p.dv && pjj != 0.0f) acc = fmaf(pjj, p.V[kj * p.dv + c], acc);
        }
        if (c < p.dv) num[c] = acc;
      }
    }
    __syncwarp();  // every lane has read flags[i] before lane 0 may rewrite it
    if (lane == 0) {
      p.m[i] = mrow;
      p.den[i] = l;
      if (p.mode == 1) p.flags[i] = 2;
    }
  }
}

void launch_support_exact(const support_exact_params& p, cudaStream_t stream) {
  constexpr int warps = support_kernel_traits::exact_warps;
  if (p.n_q <= 0) return;
  const long long blocks = (p.n_q + warps - 1) / warps;
  const unsigned grid = static_cast<unsigned>(blocks < 65535LL * 16 ? blocks : 65535LL * 16);
  support_exact_kernel<<<grid, 32 * warps, 0, stream>>>(p);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_detect_kernel(const float* __restrict__ den, const float* __restrict__ num, long long n_q,
                                      long long dv, int* __restrict__ flags, unsigned long long* count) {
  BASISATTN_SUPPORT_GRID_LOOP(i, n_q) {
    const float dd = den[i];
    bool bad = flags[i] == 2 || !(dd >= FLT_MIN) || !isfinite(dd);
    for (long long c = 0; c < dv && !bad; ++c) bad = !isfinite(num[i * dv + c]);
    if (bad) {
      flags[i] = 3;
      atomicAdd(count, 1ull);
    }
  }
}

void launch_support_detect(const float* den, const float* num, index_t n_q, index_t dv, int* flags,
                           unsigned long long* count, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (n_q <= 0) return;
  support_detect_kernel<<<grid_for(n_q, tr::threads), tr::threads, 0, stream>>>(den, num, n_q, dv, flags, count);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_check_output_kernel(const float* __restrict__ num, const float* __restrict__ den, long long n_q,
                                            long long dv, int* __restrict__ flags, unsigned long long* count) {
  BASISATTN_SUPPORT_GRID_LOOP(i, n_q) {
    if (flags[i] >= 2) continue;      // already recomputed exactly
    const float inv = 1.0f / den[i];  // as support_store_kernel
    bool finite = true;
    for (long long c = 0; c < dv && finite; ++c) finite = isfinite(num[i * dv + c] * inv);
    if (!finite) {
      flags[i] = 3;
      atomicAdd(count, 1ull);
    }
  }
}

void launch_support_check_output(const float* num, const float* den, index_t n_q, index_t dv, int* flags,
                                 unsigned long long* count, cudaStream_t stream) {
  using tr = support_kernel_traits;
  if (n_q <= 0) return;
  support_check_output_kernel<<<grid_for(n_q, tr::threads), tr::threads, 0, stream>>>(num, den, n_q, dv, flags, count);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

/// One block: an inclusive scan of (flags == 1) per chunk of blockDim.x rows.
__global__ void support_compact_kernel(const int* __restrict__ flags, long long n_q, long long* __restrict__ rows,
                                       unsigned long long* __restrict__ count) {
  constexpr int nt = support_kernel_traits::threads;
  __shared__ long long sc[nt];
  const int t = threadIdx.x;
  long long base = 0;
  for (long long c0 = 0; c0 < n_q; c0 += nt) {
    const long long i = c0 + t;
    const long long v = (i < n_q && flags[i] == 1) ? 1 : 0;
    sc[t] = v;
    __syncthreads();
    for (int o = 1; o < nt; o <<= 1) {
      const long long add = t >= o ? sc[t - o] : 0;
      __syncthreads();
      sc[t] += add;
      __syncthreads();
    }
    if (v) rows[base + sc[t] - 1] = i;
    base += sc[nt - 1];
    __syncthreads();  // sc is rewritten by the next chunk
  }
  if (t == 0) *count = static_cast<unsigned long long>(base);
}

void launch_support_compact(const int* flags, index_t n_q, index_t* rows, unsigned long long* count,
                            cudaStream_t stream) {
  using tr = support_kernel_traits;
  support_compact_kernel<<<1, tr::threads, 0, stream>>>(flags, n_q, reinterpret_cast<long long*>(rows), count);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

__global__ void support_summarize_kernel(const double* __restrict__ err, long long samples,
                                         const unsigned long long* __restrict__ n_rows, double* __restrict__ summary) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const long long na = static_cast<long long>(*n_rows);
  const long long s = samples < na ? samples : na;
  if (s == 0) {  // no approximated row: every row was exact
    summary[0] = summary[1] = 0;
    return;
  }
  double mx = 0, sum = 0;
  for (long long j = 0; j < s; ++j) {
    mx = fmax(mx, err[j]);
    sum += err[j];
  }
  summary[0] = mx;
  summary[1] = sum / static_cast<double>(s);
}

void launch_support_summarize(const double* err, index_t samples, const unsigned long long* n_rows, double* summary,
                              cudaStream_t stream) {
  if (samples <= 0) return;
  support_summarize_kernel<<<1, 1, 0, stream>>>(err, samples, n_rows, summary);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

#undef BASISATTN_SUPPORT_GRID_LOOP

#define BASISATTN_INSTANTIATE_SUPPORT_KERNELS(T)                                                                  \
  template void launch_support_load_head<T>(const T*, index_t, index_t, index_t, index_t, float*, cudaStream_t);  \
  template void launch_support_store<T>(const float*, const float*, index_t, index_t, T*, index_t, index_t,       \
                                        const int*, cudaStream_t);                                                \
  template void launch_support_count_nonfinite<T>(const T*, index_t, index_t, index_t, index_t, index_t, index_t, \
                                                  unsigned long long*, cudaStream_t);                             \
  template void launch_support_estimate<T>(const support_estimate_params<T>&, cudaStream_t);

BASISATTN_INSTANTIATE_SUPPORT_KERNELS(float)
BASISATTN_INSTANTIATE_SUPPORT_KERNELS(Eigen::half)
BASISATTN_INSTANTIATE_SUPPORT_KERNELS(Eigen::bfloat16)

#undef BASISATTN_INSTANTIATE_SUPPORT_KERNELS

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
