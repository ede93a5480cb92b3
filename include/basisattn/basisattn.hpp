// basisattn/basisattn.hpp - umbrella header for the CPU library.
//
// basisattn makes transformer attention cheaper: an exact Basis Decomposition (BD) of attention
// projection weights, two approximate attentions (conv-basis, support-basis) with per-head error
// reports, and exact reference attention to check every method against. Everything is
// in namespace basisattn (inline namespace v0); backends are tag types (basisattn::cpu, and
// basisattn::cuda via <basisattn/cuda/backend.hpp> with the basisattn::cuda target).
//
// Layout (dependencies point one way: core -> method folders -> backend folders -> modules):
//   core/      config & version, errors, dtypes, views, backend tags and traits, Eigen interop,
//              the one parallel loop and the one workspace carver (internal)
//   attention/ exact attention: options and argument checks, the double oracle, RoPE
//   bd/        BD options, basis selection and factorization, projections, prepared layers
//   conv/      conv-basis attention: options, anchor recovery, planning (backend-neutral)
//   support/   support-basis attention: options, features, polynomials, planning (backend-neutral)
//   cpu/       CPU backend: one file per method (attention, projection, layers, conv, support) + FFT engines
//   cuda/      CUDA backend: one file per method, kernels in cuda/kernels/*.cuh (nvcc)
//   io/        checkpoint readers and the BD converter (needs nlohmann-json)
// Module headers: <basisattn/attention.hpp>, <basisattn/bd.hpp>, <basisattn/conv.hpp>,
// <basisattn/support.hpp> (this umbrella includes those four), <basisattn/io.hpp>, <basisattn/cuda.hpp>.
#pragma once

#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>

#include <basisattn/attention.hpp>
#include <basisattn/bd.hpp>
#include <basisattn/conv.hpp>
#include <basisattn/support.hpp>
