// For test programs that need something that may be absent (real model files, a GPU): include this
// instead of <catch2/catch.hpp> and define `bool test_prerequisites(std::string& why)` once. The main
// (skip_main.cpp, compiled once into basisattn_test_skip_main) lets listing (test discovery) through;
// otherwise, when test_prerequisites says no, it prints why and exits with 77, which CTest reports
// as "Skipped" (SKIP_RETURN_CODE 77).
#pragma once

#include <catch2/catch.hpp>

#include <string>

bool test_prerequisites(std::string& why);
