#pragma once
// Settings of `streamdiffusion serve` that are not about the model.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sd::server {

struct ServerOptions {
  std::string host = "127.0.0.1";  // loopback only unless asked
  uint16_t port = 8000;            // 0 = any free port (see Server::port())
  std::string web_root;            // folder of the browser app; empty = no static files
  int max_streams = 4;             // concurrent WebSocket streams; more get a "busy" message and a close
  size_t max_ws_message = 4u << 20;   // bytes; a bigger message closes that connection with code 1009
  size_t max_http_body = 16u << 20;   // bytes; a bigger request body gets 413
  std::vector<std::string> allow_origins;  // extra Origins allowed to open a WebSocket ("*" = any)
  int io_threads = 2;              // Asio threads (network, JPEG coding)
  int max_api_pending = 8;
  // Clients whose pending frames the model worker gathers into one step with one UNet call (ModelWorker,
  // pipeline/multi_stream.h); 1 = one client per step.
  int max_batch_streams = 8;         // API images waiting for the model at once; more get 503
  size_t send_queue_frames = 2;    // frames queued per client before the oldest unsent one is dropped
  double stats_interval_s = 1.0;   // seconds between the per-client "stats" messages
  double control_interval_s = 0.25;  // seconds between the "control" images sent to a client, per ControlNet
  int control_jpeg_quality = 75;     // the "control" images (shown small on the page)
  int jpeg_quality = 85;           // output frames
  std::string worker_id;           // this worker's name in a fleet (hello, stats, /api/health); "" = host:port
};

}  // namespace sd::server
