// basisattn/cuda/projection.hpp - CUDA runtime of dense and BD projections (cuBLAS / cuBLASLt).
//
// Host-side header (g++ compiles it). Programs using it link basisattn::cuda (which brings cuBLASLt) and
// include <basisattn/cuda/kernels.cuh> in one .cu file (see <basisattn/cuda/kernel_launch.hpp>).
//
// Upload once, run many times:
//   auto dp = bd::upload(ctx, p);                p a bd::dense_projection<T> or bd::bd_projection<T>
//                                                (host, T = float, Eigen::half, Eigen::bfloat16);
//                                                gives a bd::device_dense_projection<T> /
//                                                bd::device_bd_projection<T> (move-only)
//   bd::workspace_bytes(ctx, dp, tokens, opt)
//   bd::project(ctx, dp, x, y, workspace, workspace_bytes, opt = {}) -> bd::cuda_epilogue
//       x: tokens x in_dim, y: tokens x out_dim, device memory, rows contiguous, any row strides;
//       workspace: device memory of at least workspace_bytes(...) bytes (256-byte aligned
//       start recommended). Enqueued on ctx's stream; returns without waiting; allocates nothing
//       (cuBLAS aside: cublasGemmEx uses the handle's own workspace). Returns the method that ran:
//       cublaslt, prefill, or none (a dense projection without bias: one plain cublasGemmEx), so a
//       fallback is never silent.
// Same semantics as bd::project(cpu{}, ...): dense y = x W + b; BD y_g = x[:, basis] + x[:, rest] C_g
// + b_g for every head g. Storage T, fp32 accumulation (fp32 data: exact fp32 unless
// opt.allow_tf32), one rounding of each output element to T (prefill method: two, see below).
// Split-K partial sums are reduced in fp32, never in T: the contexts' cuBLAS handles are in
// CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION mode and cuBLASLt plans only admit reduction
// schemes in the compute type (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE; none at all is always allowed).
// cuda_project_options::check_finite is not offered: the data are on the device; scan them yourself.
//
// How the BD projection runs (all heads of a basis group in one pass):
//   With several basis groups (bd_projection::groups, e.g. a basis per kv head) steps 1 and 2 run
//   once per group, on its heads' columns of coeff and y (one gather buffer, reused in stream order).
//   1. input layout: when p.basis_leading() (basis = channels 0..r-1, as prepare_mla arranges by
//      permuting the latent), x[:, :r] is the basis block and x[:, r:] the GEMM operand, both plain
//      strided views of x: no copy. Otherwise one gather kernel writes x[:, basis ++ rest] into the
//      workspace (tokens x in_dim elements; reads/writes in_dim columns per token and group, a
//      fraction groups in_dim / (G r) of the output traffic) and the rest is the same.
//   2. the basis channels + bias are added in the GEMM epilogue, never as an extra pass over y:
//      method `cublaslt` is one cuBLASLt matmul batched over the G heads, batch g computing
//          y[:, g r:(g+1) r] = x_rest * coeff[:, g r:(g+1) r] + x_basis + b_g
//        with x_rest and C = x_basis both at batch stride 0 (the same matrix for every head),
//        coeff and D at batch stride r (head g's columns), and the bias as the BIAS epilogue with
//        bias batch stride r. The output is written exactly once; the C reads (x_basis, r columns
//        per token) are shared by the G heads and mostly hit L2.
//      method `prefill` is the fallback: a broadcast kernel writes y = [x_basis + b_g]_g, then one
//        cublasGemmEx over all heads (N = G r, K = in_dim - r) with beta = 1. Simple and always
//        available, but it costs one extra write + read of the whole output: at DeepSeek-V2-Lite
//        sizes (K = 384, N = 2048, fp16) the GEMM moves ~4.5 bytes of y per 384 FLOPs per output, so
//        the extra 4 bytes/output are comparable to the GEMM itself and eat most of the 512/384 gain.
//      method `automatic` (default) uses cublaslt when cuBLASLt's heuristic returns an algorithm for
//        the batched problem (broadcast A and C, interleaved D) and prefill otherwise. Only a
//        refusal (CUBLAS_STATUS_NOT_SUPPORTED, or no algorithm) falls back; any other cuBLASLt error
//        (CUBLAS_STATUS_INVALID_VALUE: a bad descriptor, our bug) raises errc::backend. The return
//        value says which method ran.
//      The bias of head g is stored on the device at bias + g * bias_stride, bias_stride = r rounded
//        up to 256 bytes, so that every head's bias pointer in the BIAS epilogue is 256-byte aligned
//        (with r = 12 in fp16 a packed layout puts head g's bias at 24 g bytes, and cuBLASLt kernels
//        may assume 16-byte aligned bias vectors: a misaligned-address fault is a sticky error).
//      Why not a single non-batched GEMM with C = broadcast basis block? A cuBLAS/cuBLASLt matrix
//      layout cannot repeat r columns G times inside one row (no zero stride along a dimension), so
//      the broadcast has to be the batch dimension. A custom GEMM with a fused epilogue would avoid
//      both the batching and the extra pass, at the price of matching cuBLAS's tensor-core kernels.
//   The choice for a given (tokens, strides, alignment) is made once per device projection and cached
//   in it (cuBLASLt descriptors + algorithm, guarded by a mutex), so a hot loop pays no heuristic.
//
// Dense projection (the baseline): one cublasGemmEx (N = out_dim, K = in_dim) with beta = 0; with a
// bias, the cuBLASLt BIAS epilogue (automatic / cublaslt) or a bias broadcast + beta = 1 (prefill).
#pragma once

