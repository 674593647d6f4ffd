#pragma once
// Running the built CLI from tests: one command line through the shell, stdout and stderr together.
#include <string>

namespace sd::test {

struct RunResult {
  int status;  // the exit code, -1 when the command did not exit normally or could not start
  std::string output;
};

// Runs `command` with /bin/sh (stderr merged into stdout) and returns its exit code and output.
RunResult run_command(const std::string& command);
// 'text' for the shell (text must not contain a single quote).
inline std::string q(const std::string& s) { return "'" + s + "'"; }

}  // namespace sd::test
