#!/usr/bin/env bash
# Fuzz each checkpoint reader with libFuzzer (clang, + ASan + UBSan) for FUZZ_SECONDS (default 60)
# each, starting from a seed corpus of small valid files written by tests/fuzz/make_corpus.cpp.
# A crash, sanitizer report or non-basisattn exception fails the script (and CI).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
dir=${1:-build-fuzz}
mkdir -p "$dir"
inc="-Iinclude -Itests/support -isystem /usr/include/eigen3"
san="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined"
g++ -std=c++17 -O1 $inc tests/fuzz/make_corpus.cpp -o "$dir/make_corpus"
rm -rf "$dir/corpus" && "$dir/make_corpus" "$dir/corpus"
names=(safetensors gguf llama2c)
for i in 0 1 2; do
  clang++ -std=c++17 -O1 -g $san $inc -DBASISATTN_FUZZ_FORMAT=$((i + 1)) tests/fuzz/fuzz_readers.cpp -o "$dir/fuzz_${names[$i]}" &
done
wait
for n in "${names[@]}"; do
  mkdir -p "$dir/work/$n"
  echo "fuzz: $n for ${secs}s"
  "$dir/fuzz_$n" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$dir/" \
    "$dir/work/$n" "$dir/corpus/$n" 2>&1 | tail -n 12
  test "${PIPESTATUS[0]}" -eq 0
done
echo "fuzz: no crash in ${#names[@]} targets x ${secs}s"