#include <basisattn/bd/projection.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>
#include <basisattn/core/workspace.hpp>
#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/kernel_launch.hpp>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

BASISATTN_BEGIN_NAMESPACE
namespace bd {

/// How the CUDA projection adds the basis channels and the bias (see the top of this header).
enum class cuda_epilogue {
  automatic,  ///< cublaslt when cuBLASLt supports the problem, else prefill
  cublaslt,   ///< cuBLASLt, broadcast basis block as C + BIAS epilogue; errc::unsupported if refused
  prefill,    ///< broadcast kernel writes basis + bias into y, then cuBLAS GEMM with beta = 1
  none,       ///< (returned only) a dense projection without bias: one plain cublasGemmEx
};

/// Name of an epilogue method ("automatic", "cublaslt", "prefill", "none").
inline const char* to_string(cuda_epilogue e) noexcept {
  switch (e) {
    case cuda_epilogue::automatic:
      return "automatic";
    case cuda_epilogue::cublaslt:
      return "cublaslt";
    case cuda_epilogue::prefill:
      return "prefill";
    case cuda_epilogue::none:
      return "none";
  }
  return "?";
}

/// Options of a CUDA projection run.
struct cuda_project_options {
  cuda_epilogue epilogue = cuda_epilogue::automatic;
  /// fp32 storage only: allow TF32 tensor cores (about 1e-3 relative error instead of fp32's 1e-7).
  bool allow_tf32 = false;
};

namespace detail {

/// Bytes of cuBLASLt workspace a projection may use (NVIDIA recommends 32 MiB on Hopper).
constexpr std::size_t cublaslt_workspace_bytes = std::size_t(32) << 20;
inline std::size_t cuda_align_up(std::size_t n) {
  return ::basisattn::detail::align_up(n, ::basisattn::detail::cuda_workspace_align);
}

template <class T>
constexpr cudaDataType_t cuda_data_type() {
  static_assert(supports_storage_v<cuda, T>, "CUDA projections support float, Eigen::half and Eigen::bfloat16 storage");
  if constexpr (std::is_same_v<T, float>)
    return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, Eigen::half>)
    return CUDA_R_16F;
  else
    return CUDA_R_16BF;
}

/// Largest power of two (<= 256) dividing every byte offset given: the alignment cuBLASLt may assume.
inline std::uint32_t common_alignment(std::initializer_list<std::uint64_t> offsets) {
  std::uint64_t a = 256;
  for (std::uint64_t o : offsets)
    while (a > 1 && o % a != 0) a /= 2;
  return static_cast<std::uint32_t>(a);
}

/// A column-major cuBLASLt problem D = A B + beta C (+ bias), strided-batched; everything a plan
/// depends on. Strides and leading dimensions in elements, alignments in bytes.
struct lt_problem {
  cudaDataType_t type = CUDA_R_32F;
  std::int64_t m = 0, n = 0, k = 0, batch = 1;
  std::int64_t lda = 0, ldb = 0, ldc = 0, ldd = 0;
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0, stride_d = 0, stride_bias = 0;
  bool has_c = false, tf32 = false;
  const void* bias = nullptr;
  std::uint32_t align_a = 256, align_b = 256, align_c = 256, align_d = 256;
  std::size_t workspace = 0;
  bool operator==(const lt_problem& o) const {
    return type == o.type && m == o.m && n == o.n && k == o.k && batch == o.batch && lda == o.lda && ldb == o.ldb &&
           ldc == o.ldc && ldd == o.ldd && stride_a == o.stride_a && stride_b == o.stride_b && stride_c == o.stride_c &&
           stride_d == o.stride_d && stride_bias == o.stride_bias && has_c == o.has_c && tf32 == o.tf32 &&
           bias == o.bias && align_a == o.align_a && align_b == o.align_b && align_c == o.align_c &&
           align_d == o.align_d && workspace == o.workspace;
  }
};

/// cuBLASLt descriptors + the heuristic's algorithm for one lt_problem. `found` is false when
/// cuBLASLt offers no algorithm (then nothing else is valid).
class lt_plan {
 public:
  lt_plan() = default;
  lt_plan(const lt_plan&) = delete;
  lt_plan& operator=(const lt_plan&) = delete;
  ~lt_plan() { release(); }

