#pragma once
// The message of the exception `f` throws ("" when it throws none), for tests that check what an error says.
// E = the exception type to catch: sd::Error where anything else should fail the test as an uncaught exception.
#include <exception>
#include <string>

namespace sd::test {

template <class E = std::exception, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "";
}

}  // namespace sd::test
