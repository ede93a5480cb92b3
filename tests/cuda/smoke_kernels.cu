// The two library kernels test_cuda_smoke runs, instantiated for float only: the smoke test (and the
// CI stage that builds it from the GPU check's dependency folder) need not compile every kernel.
// A deliberate use of an internal kernel header (it instantiates two launchers itself), hence the macro.
#define BASISATTN_CUDA_KERNELS_TU 1
#include <basisattn/cuda/kernels/projection.cuh>

BASISATTN_BEGIN_NAMESPACE
namespace detail {
namespace cuda_kernels {
template void launch_gather_columns<float>(const float*, index_t, const int*, index_t, index_t, float*, index_t,
                                           cudaStream_t);
template void launch_broadcast_rows<float>(const float*, index_t, index_t, index_t, const float*, index_t, index_t,
                                           float*, index_t, cudaStream_t);
}  // namespace cuda_kernels
}  // namespace detail
BASISATTN_END_NAMESPACE
