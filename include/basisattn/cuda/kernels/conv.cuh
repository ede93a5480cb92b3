// basisattn/cuda/kernels/conv.cuh - internal: the kernels of conv-basis attention on the GPU (nvcc only).
//
// Definitions of the launch_conv_* functions declared in <basisattn/cuda/kernel_launch.hpp>; the
// algorithm they implement, and the layout of the buffers in conv_head_params, are described in
// <basisattn/cuda/conv.hpp>. Everything is double except the FFT buffers (Real = double, or float
// behind the dynamic-range check). Correctness first: simple grid-stride loops, one block per segment
// for the scans, one block per row for the direct (repair / exact) rows; the FFTs are cuFFT's.
//
//   conv_checksum_kernel     one block per head: index-weighted sum (and |.| sum) of q or k, NaN/Inf count
//   conv_load_values_kernel  one thread per row: v of one kv head -> double, channel-major; row norms; max|v|
//   conv_scan_kernel         one block per segment: exclusive prefix sums of vrow (segment -1) or
//                            P = prefix sums of exp(u - g) of one item, plus its bound constants
//   conv_item_max_kernel     one block per item: its largest kernel entry
//   conv_rows_kernel         one thread per row: denominator and bound, summed over the items
//   conv_fill / multiply / gather kernels   grid-stride loops around the batched cuFFT transforms
//   conv_finalize_kernel     one thread per row: num / den or a repair flag
//   conv_direct_row_kernel   one block per row: softmax-weighted average of vd with logits from the
//                            basis (repair) or from q . k (sampled exact rows), two passes
#pragma once

#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/kernel_launch.hpp>
#include <basisattn/cuda/kernels/common.cuh>

#include <cfloat>
#include <cmath>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

/// Element strides of a [n, heads, d] tensor, by value (kernel argument).
struct conv_strides {
  long long s[3];
};
inline conv_strides make_conv_strides(const long long* s) { return conv_strides{{s[0], s[1], s[2]}}; }

/// Threads per block of every conv kernel (the block reductions assume it).
constexpr int conv_threads = 256;

__device__ __forceinline__ double conv_warp_sum(double x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ double conv_warp_max(double x) {
  for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

/// Sum (max when is_max) over the block of conv_threads threads; every thread gets the result.
/// `scratch` holds conv_threads / 32 + 1 doubles of shared memory.
template <bool is_max>
__device__ double conv_block_reduce(double x, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = is_max ? conv_warp_max(x) : conv_warp_sum(x);
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    double y = lane < conv_threads / 32 ? scratch[lane] : (is_max ? -INFINITY : 0.0);
    y = is_max ? conv_warp_max(y) : conv_warp_sum(y);
    if (lane == 0) scratch[conv_threads / 32] = y;
  }
  __syncthreads();
  return scratch[conv_threads / 32];
}

/// Inclusive scan of x over the block; every thread gets its prefix and *total the block's sum.
__device__ double conv_block_scan(double x, double* scratch, double* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    double y = lane < conv_threads / 32 ? scratch[lane] : 0.0;
    for (int o = 1; o < 32; o <<= 1) {
      const double z = __shfl_up_sync(0xffffffffu, y, o);
      if (lane >= o) y += z;
    }
    if (lane < conv_threads / 32) scratch[lane] = y;  // inclusive prefix of the warp sums
  }
  __syncthreads();
  if (warp > 0) x += scratch[warp - 1];
  *total = scratch[conv_threads / 32 - 1];
  return x;
}

/// Largest non-negative double (or NaN) seen so far, kept as its bits (which order like the values).
__device__ __forceinline__ void conv_atomic_max_nonneg(unsigned long long* bits, double x) {
  atomicMax(bits, static_cast<unsigned long long>(__double_as_longlong(x)));
}

// ---- checksums ------------------------------------------------------------------------------------

