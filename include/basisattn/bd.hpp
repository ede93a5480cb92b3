// basisattn/bd.hpp - Basis Decomposition (module header: preparation and the CPU backend).
//
// BD rewrites the K/V (or K-nope/V up-projection) weights of attention layers exactly: basis rows of
// the projection plus coefficients folded into the paired Q / O weights, so the key and value
// projections need fewer multiply-adds and fewer bytes and the outputs change only by rounding.
//
//   <basisattn/bd/options.hpp>     options (basis selection, rounding, sharing) and layer configs
//   <basisattn/bd/factorize.hpp>   basis selection and the factorization in double (one rounding)
//   <basisattn/bd/projection.hpp>  dense / BD projections (the weights a runtime applies)
//   <basisattn/bd/layers.hpp>      prepared MHA / GQA / MQA / MLA layers: prepare_mha, prepare_mla
//   <basisattn/bd/measure.hpp>     product-error measurement of a prepared layer against its dense one
//   <basisattn/cpu/projection.hpp> bd::project(cpu{}, ...)
//   <basisattn/cpu/layers.hpp>     bd::forward(cpu{}, layer, x, out, options)
// CUDA backend: bd::upload, bd::project(ctx, ...), bd::forward(ctx, ...) in <basisattn/cuda.hpp>.
#pragma once

#include <basisattn/bd/factorize.hpp>
#include <basisattn/bd/layers.hpp>
#include <basisattn/bd/measure.hpp>
#include <basisattn/bd/options.hpp>
#include <basisattn/bd/projection.hpp>
#include <basisattn/cpu/layers.hpp>
#include <basisattn/cpu/projection.hpp>
