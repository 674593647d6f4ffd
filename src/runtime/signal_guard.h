#pragma once
// SIGINT / SIGTERM for a stream: while a SignalGuard lives, the first signal is only recorded (the stream runtime
// polls pending() and shuts down cleanly); a second one restores the default action and re-raises it, so a stuck
// program can still be killed with a second Ctrl-C. SIGPIPE is ignored meanwhile (a closed stdout reader becomes an
// EPIPE error of the raw sink instead of killing the process). The previous dispositions come back on destruction.
#include <csignal>
#include <string>

namespace sd {

class SignalGuard {
 public:
  SignalGuard();
  ~SignalGuard();
  SignalGuard(const SignalGuard&) = delete;
  SignalGuard& operator=(const SignalGuard&) = delete;

  // The signal received since the live guard was made (or since clear()), 0 if none or no guard lives.
  static int pending();
  static void clear();
  // "SIGINT", "SIGTERM", ...
  static std::string name(int signal);

 private:
  struct sigaction old_int_{}, old_term_{}, old_pipe_{};
};

}  // namespace sd
