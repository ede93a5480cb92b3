// basisattn's CUDA kernels compiled once for bench_cuda and bench_cuda_approx (see <basisattn/cuda/kernels.cuh>).
#include <basisattn/cuda/kernels.cuh>
