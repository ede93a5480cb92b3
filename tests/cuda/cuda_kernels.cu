// basisattn's CUDA kernels compiled once for the CUDA test programs (see <basisattn/cuda/kernels.cuh>).
#include <basisattn/cuda/kernels.cuh>
