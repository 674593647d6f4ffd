#pragma once
// Thin logging facade over spdlog so the engine's call sites stay short: sd::log::info("...{}...", x).
#include <chrono>
#include <cstdint>
#include <mutex>

#include <spdlog/spdlog.h>

namespace sd::log {
using spdlog::debug;
using spdlog::error;
using spdlog::info;
using spdlog::warn;
// "debug" | "info" | "warn" | "error" | "off"
void set_level(const std::string& level);

// Lets a warning that can repeat at every frame (a shared model call failing at each step) through at most once per
// interval, and says how many were held back meanwhile. Thread-safe.
class Throttle {
 public:
  using Clock = std::chrono::steady_clock;
  explicit Throttle(Clock::duration interval) : interval_(interval) {}
  // True when a message may go now; `held` is then how many were held back since the last one that went.
  bool pass(int64_t& held, Clock::time_point now = Clock::now()) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (sent_ && now - last_ < interval_) {
      ++held_;
      return false;
    }
    sent_ = true;
    last_ = now;
    held = held_;
    held_ = 0;
    return true;
  }

 private:
  const Clock::duration interval_;
  std::mutex mutex_;
  bool sent_ = false;
  Clock::time_point last_;
  int64_t held_ = 0;
};
}  // namespace sd::log