  /// Build for `pr`; returns found(). Descriptor errors raise errc::backend.
  bool build(cublasLtHandle_t lt, const lt_problem& pr) {
    release();
    problem_ = pr;
    const cublasComputeType_t ct = pr.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    BASISATTN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op_, ct, CUDA_R_32F));
    if (pr.bias) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      BASISATTN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
      BASISATTN_CUBLAS_CHECK(
          cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &pr.bias, sizeof(pr.bias)));
      const cudaDataType_t bt = pr.type;
      BASISATTN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
      if (pr.batch > 1)
        BASISATTN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE,
                                                              &pr.stride_bias, sizeof(pr.stride_bias)));
    }
    layout(&a_, pr.m, pr.k, pr.lda, pr.stride_a);
    layout(&b_, pr.k, pr.n, pr.ldb, pr.stride_b);
    layout(&c_, pr.m, pr.n, pr.has_c ? pr.ldc : pr.ldd, pr.has_c ? pr.stride_c : pr.stride_d);
    layout(&d_, pr.m, pr.n, pr.ldd, pr.stride_d);

    cublasLtMatmulPreference_t pref = nullptr;
    BASISATTN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    std::uint64_t ws = pr.workspace;
    cublasStatus_t s =
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    const std::uint32_t al[4] = {pr.align_a, pr.align_b, pr.has_c ? pr.align_c : pr.align_d, pr.align_d};
    const cublasLtMatmulPreferenceAttributes_t which[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4 && s == CUBLAS_STATUS_SUCCESS; ++i)
      s = cublasLtMatmulPreferenceSetAttribute(pref, which[i], &al[i], sizeof(al[i]));
    // Split-K partial sums in fp32 only (never INPLACE or OUTPUT_TYPE: both reduce in the output type).
    const std::uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction,
                                               sizeof(reduction));
    cublasLtMatmulHeuristicResult_t result{};
    int count = 0;
    cublasStatus_t h = CUBLAS_STATUS_NOT_SUPPORTED;
    if (s == CUBLAS_STATUS_SUCCESS)
      h = cublasLtMatmulAlgoGetHeuristic(lt, op_, a_, b_, c_, d_, pref, 1, &result, &count);
    cublasLtMatmulPreferenceDestroy(pref);
    BASISATTN_CUBLAS_CHECK(s);
    // NOT_SUPPORTED or zero results: cuBLASLt declines this problem (the caller may fall back). Any
    // other status (INVALID_VALUE: a descriptor cuBLASLt rejects) is our error and raises.
    if (h != CUBLAS_STATUS_NOT_SUPPORTED) BASISATTN_CUBLAS_CHECK(h);
    found_ = h == CUBLAS_STATUS_SUCCESS && count > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (found_) algo_ = result.algo;
    return found_;
  }

  bool found() const noexcept { return found_; }
  const lt_problem& problem() const noexcept { return problem_; }

  /// D = A B + (has_c ? C : 0) (+ bias) on `stream`; returns cublasLtMatmul's status.
  cublasStatus_t run(cublasLtHandle_t lt, const void* a, const void* b, const void* c, void* d, void* workspace,
                     cudaStream_t stream) const {
    const float one = 1.0f, beta = problem_.has_c ? 1.0f : 0.0f;
    return cublasLtMatmul(lt, op_, &one, a, a_, b, b_, &beta, problem_.has_c ? c : d, c_, d, d_, &algo_, workspace,
                          problem_.workspace, stream);
  }
  /// Mark the plan unusable (cuBLASLt accepted the heuristic query but refused to run it).
  void decline() noexcept { found_ = false; }

 private:
  void layout(cublasLtMatrixLayout_t* l, std::int64_t rows, std::int64_t cols, std::int64_t ld, std::int64_t stride) {
    BASISATTN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(l, problem_.type, static_cast<std::uint64_t>(rows),
                                                      static_cast<std::uint64_t>(cols), ld));
    if (problem_.batch > 1) {
      const std::int32_t bc = static_cast<std::int32_t>(problem_.batch);
      BASISATTN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof(bc)));
      BASISATTN_CUBLAS_CHECK(
          cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    }
  }
  void release() noexcept {
    if (a_) cublasLtMatrixLayoutDestroy(a_);
    if (b_) cublasLtMatrixLayoutDestroy(b_);
    if (c_) cublasLtMatrixLayoutDestroy(c_);
    if (d_) cublasLtMatrixLayoutDestroy(d_);
    if (op_) cublasLtMatmulDescDestroy(op_);
    a_ = b_ = c_ = d_ = nullptr;
    op_ = nullptr;
    found_ = false;
  }

  lt_problem problem_;
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr, d_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
  bool found_ = false;
};

