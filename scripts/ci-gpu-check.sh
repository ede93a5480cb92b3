#!/usr/bin/env bash
# CI stage: prove scripts/gpu-deps.sh and scripts/gpu-check.sh on a machine without a GPU, cheaply.
#   bash scripts/ci-gpu-check.sh [DEPS_DIR] [BUILD_DIR]      (defaults .gpu-deps, build-gpu-ci)
# Makes the dependency folder, then, in a mount namespace where the system's Eigen, Catch2, Google
# Benchmark and nlohmann-json are hidden, runs gpu-check.sh on one small program (test_cuda_smoke:
# two of the library's kernels and Catch2 through the folder's package configs). Passes when the script exits 0 and
# ctest reports the test Skipped (or passed, should a GPU answer). The whole check of every CUDA
# program from that folder was proven once by hand (README, developer section); this stage keeps the
# folder and the script from rotting between the rare GPU sessions. Without the CUDA toolkit it is
# skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=${1:-.gpu-deps}
build=${2:-build-gpu-ci}
if ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "ci-gpu-check: no CUDA toolkit (nvcc) here: skipped"
  exit 0
fi
bash scripts/gpu-deps.sh "$deps"
out=$build-out
rm -rf "$out"
run="GPU_CHECK_PROGRAMS=test_cuda_smoke GPU_CHECK_BUILD_DIR='$build' bash scripts/gpu-check.sh --deps '$deps' --out '$out'"
hide='set -e
for d in /usr/include/eigen3 /usr/include/catch2 /usr/include/benchmark /usr/include/nlohmann /usr/lib/cmake/Catch2 \
         /usr/lib/x86_64-linux-gnu/cmake/benchmark /usr/share/cmake/nlohmann_json /usr/share/eigen3; do
  if [ -d "$d" ]; then mount -t tmpfs none "$d"; fi
done
empty=$(mktemp)
for f in /usr/lib/x86_64-linux-gnu/libbenchmark* /usr/lib/libCatch2WithMain.a; do
  if [ -e "$f" ]; then mount --bind "$empty" "$f"; fi
done
set +e'
status=0
if [ "$(id -u)" -eq 0 ] && unshare -m true 2>/dev/null; then
  echo "ci-gpu-check: system Eigen, Catch2, Google Benchmark and nlohmann-json hidden (mount namespace)"
  unshare -m bash -c "$hide
$run" || status=$?
else
  echo "ci-gpu-check: cannot hide the system packages here (needs root and unshare -m): they stay visible"
  bash -c "$run" || status=$?
fi
if [ "$status" -ne 0 ]; then
  echo "ci-gpu-check: gpu-check.sh failed (exit status $status); summary above, logs in $out" >&2
  exit 1
fi
if ! grep -qE '^ctest: 0 passed, 0 failed, [1-9][0-9]* skipped|^ctest: [1-9][0-9]* passed, 0 failed' "$out/summary.txt"; then
  echo "ci-gpu-check: unexpected test counts in $out/summary.txt" >&2
  exit 1
fi
echo "ci-gpu-check: OK"
