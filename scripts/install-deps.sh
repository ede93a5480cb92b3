#!/usr/bin/env bash
# Install what basisattn needs to build, test and benchmark on Debian/Ubuntu, only when missing
# (idempotent; run as root or with sudo available). CUDA is optional and never installed here.
# libfftw3-dev is only for the opt-in FFTW engine of conv-basis attention (GPL), which the test
# command of the README enables (-DBASISATTN_WITH_FFTW=ON) so that CI tests it. libdnnl-dev is oneDNN,
# the optional GEMM provider of the CPU backend (-DBASISATTN_WITH_ONEDNN=ON, Apache-2.0).
# `install-deps.sh fuzz` also installs clang and its runtime (libFuzzer, sanitizers).
set -euo pipefail
pkgs=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev libfftw3-dev libdnnl-dev)
if [ "${1:-}" = "fuzz" ]; then pkgs+=(clang libclang-rt-14-dev); fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all present (${pkgs[*]})"
  exit 0
fi
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
