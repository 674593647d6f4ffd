#include "server/fleet.h"

#include <cmath>
#include <cstdio>
#include <sstream>

#include <boost/asio/ip/address.hpp>

#ifdef SD_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include "core/error.h"
#include "runtime/runtime_stats.h"
#include "server/server_context.h"
#include "server/websocket_session.h"

namespace sd::server {

void StageHistogram::observe(double seconds) {
  if (!(seconds >= 0)) seconds = 0;  // NaN or a clock step back
  size_t i = 0;
  while (i < kBounds.size() && seconds > kBounds[i]) ++i;
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  double s = sum_.load(std::memory_order_relaxed);
  while (!sum_.compare_exchange_weak(s, s + seconds, std::memory_order_relaxed)) {
  }
  count_.fetch_add(1, std::memory_order_relaxed);
}

bool valid_stream_id(const std::string& id) {
  if (id.empty() || id.size() > kMaxStreamIdLength) return false;
  for (const char c : id)
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
      return false;
  return true;
}

namespace {

// The value of `name` in a query string (no percent-decoding: a valid id has nothing to decode); nullopt if absent.
std::optional<std::string> query_param(const std::string& target, const std::string& name) {
  const size_t q = target.find('?');
  if (q == std::string::npos) return std::nullopt;
  size_t pos = q + 1;
  while (pos <= target.size()) {
    size_t end = target.find('&', pos);
    if (end == std::string::npos) end = target.size();
    const std::string pair = target.substr(pos, end - pos);
    const size_t eq = pair.find('=');
    if (pair.substr(0, eq) == name) return eq == std::string::npos ? std::string() : pair.substr(eq + 1);
    pos = end + 1;
  }
  return std::nullopt;
}

std::optional<std::string> cookie(const std::string& header, const std::string& name) {
  size_t pos = 0;
  while (pos < header.size()) {
    size_t end = header.find(';', pos);
    if (end == std::string::npos) end = header.size();
    std::string pair = header.substr(pos, end - pos);
    const size_t first = pair.find_first_not_of(' ');
    pair = first == std::string::npos ? std::string() : pair.substr(first);
    const size_t eq = pair.find('=');
    if (eq != std::string::npos && pair.substr(0, eq) == name) return pair.substr(eq + 1);
    pos = end + 1;
  }
  return std::nullopt;
}

void check_id(const std::string& id, const char* where) {
  if (valid_stream_id(id)) return;
  throw InvalidArgument(std::string("stream id (") + where + "): expected 1 to " + std::to_string(kMaxStreamIdLength) +
                        " characters of [A-Za-z0-9_-], got " + std::to_string(id.size()) + " characters" +
                        (id.size() <= kMaxStreamIdLength && !id.empty() ? " with others" : ""));
}

// Prometheus label values: backslash, double quote and newline escaped.
std::string label(const std::string& v) {
  std::string out;
  for (const char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

std::string num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return std::to_string(static_cast<int64_t>(v));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

class Writer {
 public:
  void family(const std::string& name, const std::string& type, const std::string& help) {
    out_ << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
  }
  void sample(const std::string& name, double v, const std::string& labels = "") {
    out_ << name;
    if (!labels.empty()) out_ << '{' << labels << '}';
    out_ << ' ' << num(v) << '\n';
  }
  void one(const std::string& name, const std::string& type, const std::string& help, double v) {
    family(name, type, help);
    sample(name, v);
  }
  void histogram(const std::string& stage, const StageHistogram& h) {
    uint64_t cumulative = 0;
    const std::string s = "stage=\"" + stage + "\"";
    // count and buckets from one pass of the per-bucket counters (observe() may run meanwhile: +Inf is the total of
    // the buckets read, so the series stays consistent)
    for (size_t i = 0; i < StageHistogram::kBounds.size(); ++i) {
      cumulative += h.bucket(i);
      sample("sd_stage_seconds_bucket", static_cast<double>(cumulative),
             s + ",le=\"" + num(StageHistogram::kBounds[i]) + "\"");
    }
    cumulative += h.bucket(StageHistogram::kBounds.size());
    sample("sd_stage_seconds_bucket", static_cast<double>(cumulative), s + ",le=\"+Inf\"");
    sample("sd_stage_seconds_sum", h.sum(), s);
    sample("sd_stage_seconds_count", static_cast<double>(cumulative), s);
  }
  std::string str() const { return out_.str(); }

 private:
  std::ostringstream out_;
};

}  // namespace

std::string stream_id_of(const std::string& target, const std::string& cookie_header) {
  if (auto q = query_param(target, "stream")) {
    check_id(*q, "query parameter 'stream'");
    return *q;
  }
  if (auto c = cookie(cookie_header, "sd_stream")) {
    check_id(*c, "cookie 'sd_stream'");
    return *c;
  }
  return "";
}

bool is_loopback_address(const std::string& address) {
  boost::system::error_code ec;
  const auto a = boost::asio::ip::make_address(address, ec);
  if (ec) return false;
  if (a.is_loopback()) return true;
  if (a.is_v6() && a.to_v6().is_v4_mapped())
    return boost::asio::ip::make_address_v4(boost::asio::ip::v4_mapped, a.to_v6()).is_loopback();
  return false;
}

bool ready(ServerContext& ctx, std::string* reason) {
  std::string r;
  if (ctx.stopping)
    r = "stopping";
  else if (ctx.draining)
    r = "draining";
  else if (!ctx.models)
    r = "no model";
  else if (ctx.active_streams.load() >= ctx.options.max_streams)
    r = "full";
  if (reason) *reason = r;
  return r.empty();
}

std::optional<ApiResponse> handle_fleet_request(ServerContext& ctx, const FleetRequest& req) {
  const bool get = req.method == "GET" || req.method == "HEAD";
  if (req.path == "/api/ready") {
    if (!get) return ApiResponse::error(405, "use GET for /api/ready");
    std::string reason;
    const bool ok = ready(ctx, &reason);
    nlohmann::json j = {{"ready", ok},
                        {"worker_id", ctx.worker_id},
                        {"streams", ctx.active_streams.load()},
                        {"max_streams", ctx.options.max_streams},
                        {"draining", ctx.draining.load()}};
    if (!ok) {
      j["reason"] = reason;
      if (reason == "full")
        j["message"] = "all " + std::to_string(ctx.options.max_streams) + " stream slots are in use (--max-streams)";
      else if (reason == "draining")
        j["message"] = "this worker is draining: new streams go to another worker";
      else
        j["message"] = "the server is shutting down";
    }
    return ApiResponse::json(ok ? 200 : 503, j);
  }
  if (req.path == "/api/drain") {
    if (req.method != "POST") return ApiResponse::error(405, "use POST for /api/drain");
    if (!is_loopback_address(req.peer_address))
      return ApiResponse::error(403, "/api/drain is accepted only from a loopback address (this request came from " +
                                         req.peer_address + ")");
    if (req.forwarded)
      return ApiResponse::error(403, "/api/drain is accepted only directly from a loopback address, not through a "
                                     "proxy (the request carries X-Forwarded-For, Forwarded or X-Real-IP)");
    const bool already = ctx.draining.load();
    if (ctx.request_drain) ctx.request_drain();
    return ApiResponse::json(202, {{"draining", true},
                                   {"already", already},
                                   {"worker_id", ctx.worker_id},
                                   {"streams", ctx.active_streams.load()}});
  }
  if (req.path == "/metrics") {
    if (!get) return ApiResponse::error(405, "use GET for /metrics");
    ApiResponse r;
    r.content_type = "text/plain; version=0.0.4; charset=utf-8";
    r.body = render_metrics(ctx);
    return r;
  }
  return std::nullopt;
}

std::string render_metrics(ServerContext& ctx) {
  // Stream counters: the closed streams' totals plus every open (not yet retired) stream's own counters, under the
  // mutex that retiring takes, so a stream that closes meanwhile is counted exactly once.
  ServerContext::StreamTotals t;
  {
    std::lock_guard<std::mutex> lock(ctx.totals_mutex);
    t = ctx.closed_streams;
    for (const auto& s : ctx.live_sessions()) {
      if (s->retired()) continue;
      const auto j = s->stats();
      if (j.is_object()) t.add(j);
    }
  }
  const nlohmann::json w = ctx.worker.stats();
  const nlohmann::json api = ctx.api ? ctx.api->stats() : nlohmann::json::object();
  const double up = std::chrono::duration<double>(std::chrono::steady_clock::now() - ctx.t_start).count();
  Writer m;
  m.family("sd_worker_info", "gauge", "This worker: its id (--worker-id) and model.");
  m.sample("sd_worker_info", 1,
           "worker_id=\"" + label(ctx.worker_id) + "\",model=\"" + label(ctx.models ? ctx.models->describe() : "") +
               "\"");
  std::string reason;
  m.one("sd_ready", "gauge", "1 when /api/ready answers 200 (model loaded, a stream slot free, not draining).",
        ready(ctx, &reason) ? 1 : 0);
  m.one("sd_draining", "gauge", "1 while draining (SIGTERM or POST /api/drain).", ctx.draining ? 1 : 0);
  m.one("sd_uptime_seconds", "gauge", "Seconds since the server started.", up);
  m.one("sd_streams_open", "gauge", "WebSocket streams open now.", ctx.active_streams.load());
  m.one("sd_streams_max", "gauge", "Stream slots (--max-streams).", ctx.options.max_streams);
  m.one("sd_streams_opened_total", "counter", "WebSocket streams opened.", static_cast<double>(ctx.streams_total));
  m.family("sd_streams_rejected_total", "counter", "WebSocket connections refused, by reason.");
  m.sample("sd_streams_rejected_total", static_cast<double>(ctx.rejected_busy), "reason=\"busy\"");
  m.sample("sd_streams_rejected_total", static_cast<double>(ctx.rejected_draining), "reason=\"draining\"");
  m.sample("sd_streams_rejected_total", static_cast<double>(ctx.rejected_origin), "reason=\"origin\"");
  m.sample("sd_streams_rejected_total", static_cast<double>(ctx.rejected_stream_id), "reason=\"stream_id\"");
  m.one("sd_reconnects_sent_total", "counter", "Reconnect messages sent to clients by drains.",
        static_cast<double>(ctx.reconnects_sent));
  m.one("sd_frames_in_total", "counter", "Requests (frames, generate) received from WebSocket clients.",
        static_cast<double>(t.frames_in));
  m.one("sd_frames_out_total", "counter",
        "Results the model made for WebSocket clients (sent, or dropped from a full send queue).",
        static_cast<double>(t.frames_out));
  m.family("sd_frames_dropped_total", "counter",
           "Requests answered with a 'dropped' message instead of a frame, by reason: input (replaced by a newer "
           "one before the model took it), output (pushed out of the client's full send queue, or left unsent when the "
           "stream closed), closed (a request the model had not taken when the stream closed: no reply).");
  m.sample("sd_frames_dropped_total", static_cast<double>(t.dropped_in), "reason=\"input\"");
  m.sample("sd_frames_dropped_total", static_cast<double>(t.dropped_out), "reason=\"output\"");
  m.sample("sd_frames_dropped_total", static_cast<double>(t.lost_at_close), "reason=\"closed\"");
  m.one("sd_frames_skipped_total", "counter", "Frames the similarity filter skipped (their previous result resent).",
        static_cast<double>(t.skipped));
  m.one("sd_stream_errors_total", "counter", "Error messages sent to WebSocket clients (bad input, failed steps).",
        static_cast<double>(t.errors));
  // A failed capture is not an error (that call runs eagerly, as without graphs) but costs the frame rate: an alert.
  m.family("sd_cuda_graphs_total", "counter",
           "CUDA graph events of the model calls (WebSocket streams' own calls, the shared multi-stream calls and the "
           "API's images; 0 off CUDA), by event: capture (a graph recorded), replay (a call answered by a replay), "
           "failure (a capture that failed: that call and shape then run eagerly).");
  const struct {
    const char* event;
    const char* key;  // in the worker's stats as batched_<key>, in the API's as <key>
    int64_t streams;  // the WebSocket streams' own calls
  } graph_events[] = {{"capture", "graph_captures", t.graph_captures},
                      {"replay", "graph_replays", t.graph_replays},
                      {"failure", "graph_failures", t.graph_failures}};
  for (const auto& g : graph_events) {
    const int64_t n = g.streams + w.value(std::string("batched_") + g.key, int64_t{0}) + api.value(g.key, int64_t{0});
    m.sample("sd_cuda_graphs_total", static_cast<double>(n), std::string("event=\"") + g.event + "\"");
  }
  m.one("sd_model_steps_total", "counter", "Model worker turns (stream steps, API images).",
        static_cast<double>(w.value("steps", int64_t{0})));
  m.one("sd_model_busy_seconds_total", "counter", "Seconds the model worker spent running steps.",
        w.value("busy_s", 0.0));
  m.one("sd_model_busy_ratio", "gauge",
        "Fraction of the uptime the model worker was busy (rate(sd_model_busy_seconds_total) for a recent window).",
        w.value("utilisation", 0.0));
  m.one("sd_model_queue_length", "gauge", "Tasks waiting for the model worker.",
        static_cast<double>(w.value("queued", int64_t{0})));
  m.family("sd_stage_seconds", "histogram",
           "Seconds per stage of a WebSocket frame: decode (JPEG decode and fit), queue (waiting for the model), "
           "model (the step), encode (JPEG encode of the result).");
  m.histogram("decode", ctx.stages.decode);
  m.histogram("queue", ctx.stages.queue);
  m.histogram("model", ctx.stages.model);
  m.histogram("encode", ctx.stages.encode);
  m.one("sd_http_requests_total", "counter", "HTTP requests read (all paths).", static_cast<double>(ctx.http_requests));
  m.one("sd_api_images_total", "counter", "Images the HTTP API (txt2img, img2img) returned.",
        static_cast<double>(api.value("images", int64_t{0})));
  m.one("sd_api_rejected_busy_total", "counter", "API image requests refused with 503 (--max-api-pending).",
        static_cast<double>(api.value("rejected_busy", int64_t{0})));
  m.one("sd_api_cancelled_total", "counter",
        "API image requests dropped before the model took them: their client closed the connection.",
        static_cast<double>(api.value("cancelled", int64_t{0})));
  if (ctx.models)
    if (const auto c = ctx.models->compiled_unet_stats(); !c.path.empty()) {
      m.family("sd_unet_calls_total", "counter",
               "UNet calls with a compiled UNet loaded (--compiled-unet), by the UNet that ran them: compiled (the "
               "package) or own (a call the package does not take; /api/stats says the last reason).");
      m.sample("sd_unet_calls_total", static_cast<double>(c.calls), "unet=\"compiled\"");
      m.sample("sd_unet_calls_total", static_cast<double>(c.fallbacks), "unet=\"own\"");
    }
  const double rss_mb = resident_memory_mb();
  if (rss_mb >= 0)
    m.one("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss_mb * 1024.0 * 1024.0);
#ifdef SD_WITH_CUDA
  if (ctx.models && ctx.models->device().is_cuda()) {
    const c10::cuda::CUDAGuard guard(ctx.models->device());
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
      m.one("sd_device_memory_used_bytes", "gauge", "Memory in use on the model's CUDA device (all processes).",
            static_cast<double>(total_b - free_b));
      m.one("sd_device_memory_total_bytes", "gauge", "Memory of the model's CUDA device.",
            static_cast<double>(total_b));
    }
  }
#endif
  return m.str();
}

}  // namespace sd::server
