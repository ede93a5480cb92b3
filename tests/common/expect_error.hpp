// expect_error(f, code, fragment): f() must raise a basisattn::error with that code and a message
// containing fragment (Catch2 checks; a missing error fails the test).
#pragma once

#include <basisattn/core/error.hpp>

#include <catch2/catch.hpp>

#include <string>

namespace test {

template <class F>
void expect_error(F&& f, basisattn::errc code, const std::string& fragment) {
  try {
    f();
    FAIL("no error raised; expected " << to_string(code) << " containing '" << fragment << "'");
  } catch (const basisattn::error& e) {
    INFO(e.what());
    CHECK(e.code() == code);
    CHECK_THAT(std::string(e.what()), Catch::Contains(fragment));
  }
}

}  // namespace test
