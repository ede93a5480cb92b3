// basisattn's CUDA kernels compiled once for bench_cuda (see <basisattn/cuda/kernels.cuh>).
#include <basisattn/cuda/kernels.cuh>