template <class D>
__global__ void __launch_bounds__(conv_threads)
    conv_checksum_kernel(const D* __restrict__ x, long long n, long long d, conv_strides st, double* sum,
                         double* abs_sum, unsigned long long* nonfinite) {
  __shared__ double scratch[conv_threads / 32 + 1];
  const long long h = blockIdx.x, total = n * d;
  double s = 0, a = 0;
  unsigned long long bad = 0;
  for (long long e = threadIdx.x; e < total; e += conv_threads) {
    const long long i = e / d, c = e - i * d;
    const double v = static_cast<double>(load_f(x[i * st.s[0] + h * st.s[1] + c * st.s[2]]));
    // the weight of basisattn::detail::head_checksum (<basisattn/core/eigen.hpp>)
    const unsigned long long hsh = (static_cast<unsigned long long>(i) * 0x9E3779B97F4A7C15ull) ^
                                   (static_cast<unsigned long long>(c + 1) * 0xC2B2AE3D27D4EB4Full);
    const double w = 0.5 + static_cast<double>(hsh >> 40) / static_cast<double>(1ull << 24);
    s += v * w;
    a += fabs(v * w);
    if (!isfinite(v)) ++bad;
  }
  s = conv_block_reduce<false>(s, scratch);
  a = conv_block_reduce<false>(a, scratch);
  if (threadIdx.x == 0) {
    sum[h] = s;
    abs_sum[h] = a;
  }
  if (bad) atomicAdd(nonfinite, bad);
}

template <class T>
void launch_conv_checksum(const T* x, long long n, long long heads, long long d, const long long* stride, double* sum,
                          double* abs_sum, unsigned long long* nonfinite, cudaStream_t stream) {
  if (heads <= 0) return;
  conv_checksum_kernel<<<static_cast<unsigned>(heads), conv_threads, 0, stream>>>(
      as_device(x), n, d, make_conv_strides(stride), sum, abs_sum, nonfinite);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

// ---- values ---------------------------------------------------------------------------------------

template <class D>
__global__ void __launch_bounds__(conv_threads)
    conv_load_values_kernel(conv_head_params p, const D* __restrict__ v, long long hk, conv_strides st) {
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; r < p.n;
       r += static_cast<long long>(gridDim.x) * blockDim.x) {
    double n2 = 0, m = 0;
    for (long long j = 0; j < p.d_v; ++j) {
      const double x = static_cast<double>(load_f(v[r * st.s[0] + hk * st.s[1] + j * st.s[2]]));
      p.vd[j * p.n + r] = x;
      n2 += x * x;
      m = fmax(m, fabs(x));
    }
    p.vrow[r] = n2;
    conv_atomic_max_nonneg(p.vmax_bits, m);
  }
}

template <class T>
void launch_conv_load_values(const conv_head_params& p, const T* v, long long hk, const long long* stride,
                             cudaStream_t stream) {
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(p.vmax_bits, 0, sizeof(unsigned long long), stream));
  conv_load_values_kernel<<<grid_for(p.n, conv_threads), conv_threads, 0, stream>>>(p, as_device(v), hk,
                                                                                    make_conv_strides(stride));
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

// ---- per-head prefix sums -------------------------------------------------------------------------

__global__ void __launch_bounds__(conv_threads) conv_item_max_kernel(conv_head_params p) {
  __shared__ double scratch[conv_threads / 32 + 1];
  const conv_item it = p.items[blockIdx.x];
  const long long L = p.n - it.s0, t0 = it.upper ? 1 : 0;
  const double* u = p.kernels + it.koff;
  double m = -INFINITY;
  for (long long t = t0 + threadIdx.x; t < L; t += conv_threads) m = fmax(m, u[t]);
  m = conv_block_reduce<true>(m, scratch);
  if (threadIdx.x == 0) p.item_max[blockIdx.x] = m;
}