/// One cached plan per device projection (the last problem seen); thread-safe.
struct lt_plan_cache {
  std::mutex mutex;
  bool valid = false;
  lt_plan plan;
};

/// Runs `pr` through the cache: false when cuBLASLt has no algorithm for it.
inline bool lt_run_cached(lt_plan_cache& cache, const cuda_context& ctx, const lt_problem& pr, const void* a,
                          const void* b, const void* c, void* d, void* workspace) {
  std::lock_guard<std::mutex> lock(cache.mutex);
  if (!cache.valid || !(cache.plan.problem() == pr)) {
    cache.valid = false;
    cache.plan.build(ctx.cublaslt(), pr);
    cache.valid = true;
  }
  if (!cache.plan.found()) return false;
  const cublasStatus_t s = cache.plan.run(ctx.cublaslt(), a, b, c, d, workspace, ctx.stream());
  if (s == CUBLAS_STATUS_NOT_SUPPORTED) {  // refused before launching (other errors raise below)
    cache.plan.decline();
    return false;
  }
  ::basisattn::detail::cublas_check(s, "cublasLtMatmul", __FILE__, __LINE__);
  return true;
}

/// Column-major C(m x n) = A(m x k) B(k x n) + beta C through cublasGemmEx, fp32 compute.
template <class T>
void gemm_ex(const cuda_context& ctx, index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb,
             float beta, T* c, index_t ldc, bool tf32) {
  const float one = 1.0f;
  const cudaDataType_t t = cuda_data_type<T>();
  const cublasComputeType_t ct = (std::is_same_v<T, float> && tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  BASISATTN_CUBLAS_CHECK(cublasGemmEx(
      ctx.cublas(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &one, a, t,
      static_cast<int>(lda), b, t, static_cast<int>(ldb), &beta, c, t, static_cast<int>(ldc), ct, CUBLAS_GEMM_DEFAULT));
}

template <class T>
void check_cuda_io(const char* what, const matrix_view<const T>& x, const matrix_view<T>& y, index_t in, index_t out) {
  BASISATTN_REQUIRE(x.cols == in, shape_mismatch, what, ": x has ", x.cols, " columns, the projection takes ", in);
  BASISATTN_REQUIRE(y.cols == out, shape_mismatch, what, ": y has ", y.cols, " columns, the projection gives ", out);
  BASISATTN_REQUIRE(x.rows == y.rows, shape_mismatch, what, ": x has ", x.rows, " rows (tokens) but y has ", y.rows);
  BASISATTN_REQUIRE(x.rows == 0 || (x.data && y.data), invalid_argument, what, ": null data");
  BASISATTN_REQUIRE(x.rows_contiguous() && y.rows_contiguous(), invalid_argument, what,
                    ": x and y rows must be contiguous (col_stride 1)");
  BASISATTN_REQUIRE(x.row_stride >= x.cols && y.row_stride >= y.cols, invalid_argument, what, ": row strides (",
                    x.row_stride, ", ", y.row_stride, ") smaller than the row lengths (", x.cols, ", ", y.cols, ")");
  BASISATTN_REQUIRE(x.rows <= INT_MAX && x.row_stride <= INT_MAX && y.row_stride <= INT_MAX, invalid_argument, what,
                    ": ", x.rows, " tokens / row strides ", x.row_stride, ", ", y.row_stride,
                    " exceed cuBLAS's 32-bit int range");
}

inline std::uint64_t byte_offset(const void* p) {
  return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p));
}

}  // namespace detail

