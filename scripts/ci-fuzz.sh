#!/usr/bin/env bash
# Fuzz each checkpoint reader with libFuzzer (clang, + ASan + UBSan) for FUZZ_SECONDS (default 60)
# each, starting from a seed corpus of small valid files written by tests/fuzz/make_corpus.cpp.
# A crash, sanitizer report or non-basisattn exception fails the script (and CI).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
dir=${1:-build-fuzz}
mkdir -p "$dir"
inc="-Iinclude -Itests/common -isystem /usr/include/eigen3"
san="-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined"
g++ -std=c++17 -O1 $inc tests/fuzz/make_corpus.cpp -o "$dir/make_corpus"
rm -rf "$dir/corpus" && "$dir/make_corpus" "$dir/corpus"
names=(safetensors gguf llama2c)
for i in 0 1 2; do
  clang++ -std=c++17 -O1 -g $san $inc -DBASISATTN_FUZZ_FORMAT=$((i + 1)) tests/fuzz/fuzz_readers.cpp -o "$dir/fuzz_${names[$i]}" &
done
wait
# Two targets at a time (each fuzzer is one process on one core; CI has two): the same fuzzing time
# per target in two thirds of the wall time.
fuzz_one() {
  local n=$1
  mkdir -p "$dir/work/$n"
  "$dir/fuzz_$n" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$dir/" \
    "$dir/work/$n" "$dir/corpus/$n" >"$dir/fuzz_$n.log" 2>&1
}
status=0
for group in "safetensors gguf" "llama2c"; do
  pids=()
  for n in $group; do
    echo "fuzz: $n for ${secs}s"
    fuzz_one "$n" &
    pids+=($!)
  done
  i=0
  for n in $group; do
    if wait "${pids[$i]}"; then rc=0; else rc=$?; fi
    tail -n 12 "$dir/fuzz_$n.log"
    if [ "$rc" -ne 0 ]; then echo "fuzz: $n failed (exit $rc)"; status=1; fi
    i=$((i + 1))
  done
done
[ "$status" -eq 0 ]
echo "fuzz: no crash in ${#names[@]} targets x ${secs}s"
