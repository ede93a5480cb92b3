#!/usr/bin/env bash
# The one command that proves basisattn's CUDA half on a (bare) GPU machine, within ~8 minutes on a
# 16-core H200:
#   bash scripts/gpu-check.sh [--deps DIR] [--out DIR]     (defaults: .gpu-deps and gpu-check-out)
# DIR of --deps is the folder made by scripts/gpu-deps.sh (Eigen, Catch2, nlohmann-json, Google
# Benchmark sources and our CMake package configs); when it is absent, the system's packages are used.
# Stages, each timed and logged, each run even after an earlier one failed:
#   a. env        nvidia-smi, nvcc, g++, cmake, CPU, git commit and status          -> env.txt
#   b. configure  cmake -S . -B build-gpu (Ninja, Release, sm_90, the deps folder)   -> build.log
#   c. build      only the CUDA test and benchmark programs, with all cores          -> build.log
#   d. ctest      ctest -R cuda (Skipped without a GPU: the programs exit 77)       -> ctest.log, ctest-junit.xml
#   e. sanitizer  compute-sanitizer memcheck + racecheck on the "[sanitize]" cases   -> runs.log
#   f. bench      bench_cuda, bench_cuda_approx (JSON)                               -> runs.log, bench_*.json
#   g. summary    stage/seconds/result table, test counts, sanitizer errors, one line per benchmark
#                 -> summary.txt, printed last
# Stages e and f are skipped, with a note, when no GPU answers. The out folder holds at most 8 flat
# files (the names above). Exit status: 0 when no stage failed.
# Environment: JOBS (build parallelism, default nproc), GPU_CHECK_BENCH_ARGS (appended to both
# benchmark command lines), GPU_CHECK_BUDGET_S (total time budget, default 470 s: later stages are
# shortened or skipped, with a note, when it runs out), GPU_CHECK_BENCH_RESERVE_S (time kept for the
# benchmarks while the sanitizer runs, default 120 s), GPU_CHECK_BUILD_DIR (default build-gpu),
# GPU_CHECK_CUDA_ARCH (default 90), GPU_CHECK_PROGRAMS (build and run only these programs).
set -uo pipefail
t_start=$SECONDS
root=$(cd "$(dirname "$0")/.." && pwd)

deps=$root/.gpu-deps
deps_given=0
out=$root/gpu-check-out
while [ $# -gt 0 ]; do
  case $1 in
    --deps) deps=${2:?--deps needs a folder}; deps_given=1; shift 2 ;;
    --deps=*) deps=${1#--deps=}; deps_given=1; shift ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$deps_given" -eq 1 ] && [ ! -d "$deps" ]; then
  # A bare GPU machine has no Eigen/Catch2/benchmark: without the folder the whole run would be wasted.
  echo "gpu-check: the deps folder $deps is missing (make it with scripts/gpu-deps.sh; it is gitignored," \
       "so a copy of the tree must bring it, e.g. the device tool's carry [\".gpu-deps\"])" >&2
  exit 2
fi
mkdir -p "$out" || { echo "gpu-check: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)                        # both relative to where the command was given
if [ -d "$deps" ]; then deps=$(cd "$deps" && pwd); fi
cd "$root" || exit 2

budget=${GPU_CHECK_BUDGET_S:-470}
bench_reserve=${GPU_CHECK_BENCH_RESERVE_S:-120}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 4)}
build=${GPU_CHECK_BUILD_DIR:-build-gpu}
cuda_arch=${GPU_CHECK_CUDA_ARCH:-90}
cuda_tests=(test_cuda_smoke test_cuda_projection test_cuda_layers test_cuda_conv test_cuda_support)
# Our own kernels first (conv, support, layers); projection's cases are mostly cuBLAS / cuBLASLt.
sanitize_progs=(test_cuda_conv test_cuda_support test_cuda_layers test_cuda_projection)
benches=(bench_cuda bench_cuda_approx)
# GPU_CHECK_PROGRAMS (a subset of the names above, space-separated) builds and runs only those: CI uses
# it to prove the deps folder and the script on one small program (scripts/ci-gpu-check.sh).
if [ -n "${GPU_CHECK_PROGRAMS:-}" ]; then
  keep() { local p w; local -n arr=$1; local kept=(); for p in "${arr[@]}"; do for w in $GPU_CHECK_PROGRAMS; do [ "$p" = "$w" ] && kept+=("$p"); done; done; arr=("${kept[@]}"); }
  keep cuda_tests; keep sanitize_progs; keep benches