/// A dense_projection<T> on the device (see bd::upload).
template <class T>
struct device_dense_projection {
  index_t in_dim = 0, out_dim = 0;
  device_buffer<T> weight;  ///< in_dim x out_dim, row-major
  device_buffer<T> bias;    ///< out_dim values, or empty
  std::unique_ptr<detail::lt_plan_cache> cache = std::make_unique<detail::lt_plan_cache>();
  std::size_t bytes() const { return weight.bytes() + bias.bytes(); }
};

/// A bd_projection<T> on the device (see bd::upload).
template <class T>
struct device_bd_projection {
  index_t in_dim = 0, rank = 0, heads = 0;
  index_t groups = 1;          ///< basis groups (bd_projection::groups)
  bool basis_leading = false;  ///< input needs no gather (p.basis_leading() on the host)
  device_buffer<T> coeff;      ///< (in_dim - rank) x (heads rank), row-major
  device_buffer<T> bias;       ///< head g's rank values at bias_stride g (padding zero), or empty
  index_t bias_stride = 0;     ///< elements between two heads' biases: rank rounded up to 256 bytes
  device_buffer<int> perm;     ///< per group basis ++ rest (groups x in_dim); empty when basis_leading
  /// One cuBLASLt plan cache per basis group (a plan holds its group's bias pointer).
  std::vector<std::unique_ptr<detail::lt_plan_cache>> caches;
  index_t out_dim() const { return heads * rank; }
  std::size_t bytes() const { return coeff.bytes() + bias.bytes() + perm.bytes(); }
};

/// Copy a host dense projection to the device (ctx's device; waits for the copies).
template <class T>
device_dense_projection<T> upload(const cuda_context& ctx, const dense_projection<T>& p) {
  (void)detail::cuda_data_type<T>();
  BASISATTN_REQUIRE(p.in_dim() >= 1 && p.out_dim() >= 1, invalid_argument, "upload: empty dense projection (",
                    p.in_dim(), "x", p.out_dim(), ")");
  BASISATTN_REQUIRE(p.bias.empty() || static_cast<index_t>(p.bias.size()) == p.out_dim(), shape_mismatch,
                    "upload: dense projection bias has ", p.bias.size(), " values for ", p.out_dim(), " outputs");
  device_dense_projection<T> d;
  d.in_dim = p.in_dim();
  d.out_dim = p.out_dim();
  d.weight = to_device(ctx, p.weight.data(), p.weight.size());
  d.bias = to_device(ctx, p.bias.data(), static_cast<index_t>(p.bias.size()));
  return d;
}

