// A Catch2 v2 main for test programs that need something that may be absent (real model files, a
// GPU): listing (test discovery) always works; otherwise, when `available()` says no, the program
// prints why and exits with 77, which CTest reports as "Skipped" (SKIP_RETURN_CODE 77).
// Usage: define `bool test_prerequisites(std::string& why)` and include this file once.
#pragma once

#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>
#include <string>

bool test_prerequisites(std::string& why);

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], "--list", 6) == 0) listing = true;
  std::string why;
  if (!listing && !test_prerequisites(why)) {
    std::printf("SKIPPED: %s\n", why.c_str());
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