fi

env_log=$out/env.txt build_log=$out/build.log ctest_log=$out/ctest.log runs_log=$out/runs.log
summary=$out/summary.txt junit=$out/ctest-junit.xml
rm -f "$env_log" "$build_log" "$ctest_log" "$runs_log" "$summary" "$junit" "$out/bench_cuda.json" "$out/bench_cuda_approx.json"
: > "$env_log"; : > "$build_log"; : > "$ctest_log"; : > "$runs_log"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The CUDA toolkit (nvcc, compute-sanitizer) is often installed without being on PATH.
find_tool() {  # find_tool NAME: PATH, beside nvcc, the usual CUDA folders, then a bounded search
  local d f
  if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return 0; fi
  for d in ${nvcc_dir:+"$nvcc_dir"} /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer /usr/local/cuda-*/bin \
           /usr/local/cuda-*/compute-sanitizer /opt/cuda/bin; do
    if [ -x "$d/$1" ]; then echo "$d/$1"; return 0; fi
  done
  f=$(timeout 20 find /usr/local /opt -maxdepth 9 -name "$1" -type f -perm -u+x 2>/dev/null | head -n1)
  [ -n "$f" ] && echo "$f"
}
nvcc_dir=""
nvcc_bin=$(find_tool nvcc)
if [ -n "$nvcc_bin" ]; then
  nvcc_dir=$(dirname "$nvcc_bin")
  command -v nvcc >/dev/null 2>&1 || PATH=$PATH:$nvcc_dir
fi
sanitizer_bin=$(find_tool compute-sanitizer)
export PATH

# ---- bookkeeping --------------------------------------------------------------------------------------
names=() secs=() results=()
details=()       # extra summary lines
failed=0
left() { echo $((budget - (SECONDS - t_start))); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
record() {  # record NAME SECONDS RESULT  (RESULT starting with FAIL counts as a failure)
  names+=("$1"); secs+=("$2"); results+=("$3")
  case $3 in FAIL*|TIMEOUT*) failed=1 ;; esac
  printf 'gpu-check: %-10s %5ss  %s\n' "$1" "$2" "$3"
}
stage_begin() { stage_t0=$SECONDS; printf '\ngpu-check: ---- %s (%ss of the %ss budget left) ----\n' "$1" "$(left)" "$budget"; }
elapsed() { echo $((SECONDS - stage_t0)); }
section() { printf '\n==== %s ====\n' "$*"; }   # a header in a log
run_logged() {  # run_logged LOG TIMEOUT_S CMD...: section header + output into LOG; returns CMD's status
  local log=$1 t=$2; shift 2
  section "$* (timeout ${t}s)" >> "$log"
  timeout --kill-after=10 "$t" "$@" >> "$log" 2>&1
  local rc=$?
  echo "[exit status $rc]" >> "$log"
  return $rc
}
cap_log() {  # cap_log FILE MAX_BYTES: keep the first 64 KiB and the last part
  local f=$1 max=$2 size
  [ -f "$f" ] || return 0
  size=$(wc -c < "$f")
  [ "$size" -gt "$max" ] || return 0
  { head -c 65536 "$f"; printf '\n\n[... %s bytes cut by gpu-check ...]\n\n' "$((size - max))"; tail -c $((max - 65536)) "$f"; } > "$tmp/cap"
  mv "$tmp/cap" "$f"
}