/// Copy a host BD projection to the device (ctx's device; waits for the copies).
template <class T>
device_bd_projection<T> upload(const cuda_context& ctx, const bd_projection<T>& p) {
  (void)detail::cuda_data_type<T>();
  const index_t m = p.in_dim, r = p.rank, G = p.heads;
  BASISATTN_REQUIRE(r >= 1 && m > r && G >= 1, invalid_argument, "upload: bd projection with in_dim ", m, ", rank ", r,
                    ", heads ", G, " (need 1 <= rank < in_dim, heads >= 1)");
  const index_t Q = p.groups;
  BASISATTN_REQUIRE(Q >= 1 && G % Q == 0, invalid_argument, "upload: ", Q, " basis groups do not divide ", G, " heads");
  BASISATTN_REQUIRE(static_cast<index_t>(p.basis.size()) == Q * r && static_cast<index_t>(p.rest.size()) == Q * (m - r),
                    shape_mismatch, "upload: bd projection has ", p.basis.size(), " basis and ", p.rest.size(),
                    " rest channels for ", Q, " groups, in_dim ", m, ", rank ", r);
  BASISATTN_REQUIRE(p.coeff.rows() == m - r && p.coeff.cols() == G * r, shape_mismatch, "upload: coefficients are ",
                    p.coeff.rows(), "x", p.coeff.cols(), ", expected ", m - r, "x", G * r);
  BASISATTN_REQUIRE(p.bias.empty() || static_cast<index_t>(p.bias.size()) == G * r, shape_mismatch,
                    "upload: bd projection bias has ", p.bias.size(), " values for ", G * r, " outputs");
  BASISATTN_REQUIRE(m <= INT_MAX, invalid_argument, "upload: in_dim ", m, " too large");
  std::vector<int> perm;
  perm.reserve(static_cast<std::size_t>(Q * m));
  for (index_t q = 0; q < Q; ++q) {
    std::vector<bool> seen(static_cast<std::size_t>(m), false);
    for (const index_t* list : {p.basis.data() + q * r, p.rest.data() + q * (m - r)})
      for (index_t i = 0; i < (list == p.basis.data() + q * r ? r : m - r); ++i) {
        const index_t c = list[i];
        BASISATTN_REQUIRE(c >= 0 && c < m && !seen[static_cast<std::size_t>(c)], invalid_argument,
                          "upload: basis/rest channel ", c, " of group ", q, " is out of range or repeated (in_dim ", m,
                          ")");
        seen[static_cast<std::size_t>(c)] = true;
        perm.push_back(static_cast<int>(c));
      }
  }
  device_bd_projection<T> d;
  d.in_dim = m;
  d.rank = r;
  d.heads = G;
  d.groups = Q;
  for (index_t q = 0; q < Q; ++q) d.caches.push_back(std::make_unique<detail::lt_plan_cache>());
  d.basis_leading = p.basis_leading();
  d.coeff = to_device(ctx, p.coeff.data(), p.coeff.size());
  d.bias_stride = static_cast<index_t>(detail::cuda_align_up(static_cast<std::size_t>(r) * sizeof(T)) / sizeof(T));
  if (!p.bias.empty()) {
    std::vector<T> padded(static_cast<std::size_t>(G * d.bias_stride), T(0));
    for (index_t g = 0; g < G; ++g)
      std::copy(p.bias.begin() + g * r, p.bias.begin() + (g + 1) * r, padded.begin() + g * d.bias_stride);
    d.bias = to_device(ctx, padded.data(), static_cast<index_t>(padded.size()));
  }
  if (!d.basis_leading) d.perm = to_device(ctx, perm.data(), Q * m);
  return d;
}

/// Device workspace bytes bd::project(ctx, p, ...) needs for `tokens` rows with these options.
template <class T>
std::size_t workspace_bytes(const cuda_context&, const device_bd_projection<T>& p, index_t tokens,
                            const cuda_project_options& opt = {}) {
  BASISATTN_REQUIRE(tokens >= 0, invalid_argument, "workspace_bytes(projection): negative token count ", tokens);
  std::size_t n = 0;
  if (!p.basis_leading) n += detail::cuda_align_up(static_cast<std::size_t>(tokens * p.in_dim) * sizeof(T));
  if (opt.epilogue != cuda_epilogue::prefill) n += detail::cublaslt_workspace_bytes;
  return n;
}
template <class T>
std::size_t workspace_bytes(const cuda_context&, const device_dense_projection<T>& p, index_t tokens,
                            const cuda_project_options& opt = {}) {
  BASISATTN_REQUIRE(tokens >= 0, invalid_argument, "workspace_bytes(projection): negative token count ", tokens);
  return !p.bias.empty() && opt.epilogue != cuda_epilogue::prefill ? detail::cublaslt_workspace_bytes : 0;
}

/// Deprecated spelling of workspace_bytes(ctx, p, tokens, opt).
template <class P>
[[deprecated("use workspace_bytes(ctx, p, tokens, opt)")]] auto project_workspace_bytes(
    const cuda_context& ctx, const P& p, index_t tokens, const cuda_project_options& opt = {})
    -> decltype(workspace_bytes(ctx, p, tokens, opt)) {
  return workspace_bytes(ctx, p, tokens, opt);
}

