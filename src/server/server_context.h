#pragma once
// What every connection of the server shares: the one model, the defaults and limits, the model worker, the API
// handlers, the static files, the stream slots and the registry of live WebSocket sessions (for stats and shutdown).
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "pipeline/diffusion_models.h"
#include "server/api_handlers.h"
#include "server/fleet.h"
#include "server/model_worker.h"
#include "server/server_options.h"
#include "server/static_files.h"
#include "server/stream_settings.h"

namespace sd::server {

class WebSocketSession;

struct ServerContext {
  std::shared_ptr<const DiffusionModels> models;
  StreamDefaults defaults;
  ServerOptions options;
  ModelWorker worker;
  std::unique_ptr<ApiHandlers> api;
  std::optional<StaticFiles> files;
  std::chrono::steady_clock::time_point t_start = std::chrono::steady_clock::now();

  std::atomic<int> active_streams{0};
  std::atomic<uint64_t> next_id{1};
  std::atomic<int64_t> streams_total{0}, rejected_busy{0}, rejected_origin{0}, http_requests{0};
  std::atomic<bool> stopping{false};

  // Fleet (fleet.h): this worker's name in hellos, stats and /api/health (--worker-id, default host:port); draining
  // (Server::drain) refuses new streams and tells the open ones to reconnect elsewhere.
  std::string worker_id;
  std::atomic<bool> draining{false};
  std::atomic<int64_t> rejected_draining{0}, rejected_stream_id{0}, reconnects_sent{0};
  std::function<void()> request_drain;  // POST /api/drain (set by Server)
  StageHistograms stages;
  // The counters of closed streams, added when a stream closes (WebSocketSession::finish): with the open streams'
  // own counters they make the server-wide totals of /metrics. A session is "retired" under this mutex.
  struct StreamTotals {
    int64_t frames_in = 0, frames_out = 0, dropped_in = 0, dropped_out = 0, skipped = 0, errors = 0,
            lost_at_close = 0;
    int64_t graph_captures = 0, graph_replays = 0, graph_failures = 0;
    void add(const nlohmann::json& s) {
      frames_in += s.value("frames_in", int64_t{0});
      frames_out += s.value("frames_out", int64_t{0});
      dropped_in += s.value("dropped_in", int64_t{0});
      dropped_out += s.value("dropped_out", int64_t{0});
      skipped += s.value("skipped", int64_t{0});
      errors += s.value("errors", int64_t{0});
      lost_at_close += s.value("lost_at_close", int64_t{0});
      graph_captures += s.value("graph_captures", int64_t{0});
      graph_replays += s.value("graph_replays", int64_t{0});
      graph_failures += s.value("graph_failures", int64_t{0});
    }
  };
  std::mutex totals_mutex;
  StreamTotals closed_streams;

  // A stream slot for a new WebSocket client; false when --max-streams are in use (or draining, shutting down).
  bool acquire_stream_slot() {
    if (stopping || draining) return false;
    int n = active_streams.load();
    while (n < options.max_streams)
      if (active_streams.compare_exchange_weak(n, n + 1)) return true;
    return false;
  }
  void release_stream_slot() { active_streams.fetch_sub(1); }

  std::mutex sessions_mutex;
  std::vector<std::weak_ptr<WebSocketSession>> sessions;  // pruned on insert
  void register_session(const std::shared_ptr<WebSocketSession>& s) {
    std::lock_guard<std::mutex> lock(sessions_mutex);
    std::vector<std::weak_ptr<WebSocketSession>> live;
    for (auto& w : sessions)
      if (!w.expired()) live.push_back(std::move(w));
    live.push_back(s);
    sessions.swap(live);
  }
  std::vector<std::shared_ptr<WebSocketSession>> live_sessions() {
    std::lock_guard<std::mutex> lock(sessions_mutex);
    std::vector<std::shared_ptr<WebSocketSession>> out;
    for (auto& w : sessions)
      if (auto s = w.lock()) out.push_back(std::move(s));
    return out;
  }
};

}  // namespace sd::server
