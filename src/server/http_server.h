#pragma once
// `streamdiffusion serve`'s server: one listening socket on Boost.Asio/Beast, io_threads network threads, and one
// model thread (ModelWorker) shared by every client.
//
// Routes: GET /ws (WebSocket upgrade, see websocket_session.h) · /api/ready, /api/drain, /metrics (fleet.h) ·
// /api/... (api_handlers.h) · anything else GET/HEAD
// is a static file of the web root (static_files.h). Limits: request headers 16 KiB, request bodies
// --max-http-body (413 beyond), 30 s to send a request, one request at a time per connection (keep-alive).
// Expect: 100-continue (curl 7.88 sends it with bodies over 1 MiB, older curl over 1 KiB) gets "100 Continue" once
// the header is read, or at once the final answer, with the connection closed, when the request is refused whatever
// its body (413, a wrong route, method or Content-Type, a busy API). An API image request whose client hangs up
// before the model takes it is dropped (ApiHandlers::Cancel).
// The WebSocket upgrade checks the Origin (403 when refused) before any stream slot is taken.
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "pipeline/diffusion_models.h"
#include "server/server_options.h"
#include "server/stream_settings.h"

namespace sd::server {

struct ServerContext;

class Server {
 public:
  Server(std::shared_ptr<const DiffusionModels> models, StreamDefaults defaults, ServerOptions options);
  ~Server();  // stop()
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds and listens (throws sd::Error naming host:port when that fails), starts the network threads and the model
  // thread. Returns at once.
  void start();
  // The bound port (the real one when options.port was 0).
  uint16_t port() const { return port_; }
  // Stops accepting, tells every stream client "going away", finishes the model step in progress, then stops the
  // network threads. Idempotent; safe to call from any thread except a network thread.
  void stop();

  // Drain (a fleet's rolling restart): no new streams (/api/ready and the /ws upgrade answer 503 "draining"), every
  // open stream gets {"type":"reconnect"} and goes on until its client closes it. Returns at once; idempotent; any
  // thread (POST /api/drain calls it).
  void begin_drain();
  bool draining() const;
  // begin_drain(), then waits until every stream has closed and no API image is pending (the frames in flight
  // answered), or `seconds` passed, or cut_short() says so; then stop(). Returns the streams still open then.
  int drain_and_stop(double seconds, const std::function<bool()>& cut_short = {});

  // Uptime, streams (active / max / total / rejected), per-stream counters, model worker, RSS.
  nlohmann::json stats() const;

 private:
  struct Impl;
  std::shared_ptr<ServerContext> ctx_;
  std::unique_ptr<Impl> impl_;
  uint16_t port_ = 0;
  bool started_ = false, stopped_ = false;
};

}  // namespace sd::server