/// BD projection of all heads on the GPU: y = [x_S + x_rest C_g + b_g]_g (see the top of this header).
/// Returns the method that ran (cuda_epilogue::cublaslt, or cuda_epilogue::prefill when any basis group
/// took it).
template <class T>
cuda_epilogue project(const cuda_context& ctx, const device_bd_projection<T>& p,
                      matrix_view<const ::basisattn::detail::nondeduced_t<T>> x, matrix_view<T> y, void* workspace,
                      std::size_t workspace_bytes, const cuda_project_options& opt = {}) {
  detail::check_cuda_io<T>("project(cuda, bd)", x, y, p.in_dim, p.out_dim());
  const index_t tokens = x.rows;
  if (tokens == 0) return opt.epilogue == cuda_epilogue::prefill ? cuda_epilogue::prefill : cuda_epilogue::cublaslt;
  const std::size_t need = bd::workspace_bytes(ctx, p, tokens, opt);
  BASISATTN_REQUIRE(workspace_bytes >= need && (need == 0 || workspace), invalid_argument,
                    "project(cuda, bd): workspace of ", workspace_bytes, " bytes, ", need, " needed (workspace_bytes)");
  const index_t m = p.in_dim, r = p.rank, G = p.heads, nr = m - r, Q = p.groups, hq = G / Q, nq = hq * r;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  T* xg = nullptr;  // the gathered input of one group at a time (stream order makes the reuse safe)
  if (!p.basis_leading) {
    xg = reinterpret_cast<T*>(ws);
    ws += detail::cuda_align_up(static_cast<std::size_t>(tokens * m) * sizeof(T));
  }
  const bool tf32 = std::is_same_v<T, float> && opt.allow_tf32;
  bool lt = opt.epilogue != cuda_epilogue::prefill;
  BASISATTN_REQUIRE(!lt || static_cast<index_t>(p.caches.size()) == Q, invalid_argument,
                    "project(cuda, bd): the device projection has ", p.caches.size(), " plan caches for ", Q,
                    " basis groups (made by bd::upload?)");
  index_t lt_groups = 0;  // groups that ran the cuBLASLt epilogue
  for (index_t q = 0; q < Q; ++q) {
    // 1. input with the basis leading: x itself, or x[:, basis_q ++ rest_q] gathered into the workspace.
    const T* xs = x.data;
    index_t ldx = x.row_stride;
    if (!p.basis_leading) {
      ::basisattn::detail::cuda_kernels::launch_gather_columns(x.data, x.row_stride, p.perm.data() + q * m, m, tokens,
                                                               xg, m, ctx.stream());
      xs = xg;
      ldx = m;
    }
    const T* bias = p.bias.empty() ? nullptr : p.bias.data() + q * hq * p.bias_stride;
    const T* coeff = p.coeff.data() + q * nq;
    T* yq = y.data + q * nq;

    // 2a. cuBLASLt: one matmul batched over the group's heads, basis block as C (batch stride 0), bias
    // epilogue; each group's plan cached in its own slot (the bias pointer is part of a plan).
    if (lt) {
      detail::lt_problem pr;
      const std::uint64_t es = sizeof(T);
      pr.type = detail::cuda_data_type<T>();
      pr.m = r, pr.n = tokens, pr.k = nr, pr.batch = hq;
      pr.lda = G * r, pr.stride_a = r;                 // coeff[:, g r:(g+1) r] as a column-major r x nr matrix
      pr.ldb = ldx, pr.stride_b = 0;                   // x_rest as a column-major nr x tokens matrix, every head
      pr.has_c = true, pr.ldc = ldx, pr.stride_c = 0;  // x_basis (r x tokens), every head
      pr.ldd = y.row_stride, pr.stride_d = r;          // y[:, g r:(g+1) r]
      pr.bias = bias, pr.stride_bias = p.bias_stride;  // 256-byte aligned per head (see upload)
      pr.tf32 = tf32;
      pr.workspace = detail::cublaslt_workspace_bytes;
      pr.align_a = detail::common_alignment({detail::byte_offset(p.coeff.data()), es * G * r, es * r, es * nq});
      pr.align_b = detail::common_alignment({detail::byte_offset(xs + r), es * ldx});
      pr.align_c = detail::common_alignment({detail::byte_offset(xs), es * ldx});
      pr.align_d = detail::common_alignment({detail::byte_offset(y.data), es * y.row_stride, es * r, es * nq});
      if (detail::lt_run_cached(*p.caches[static_cast<std::size_t>(q)], ctx, pr, coeff, xs + r, xs, yq, ws)) {
        ++lt_groups;
        continue;
      }
      BASISATTN_REQUIRE(opt.epilogue == cuda_epilogue::automatic, unsupported,
                        "project(cuda, bd): cuBLASLt has no algorithm for the batched basis-epilogue GEMM (tokens ",
                        tokens, ", rank ", r, ", heads ", hq, "); use cuda_epilogue::prefill or automatic");
      lt = false;  // this group and the next ones take the prefill method
    }

    // 2b. prefill: y = [x_basis + b_g]_g, then y += x_rest C over the group's heads in one GEMM.
    ::basisattn::detail::cuda_kernels::launch_broadcast_rows(xs, ldx, r, hq, bias, p.bias_stride, tokens, yq,
                                                             y.row_stride, ctx.stream());
    detail::gemm_ex<T>(ctx, nq, tokens, nr, coeff, G * r, xs + r, ldx, 1.0f, yq, y.row_stride, tf32);
  }
  return lt_groups == Q ? cuda_epilogue::cublaslt : cuda_epilogue::prefill;
}