/// Block b < n_items: the item's prefix sums and bound constants; block n_items: vrow's prefix sums.
/// (vrow's are needed by the bound constants: the launcher runs the vrow block first, separately.)
__global__ void __launch_bounds__(conv_threads) conv_scan_kernel(conv_head_params p, int vrow_only) {
  __shared__ double scratch[conv_threads / 32 + 1];
  __shared__ double carry;
  if (vrow_only) {  // exclusive prefix sums of the n squared row norms, in place; vrow[n] = total
    if (threadIdx.x == 0) carry = 0;
    for (long long t0 = 0; t0 < p.n; t0 += conv_threads) {
      const long long t = t0 + threadIdx.x;
      const double x = t < p.n ? p.vrow[t] : 0.0;
      double tot;
      const double inc = conv_block_scan(x, scratch, &tot);
      const double c = carry;
      if (t < p.n) p.vrow[t] = c + inc - x;
      __syncthreads();
      if (threadIdx.x == 0) carry = c + tot;
      __syncthreads();
    }
    if (threadIdx.x == 0) p.vrow[p.n] = carry;
    return;
  }
  double g = -INFINITY;  // the global shift: the largest entry of every kernel of the head
  for (int i = 0; i < p.n_items; ++i) g = fmax(g, p.item_max[i]);
  const conv_item it = p.items[blockIdx.x];
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.shift = g;
  const long long L = p.n - it.s0, t_first = it.upper ? 1 : 0;
  const double* u = p.kernels + it.koff;
  double* P = p.prefix + it.poff;  // P[m] = sum_{t_first <= t < m} a[t], m in [0, L]
  if (threadIdx.x == 0) {
    carry = 0;
    P[0] = 0;
  }
  double sq = 0;
  for (long long t0 = 0; t0 < L; t0 += conv_threads) {
    const long long t = t0 + threadIdx.x;
    const double a = t < L && t >= t_first ? exp(u[t] - g) : 0.0;
    sq += a * a;
    double tot;
    const double inc = conv_block_scan(a, scratch, &tot);
    const double c = carry;
    if (t < L) P[t + 1] = c + inc;
    __syncthreads();
    if (threadIdx.x == 0) carry = c + tot;
    __syncthreads();
  }
  sq = conv_block_reduce<false>(sq, scratch);
  if (threadIdx.x == 0) {
    // ||V_block||_F: the rows the block's FFT reads (lower: [s0, e0); upper: [s0 + 1, n))
    const long long r0 = it.upper ? it.s0 + 1 : it.s0, r1 = it.upper ? p.n : it.e0;
    const double vn2 = fmax(0.0, p.vrow[r1] - p.vrow[r0]);
    double vmax = __longlong_as_double(static_cast<long long>(*p.vmax_bits));
    if (vmax == 0) vmax = 1;
    p.item_cnum[blockIdx.x] = log2(static_cast<double>(p.nf)) * sqrt(sq) * sqrt(vn2) / vmax;
    p.item_cden[blockIdx.x] = carry;
  }
}

void launch_conv_head_prefix(const conv_head_params& p, cudaStream_t stream) {
  conv_scan_kernel<<<1, conv_threads, 0, stream>>>(p, 1);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
  if (p.n_items <= 0) return;
  conv_item_max_kernel<<<static_cast<unsigned>(p.n_items), conv_threads, 0, stream>>>(p);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
  conv_scan_kernel<<<static_cast<unsigned>(p.n_items), conv_threads, 0, stream>>>(p, 0);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

// ---- denominators and bounds ----------------------------------------------------------------------

__global__ void __launch_bounds__(conv_threads) conv_rows_kernel(conv_head_params p) {
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; r < p.n;
       r += static_cast<long long>(gridDim.x) * blockDim.x) {
    double den = 0, bnd = 0;
    for (int i = 0; i < p.n_items; ++i) {
      const conv_item it = p.items[i];
      const double* P = p.prefix + it.poff;
      if (!it.upper) {  // row r sees lags [max(0, r - e0 + 1), r - s0] of a block with s0 <= r
        if (it.s0 > r) continue;
        const long long hi = r - it.s0, lo = r - it.e0 + 1 > 0 ? r - it.e0 + 1 : 0;
        den += P[hi + 1] - P[lo];
      } else {  // a row r in [s0, e0) sees lags 1 .. n - 1 - r
        if (r < it.s0 || r >= it.e0) continue;
        const long long top = p.n - 1 - r;
        if (top >= 1) den += P[top + 1];
      }
      bnd += p.item_cnum[i] + p.item_cden[i];
    }
    p.den[r] = den;
    p.bnd[r] = bnd;
    if (den > 0 && isfinite(den)) conv_atomic_max_nonneg(p.ratio_bits, bnd / den);
  }
}

