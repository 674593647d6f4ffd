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

  // A stream slot for a new WebSocket client; false when --max-streams are in use (or shutting down).
  bool acquire_stream_slot() {
    if (stopping) return false;
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
