#include "runtime/runtime_stats.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>

#include <unistd.h>

namespace sd {
namespace {

constexpr double kMinMs = 0.01;      // histogram range [10 µs, 10^7 ms)
constexpr double kRatio = 1.01;      // 1 % bins
const double kLogRatio = std::log(kRatio);
const int kBins = static_cast<int>(std::ceil(std::log(1e7 / kMinMs) / std::log(kRatio))) + 1;
constexpr size_t kMaxRssSamples = 4096;

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

double nearest_rank(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  size_t k = static_cast<size_t>(std::ceil(p / 100.0 * v.size()));
  k = std::min(v.size(), std::max<size_t>(k, 1)) - 1;
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

}  // namespace

LatencyHistogram::LatencyHistogram() : bins_(kBins, 0) {}

void LatencyHistogram::add(double ms) {
  int b = ms <= kMinMs ? 0 : static_cast<int>(std::log(ms / kMinMs) / kLogRatio);
  b = std::min(std::max(b, 0), kBins - 1);
  ++bins_[b];
  ++count_;
  sum_ += ms;
  max_ = std::max(max_, ms);
}

void LatencyHistogram::clear() {
  std::fill(bins_.begin(), bins_.end(), 0);
  count_ = 0;
  sum_ = max_ = 0;
}

double LatencyHistogram::percentile(double p) const {
  if (count_ == 0) return 0;
  int64_t rank = static_cast<int64_t>(std::ceil(p / 100.0 * count_));
  rank = std::min(count_, std::max<int64_t>(rank, 1));
  int64_t seen = 0;
  for (int b = 0; b < kBins; ++b) {
    seen += bins_[b];
    if (seen >= rank) {
      // Geometric middle of the bin, never above the largest value seen.
      const double mid = kMinMs * std::pow(kRatio, b + 0.5);
      return std::min(mid, max_);
    }
  }
  return max_;
}

double resident_memory_mb() {
  std::ifstream f("/proc/self/statm");
  long long size = 0, resident = 0;
  if (!(f >> size >> resident)) return -1;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

RuntimeStats::RuntimeStats(int64_t warmup_outputs) : warmup_outputs_(warmup_outputs) { start(); }

void RuntimeStats::start() {
  std::lock_guard<std::mutex> lock(mutex_);
  t0_ = StreamClock::now();
  last_tick_ = Counts{};
  rss_start_ = rss_max_ = resident_memory_mb();
  rss_samples_.clear();
}

double RuntimeStats::seconds_since_start(StreamClock::time_point t) const {
  return std::chrono::duration<double>(t - t0_).count();
}

void RuntimeStats::on_output(StreamClock::time_point t_capture, StreamClock::time_point now) {
  const double ms = std::chrono::duration<double, std::milli>(now - t_capture).count();
  std::lock_guard<std::mutex> lock(mutex_);
  total_.add(ms);
  window_.push_back(ms);
  if (outputs_.load(std::memory_order_relaxed) == 0) t_first_output_ = now;
  t_last_output_ = now;
  outputs_.fetch_add(1, std::memory_order_relaxed);
}

RuntimeStats::Counts RuntimeStats::counts_now() const {
  Counts c;
  c.t = seconds_since_start(StreamClock::now());
  c.captured = captured_.load();
  c.model = model_frames_.load();
  c.outputs = outputs_.load();
  return c;
}

std::string RuntimeStats::format_line(const Counts& now, const Counts& prev, std::vector<double> window,
                                      double rss) const {
  const double dt = std::max(1e-9, now.t - prev.t);
  std::string s = "in " + fmt("%.1f", (now.captured - prev.captured) / dt) + " fps | model " +
                  fmt("%.1f", (now.model - prev.model) / dt) + " fps | out " +
                  fmt("%.1f", (now.outputs - prev.outputs) / dt) + " fps | latency ";
  if (window.empty())
    s += "p50 - p95 -";
  else
    s += "p50 " + fmt("%.1f", nearest_rank(window, 50)) + " ms p95 " + fmt("%.1f", nearest_rank(window, 95)) + " ms";
  s += " | dropped " + std::to_string(dropped_.load()) + " | skipped " + std::to_string(skipped_.load());
  const int64_t discarded = discarded_at_stop_.load(), in_flight = in_flight_at_stop_.load();
  if (discarded + in_flight > 0)
    s += " | lost at stop: discarded " + std::to_string(discarded) + ", in flight " + std::to_string(in_flight);
  if (rss >= 0) s += " | rss " + fmt("%.0f", rss) + " MB";
  return s;
}

std::string RuntimeStats::tick() {
  const double rss = resident_memory_mb();
  std::lock_guard<std::mutex> lock(mutex_);
  const Counts now = counts_now();
  std::string line = format_line(now, last_tick_, std::move(window_), rss);
  window_.clear();
  last_tick_ = now;
  if (rss >= 0) {
    rss_max_ = std::max(rss_max_, rss);
    rss_end_ = rss;
    if (rss_after_warmup_ < 0 && now.outputs >= warmup_outputs_) rss_after_warmup_ = rss;
    rss_samples_.push_back({now.t, static_cast<double>(now.outputs), rss});
    if (rss_samples_.size() >= kMaxRssSamples) {  // keep every other sample: bounded memory, whole run covered
      std::vector<std::array<double, 3>> kept;
      for (size_t i = 0; i < rss_samples_.size(); i += 2) kept.push_back(rss_samples_[i]);
      rss_samples_ = std::move(kept);
    }
  }
  return line;
}

std::string RuntimeStats::peek() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return format_line(counts_now(), last_tick_, window_, resident_memory_mb());
}

void RuntimeStats::finish() {
  const double rss = resident_memory_mb();
  std::lock_guard<std::mutex> lock(mutex_);
  t_end_ = StreamClock::now();
  finished_ = true;
  rss_end_ = rss;
  rss_max_ = std::max(rss_max_, rss);
  if (rss_after_warmup_ < 0 && outputs_.load() >= warmup_outputs_) rss_after_warmup_ = rss;
}

nlohmann::json RuntimeStats::summary() const {
  std::lock_guard<std::mutex> lock(mutex_);
  const double duration = seconds_since_start(finished_ ? t_end_ : StreamClock::now());
  const int64_t out = outputs_.load();
  nlohmann::json j;
  j["duration_s"] = duration;
  j["frames_in"] = captured_.load();
  j["frames_model"] = model_frames_.load();
  j["frames_out"] = out;
  j["dropped"] = dropped_.load();
  j["skipped"] = skipped_.load();
  // frames_in == frames_out + dropped + discarded_at_stop + in_flight_at_stop once the stream has ended.
  j["discarded_at_stop"] = discarded_at_stop_.load();
  j["in_flight_at_stop"] = in_flight_at_stop_.load();
  const double d = std::max(duration, 1e-9);
  j["input_fps"] = captured_.load() / d;
  j["model_fps"] = model_frames_.load() / d;
  j["output_fps"] = out / d;
  // Steady state: outputs per second between the first and the last output (start-up and warm-up excluded).
  const double span = out > 1 ? std::chrono::duration<double>(t_last_output_ - t_first_output_).count() : 0.0;
  j["output_fps_steady"] = span > 0 ? (out - 1) / span : 0.0;
  j["first_output_s"] = out > 0 ? seconds_since_start(t_first_output_) : -1.0;
  j["latency_ms"] = {{"p50", total_.percentile(50)}, {"p95", total_.percentile(95)}, {"mean", total_.mean()},
                     {"max", total_.max()}, {"count", total_.count()}};
  j["rss_mb"] = {{"start", rss_start_},
                 {"after_warmup", rss_after_warmup_},
                 {"warmup_outputs", warmup_outputs_},
                 {"end", rss_end_},
                 {"max", rss_max_},
                 {"growth_after_warmup", rss_after_warmup_ >= 0 && rss_end_ >= 0 ? rss_end_ - rss_after_warmup_ : 0.0}};
  nlohmann::json samples = nlohmann::json::array();
  for (const auto& s : rss_samples_) samples.push_back({s[0], static_cast<int64_t>(s[1]), s[2]});
  j["rss_samples"] = samples;
  return j;
}

}  // namespace sd
