#include "common/cli_run.h"

#include <cstdio>

#include <sys/wait.h>

namespace sd::test {

RunResult run_command(const std::string& command) {
  const std::string cmd = command + " 2>&1";
  RunResult r{-1, ""};
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof(buf), p)) r.output.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

}  // namespace sd::test
