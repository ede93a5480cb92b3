#!/usr/bin/env bash
# The tests whose bounds rest on rounding, once more in a Release build for another instruction-set
# level than the main build's -march=native (rounding differs between ISA levels, and
# the machines this project runs on differ: Zen 3 has AVX2 only, Zen 4/5 have AVX-512).
# Level: x86-64-v3 (AVX2 + FMA: the code a Zen 3 machine builds) where the compiler's native
# target has AVX-512, x86-64-v2 (SSE4.2, no FMA) where it has not. The library tests also run at
# baseline x86-64 (SSE2, no FMA) under the sanitizers (scripts/ci-sanitize.sh); this build covers
# the real-model tests, which are too slow under ASan. They run on one thread here, two in the
# main run.
#   scripts/ci-isa.sh [build dir] [march level]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build-isa}
target_info=$(g++ -march=native -Q --help=target 2>/dev/null || true)
native=$(awk '$1 == "-march=" {print $2; exit}' <<<"$target_info")
# The main build has AVX-512 when the CPU does (cmake/BasisattnIsa.cmake adds what -march=native misses).
avx512=no
if grep -qE -- '-mavx512f[[:space:]]+\[enabled\]' <<<"$target_info" || grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  avx512=yes
fi
if [ -n "${2:-}" ]; then
  level=$2
elif [ "$avx512" = yes ]; then
  level=x86-64-v3
else
  level=x86-64-v2
fi
echo "ci-isa: main build -march=native (${native:-unknown}; AVX-512 in the main build: $avx512); this build -march=$level"
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DBASISATTN_NATIVE=OFF -DCMAKE_CXX_FLAGS="-march=$level" \
  -DBASISATTN_BUILD_BENCHMARKS=OFF -DBASISATTN_BUILD_EXAMPLES=OFF -DBASISATTN_HEADER_CHECK=OFF -DBASISATTN_ENABLE_CUDA=OFF >/dev/null
# basisattn_real_model_tests: test_real_weights, test_pypi_models, test_smollm2, test_minilm.
cmake --build "$dir" -j2 --target basisattn_real_model_tests
# One OpenMP thread here (the main run uses two): the bounds must hold for either.
OMP_NUM_THREADS=1 ctest --test-dir "$dir" --output-on-failure --no-tests=error -j2 -R '^(test_real_weights|test_pypi_models|test_smollm2|test_minilm):'
