#include "runtime/signal_guard.h"

#include <atomic>
#include <cstring>

#include "core/error.h"

namespace sd {
namespace {

std::atomic<int> g_pending{0};
std::atomic<int> g_guards{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal handler needs a lock-free atomic");

extern "C" void on_stop_signal(int sig) {
  // Async-signal-safe only: an atomic store, signal() and raise().
  if (g_pending.exchange(sig) != 0) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
}

}  // namespace

SignalGuard::SignalGuard() {
  if (g_guards.fetch_add(1) != 0) {
    g_guards.fetch_sub(1);
    throw InvalidArgument("SignalGuard: only one may exist at a time");
  }
  g_pending = 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a blocking call in the main thread returns EINTR
  sigaction(SIGINT, &sa, &old_int_);
  sigaction(SIGTERM, &sa, &old_term_);
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  sigemptyset(&ign.sa_mask);
  sigaction(SIGPIPE, &ign, &old_pipe_);
}

SignalGuard::~SignalGuard() {
  sigaction(SIGINT, &old_int_, nullptr);
  sigaction(SIGTERM, &old_term_, nullptr);
  sigaction(SIGPIPE, &old_pipe_, nullptr);
  g_pending = 0;  // a signal belongs to the guard that caught it
  g_guards.fetch_sub(1);
}

int SignalGuard::pending() { return g_pending.load(); }
void SignalGuard::clear() { g_pending = 0; }

std::string SignalGuard::name(int signal) {
  switch (signal) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case 0: return "none";
    default: return "signal " + std::to_string(signal);
  }
}

}  // namespace sd
