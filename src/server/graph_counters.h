#pragma once
// The CUDA graph counters of a server's own streams (a WebSocket session's stream, the API's image streams): what
// each step added, read by /api/stats and /metrics from other threads. All 0 off CUDA.
#include <atomic>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "pipeline/stream_diffusion.h"

namespace sd::server {

struct GraphCounters {
  std::atomic<int64_t> captures{0}, replays{0}, failures{0};
  // A step's counts: the stream's stats before and after it (failed steps too).
  void add(const StreamStats& before, const StreamStats& after) {
    captures.fetch_add(after.graph_captures - before.graph_captures, std::memory_order_relaxed);
    replays.fetch_add(after.graph_replays - before.graph_replays, std::memory_order_relaxed);
    failures.fetch_add(after.graph_failures - before.graph_failures, std::memory_order_relaxed);
  }
  // As graph_captures / graph_replays / graph_failures (the keys /metrics sums).
  void put(nlohmann::json& j) const {
    j["graph_captures"] = captures.load();
    j["graph_replays"] = replays.load();
    j["graph_failures"] = failures.load();
  }
};

}  // namespace sd::server