void launch_conv_rows(const conv_head_params& p, cudaStream_t stream) {
  BASISATTN_CUDA_CHECK(cudaMemsetAsync(p.ratio_bits, 0, sizeof(unsigned long long), stream));
  conv_rows_kernel<<<grid_for(p.n, conv_threads), conv_threads, 0, stream>>>(p);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

// ---- FFT numerators -------------------------------------------------------------------------------

template <class Real>
__global__ void __launch_bounds__(conv_threads)
    conv_fill_kernel(conv_head_params p, int item0, int count, Real* __restrict__ buf) {
  const long long S = p.signal, total = static_cast<long long>(count) * (p.d_v + 1) * S;
  const double g = *p.shift;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long sig = e / S, t = e - sig * S;
    double x = 0;
    if (sig < count) {  // kernel signal: a[t] = exp(u[t] - g), t in [t0, L)
      const conv_item it = p.items[item0 + sig];
      const long long L = p.n - it.s0;
      if (t < L && t >= (it.upper ? 1 : 0)) x = exp(p.kernels[it.koff + t] - g);
    } else {  // value signal of channel j: lower v[s0 + t], t < e0 - s0; upper v[s0 + t], t < L
      const long long vs = sig - count, local = vs / p.d_v, j = vs - local * p.d_v;
      const conv_item it = p.items[item0 + local];
      const long long len = it.upper ? p.n - it.s0 : it.e0 - it.s0;
      if (t < len) x = p.vd[j * p.n + it.s0 + t];
    }
    buf[e] = static_cast<Real>(x);
  }
}

template <class Real>
__global__ void __launch_bounds__(conv_threads)
    conv_multiply_kernel(conv_head_params p, int item0, int count, Real* __restrict__ buf) {
  const long long bins = p.nf / 2 + 1, S = p.signal;
  const long long total = static_cast<long long>(count) * p.d_v * bins;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long vs = e / bins, f = e - vs * bins, local = vs / p.d_v;
    const Real* a = buf + local * S + 2 * f;
    Real* x = buf + (count + vs) * S + 2 * f;
    const Real ar = a[0], ai = p.items[item0 + local].upper ? -a[1] : a[1];  // upper: correlation (conjugate)
    const Real xr = x[0], xi = x[1];
    x[0] = xr * ar - xi * ai;
    x[1] = xr * ai + xi * ar;
  }
}

template <class Real>
__global__ void __launch_bounds__(conv_threads)
    conv_gather_kernel(conv_head_params p, int item0, int count, const Real* __restrict__ buf) {
  const long long total = p.n * p.d_v, S = p.signal;
  const double inv = 1.0 / static_cast<double>(p.nf);  // cuFFT's inverse is unnormalised
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long j = e / p.n, r = e - j * p.n;
    double acc = 0;
    for (int l = 0; l < count; ++l) {
      const conv_item it = p.items[item0 + l];
      // lower: convolution output t = r - s0 < n - s0 for every row r >= s0;
      // upper: correlation output rho = r - s0 for the block's own rows [s0, e0)
      if (r < it.s0 || (it.upper && r >= it.e0)) continue;
      acc += static_cast<double>(buf[(count + static_cast<long long>(l) * p.d_v + j) * S + (r - it.s0)]);
    }
    p.num[j * p.n + r] += acc * inv;
  }
}

