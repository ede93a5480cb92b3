// basisattn/basisattn.hpp - umbrella header for the CPU library.
//
// basisattn makes transformer attention cheaper: an exact Basis Decomposition (BD) of attention
// projection weights, two approximate attentions (conv-basis, support-basis) with per-head error
// reports, and exact reference attention to check every method against. Everything is
// in namespace basisattn (inline namespace v0); backends are tag types (basisattn::cpu, and
// basisattn::cuda via <basisattn/cuda/backend.hpp> with the basisattn::cuda target).
//
//   core/      config & version, error, dtypes, views, backend tags and traits
//   attention/ exact attention (naive double oracle, blocked CPU), RoPE
//   bd/        BD options, factorization (basis selection), projections, prepared layers
//   conv/      conv-basis attention: anchor recovery, FFT application, error control, backward
//   support/   support-basis attention: exact supports of large rows, polynomial (linear-attention) rest
//   cpu/       CPU runtime: projections, layer forward passes, conv-basis, Eigen interop
#pragma once

#include <basisattn/core/backend.hpp>
#include <basisattn/core/config.hpp>
#include <basisattn/core/dtype.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/core/view.hpp>

#include <basisattn/attention/attention.hpp>
#include <basisattn/attention/options.hpp>
#include <basisattn/attention/reference.hpp>
#include <basisattn/attention/rope.hpp>

#include <basisattn/bd/factorize.hpp>
#include <basisattn/bd/layers.hpp>
#include <basisattn/bd/measure.hpp>
#include <basisattn/bd/options.hpp>
#include <basisattn/bd/projection.hpp>

#include <basisattn/conv/conv_basis.hpp>
#include <basisattn/conv/fft.hpp>
#include <basisattn/conv/options.hpp>

#include <basisattn/support/support_basis.hpp>

#include <basisattn/cpu/layers.hpp>
#include <basisattn/cpu/projection.hpp>
