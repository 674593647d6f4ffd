#pragma once
// Counters and timings of a running stream: a status line per interval (input / model / output fps, latency p50/p95
// from capture to sink, frames dropped and skipped, RSS) and a JSON summary at the end.
//
// The stage threads call the on_*() hooks (lock-free counters; one short mutex for latencies); the monitor thread calls
// tick() once per interval. Latency percentiles of the whole run come from a log-spaced histogram (1 % bins), so
// memory stays constant however long the stream runs.
#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/frame.h"

namespace sd {

class LatencyHistogram {
 public:
  LatencyHistogram();
  void add(double ms);
  void clear();
  int64_t count() const { return count_; }
  // Nearest-rank percentile (p in [0, 100]) to within 1 %; 0 when empty.
  double percentile(double p) const;
  double mean() const { return count_ ? sum_ / count_ : 0.0; }
  double max() const { return max_; }

 private:
  std::vector<int64_t> bins_;
  int64_t count_ = 0;
  double sum_ = 0, max_ = 0;
};

// Resident set size of this process in MiB (/proc/self/statm), -1 when unavailable.
double resident_memory_mb();

class RuntimeStats {
 public:
  explicit RuntimeStats(int64_t warmup_outputs = 100);

  void start();
  void on_captured() { captured_.fetch_add(1, std::memory_order_relaxed); }
  void on_model_frame() { model_frames_.fetch_add(1, std::memory_order_relaxed); }
  void on_output(StreamClock::time_point t_capture, StreamClock::time_point now);
  void set_dropped(int64_t n) { dropped_.store(n, std::memory_order_relaxed); }
  void set_skipped(int64_t n) { skipped_.store(n, std::memory_order_relaxed); }
  // Frames a stop lost: waiting in a queue (discarded) or held by a stage or the processor (in flight).
  void set_lost_at_stop(int64_t discarded, int64_t in_flight) {
    discarded_at_stop_.store(discarded, std::memory_order_relaxed);
    in_flight_at_stop_.store(in_flight, std::memory_order_relaxed);
  }
  void finish();

  // Rates over the time since the previous tick, latency percentiles of the outputs in that interval, samples RSS;
  // returns the status line.
  std::string tick();
  // The line tick() would print, without starting a new interval (for the `stats` command).
  std::string peek() const;

  int64_t captured() const { return captured_.load(); }
  int64_t model_frames() const { return model_frames_.load(); }
  int64_t outputs() const { return outputs_.load(); }
  int64_t dropped() const { return dropped_.load(); }
  int64_t skipped() const { return skipped_.load(); }
  int64_t discarded_at_stop() const { return discarded_at_stop_.load(); }
  int64_t in_flight_at_stop() const { return in_flight_at_stop_.load(); }

  // duration_s, frames_in / model / out, dropped, skipped, discarded_at_stop, in_flight_at_stop, fps (whole run and
  // steady state), latency_ms {p50, p95, mean, max, count}, rss_mb {start, after_warmup, end, max,
  // growth_after_warmup}, rss_samples.
  nlohmann::json summary() const;

 private:
  struct Counts {
    double t = 0;
    int64_t captured = 0, model = 0, outputs = 0;
  };
  Counts counts_now() const;
  std::string format_line(const Counts& now, const Counts& prev, std::vector<double> window, double rss) const;
  double seconds_since_start(StreamClock::time_point t) const;

  const int64_t warmup_outputs_;
  StreamClock::time_point t0_, t_end_;
  bool finished_ = false;
  std::atomic<int64_t> captured_{0}, model_frames_{0}, outputs_{0}, dropped_{0}, skipped_{0};
  std::atomic<int64_t> discarded_at_stop_{0}, in_flight_at_stop_{0};

  mutable std::mutex mutex_;  // guards everything below
  LatencyHistogram total_;
  std::vector<double> window_;  // latencies (ms) of the current interval
  Counts last_tick_;
  StreamClock::time_point t_first_output_, t_last_output_;
  double rss_start_ = -1, rss_after_warmup_ = -1, rss_max_ = -1, rss_end_ = -1;
  std::vector<std::array<double, 3>> rss_samples_;  // [seconds, outputs, MiB], thinned to stay bounded
};

}  // namespace sd
