// The Catch2 v2 runner of the SKIPPABLE test programs (see skip_main.hpp), compiled once: Catch2's
// implementation takes ~15 s to compile, once per program before.
#define CATCH_CONFIG_RUNNER
#include "skip_main.hpp"

#include <cstdio>
#include <cstring>

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
