#pragma once
// The stream's watchdog: how long each stage spends on each frame, and a log line for any frame a stage takes far
// longer on than usual — the evidence needed when a live stream stutters on a loaded machine.
//
// Each stage thread brackets its work on one frame with begin()/end() (waiting for a queue is not counted). A frame is
// "slow" when its time exceeds `factor` × the stage's running median (of its last 128 frames, once 16 are known) and
// `min_ms` (below that, a few scheduler time slices on a busy machine would trip a stage whose median is micro-
// seconds). end() logs a slow frame with its stage; poll() (the monitor thread, every ~20 ms) logs a stage that is
// *still* on one frame past that bound, once per frame, so a stall shows while it lasts and names the stage it is
// stuck in. The longest gap between two consecutive outputs is the stall measure (`max_output_gap_ms`).
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/frame.h"

namespace sd {

class StageWatchdog {
 public:
  enum Stage : int { Capture, Preprocess, Model, Postprocess, Sink };
  static constexpr int kStages = 5;
  static const char* stage_name(int stage);

  struct Options {
    double factor = 10.0;   // slow = above factor × median ...
    double min_ms = 100.0;  // ... and above this
    std::function<void(const std::string&)> log;  // default: log::warn
  };

  StageWatchdog();
  explicit StageWatchdog(Options options);

  // Stage thread: starts / ends timing `stage` on input frame `frame`.
  void begin(int stage, int64_t frame);
  void end(int stage);
  // Stops timing without counting the frame (the stage left early: end of input, stop, an error).
  void abandon(int stage);

  // begin() now, end() on finish(), abandon() if it goes out of scope before that.
  class Timer {
   public:
    Timer(StageWatchdog& w, int stage, int64_t frame) : w_(w), stage_(stage) { w_.begin(stage, frame); }
    ~Timer() {
      if (!done_) w_.abandon(stage_);
    }
    void finish() {
      if (!done_) w_.end(stage_);
      done_ = true;
    }
    Timer(const Timer&) = delete;
    Timer& operator=(const Timer&) = delete;

   private:
    StageWatchdog& w_;
    int stage_;
    bool done_ = false;
  };

  // Sink thread, after each output written.
  void on_output(StreamClock::time_point now);
  // Monitor thread: reports stages that are still on one frame past the slow bound.
  void poll(StreamClock::time_point now);

  // The bound above which a frame of `stage` counts as slow now, in ms (+inf while the median is not yet known).
  double slow_bound_ms(int stage) const;
  int64_t slow_frames() const { return slow_total_.load(); }
  double max_output_gap_ms() const;
  // {factor, min_ms, slow_frames, max_output_gap_ms, stages: {name: {frames, median_ms, max_ms, slow}},
  //  events: [{frame, stage, ms, median_ms, still_running}] (the first 32)}
  nlohmann::json summary() const;

 private:
  static constexpr size_t kWindow = 128;
  static constexpr size_t kMinSamples = 16;
  struct StageState {
    std::atomic<int64_t> busy_since_ns{0};  // 0 = idle
    std::atomic<int64_t> frame{-1};
    std::atomic<int64_t> reported_frame{-1};  // poll() reported this frame already
    mutable std::mutex mutex;                 // guards the fields below
    std::array<double, kWindow> window{};
    size_t filled = 0, next = 0;
    double median_ms = 0;
    int64_t frames = 0, slow = 0;
    double max_ms = 0;
  };
  void report(int stage, int64_t frame, double ms, double median_ms, bool still_running);
  static int64_t now_ns(StreamClock::time_point t);

  Options options_;
  std::array<StageState, kStages> stages_;
  std::atomic<int64_t> slow_total_{0};
  mutable std::mutex mutex_;  // guards the fields below
  std::vector<nlohmann::json> events_;
  StreamClock::time_point last_output_{};
  bool have_output_ = false;
  double max_gap_ms_ = 0;
};

}  // namespace sd
