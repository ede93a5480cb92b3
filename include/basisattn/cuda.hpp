// basisattn/cuda.hpp - the CUDA backend (module header; link basisattn::cuda).
//
// Host-side headers, compiled by the C++ compiler; the kernels are in <basisattn/cuda/kernels.cuh>,
// which one .cu file of the program compiles (nvcc). Every entry takes a cuda_context first.
//   <basisattn/cuda/backend.hpp>     backend_traits<cuda>, cuda_device_count, error checks
//   <basisattn/cuda/context.hpp>     cuda_context (stream, cuBLAS / cuBLASLt handles), device buffers
//   <basisattn/cuda/projection.hpp>  bd::upload, bd::project(ctx, ...): dense and BD projections
//   <basisattn/cuda/attention.hpp>   exact attention
//   <basisattn/cuda/layers.hpp>      bd::upload of prepared layers, bd::forward(ctx, ...)
//   <basisattn/cuda/conv.hpp>        conv-basis attention on a host-made conv::plan (cuFFT)
//   <basisattn/cuda/cufft.hpp>       the cuFFT plan cache conv's run keeps
//   <basisattn/cuda/support.hpp>     support-basis attention on a host-made support::plan
#pragma once

#include <basisattn/cuda/attention.hpp>
#include <basisattn/cuda/backend.hpp>
#include <basisattn/cuda/context.hpp>
#include <basisattn/cuda/conv.hpp>
#include <basisattn/cuda/cufft.hpp>
#include <basisattn/cuda/layers.hpp>
#include <basisattn/cuda/projection.hpp>
#include <basisattn/cuda/support.hpp>