/// Dense projection y = x W + b on the GPU (the baseline). Returns the method that ran
/// (cuda_epilogue::none without a bias, else cublaslt or prefill).
template <class T>
cuda_epilogue project(const cuda_context& ctx, const device_dense_projection<T>& p,
                      matrix_view<const ::basisattn::detail::nondeduced_t<T>> x, matrix_view<T> y, void* workspace,
                      std::size_t workspace_bytes, const cuda_project_options& opt = {}) {
  detail::check_cuda_io<T>("project(cuda, dense)", x, y, p.in_dim, p.out_dim);
  const index_t tokens = x.rows;
  const T* bias = p.bias.empty() ? nullptr : p.bias.data();
  if (tokens == 0)
    return !bias                                    ? cuda_epilogue::none
           : opt.epilogue == cuda_epilogue::prefill ? cuda_epilogue::prefill
                                                    : cuda_epilogue::cublaslt;
  const std::size_t need = bd::workspace_bytes(ctx, p, tokens, opt);
  BASISATTN_REQUIRE(workspace_bytes >= need && (need == 0 || workspace), invalid_argument,
                    "project(cuda, dense): workspace of ", workspace_bytes, " bytes, ", need,
                    " needed (workspace_bytes)");
  const index_t in = p.in_dim, out = p.out_dim;
  const bool tf32 = std::is_same_v<T, float> && opt.allow_tf32;
  if (!bias) {
    detail::gemm_ex<T>(ctx, out, tokens, in, p.weight.data(), out, x.data, x.row_stride, 0.0f, y.data, y.row_stride,
                       tf32);
    return cuda_epilogue::none;
  }
  if (opt.epilogue != cuda_epilogue::prefill) {
    detail::lt_problem pr;
    const std::uint64_t es = sizeof(T);
    pr.type = detail::cuda_data_type<T>();
    pr.m = out, pr.n = tokens, pr.k = in;
    pr.lda = out, pr.ldb = x.row_stride, pr.ldd = y.row_stride;
    pr.bias = bias;
    pr.tf32 = tf32;
    pr.workspace = detail::cublaslt_workspace_bytes;
    pr.align_a = detail::common_alignment({detail::byte_offset(p.weight.data()), es * out});
    pr.align_b = detail::common_alignment({detail::byte_offset(x.data), es * x.row_stride});
    pr.align_d = detail::common_alignment({detail::byte_offset(y.data), es * y.row_stride, detail::byte_offset(bias)});
    if (detail::lt_run_cached(*p.cache, ctx, pr, p.weight.data(), x.data, nullptr, y.data, workspace))
      return cuda_epilogue::cublaslt;
    BASISATTN_REQUIRE(opt.epilogue == cuda_epilogue::automatic, unsupported,
                      "project(cuda, dense): cuBLASLt has no algorithm for the bias-epilogue GEMM (tokens ", tokens,
                      ")");
  }
  ::basisattn::detail::cuda_kernels::launch_broadcast_rows<T>(nullptr, 0, out, 1, bias, out, tokens, y.data,
                                                              y.row_stride, ctx.stream());
  detail::gemm_ex<T>(ctx, out, tokens, in, p.weight.data(), out, x.data, x.row_stride, 1.0f, y.data, y.row_stride,
                     tf32);
  return cuda_epilogue::prefill;
}

}  // namespace bd
BASISATTN_END_NAMESPACE
