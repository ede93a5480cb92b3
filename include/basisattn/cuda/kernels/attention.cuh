// basisattn/cuda/kernels/attention.cuh - internal: exact streaming-softmax attention kernel (nvcc only).
//
// Definition of launch_attention (declared in <basisattn/cuda/kernel_launch.hpp>). Correctness first,
// not tuned: no tensor cores, fp32 arithmetic in CUDA cores.
//
// Grid: (ceil(n_q / block_q), h_q); one block of `warps` warps per (query tile, query head). The block
// keeps its scaled query tile in shared memory (fp32) and streams the key/value tiles of its kv head
// (h / group) through shared memory, block_kv keys at a time. Each warp owns block_q / warps query
// rows; per row and key tile, lane j scores key j, the warp reduces max and sum with shuffles, and
// the running (m, l, O) are updated as in flash attention: O = alpha O + P V with the output row
// spread over the lanes (d_v <= 32 * out_per_lane). Key tiles entirely above the causal diagonal of
// the block's last row are never loaded; causal masking is end-aligned (key j visible to query i
// when j <= i + n_kv - n_q).
#pragma once

#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/kernel_launch.hpp>
#include <basisattn/cuda/kernels/common.cuh>

#include <cfloat>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {

/// Tile sizes of the attention kernel.
struct attention_kernel_traits {
  static constexpr int warps = 4;
  static constexpr int threads = 32 * warps;
  static constexpr int block_q = 16;                     ///< query rows per block
  static constexpr int rows_per_warp = block_q / warps;  ///< query rows per warp
  static constexpr int block_kv = 32;                    ///< keys per tile: one per lane
  static constexpr int out_per_lane = (attention_kernel_max_dim + 31) / 32;
  static_assert(block_q % warps == 0, "query rows must split evenly over the warps");
  static_assert(block_kv == 32, "one key per lane");

