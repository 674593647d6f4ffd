#pragma once
// What makes `serve` a citizen of a fleet behind a load balancer (docs/SCALING.md, deploy/):
//   GET  /api/ready   200 {"ready":true,...} when the model is loaded, a stream slot is free and the server is not
//                     draining; 503 {"ready":false,"reason":...} otherwise (a readiness probe / nginx's view)
//   POST /api/drain   starts a drain (see Server::drain); accepted only from a loopback peer address that did not
//                     come through a proxy (X-Forwarded-For / Forwarded / X-Real-IP), 403 otherwise
//   GET  /metrics     Prometheus text exposition format 0.0.4 (render_metrics)
// and the stream id a client routes by (?stream= on /ws, or the sd_stream cookie).
#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

#include "server/api_handlers.h"

namespace sd::server {

struct ServerContext;

// A latency histogram in seconds with fixed bucket bounds (Prometheus style): lock-free observe(), cumulative
// counts rendered by render_metrics.
class StageHistogram {
 public:
  static constexpr std::array<double, 15> kBounds = {0.0005, 0.001, 0.0025, 0.005, 0.01,  0.025, 0.05, 0.1,
                                                     0.25,   0.5,   1.0,    2.5,   5.0,   10.0,  30.0};
  void observe(double seconds);
  // Per bucket (not cumulative), the last one is +Inf.
  uint64_t bucket(size_t i) const { return counts_[i].load(std::memory_order_relaxed); }
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  double sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  std::array<std::atomic<uint64_t>, kBounds.size() + 1> counts_{};
  std::atomic<uint64_t> count_{0};
  std::atomic<double> sum_{0};
};

// The stages a WebSocket frame passes: JPEG decode and fit (network thread), waiting for the model (queue), the
// model step, JPEG encode of the result (network thread).
struct StageHistograms {
  StageHistogram decode, queue, model, encode;
};

// Stream ids: 1..64 characters of [A-Za-z0-9_-].
constexpr size_t kMaxStreamIdLength = 64;
bool valid_stream_id(const std::string& id);
// The stream id of a /ws upgrade: the `stream` query parameter, else the `sd_stream` cookie; "" when neither is
// there. Throws sd::InvalidArgument naming what is expected when one is there but is not a valid id.
std::string stream_id_of(const std::string& target, const std::string& cookie_header);

// 127.0.0.0/8, ::1 and ::ffff:127.x.y.z.
bool is_loopback_address(const std::string& address);

struct FleetRequest {
  std::string method;
  std::string path;          // without the query
  std::string peer_address;  // the TCP peer, as text
  bool forwarded = false;    // the request carries X-Forwarded-For, Forwarded or X-Real-IP
};

// /api/ready, /api/drain and /metrics; nullopt for any other path.
std::optional<ApiResponse> handle_fleet_request(ServerContext& ctx, const FleetRequest& req);

// Is this server ready for a new stream? reason: "draining", "stopping", "full" or "" when ready.
bool ready(ServerContext& ctx, std::string* reason = nullptr);

// The /metrics text. Stream counters are the ones the page's stats messages show (StreamSession's), summed over the
// open streams plus the closed ones (ServerContext::closed_streams), so they only grow.
std::string render_metrics(ServerContext& ctx);

}  // namespace sd::server