template <class Real>
void launch_conv_fill(const conv_head_params& p, int item0, int count, Real* buf, cudaStream_t stream) {
  const long long total = static_cast<long long>(count) * (p.d_v + 1) * p.signal;
  conv_fill_kernel<Real><<<grid_for(total, conv_threads), conv_threads, 0, stream>>>(p, item0, count, buf);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class Real>
void launch_conv_multiply(const conv_head_params& p, int item0, int count, Real* buf, cudaStream_t stream) {
  const long long total = static_cast<long long>(count) * p.d_v * (p.nf / 2 + 1);
  conv_multiply_kernel<Real><<<grid_for(total, conv_threads), conv_threads, 0, stream>>>(p, item0, count, buf);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class Real>
void launch_conv_gather(const conv_head_params& p, int item0, int count, const Real* buf, cudaStream_t stream) {
  conv_gather_kernel<Real><<<grid_for(p.n * p.d_v, conv_threads), conv_threads, 0, stream>>>(p, item0, count, buf);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

// ---- outputs --------------------------------------------------------------------------------------

template <class D>
__global__ void __launch_bounds__(conv_threads)
    conv_finalize_kernel(conv_head_params p, double eps, double tol, D* __restrict__ out, long long h,
                         conv_strides st) {
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; r < p.n;
       r += static_cast<long long>(gridDim.x) * blockDim.x) {
    const double den = p.den[r];
    const double bound = eps * p.bnd[r] / den;
    bool ok = den > 0 && isfinite(den) && bound <= tol;
    if (ok) {
      for (long long j = 0; j < p.d_v; ++j) {
        const double y = p.num[j * p.n + r] / den;
        ok = ok && isfinite(y);
        p.num[j * p.n + r] = y;
        out[r * st.s[0] + h * st.s[1] + j * st.s[2]] = store_double<D>(y);
      }
    }
    p.flags[r] = ok ? 0 : 1;  // a flagged row is rewritten in full by the repair kernel
    if (ok)
      conv_atomic_max_nonneg(p.worst_bits, bound);
    else
      atomicAdd(p.repaired, 1ull);
  }
}

/// Lower block of column c: the last lower item with s0 <= c (items 0 .. n_lower - 1, ascending).
__device__ __forceinline__ int conv_lower_block(const conv_head_params& p, long long c) {
  int lo = 0, hi = p.n_lower - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.items[mid].s0 <= c)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

/// The logit the basis assigns to (r, c); `up` is the upper item of row r (or -1).
__device__ __forceinline__ double conv_basis_logit(const conv_head_params& p, long long r, long long c, int up) {
  if (c <= r) {
    const conv_item it = p.items[conv_lower_block(p, c)];
    return p.kernels[it.koff + (r - c)];
  }
  return p.kernels[p.items[up].koff + (c - r)];
}

/// One block per row (grid-stride): mode 0 repairs the flagged rows from the basis (writes out and
/// num); mode 1 computes sampled row rows[b] exactly from q . k and compares it with num.
/// Shared memory (dynamic): tile weights, y, the uniform mean, the query row.
template <class D>
__global__ void __launch_bounds__(conv_threads)
    conv_direct_row_kernel(conv_head_params p, int mode, bool causal, D* __restrict__ out, long long h,
                           conv_strides ost, const D* __restrict__ q, conv_strides qst, const D* __restrict__ k,
                           conv_strides kst, long long hk, long long d_qk, double scale, const long long* rows,
                           int count, double* err, double* uerr) {
  extern __shared__ double sm[];
  double* w = sm;                                 // conv_threads tile weights
  double* y = w + conv_threads;                   // d_v
  double* yu = y + p.d_v;                         // d_v
  double* qr = yu + p.d_v;                        // d_qk (mode 1)
  double* scratch = qr + (mode == 1 ? d_qk : 0);  // conv_threads / 32 + 1
  const long long n_rows = mode == 0 ? p.n : count;
  for (long long b = blockIdx.x; b < n_rows; b += gridDim.x) {
    const long long r = mode == 0 ? b : rows[b];
    if (mode == 0 && p.flags[r] == 0) continue;  // block-uniform
    __syncthreads();                             // the previous row's shared data are consumed
    int up = -1;
    if (!causal)
      for (int i = p.n_lower; i < p.n_items; ++i)
        if (p.items[i].s0 <= r && r < p.items[i].e0) up = i;
    if (mode == 1)
      for (long long e = threadIdx.x; e < d_qk; e += conv_threads)
        qr[e] = static_cast<double>(load_f(q[r * qst.s[0] + h * qst.s[1] + e * qst.s[2]]));
    for (long long j = threadIdx.x; j < p.d_v; j += conv_threads) y[j] = yu[j] = 0;
    __syncthreads();
    auto logit = [&](long long c) {
      if (mode == 0) return conv_basis_logit(p, r, c, up);
      double dot = 0;
      for (long long e = 0; e < d_qk; ++e)
        dot += qr[e] * static_cast<double>(load_f(k[c * kst.s[0] + hk * kst.s[1] + e * kst.s[2]]));
      return scale * dot;
    };
    const long long c_end = causal ? r + 1 : p.n;
    double m = -INFINITY;
    for (long long c = threadIdx.x; c < c_end; c += conv_threads) m = fmax(m, logit(c));
    m = conv_block_reduce<true>(m, scratch);
    double den = 0;
    for (long long c0 = 0; c0 < c_end; c0 += conv_threads) {
      const long long c = c0 + threadIdx.x;
      const double wc = c < c_end ? exp(logit(c) - m) : 0.0;
      den += wc;
      __syncthreads();
      w[threadIdx.x] = wc;
      __syncthreads();
      const long long tile = c_end - c0 < conv_threads ? c_end - c0 : conv_threads;
      for (long long j = threadIdx.x; j < p.d_v; j += conv_threads) {
        const double* vj = p.vd + j * p.n + c0;
        double s = 0, su = 0;
        for (long long t = 0; t < tile; ++t) {
          s += w[t] * vj[t];
          su += vj[t];
        }
        y[j] += s;
        yu[j] += su;
      }
    }
    den = conv_block_reduce<false>(den, scratch);
    if (mode == 0) {
      for (long long j = threadIdx.x; j < p.d_v; j += conv_threads) {
        const double yj = y[j] / den;
        p.num[j * p.n + r] = yj;
        out[r * ost.s[0] + h * ost.s[1] + j * ost.s[2]] = store_double<D>(yj);
      }
      continue;
    }
    double ne = 0, de = 0, du = 0;
    for (long long j = threadIdx.x; j < p.d_v; j += conv_threads) {
      const double ye = y[j] / den, uj = yu[j] / static_cast<double>(c_end), got = p.num[j * p.n + r];
      ne += ye * ye;
      de += (got - ye) * (got - ye);
      du += (uj - ye) * (uj - ye);
    }
    ne = conv_block_reduce<false>(ne, scratch);
    de = conv_block_reduce<false>(de, scratch);
    du = conv_block_reduce<false>(du, scratch);
    if (threadIdx.x == 0) {
      err[b] = ne > 0 ? sqrt(de / ne) : sqrt(de);
      uerr[b] = ne > 0 ? sqrt(du / ne) : sqrt(du);
    }
  }
}

inline std::size_t conv_direct_row_smem(long long d_v, long long d_qk) {
  return sizeof(double) * static_cast<std::size_t>(conv_threads + 2 * d_v + d_qk + conv_threads / 32 + 1);
}

template <class T>
void launch_conv_finalize(const conv_head_params& p, double eps, double tol, T* out, long long h,
                          const long long* stride, cudaStream_t stream) {
  conv_finalize_kernel<<<grid_for(p.n, conv_threads), conv_threads, 0, stream>>>(p, eps, tol, as_device(out), h,
                                                                                 make_conv_strides(stride));
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void launch_conv_repair(const conv_head_params& p, bool causal, T* out, long long h, const long long* stride,
                        cudaStream_t stream) {
  using D = device_type_t<T>;
  const long long none[3] = {0, 0, 0};
  const unsigned grid = static_cast<unsigned>(p.n < 4096 ? p.n : 4096);
  conv_direct_row_kernel<D><<<grid, conv_threads, conv_direct_row_smem(p.d_v, 0), stream>>>(
      p, 0, causal, as_device(out), h, make_conv_strides(stride), nullptr, make_conv_strides(none), nullptr,
      make_conv_strides(none), 0, 0, 0.0, nullptr, 0, nullptr, nullptr);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void launch_conv_exact_rows(const conv_head_params& p, const T* q, const long long* q_stride, const T* k,
                            const long long* k_stride, long long h, long long hk, long long d_qk, double scale,
                            bool causal, const long long* rows, int count, double* err, double* uerr,
                            cudaStream_t stream) {
  using D = device_type_t<T>;
  if (count <= 0) return;
  const long long none[3] = {0, 0, 0};
  conv_direct_row_kernel<D><<<static_cast<unsigned>(count), conv_threads, conv_direct_row_smem(p.d_v, d_qk), stream>>>(
      p, 1, causal, static_cast<D*>(nullptr), h, make_conv_strides(none), as_device(q), make_conv_strides(q_stride),
      as_device(k), make_conv_strides(k_stride), hk, d_qk, scale, rows, count, err, uerr);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