  /// Dynamic shared memory: q tile, k tile (rows padded by one float against bank conflicts), v tile.
  static std::size_t smem_bytes(long long d_qk, long long d_v) {
    return sizeof(float) * static_cast<std::size_t>(block_q * d_qk + block_kv * (d_qk + 1) + block_kv * d_v);
  }
};

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class D>
__global__ void __launch_bounds__(attention_kernel_traits::threads)
    attention_kernel(const D* __restrict__ q, const D* __restrict__ k, const D* __restrict__ v, D* __restrict__ out,
                     attention_kernel_params<D> p) {
  using tr = attention_kernel_traits;
  extern __shared__ float smem[];
  const long long d_qk = p.d_qk, d_v = p.d_v;
  float* const qs = smem;                            // block_q x d_qk
  float* const ks = qs + tr::block_q * d_qk;         // block_kv x (d_qk + 1)
  float* const vs = ks + tr::block_kv * (d_qk + 1);  // block_kv x d_v
  const long long h = blockIdx.y, hk = h / p.group;
  const long long q0 = static_cast<long long>(blockIdx.x) * tr::block_q;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (long long i = tid; i < tr::block_q * d_qk; i += tr::threads) {
    const long long r = i / d_qk, c = i - r * d_qk, qi = q0 + r;
    qs[i] = qi < p.n_q ? p.scale * load_f(q[qi * p.q_stride[0] + h * p.q_stride[1] + c * p.q_stride[2]]) : 0.0f;
  }

  float m[tr::rows_per_warp], l[tr::rows_per_warp], o[tr::rows_per_warp][tr::out_per_lane];
#pragma unroll
  for (int rr = 0; rr < tr::rows_per_warp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int cc = 0; cc < tr::out_per_lane; ++cc) o[rr][cc] = 0.0f;
  }

  const long long last_q = (q0 + tr::block_q < p.n_q ? q0 + tr::block_q : p.n_q) - 1;
  const long long kend =
      p.causal ? (last_q + p.causal_offset + 1 < p.n_kv ? last_q + p.causal_offset + 1 : p.n_kv) : p.n_kv;
  for (long long k0 = 0; k0 < kend; k0 += tr::block_kv) {
    __syncthreads();  // the previous tiles are consumed (and, first time round, qs is written)
    for (long long i = tid; i < tr::block_kv * d_qk; i += tr::threads) {
      const long long j = i / d_qk, c = i - j * d_qk, kj = k0 + j;
      ks[j * (d_qk + 1) + c] =
          kj < kend ? load_f(k[kj * p.k_stride[0] + hk * p.k_stride[1] + c * p.k_stride[2]]) : 0.0f;
    }
    for (long long i = tid; i < tr::block_kv * d_v; i += tr::threads) {
      const long long j = i / d_v, c = i - j * d_v, kj = k0 + j;
      vs[i] = kj < kend ? load_f(v[kj * p.v_stride[0] + hk * p.v_stride[1] + c * p.v_stride[2]]) : 0.0f;
    }
    __syncthreads();

#pragma unroll
    for (int rr = 0; rr < tr::rows_per_warp; ++rr) {
      const int row = warp * tr::rows_per_warp + rr;
      const long long qi = q0 + row;
      if (qi >= p.n_q) continue;  // warp-uniform
      const long long kj = k0 + lane;
      const bool visible = kj < kend && (!p.causal || kj <= qi + p.causal_offset);
      float s = -INFINITY;
      if (visible) {
        const float* qr = qs + row * d_qk;
        const float* kr = ks + lane * (d_qk + 1);
        float acc = 0.0f;
        for (long long c = 0; c < d_qk; ++c) acc = fmaf(qr[c], kr[c], acc);
        s = acc;
      }
      const float tile_max = warp_max(s);
      if (tile_max == -INFINITY) continue;  // nothing visible to this row in this tile (warp-uniform)
      const float m_new = fmaxf(m[rr], tile_max);
      const float alpha = expf(m[rr] - m_new);  // 0 on the first visible tile (m = -inf)
      const float pj = visible ? expf(s - m_new) : 0.0f;
      l[rr] = alpha * l[rr] + warp_sum(pj);
      m[rr] = m_new;
#pragma unroll
      for (int cc = 0; cc < tr::out_per_lane; ++cc) o[rr][cc] *= alpha;
      for (int j = 0; j < tr::block_kv; ++j) {
        const float pjj = __shfl_sync(0xffffffffu, pj, j);
        const float* vr = vs + j * d_v;
#pragma unroll
        for (int cc = 0; cc < tr::out_per_lane; ++cc) {
          const long long c = lane + 32 * cc;
          if (c < d_v) o[rr][cc] = fmaf(pjj, vr[c], o[rr][cc]);
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < tr::rows_per_warp; ++rr) {
    const long long qi = q0 + warp * tr::rows_per_warp + rr;
    if (qi >= p.n_q) continue;
    const float inv = 1.0f / l[rr];  // l > 0: key 0 is visible to every row (n_q <= n_kv when causal)
#pragma unroll
    for (int cc = 0; cc < tr::out_per_lane; ++cc) {
      const long long c = lane + 32 * cc;
      if (c < d_v) out[qi * p.o_stride[0] + h * p.o_stride[1] + c * p.o_stride[2]] = store_f<D>(o[rr][cc] * inv);
    }
  }
}

template <class T>
void launch_attention(const attention_kernel_params<T>& p, cudaStream_t stream) {
  using D = device_type_t<T>;
  using tr = attention_kernel_traits;
  if (p.n_q <= 0 || p.h_q <= 0) return;
  attention_kernel_params<D> dp;
  dp.q = as_device(p.q);
  dp.k = as_device(p.k);
  dp.v = as_device(p.v);
  dp.out = as_device(p.out);
  dp.n_q = p.n_q, dp.n_kv = p.n_kv, dp.h_q = p.h_q, dp.h_kv = p.h_kv, dp.d_qk = p.d_qk, dp.d_v = p.d_v;
  dp.group = p.group, dp.causal_offset = p.causal_offset;
  for (int i = 0; i < 3; ++i) {
    dp.q_stride[i] = p.q_stride[i];
    dp.k_stride[i] = p.k_stride[i];
    dp.v_stride[i] = p.v_stride[i];
    dp.o_stride[i] = p.o_stride[i];
  }
  dp.scale = p.scale;
  dp.causal = p.causal;
  const std::size_t smem = tr::smem_bytes(p.d_qk, p.d_v);
  if (smem > 48 * 1024)  // above the default limit the kernel must opt in (sm_80: up to 163 KiB)
    BASISATTN_CUDA_CHECK(
        cudaFuncSetAttribute(attention_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((p.n_q + tr::block_q - 1) / tr::block_q), static_cast<unsigned>(p.h_q));
  attention_kernel<D><<<grid, tr::threads, smem, stream>>>(dp.q, dp.k, dp.v, dp.out, dp);
  BASISATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
