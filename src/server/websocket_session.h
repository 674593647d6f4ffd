#pragma once
// One browser client on /ws: binary messages carry JPEG frames both ways, text messages carry JSON control.
//
// Client -> server
//   binary                      a JPEG frame (any size 8..4096 px per side; centre-cropped and resized to the
//                               stream size). In txt2img mode it only asks for the next image.
//   {"type":"config", ...}      stream settings (fields in stream_settings.h); applied before the next frame
//   {"type":"generate"}         txt2img: ask for the next image (no frame needed)
//   {"type":"stats"}            ask for a stats message now
//   {"type":"ping"}             -> {"type":"pong"}
// Server -> client
//   binary                      a JPEG result, exactly one per frame / generate request the model took
//   {"type":"hello", id, width, height, settings, loras, limits,   after the handshake (loras: names loaded;
//    worker, stream,                                         worker: this server's --worker-id, stream: the
//                                                           client's stream id, ?stream= or the sd_stream cookie)
//    controlnets, control_preprocessors, ip_adapter}               controlnets: [{name, scale, preprocessor}] of the
//                                                           loaded ControlNets (the defaults), control_preprocessors:
//                                                           the names, ip_adapter: {scale} or null
//   {"type":"control", index, image}                        the control image ControlNet `index` got for a frame
//                                                           (a data:image/jpeg;base64 URL), at most every
//                                                           control_interval_s per ControlNet
//   {"type":"config", settings}                             settings applied (by the model thread; with LoRAs
//                                                           loaded, settings.lora = the model's current scales)
//   {"type":"stats", ..., worker}                           about once a second while frames flow, and on request
//   {"type":"reconnect", reason, worker, message}           the server drains (SIGTERM, POST /api/drain): open a new
//                                                           connection (the load balancer picks another worker); the
//                                                           results of frames in flight still come until then
//   {"type":"error", message}                               a refused message; the stream goes on
//   {"type":"dropped", where, reason}                       instead of the frame of a request that lost it: "input"
//                                                           (replaced while pending) or "output" (send queue full);
//                                                           one reply per request either way (dropped_message)
//   {"type":"busy", message, max_streams}                   then close 1013 (try again later): no free stream slot
// A draining server refuses the upgrade itself (HTTP 503, JSON {"type":"busy","reason":"draining"}), so that a
// load balancer retries another worker; a stream id that is not 1..64 characters of [A-Za-z0-9_-] gets HTTP 400.
// A message over --max-ws-message closes the connection with 1009 (message too big): it cannot be skipped unread.
//
// Threads: all socket work runs on the session's strand. The model thread hands results over with send_frame(),
// which only posts to the strand; the JPEG is encoded there and queued. The queue holds at most
// send_queue_frames frames: a client that does not read fast enough loses its oldest unsent frames (counted), so
// it never stalls the model thread or anyone else.
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <nlohmann/json.hpp>
#include <opencv2/core/mat.hpp>

#include "server/server_context.h"
#include "server/stream_session.h"

namespace sd::server {

// May a page from `origin` open a WebSocket on this server? Allowed: no Origin header (not a browser); an origin in
// `allow` (exact match, or "*"); the same host:port as the request's Host header when that host is "localhost" or an
// IP literal (a DNS name could be rebound to 127.0.0.1 by another site, so names must be listed explicitly).
bool origin_allowed(const std::string& origin, const std::string& host_header, const std::vector<std::string>& allow);

class WebSocketSession : public std::enable_shared_from_this<WebSocketSession> {
 public:
  WebSocketSession(boost::beast::tcp_stream&& stream, std::shared_ptr<ServerContext> ctx);
  ~WebSocketSession();

  // Completes the handshake of this upgrade request (Origin already checked) and starts reading.
  void run(boost::beast::http::request<boost::beast::http::string_body> req, std::string stream_id = "");
  // Any thread: close with "going away" (server shutdown; no error message after a reconnect message).
  void shutdown();
  // Any thread: tell the client to reconnect elsewhere ({"type":"reconnect"}); the stream goes on until it closes.
  void drain();
  // Closed and its counters added to ServerContext::closed_streams (read under ctx->totals_mutex).
  bool retired() const { return retired_.load(); }
  // Any thread. Snapshot of the stream's counters (empty when busy / not yet started).
  nlohmann::json stats() const;

 private:
  struct Outgoing {
    bool binary = false;
    std::string data;
  };

  void on_accept(boost::beast::error_code ec);
  void do_read();
  void on_read(boost::beast::error_code ec, std::size_t bytes);
  void handle_text(const std::string& text);
  void handle_binary(const std::string& data);

  // Strand only.
  void enqueue(Outgoing out);
  // A client that reads nothing while its requests keep coming: the socket is closed (the pending write then fails
  // and finish() releases the stream and its slot).
  void cut_unread_client();
  void do_write();
  void on_write(boost::beast::error_code ec, std::size_t bytes);
  void send_json(const nlohmann::json& j);
  void close_with(boost::beast::websocket::close_code code, const std::string& reason);
  void finish();

  // Any thread: post to the strand.
  void post_frame(cv::Mat rgb);
  void post_json(nlohmann::json j);
  void post_control(size_t index, cv::Mat rgb);

  boost::beast::websocket::stream<boost::beast::tcp_stream> ws_;
  boost::beast::flat_buffer buffer_;
  std::shared_ptr<ServerContext> ctx_;
  std::shared_ptr<StreamSession> stream_;  // null when refused (busy)
  bool has_slot_ = false;
  uint64_t id_ = 0;
  std::string stream_id_;
  bool reconnect_sent_ = false;  // strand only
  std::atomic<bool> retired_{false};

  std::deque<Outgoing> queue_;
  size_t queued_frames_ = 0;
  bool writing_ = false;
  bool close_after_write_ = false;
  boost::beast::websocket::close_reason close_reason_;
  bool closing_ = false;
  bool finished_ = false;
  bool cut_ = false;  // the connection was cut: the client read nothing (enqueue)
  std::chrono::steady_clock::time_point last_stats_{};
  std::vector<std::chrono::steady_clock::time_point> last_control_;  // per ControlNet (strand only)
};

}  // namespace sd::server