# ---- a. env -------------------------------------------------------------------------------------------
stage_begin env
have_gpu=0 gpu_name=none
{
  section "date"; date -u +%Y-%m-%dT%H:%M:%SZ
  section "nvidia-smi -L"; timeout 30 nvidia-smi -L 2>&1
  section "nvidia-smi --query-gpu"
  timeout 30 nvidia-smi --query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,memory.total,memory.used,memory.free,temperature.gpu,power.limit --format=csv 2>&1
  timeout 30 nvidia-smi --query-gpu=compute_cap,persistence_mode,mig.mode.current --format=csv 2>&1
  section "nvidia-smi"; timeout 30 nvidia-smi 2>&1
  section "nvcc --version"; timeout 30 nvcc --version 2>&1
  section "compute-sanitizer --version"
  if [ -n "$sanitizer_bin" ]; then echo "$sanitizer_bin"; timeout 30 "$sanitizer_bin" --version 2>&1; else echo "compute-sanitizer: not found"; fi
  section "g++ --version"; timeout 30 g++ --version 2>&1
  section "cmake --version"; timeout 30 cmake --version 2>&1
  section "ninja --version"; timeout 30 ninja --version 2>&1
  section "python3 --version"; timeout 30 python3 --version 2>&1
  section "nproc"; nproc 2>&1
  section "lscpu (model name)"; timeout 30 lscpu 2>&1 | grep -i 'model name'
  section "free -g"; free -g 2>&1
  section "uname -a"; uname -a 2>&1
  section "git"
  if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    echo "HEAD $(git -C "$root" rev-parse HEAD 2>&1)"
    echo "git status --short:"; git -C "$root" status --short 2>&1 | head -n 200
  else
    echo "not a git checkout (a plain copy of the tree): no commit to report"
  fi
  section "deps folder"; if [ -f "$deps/MANIFEST.txt" ]; then cat "$deps/MANIFEST.txt"; else echo "$deps: absent (system packages will be used)"; fi
} >> "$env_log" 2>&1
if timeout 30 nvidia-smi -L > "$tmp/smi" 2>&1 && grep -q '^GPU ' "$tmp/smi"; then
  have_gpu=1
  gpu_name=$(grep -m1 '^GPU ' "$tmp/smi" | sed -E 's/^GPU [0-9]+: //; s/ \(UUID.*//')
fi
commit=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo "no-git")
dirty=""
if [ "$commit" != no-git ] && [ -n "$(git -C "$root" status --short 2>/dev/null | head -n1)" ]; then dirty=" (dirty tree)"; fi
env_note="GPU: $gpu_name; $(nproc) cores; nvcc $(nvcc --version 2>/dev/null | grep -oE 'release [0-9.]+' | cut -d' ' -f2)"
record env "$(elapsed)" "OK ($env_note)"

# ---- b. configure -------------------------------------------------------------------------------------
stage_begin configure
configured=0
if timeout 30 ninja --version >/dev/null 2>&1; then gen=Ninja; else gen="Unix Makefiles"; fi
if [ -f "$build/CMakeCache.txt" ] && ! grep -qx "CMAKE_GENERATOR:INTERNAL=$gen" "$build/CMakeCache.txt"; then
  echo "gpu-check: $build was configured with another generator: removing it" | tee -a "$build_log"
  rm -rf "$build"
