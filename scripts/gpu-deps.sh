#!/usr/bin/env bash
# Make the small, self-contained folder of third-party dependencies that a bare GPU machine lacks
# (no Eigen, Catch2, Google Benchmark or nlohmann-json there, and no network), for
# scripts/gpu-check.sh. Run on a Debian machine with the mirrors reachable:
#   scripts/gpu-deps.sh [DIR]        (default DIR: .gpu-deps in the repository root; gitignored)
# The folder holds, taken from Debian bookworm's packages (installed with apt-get only when missing):
#   eigen3/           Eigen 3 headers (libeigen3-dev): Eigen/ and only the unsupported/ modules that
#                     basisattn's sources include (found with grep, e.g. unsupported/Eigen/FFT)
#   catch2/           Catch2 v2 single header catch2/catch.hpp, its CMake scripts (Catch.cmake,
#                     CatchAddTests.cmake) and a one-line main for Catch2::Catch2WithMain (catch2)
#   nlohmann_json/    nlohmann/json headers (nlohmann-json3-dev)
#   benchmark/        Google Benchmark 1.7.1 SOURCES (include/, src/; the Debian source package
#                     `benchmark` with Debian's patches, fetched with `apt-get source` through a
#                     private, temporary deb-src list: the system's apt configuration is not touched)
#   cmake/            our own package config files: Eigen3, Catch2, nlohmann_json, benchmark (which
#                     compiles the benchmark sources as a static library inside the consuming build)
#   licenses/         the Debian copyright files of the four packages
#   MANIFEST.txt      versions and provenance
# Nothing here is ever committed (/.gpu-deps/ is in .gitignore). The downloaded source package is kept
# in .cache/gpu-deps/ so that a rerun needs no network.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/.gpu-deps}
case $dir in /*) ;; *) dir=$PWD/$dir ;; esac
cache=$root/.cache/gpu-deps
bm_version=1.7.1
bm_debian=1.7.1-1

log() { echo "gpu-deps: $*"; }
die() { echo "gpu-deps: error: $*" >&2; exit 1; }

# ---- Debian packages, only when missing -------------------------------------------------------------
pkgs=(libeigen3-dev catch2 nlohmann-json3-dev dpkg-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
eigen_inc=/usr/include/eigen3
[ -f "$eigen_inc/Eigen/Core" ] || die "$eigen_inc/Eigen/Core missing (libeigen3-dev)"
[ -f /usr/include/catch2/catch.hpp ] || die "/usr/include/catch2/catch.hpp missing (catch2 v2)"
[ -f /usr/include/nlohmann/json.hpp ] || die "/usr/include/nlohmann/json.hpp missing (nlohmann-json3-dev)"
catch_cmake=$(dirname "$(dpkg -L catch2 | grep '/Catch\.cmake$' | head -n1)")
[ -f "$catch_cmake/CatchAddTests.cmake" ] || die "Catch.cmake/CatchAddTests.cmake not found in package catch2"

# ---- Google Benchmark's Debian source package (cached) ----------------------------------------------
dsc=$cache/benchmark_$bm_debian.dsc
if [ ! -f "$dsc" ]; then
  log "downloading the Debian source package benchmark=$bm_debian (private deb-src list)"
  mkdir -p "$cache"
  apt_tmp=$(mktemp -d)
  trap 'rm -rf "$apt_tmp"' EXIT
  mkdir -p "$apt_tmp/lists/partial" "$apt_tmp/cache/archives/partial"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" \
    > "$apt_tmp/sources.list"
  apt_opts=(-o "Dir::Etc::sourcelist=$apt_tmp/sources.list" -o Dir::Etc::sourceparts=-
            -o "Dir::State::Lists=$apt_tmp/lists" -o "Dir::Cache=$apt_tmp/cache"
            -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
  apt-get "${apt_opts[@]}" update -qq
  (cd "$cache" && apt-get "${apt_opts[@]}" source --download-only -qq "benchmark=$bm_debian")
  [ -f "$dsc" ] || die "apt-get source did not produce $dsc"
fi

# ---- assemble the folder in a temporary sibling, then swap it in --------------------------------------
mkdir -p "$(dirname "$dir")"
tmp=$(mktemp -d "$(dirname "$dir")/.gpu-deps.tmp.XXXXXX")
cleanup() { rm -rf "$tmp" "${apt_tmp:-}"; }
trap cleanup EXIT

# Eigen: the whole Eigen/ tree (Core and Dense pull in most of it) + the unsupported modules we include.
mkdir -p "$tmp/eigen3"
cp -a "$eigen_inc/Eigen" "$tmp/eigen3/"
mapfile -t unsup < <(grep -rhoE '#include *[<"]unsupported/Eigen/[A-Za-z]+' \
  "$root/include" "$root/tests" "$root/bench" "$root/examples" 2>/dev/null | sed -E 's|.*unsupported/Eigen/||' | sort -u)
for m in "${unsup[@]}"; do
  [ -f "$eigen_inc/unsupported/Eigen/$m" ] || die "unsupported/Eigen/$m is included but not in $eigen_inc"
  mkdir -p "$tmp/eigen3/unsupported/Eigen/src"
  cp -a "$eigen_inc/unsupported/Eigen/$m" "$tmp/eigen3/unsupported/Eigen/"
  if [ -d "$eigen_inc/unsupported/Eigen/src/$m" ]; then
    cp -a "$eigen_inc/unsupported/Eigen/src/$m" "$tmp/eigen3/unsupported/Eigen/src/"
  fi
done
eigen_ver=$(awk '/#define EIGEN_(WORLD|MAJOR|MINOR)_VERSION/ {printf "%s%s", sep, $3; sep="."}' \
  "$eigen_inc/Eigen/src/Core/util/Macros.h")

# Catch2 v2: the single header, the CMake scripts, a main.
mkdir -p "$tmp/catch2/include/catch2" "$tmp/catch2/cmake"
cp -a /usr/include/catch2/catch.hpp "$tmp/catch2/include/catch2/"
cp -a "$catch_cmake/Catch.cmake" "$catch_cmake/CatchAddTests.cmake" "$tmp/catch2/cmake/"
printf '#define CATCH_CONFIG_MAIN\n#include <catch2/catch.hpp>\n' > "$tmp/catch2/catch2_main.cpp"
catch_ver=$(awk '/#define CATCH_VERSION_(MAJOR|MINOR|PATCH)/ {printf "%s%s", sep, $3; sep="."}' /usr/include/catch2/catch.hpp)

# nlohmann-json headers.
mkdir -p "$tmp/nlohmann_json/include"
cp -a /usr/include/nlohmann "$tmp/nlohmann_json/include/"
json_ver=$(grep -rh '#define NLOHMANN_JSON_VERSION_\(MAJOR\|MINOR\|PATCH\) ' /usr/include/nlohmann | sort -u |
  awk '{v[$2]=$3} END {print v["NLOHMANN_JSON_VERSION_MAJOR"] "." v["NLOHMANN_JSON_VERSION_MINOR"] "." v["NLOHMANN_JSON_VERSION_PATCH"]}')
[[ $json_ver =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "could not read nlohmann_json's version"

# Google Benchmark sources (Debian's patches applied by dpkg-source).
mkdir -p "$tmp/x"
(cd "$tmp/x" && dpkg-source --no-check -x "$dsc" bm-src >/dev/null)
mkdir -p "$tmp/benchmark"
cp -a "$tmp/x/bm-src/include" "$tmp/x/bm-src/src" "$tmp/x/bm-src/LICENSE" "$tmp/x/bm-src/README.md" "$tmp/benchmark/"
rm -f "$tmp/benchmark/src/CMakeLists.txt"
mkdir -p "$tmp/licenses"
cp -a "$tmp/x/bm-src/debian/copyright" "$tmp/licenses/benchmark.copyright"
rm -rf "$tmp/x"
for p in libeigen3-dev catch2 nlohmann-json3-dev; do
  cp -a "/usr/share/doc/$p/copyright" "$tmp/licenses/$p.copyright"
done

# ---- our own CMake package config files ---------------------------------------------------------------
mkdir -p "$tmp/cmake"
# write_version NAME VERSION: <NAME>ConfigVersion.cmake, compatible with a request of the same major
# version that is not newer (like write_basic_package_version_file(... SameMajorVersion)).
write_version() {
  local major=${2%%.*}
  cat > "$tmp/cmake/$1ConfigVersion.cmake" <<EOF
# Written by basisattn's scripts/gpu-deps.sh.
set(PACKAGE_VERSION "$2")
set(PACKAGE_VERSION_COMPATIBLE TRUE)
if(PACKAGE_FIND_VERSION)
  if(PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION OR NOT PACKAGE_FIND_VERSION_MAJOR STREQUAL "$major")
    set(PACKAGE_VERSION_COMPATIBLE FALSE)
  elseif(PACKAGE_FIND_VERSION VERSION_EQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
EOF
}
write_version Eigen3 "$eigen_ver"
write_version Catch2 "$catch_ver"
write_version nlohmann_json "$json_ver"
write_version benchmark "$bm_version"

cat > "$tmp/cmake/Eigen3Config.cmake" <<'EOF'
# Written by basisattn's scripts/gpu-deps.sh: Eigen 3 headers from Debian's libeigen3-dev.
get_filename_component(_gpu_deps_eigen3 "${CMAKE_CURRENT_LIST_DIR}/../eigen3" ABSOLUTE)
if(NOT TARGET Eigen3::Eigen)
  add_library(Eigen3::Eigen INTERFACE IMPORTED)
  set_target_properties(Eigen3::Eigen PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_gpu_deps_eigen3}")
endif()
set(EIGEN3_FOUND 1)
set(EIGEN3_INCLUDE_DIR "${_gpu_deps_eigen3}")
set(EIGEN3_INCLUDE_DIRS "${_gpu_deps_eigen3}")
set(EIGEN3_VERSION_STRING "${Eigen3_VERSION}")
unset(_gpu_deps_eigen3)
EOF

cat > "$tmp/cmake/Catch2Config.cmake" <<'EOF'
# Written by basisattn's scripts/gpu-deps.sh: Catch2 v2 (Debian's catch2), header-only, plus
# Catch2::Catch2WithMain compiled here from a one-line main; `include(Catch)` finds catch_discover_tests.
get_filename_component(_gpu_deps_catch2 "${CMAKE_CURRENT_LIST_DIR}/../catch2" ABSOLUTE)
if(NOT TARGET Catch2::Catch2)
  list(APPEND CMAKE_MODULE_PATH "${_gpu_deps_catch2}/cmake")
  add_library(Catch2::Catch2 INTERFACE IMPORTED)
  set_target_properties(Catch2::Catch2 PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_gpu_deps_catch2}/include")
  add_library(gpu_deps_Catch2WithMain STATIC EXCLUDE_FROM_ALL "${_gpu_deps_catch2}/catch2_main.cpp")
  target_link_libraries(gpu_deps_Catch2WithMain PUBLIC Catch2::Catch2)
  add_library(Catch2::Catch2WithMain ALIAS gpu_deps_Catch2WithMain)
endif()
unset(_gpu_deps_catch2)
EOF

cat > "$tmp/cmake/nlohmann_jsonConfig.cmake" <<'EOF'
# Written by basisattn's scripts/gpu-deps.sh: nlohmann/json headers from Debian's nlohmann-json3-dev.
get_filename_component(_gpu_deps_json "${CMAKE_CURRENT_LIST_DIR}/../nlohmann_json/include" ABSOLUTE)
if(NOT TARGET nlohmann_json::nlohmann_json)
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_gpu_deps_json}")
endif()
unset(_gpu_deps_json)
EOF

cat > "$tmp/cmake/benchmarkConfig.cmake" <<'EOF'
# Written by basisattn's scripts/gpu-deps.sh: Google Benchmark 1.7.1 (Debian's source package) compiled
# from its sources as static libraries inside the consuming build, with the definitions its own
# CMakeLists finds on Linux/GCC (std::regex, POSIX regex, steady_clock).
get_filename_component(_gpu_deps_bm "${CMAKE_CURRENT_LIST_DIR}/../benchmark" ABSOLUTE)
if(NOT TARGET benchmark::benchmark)
  find_package(Threads REQUIRED)
  file(GLOB _gpu_deps_bm_src "${_gpu_deps_bm}/src/*.cc")
  list(FILTER _gpu_deps_bm_src EXCLUDE REGEX "/benchmark_main\\.cc$")
  add_library(gpu_deps_benchmark STATIC EXCLUDE_FROM_ALL ${_gpu_deps_bm_src})
  target_include_directories(gpu_deps_benchmark SYSTEM PUBLIC "${_gpu_deps_bm}/include")
  target_include_directories(gpu_deps_benchmark PRIVATE "${_gpu_deps_bm}/src")
  target_compile_definitions(gpu_deps_benchmark PUBLIC BENCHMARK_STATIC_DEFINE
                             PRIVATE HAVE_STD_REGEX HAVE_POSIX_REGEX HAVE_STEADY_CLOCK)
  target_compile_features(gpu_deps_benchmark PUBLIC cxx_std_11)
  target_compile_options(gpu_deps_benchmark PRIVATE -w)
  target_link_libraries(gpu_deps_benchmark PRIVATE Threads::Threads)
  if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
    find_library(GPU_DEPS_LIBRT rt)
    if(GPU_DEPS_LIBRT)
      target_link_libraries(gpu_deps_benchmark PRIVATE ${GPU_DEPS_LIBRT})
    endif()
  endif()
  add_library(benchmark::benchmark ALIAS gpu_deps_benchmark)
  add_library(gpu_deps_benchmark_main STATIC EXCLUDE_FROM_ALL "${_gpu_deps_bm}/src/benchmark_main.cc")
  target_link_libraries(gpu_deps_benchmark_main PUBLIC gpu_deps_benchmark)
  add_library(benchmark::benchmark_main ALIAS gpu_deps_benchmark_main)
  unset(_gpu_deps_bm_src)
endif()
unset(_gpu_deps_bm)
EOF

cat > "$tmp/MANIFEST.txt" <<EOF
Third-party dependencies for a bare GPU machine, made by basisattn's scripts/gpu-deps.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ).
Use: bash scripts/gpu-check.sh --deps <this folder> --out <folder>  (or -D<Pkg>_DIR=<this folder>/cmake).
eigen3/         Eigen $eigen_ver headers, Debian libeigen3-dev $(dpkg-query -W -f='${Version}' libeigen3-dev); unsupported modules: ${unsup[*]:-none}
catch2/         Catch2 $catch_ver single header + Catch.cmake/CatchAddTests.cmake, Debian catch2 $(dpkg-query -W -f='${Version}' catch2)
nlohmann_json/  nlohmann/json $json_ver headers, Debian nlohmann-json3-dev $(dpkg-query -W -f='${Version}' nlohmann-json3-dev)
benchmark/      Google Benchmark $bm_version sources, Debian source package benchmark $bm_debian (Debian patches applied)
cmake/          package config files written by gpu-deps.sh (Eigen3, Catch2, nlohmann_json, benchmark)
licenses/       the Debian copyright files of the packages above
EOF

chmod 755 "$tmp"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
rm -rf "${apt_tmp:-}"
log "made $dir: Eigen $eigen_ver (unsupported: ${unsup[*]:-none}), Catch2 $catch_ver, nlohmann_json $json_ver, benchmark $bm_version"
log "size: $(du -sh "$dir" | cut -f1)"
