#include "runtime/stage_watchdog.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "core/log.h"

namespace sd {
namespace {

constexpr size_t kMaxEvents = 32;

std::string format_ms(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", ms);
  return buf;
}

}  // namespace

const char* StageWatchdog::stage_name(int stage) {
  static const char* const names[kStages] = {"capture", "pre-process", "model", "post-process", "sink"};
  return stage >= 0 && stage < kStages ? names[stage] : "?";
}

StageWatchdog::StageWatchdog() : StageWatchdog(Options{}) {}

StageWatchdog::StageWatchdog(Options options) : options_(std::move(options)) {
  if (!(options_.factor >= 1)) throw std::invalid_argument("watchdog factor must be >= 1");
  if (!(options_.min_ms >= 0)) throw std::invalid_argument("watchdog min_ms must be >= 0");
  if (!options_.log) options_.log = [](const std::string& line) { log::warn("{}", line); };
}

int64_t StageWatchdog::now_ns(StreamClock::time_point t) {
  // +1: a time point that happens to be the clock's epoch must not read as "idle".
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count() + 1;
}

void StageWatchdog::begin(int stage, int64_t frame) {
  StageState& s = stages_.at(static_cast<size_t>(stage));
  s.frame.store(frame, std::memory_order_relaxed);
  s.busy_since_ns.store(now_ns(StreamClock::now()), std::memory_order_release);
}

void StageWatchdog::abandon(int stage) {
  stages_.at(static_cast<size_t>(stage)).busy_since_ns.store(0, std::memory_order_release);
}

double StageWatchdog::slow_bound_ms(int stage) const {
  const StageState& s = stages_.at(static_cast<size_t>(stage));
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.filled < kMinSamples) return std::numeric_limits<double>::infinity();
  return std::max(options_.factor * s.median_ms, options_.min_ms);
}

void StageWatchdog::end(int stage) {
  StageState& s = stages_.at(static_cast<size_t>(stage));
  const int64_t since = s.busy_since_ns.exchange(0, std::memory_order_acq_rel);
  if (since == 0) return;  // end() without begin()
  const double ms = static_cast<double>(now_ns(StreamClock::now()) - since) / 1e6;
  const int64_t frame = s.frame.load(std::memory_order_relaxed);
  bool slow = false;
  double median = 0;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    median = s.median_ms;
    slow = s.filled >= kMinSamples && ms > std::max(options_.factor * median, options_.min_ms);
    ++s.frames;
    s.max_ms = std::max(s.max_ms, ms);
    if (slow) ++s.slow;
    s.window[s.next] = ms;
    s.next = (s.next + 1) % kWindow;
    s.filled = std::min(s.filled + 1, kWindow);
    // The median of the frames so far (the one just judged included), for the next frame's judgement.
    std::array<double, kWindow> sorted = s.window;
    auto mid = sorted.begin() + static_cast<std::ptrdiff_t>(s.filled / 2);
    std::nth_element(sorted.begin(), mid, sorted.begin() + static_cast<std::ptrdiff_t>(s.filled));
    s.median_ms = *mid;
  }
  // poll() already reported this frame while it ran: report its final time too, but count it once.
  const bool reported = s.reported_frame.load() == frame;
  if (slow) {
    if (!reported) slow_total_.fetch_add(1);
    report(stage, frame, ms, median, false);
  }
}

void StageWatchdog::poll(StreamClock::time_point now) {
  for (int i = 0; i < kStages; ++i) {
    StageState& s = stages_[static_cast<size_t>(i)];
    const int64_t since = s.busy_since_ns.load(std::memory_order_acquire);
    if (since == 0) continue;
    const int64_t frame = s.frame.load(std::memory_order_relaxed);
    if (s.reported_frame.load() == frame) continue;
    const double ms = static_cast<double>(now_ns(now) - since) / 1e6;
    const double bound = slow_bound_ms(i);
    if (!(ms > bound)) continue;
    if (s.reported_frame.exchange(frame) == frame) continue;
    double median = 0;
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      median = s.median_ms;
    }
    slow_total_.fetch_add(1);
    report(i, frame, ms, median, true);
  }
}

void StageWatchdog::report(int stage, int64_t frame, double ms, double median_ms, bool still_running) {
  const std::string line = std::string("watchdog: frame ") + std::to_string(frame) + (still_running ? " has been " : " took ") +
                           format_ms(ms) + " ms in stage '" + stage_name(stage) + "'" +
                           (still_running ? " and is still there" : "") + " (median " + format_ms(median_ms) +
                           " ms, bound " + format_ms(std::max(options_.factor * median_ms, options_.min_ms)) + " ms)";
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (events_.size() < kMaxEvents)
      events_.push_back({{"frame", frame},
                         {"stage", stage_name(stage)},
                         {"ms", ms},
                         {"median_ms", median_ms},
                         {"still_running", still_running}});
  }
  options_.log(line);
}

void StageWatchdog::on_output(StreamClock::time_point now) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (have_output_)
    max_gap_ms_ = std::max(max_gap_ms_, std::chrono::duration<double, std::milli>(now - last_output_).count());
  last_output_ = now;
  have_output_ = true;
}

double StageWatchdog::max_output_gap_ms() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return max_gap_ms_;
}

nlohmann::json StageWatchdog::summary() const {
  nlohmann::json stages = nlohmann::json::object();
  for (int i = 0; i < kStages; ++i) {
    const StageState& s = stages_[static_cast<size_t>(i)];
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.frames == 0) continue;
    stages[stage_name(i)] = {{"frames", s.frames}, {"median_ms", s.median_ms}, {"max_ms", s.max_ms}, {"slow", s.slow}};
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return {{"factor", options_.factor},
          {"min_ms", options_.min_ms},
          {"slow_frames", slow_total_.load()},
          {"max_output_gap_ms", max_gap_ms_},
          {"stages", stages},
          {"events", events_}};
}

}  // namespace sd