fi
cmake_args=(-S . -B "$build" -G "$gen" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$cuda_arch"
  -DBASISATTN_HEADER_CHECK=OFF -DBASISATTN_PYPI_MODEL_TESTS=OFF -DBASISATTN_BUILD_EXAMPLES=OFF
  -DBASISATTN_ENABLE_CUDA=ON -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if [ -n "$nvcc_bin" ]; then cmake_args+=(-DCMAKE_CUDA_COMPILER="$nvcc_bin"); fi
deps_abs=""
if [ -d "$deps/cmake" ]; then
  deps_abs=$(cd "$deps" && pwd)
  cmake_args+=(-DCMAKE_PREFIX_PATH="$deps_abs/cmake")
  for p in Eigen3 Catch2 nlohmann_json benchmark; do cmake_args+=("-D${p}_DIR=$deps_abs/cmake"); done
else
  echo "gpu-check: deps folder $deps/cmake absent: using the system's packages" | tee -a "$build_log"
fi
t=$(min 240 "$(left)")
if ! command -v cmake >/dev/null 2>&1; then
  record configure "$(elapsed)" "FAIL (no cmake)"
elif [ "$t" -lt 30 ]; then
  record configure 0 "FAIL (time budget spent before configuring)"
else
  run_logged "$build_log" "$t" cmake "${cmake_args[@]}"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    found=$(grep -E '^(Eigen3|Catch2|nlohmann_json|benchmark)_DIR:' "$build/CMakeCache.txt" | sed -E 's/:[A-Z]+=/=/')
    { section "packages found"; echo "$found"; } >> "$build_log"
    note="generator $gen"
    if [ -n "$deps_abs" ] && [ "$(grep -c "=$deps_abs/cmake\$" <<< "$found")" -ne 4 ]; then
      record configure "$(elapsed)" "FAIL (a package did not come from $deps: $(tr '\n' ' ' <<< "$found"))"
    elif ! grep -q 'basisattn::cuda available' "$build_log" || ! grep -q '^CMAKE_CUDA_COMPILER:.*nvcc' "$build/CMakeCache.txt"; then
      record configure "$(elapsed)" "FAIL (CUDA toolkit or nvcc not found: no CUDA targets)"
    else
      configured=1
      [ -n "$deps_abs" ] && note="$note, all 4 packages from $deps"
      record configure "$(elapsed)" "OK ($note)"
    fi
  else
    record configure "$(elapsed)" "FAIL (cmake exit status $rc; see build.log)"
  fi
fi

# ---- c. build -----------------------------------------------------------------------------------------
stage_begin build
built=()
if [ "$configured" -eq 1 ]; then
  keep_going=(-k 0); [ "$gen" = Ninja ] || keep_going=(-k)
  t=$(( $(left) - 60 ))
  if [ "$t" -lt 30 ]; then
    record build 0 "FAIL (time budget spent before the build)"
  else
    run_logged "$build_log" "$t" cmake --build "$build" -j "$jobs" --target "${cuda_tests[@]}" "${benches[@]}" -- "${keep_going[@]}"
    rc=$?
    missing=()
    for p in "${cuda_tests[@]}"; do if [ -x "$build/tests/$p" ]; then built+=("$p"); else missing+=("$p"); fi; done
    for p in "${benches[@]}"; do if [ -x "$build/bench/$p" ]; then built+=("$p"); else missing+=("$p"); fi; done
    if [ "$rc" -eq 0 ]; then
      record build "$(elapsed)" "OK (${#built[@]} programs, -j$jobs)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      record build "$(elapsed)" "TIMEOUT (after ${t}s; not built: ${missing[*]:-none})"
    else
      record build "$(elapsed)" "FAIL (exit status $rc; not built: ${missing[*]:-none}; see build.log)"
    fi
  fi
else
  record build 0 "SKIP (not configured)"
fi

# ---- d. ctest -----------------------------------------------------------------------------------------
stage_begin ctest
ctest_counts="not run"
if [ "$configured" -eq 1 ] && [ ${#built[@]} -gt 0 ]; then
  t=$(min 300 $(( $(left) - 30 )))
  if [ "$t" -lt 20 ]; then
    record ctest 0 "FAIL (no time left in the budget)"
  else
    stop=$(date -d "@$(( $(date +%s) + t - 10 ))" +%H:%M:%S 2>/dev/null || true)
    regex=cuda
    [ -n "${GPU_CHECK_PROGRAMS:-}" ] && regex="^($(IFS='|'; echo "${cuda_tests[*]}")):"
    # Every test claims 2 processors (PROCESSORS 2): -j12 runs 6 test processes at once, 2 OpenMP
    # threads each (their CPU oracles), sharing the GPU; 6 of the [large] cases (<= 16 GB each) fit.
    ctest_args=(--test-dir "$build" -R "$regex" --output-on-failure -j"${GPU_CHECK_CTEST_J:-12}" --output-junit "$junit")
    [ -n "$stop" ] && ctest_args+=(--stop-time "$stop")
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} run_logged "$ctest_log" "$t" ctest "${ctest_args[@]}"
    rc=$?
    total=$(grep -cE 'Test +#[0-9]+: ' "$ctest_log")
    passed=$(grep -E 'Test +#[0-9]+: ' "$ctest_log" | grep -cE ' Passed +[0-9.]+ sec')
    skipped=$(grep -E 'Test +#[0-9]+: ' "$ctest_log" | grep -c '\*\*\*Skipped')
    failed_n=$((total - passed - skipped))
    ctest_counts="$passed passed, $failed_n failed, $skipped skipped (of $total)"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      record ctest "$(elapsed)" "TIMEOUT (after ${t}s: $ctest_counts)"
    elif [ "$total" -eq 0 ]; then
      record ctest "$(elapsed)" "FAIL (no CUDA tests found; exit status $rc)"
    elif [ "$rc" -ne 0 ] || [ "$failed_n" -gt 0 ]; then
      record ctest "$(elapsed)" "FAIL ($ctest_counts)"
    elif [ "$skipped" -gt 0 ] && [ "$have_gpu" -eq 1 ]; then
      record ctest "$(elapsed)" "FAIL (a GPU answers but $skipped tests were Skipped: $ctest_counts)"
    elif [ "$skipped" -gt 0 ]; then
      record ctest "$(elapsed)" "OK (no GPU: $ctest_counts)"
    else
      record ctest "$(elapsed)" "OK ($ctest_counts)"
    fi
  fi
else
  record ctest 0 "SKIP (nothing built)"
fi

# ---- e. compute-sanitizer -----------------------------------------------------------------------------
stage_begin sanitizer
if [ "$have_gpu" -eq 0 ]; then
  record sanitizer 0 "SKIP (no GPU answers: nvidia-smi fails or lists none)"
elif [ -z "$sanitizer_bin" ]; then
  record sanitizer 0 "SKIP (compute-sanitizer not found)"
elif [ ${#built[@]} -eq 0 ]; then
  record sanitizer 0 "SKIP (nothing built)"
else
  san_fail=0 san_runs=0 san_skipped=0 san_unsupported=0 san_skipped_list=""
  # memcheck on every program first, then racecheck: the less time is left, the more it matters that
  # each program got the memory check. racecheck instruments only our kernels (namespace cuda_kernels;
  # cuBLAS's shared-memory use is not ours to check and racecheck on it is slow); if this
  # compute-sanitizer does not know the filter option, the run is repeated without it.
  declare -A n_cases=()
  for p in "${sanitize_progs[@]}"; do
    exe=$build/tests/$p
    if [ ! -x "$exe" ]; then
      details+=("sanitizer  $p: not built"); san_fail=1; n_cases[$p]=0; continue
    fi
    n_cases[$p]=$(timeout 30 "$exe" --list-test-names-only "[sanitize]" 2>/dev/null | grep -c '[^[:space:]]')
    if [ "${n_cases[$p]}" -eq 0 ]; then
      details+=("sanitizer  $p: no test case tagged [sanitize] (nothing checked)"); san_fail=1
    fi
  done
  for tool in memcheck racecheck; do
    for p in "${sanitize_progs[@]}"; do
      [ "${n_cases[$p]}" -gt 0 ] || continue
      exe=$build/tests/$p
      t=$(min "${GPU_CHECK_SANITIZER_RUN_S:-150}" $(( $(left) - bench_reserve )))
      if [ "$t" -lt 20 ]; then
        san_skipped_list="$san_skipped_list $p/$tool"
        san_skipped=$((san_skipped + 1)); continue
      fi
      t1=$SECONDS
      filter=()
      [ "$tool" = racecheck ] && filter=(--kernel-name kns=cuda_kernels)
      run_logged "$tmp/san" "$t" "$sanitizer_bin" --tool "$tool" "${filter[@]}" --error-exitcode 1 "$exe" "[sanitize]"
      rc=$?
      if [ "$rc" -ne 0 ] && [ ${#filter[@]} -gt 0 ] && grep -qiE 'unrecogni[sz]ed|unknown option|invalid option|kernel-name' "$tmp/san" \
         && ! grep -qE 'ERROR SUMMARY: [1-9]' "$tmp/san"; then
        echo "gpu-check: this compute-sanitizer refused '${filter[*]}': racecheck on every kernel" >> "$tmp/san"
        cat "$tmp/san" >> "$runs_log"; rm -f "$tmp/san"
        t=$(min "${GPU_CHECK_SANITIZER_RUN_S:-150}" $(( $(left) - bench_reserve )))
        run_logged "$tmp/san" "$t" "$sanitizer_bin" --tool "$tool" --error-exitcode 1 "$exe" "[sanitize]"
        rc=$?
      fi
      san_runs=$((san_runs + 1))
      errs=$(grep -oE 'ERROR SUMMARY: [0-9]+' "$tmp/san" | tail -n1 | grep -oE '[0-9]+$')
      [ -n "$errs" ] || errs=$(grep -oE 'SUMMARY: .*\(([0-9]+) errors' "$tmp/san" | tail -n1 | grep -oE '[0-9]+ errors' | grep -oE '[0-9]+')
      unsupported=$(grep -m1 -o 'Device not supported' "$tmp/san")
      cap_log "$tmp/san" 400000
      cat "$tmp/san" >> "$runs_log"; rm -f "$tmp/san"
      if [ "$rc" -ne 0 ] && [ "$unsupported" = "Device not supported" ]; then
        san_unsupported=1; break 2   # e.g. a gVisor machine: compute-sanitizer cannot attach there
      fi
      case $rc in
        0) res="OK" ;;
        124|137) res="TIMEOUT after ${t}s"; san_fail=1 ;;
        *) res="FAIL (exit status $rc)"; san_fail=1 ;;
      esac
      details+=("sanitizer  $p $tool (${n_cases[$p]} cases): ${errs:-?} errors, $((SECONDS - t1))s, $res")
    done
  done
  note="$san_runs runs"
  if [ "$san_skipped" -gt 0 ]; then
    note="$note, $san_skipped skipped for time"
    details+=("sanitizer  skipped, time budget (${bench_reserve}s kept for the benchmarks):$san_skipped_list")
  fi
  if [ "$san_unsupported" -eq 1 ]; then
    record sanitizer "$(elapsed)" "SKIP (compute-sanitizer says 'Device not supported' on this machine's runtime; see runs.log)"
  elif [ "$san_fail" -eq 1 ]; then record sanitizer "$(elapsed)" "FAIL ($note; see above and runs.log)"
  elif [ "$san_skipped" -gt 0 ]; then
    # Not a pass: part of the check did not run (rerun with GPU_CHECK_BUDGET_S larger, or a warm build).
    record sanitizer "$(elapsed)" "FAIL (incomplete: $note; see above)"
  else record sanitizer "$(elapsed)" "OK ($note)"; fi
fi

# ---- f. benchmarks ------------------------------------------------------------------------------------
stage_begin bench
extra=()
[ -n "${GPU_CHECK_BENCH_ARGS:-}" ] && read -r -a extra <<< "$GPU_CHECK_BENCH_ARGS"
if [ "$have_gpu" -eq 0 ]; then
  record bench 0 "SKIP (no GPU answers)"
else
  bench_fail=0 bench_note="" bench_ran=0
  for i in "${!benches[@]}"; do
    b=${benches[$i]}
    exe=$build/bench/$b
    if [ ! -x "$exe" ]; then bench_fail=1; bench_note="$bench_note $b: not built;"; continue; fi
    room=$(( $(left) - 20 ))
    if [ "$i" -eq 0 ]; then t=$(( room * 3 / 5 )); else t=$room; fi
    if [ "$t" -lt 15 ]; then bench_note="$bench_note $b: skipped, time budget spent;"; continue; fi
    run_logged "$runs_log" "$t" "$exe" "--benchmark_out=$out/$b.json" --benchmark_out_format=json "${extra[@]}"
    rc=$?
    bench_ran=$((bench_ran + 1))
    errs=0
    [ -f "$out/$b.json" ] && errs=$(grep -c '"error_occurred": true' "$out/$b.json")
    case $rc in
      0) ;;
      124|137) bench_fail=1; bench_note="$bench_note $b: TIMEOUT after ${t}s (JSON cut short);" ;;
      *) bench_fail=1; bench_note="$bench_note $b: exit status $rc;" ;;
    esac
    if [ "$errs" -gt 0 ]; then bench_fail=1; bench_note="$bench_note $b: $errs benchmarks reported an error;"; fi
    if [ "$rc" -eq 0 ] && ! grep -q '"run_type"' "$out/$b.json" 2>/dev/null; then
      bench_note="$bench_note $b: no benchmark ran;"
      [ ${#extra[@]} -eq 0 ] && bench_fail=1   # with a filter in GPU_CHECK_BENCH_ARGS this can be intended
    fi
  done
  bench_note=${bench_note# }; bench_note=${bench_note%;}
  if [ "$bench_fail" -eq 1 ]; then record bench "$(elapsed)" "FAIL ($bench_note)"
  elif [ "$bench_ran" -eq 0 ]; then record bench "$(elapsed)" "SKIP (${bench_note:-no benchmark selected})"
  else record bench "$(elapsed)" "OK${bench_note:+ ($bench_note)}"; fi
fi

# ---- g. summary ---------------------------------------------------------------------------------------
bench_lines() {  # one line per benchmark: name, time, counters (python3; tolerates a cut-short JSON)
  command -v python3 >/dev/null 2>&1 || { echo "  (python3 absent: benchmark lines skipped)"; return; }
  python3 - "$@" <<'PY'
import json, sys, os
std = {"name", "family_index", "per_family_instance_index", "run_name", "run_type", "repetitions",
       "repetition_index", "threads", "iterations", "real_time", "cpu_time", "time_unit",
       "error_occurred", "error_message", "aggregate_name", "aggregate_unit", "label"}
std_context = {"date", "host_name", "executable", "num_cpus", "mhz_per_cpu", "cpu_scaling_enabled",
               "caches", "load_avg", "library_build_type", "json_schema_version"}
def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
for path in sys.argv[1:]:
    prog = os.path.basename(path)[:-5]
    if not os.path.exists(path):
        continue
    text = open(path, errors="replace").read()
    if not text.strip():
        print(f"  {prog}: no benchmark ran (empty JSON)"); continue
    try:
        data = json.loads(text)
    except ValueError:
        cut = text.rfind("\n    }")  # a run killed mid-way: keep the complete entries
        try:
            data = json.loads(text[:cut + 6] + "\n  ]\n}") if cut > 0 else {}
            print(f"  {prog}: JSON cut short; its complete entries follow")
        except ValueError:
            print(f"  {prog}: JSON unreadable"); continue
    ctx = " ".join(f"{k}={v}" for k, v in data.get("context", {}).items() if k not in std_context)
    if ctx:
        print(f"  {prog} context: {ctx}")
    errors = []
    for b in data.get("benchmarks", []):
        name = b.get("name", "?")
        if b.get("error_occurred"):
            errors.append(f"  {prog} {name}  ERROR: {b.get('error_message', '')}")
            continue
        counters = " ".join(f"{k}={fmt(v)}" for k, v in b.items() if k not in std)
        t = b.get("real_time")
        tt = f"{t:.4g} {b.get('time_unit', '')}" if isinstance(t, (int, float)) else "?"
        print(f"  {prog} {name}  time={tt}  {counters}".rstrip())
    for line in errors[:8]:
        print(line)
    if len(errors) > 8:
        print(f"  {prog}: {len(errors) - 8} more benchmarks reported an error ({len(errors)} in all; see the JSON)")
PY
}

total_s=$((SECONDS - t_start))
if [ "$failed" -eq 0 ]; then verdict=PASS; else verdict=FAIL; fi
{
  echo "basisattn gpu-check: commit $commit$dirty, $(date -u +%Y-%m-%dT%H:%M:%SZ), GPU: $gpu_name"
  if [ -f "$out/bench_cuda.json" ] || [ -f "$out/bench_cuda_approx.json" ]; then
    echo "benchmarks (name, real time, counters):"
    bench_lines "$out/bench_cuda.json" "$out/bench_cuda_approx.json"
  fi
  for d in "${details[@]}"; do echo "$d"; done
  echo "ctest: $ctest_counts"
  printf '%-10s %7s  %s\n' stage seconds result
  for i in "${!names[@]}"; do printf '%-10s %7s  %s\n' "${names[$i]}" "${secs[$i]}" "${results[$i]}"; done
  printf '%-10s %7s  %s\n' total "$total_s" "$verdict (budget ${budget}s; logs and JSON in $out)"
} > "$summary"

for f in "$build_log" "$ctest_log" "$runs_log" "$env_log"; do cap_log "$f" 2000000; done
# The end of a failing stage's log on stdout, before the summary (the out folder may not come back).
if grep -qE '^build +[0-9]+  (FAIL|TIMEOUT)' "$summary"; then
  printf '\n---- errors in build.log ----\n'; grep -E 'error|FAILED' "$build_log" | tail -n 30
fi
if grep -qE '^ctest +[0-9]+  (FAIL|TIMEOUT)' "$summary"; then
  printf '\n---- tests that did not pass (ctest.log) ----\n'
  awk '/The following tests FAILED:/ {on=1; next} on && /^\t/ && !/\(Skipped\)$/' "$ctest_log" | head -n 30
fi
printf '\n'
cat "$summary"
exit "$failed"
