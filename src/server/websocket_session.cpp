#include "server/websocket_session.h"

#include <algorithm>
#include <cctype>

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>

#include "core/error.h"
#include "core/log.h"
#include "models/ip_adapter.h"
#include "pipeline/controlnet.h"
#include "runtime/control_preprocessor.h"
#include "runtime/runtime_stats.h"
#include "server/client_message.h"
#include "server/image_codec.h"

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;

namespace sd::server {
namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim_slash(std::string s) {
  while (!s.empty() && s.back() == '/') s.pop_back();
  return s;
}

// "localhost", "127.0.0.1", "[::1]" (host part of a host:port authority, without the port).
bool literal_or_localhost(const std::string& host) {
  if (host == "localhost") return true;
  if (!host.empty() && host.front() == '[') return host.back() == ']';
  return !host.empty() && std::all_of(host.begin(), host.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)) || c == '.'; });
}

std::string host_part(const std::string& authority) {
  if (!authority.empty() && authority.front() == '[') return authority.substr(0, authority.find(']') + 1);
  return authority.substr(0, authority.find(':'));
}

}  // namespace

bool origin_allowed(const std::string& origin_in, const std::string& host_header,
                    const std::vector<std::string>& allow) {
  if (origin_in.empty()) return true;
  const std::string origin = trim_slash(lower(origin_in));
  for (const auto& a : allow)
    if (a == "*" || trim_slash(lower(a)) == origin) return true;
  std::string authority;
  if (origin.rfind("http://", 0) == 0)
    authority = origin.substr(7);
  else if (origin.rfind("https://", 0) == 0)
    authority = origin.substr(8);
  else
    return false;  // "null" (file://, sandboxed frames) and other schemes
  if (authority.empty() || authority != lower(host_header)) return false;
  return literal_or_localhost(host_part(authority));
}

WebSocketSession::WebSocketSession(beast::tcp_stream&& stream, std::shared_ptr<ServerContext> ctx)
    : ws_(std::move(stream)), ctx_(std::move(ctx)) {}

WebSocketSession::~WebSocketSession() {
  if (stream_) stream_->close();
  if (has_slot_) ctx_->release_stream_slot();
}

void WebSocketSession::run(http::request<http::string_body> req, std::string stream_id) {
  stream_id_ = std::move(stream_id);
  beast::get_lowest_layer(ws_).expires_never();
  auto timeouts = websocket::stream_base::timeout::suggested(beast::role_type::server);
  timeouts.idle_timeout = std::chrono::seconds(30);  // a vanished peer is noticed (pings when idle)
  timeouts.keep_alive_pings = true;
  ws_.set_option(timeouts);
  ws_.set_option(websocket::stream_base::decorator(
      [](websocket::response_type& res) { res.set(http::field::server, "streamdiffusion.cpp"); }));
  ws_.read_message_max(ctx_->options.max_ws_message);
  ws_.auto_fragment(false);
  ctx_->register_session(shared_from_this());
  ws_.async_accept(req, beast::bind_front_handler(&WebSocketSession::on_accept, shared_from_this()));
}

void WebSocketSession::on_accept(beast::error_code ec) {
  if (ec) {
    log::debug("websocket handshake failed: {}", ec.message());
    return;
  }
  if (!ctx_->acquire_stream_slot()) {
    const bool stopping = ctx_->stopping.load(), draining = ctx_->draining.load();
    (draining && !stopping ? ctx_->rejected_draining : ctx_->rejected_busy).fetch_add(1);
    send_json({{"type", "busy"},
               {"reason", stopping ? "stopping" : draining ? "draining" : "full"},
               {"message", stopping   ? std::string("the server is shutting down")
                           : draining ? std::string("this worker is draining: reconnect to get another one")
                                      : "the server is busy: all " + std::to_string(ctx_->options.max_streams) +
                                            " stream slots are in use; try again later"},
               {"worker", ctx_->worker_id},
               {"max_streams", ctx_->options.max_streams}});
    close_with(websocket::close_code::try_again_later, "busy");
    do_read();  // until the peer answers the close
    return;
  }
  has_slot_ = true;
  ctx_->streams_total.fetch_add(1);
  id_ = ctx_->next_id.fetch_add(1);
  std::weak_ptr<WebSocketSession> weak = shared_from_this();
  SessionSink sink;
  sink.frame = [weak](cv::Mat rgb) {
    if (auto self = weak.lock()) self->post_frame(std::move(rgb));
  };
  sink.message = [weak](nlohmann::json j) {
    if (auto self = weak.lock()) self->post_json(std::move(j));
  };
  // A raw pointer: the model thread that calls it belongs to the context (no shared_ptr cycle through the queue).
  sink.timing = [stages = &ctx_->stages](double queue_s, double model_s) {
    stages->queue.observe(queue_s);
    stages->model.observe(model_s);
  };
  if (!ctx_->defaults.controlnets.empty())
    sink.control = [weak](size_t index, cv::Mat rgb) {
      if (auto self = weak.lock()) self->post_control(index, std::move(rgb));
    };
  // Atomic: stats() reads it from other threads.
  std::atomic_store(&stream_, std::make_shared<StreamSession>(id_, ctx_->models, ctx_->defaults, ctx_->worker,
                                                              std::move(sink)));
  const auto& o = ctx_->options;
  // What the page needs to offer the ControlNet and IP-Adapter controls.
  nlohmann::json controlnets = nlohmann::json::array();
  const StreamSettings initial = stream_->settings();
  for (size_t i = 0; i < ctx_->defaults.controlnets.size(); ++i)
    controlnets.push_back({{"name", ctx_->defaults.controlnets[i].net->name()},
                           {"scale", initial.controlnets[i].scale},
                           {"preprocessor", initial.controlnets[i].preprocessor},
                           {"guidance_start", initial.controlnets[i].guidance_start},
                           {"guidance_end", initial.controlnets[i].guidance_end}});
  nlohmann::json ip_adapter = nullptr;
  if (ctx_->models->ip_adapter()) ip_adapter = {{"scale", ctx_->models->ip_adapter()->adapter->scale()}};
  send_json({{"type", "hello"},
             {"id", id_},
             {"worker", ctx_->worker_id},
             {"stream", stream_id_},
             {"width", stream_->width()},
             {"height", stream_->height()},
             {"native_width", ctx_->defaults.native_width},
             {"native_height", ctx_->defaults.native_height},
             {"model", ctx_->models->describe()},
             {"settings", stream_->settings().to_json()},
             {"loras", ctx_->defaults.lora_names},
             {"controlnets", controlnets},
             {"control_preprocessors", control_preprocessor_names()},
             {"ip_adapter", ip_adapter},
             {"limits",
              {{"max_message_bytes", o.max_ws_message},
               {"max_image_side", kMaxImageSide},
               {"min_image_side", kMinImageSide},
               {"max_streams", o.max_streams}}}});
  log::info("stream {} opened ({} of {} slots){}", id_, ctx_->active_streams.load(), o.max_streams,
            stream_id_.empty() ? std::string() : ", stream id " + stream_id_);
  if (ctx_->draining) drain();  // the drain began between the slot and the hello: this one is told too
  do_read();
}

void WebSocketSession::do_read() {
  ws_.async_read(buffer_, beast::bind_front_handler(&WebSocketSession::on_read, shared_from_this()));
}

void WebSocketSession::on_read(beast::error_code ec, std::size_t) {
  if (ec) {
    if (ec == websocket::error::message_too_big) {
      if (stream_) stream_->count_error();
      log::warn("stream {}: message over {} bytes, connection closed (1009)", id_, ctx_->options.max_ws_message);
    } else if (ec != websocket::error::closed && ec != net::error::operation_aborted && ec != net::error::eof) {
      log::debug("stream {}: read: {}", id_, ec.message());
    }
    finish();
    return;
  }
  const std::string data = beast::buffers_to_string(buffer_.data());
  buffer_.consume(buffer_.size());
  if (stream_ && !closing_) {
    if (ws_.got_text())
      handle_text(data);
    else
      handle_binary(data);
  }
  do_read();
}

void WebSocketSession::handle_text(const std::string& text) {
  try {
    const ClientMessage m = parse_client_message(text);
    if (m.type == "config") {
      stream_->update_settings(m.body);
    } else if (m.type == "generate") {
      stream_->request_generate();
    } else if (m.type == "stats") {
      nlohmann::json s = stream_->stats();
      s["type"] = "stats";
      s["worker_queue"] = ctx_->worker.stats()["queued"];
      s["streams"] = ctx_->active_streams.load();
      s["worker"] = ctx_->worker_id;
      send_json(s);
    } else if (m.type == "ping") {
      send_json({{"type", "pong"}});
    }
  } catch (const std::exception& e) {  // an exception escaping a handler would end io_context::run (terminate)
    stream_->count_error();
    send_json({{"type", "error"}, {"message", e.what()}});
  }
}

void WebSocketSession::handle_binary(const std::string& data) {
  try {
    const auto t0 = std::chrono::steady_clock::now();
    cv::Mat rgb = fit_image(decode_image(data, false, "frame"), stream_->width(), stream_->height());
    if (!rgb.isContinuous()) rgb = rgb.clone();
    ctx_->stages.decode.observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    stream_->submit_frame(std::move(rgb));
  } catch (const std::exception& e) {  // an exception escaping a handler would end io_context::run (terminate)
    stream_->count_error();
    send_json({{"type", "error"}, {"message", e.what()}});
  }
}

void WebSocketSession::post_frame(cv::Mat rgb) {
  net::post(ws_.get_executor(), [self = shared_from_this(), rgb = std::move(rgb)]() {
    if (self->closing_ || self->finished_) return;
    Outgoing out;
    out.binary = true;
    try {
      const auto t0 = std::chrono::steady_clock::now();
      out.data = encode_jpeg(rgb, self->ctx_->options.jpeg_quality);
      self->ctx_->stages.encode.observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    } catch (const std::exception& e) {
      // This frame gets no result: say so in the words the page treats as "answered" (see web/app.js).
      if (self->stream_) self->stream_->count_error();
      self->send_json({{"type", "error"}, {"message", std::string("generation failed: ") + e.what()}});
      return;
    }
    self->enqueue(std::move(out));
    const auto now = std::chrono::steady_clock::now();
    if (self->stream_ &&
        std::chrono::duration<double>(now - self->last_stats_).count() >= self->ctx_->options.stats_interval_s) {
      self->last_stats_ = now;
      nlohmann::json s = self->stream_->stats();
      s["type"] = "stats";
      s["worker_queue"] = self->ctx_->worker.stats()["queued"];
      s["streams"] = self->ctx_->active_streams.load();
      s["worker"] = self->ctx_->worker_id;
      self->send_json(s);
    }
  });
}

void WebSocketSession::post_control(size_t index, cv::Mat rgb) {
  net::post(ws_.get_executor(), [self = shared_from_this(), index, rgb = std::move(rgb)]() {
    if (self->closing_ || self->finished_) return;
    // Throttled: the page shows it small beside the output; a copy of every frame would double the traffic.
    const auto now = std::chrono::steady_clock::now();
    if (self->last_control_.size() <= index) self->last_control_.resize(index + 1);
    const auto last = self->last_control_[index];
    if (last != std::chrono::steady_clock::time_point{} &&
        std::chrono::duration<double>(now - last).count() < self->ctx_->options.control_interval_s)
      return;
    self->last_control_[index] = now;
    try {
      self->send_json({{"type", "control"},
                       {"index", index},
                       {"image", "data:image/jpeg;base64," +
                                     base64_encode(encode_jpeg(rgb, self->ctx_->options.control_jpeg_quality))}});
    } catch (const std::exception& e) {
      log::debug("stream {}: control image not sent: {}", self->id_, e.what());
    }
  });
}

void WebSocketSession::post_json(nlohmann::json j) {
  net::post(ws_.get_executor(), [self = shared_from_this(), j = std::move(j)]() { self->send_json(j); });
}

namespace {
constexpr size_t kMaxQueuedText = 64;  // text messages waiting to be sent (send_json drops more)
}  // namespace

void WebSocketSession::send_json(const nlohmann::json& j) {
  if (finished_) return;
  if (queue_.size() >= kMaxQueuedText + queued_frames_) return;  // a client that reads nothing: drop the chatter
  enqueue(Outgoing{false, j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)});
}

void WebSocketSession::enqueue(Outgoing out) {
  if (finished_ || close_after_write_ || cut_) return;
  // Frames are bounded below and text by send_json, but each frame pushed out leaves a "dropped" reply in its place:
  // with the write pending for good (the client's receive window full) the queue would grow by one per step.
  constexpr size_t kMaxQueuedDropReplies = 128;
  if (queue_.size() >= kMaxQueuedText + ctx_->options.send_queue_frames + kMaxQueuedDropReplies)
    return cut_unread_client();
  if (out.binary) {
    // Bounded: drop the oldest frame that is not being written right now. A short "dropped" message takes its
    // place, so the client still gets one reply per request, in order.
    while (queued_frames_ >= ctx_->options.send_queue_frames) {
      auto it = std::find_if(queue_.begin() + (writing_ ? 1 : 0), queue_.end(), [](const Outgoing& o) { return o.binary; });
      if (it == queue_.end()) break;
      *it = Outgoing{false, dropped_message(DropPoint::Output).dump()};
      --queued_frames_;
      if (stream_) stream_->count_dropped_output();
    }
    // Only the one being written is left (send_queue_frames == 1): queue the new one anyway, one over the bound. It
    // answers the client's latest request; dropping it would leave a send-after-receive client waiting for nothing.
    ++queued_frames_;
  }
  queue_.push_back(std::move(out));
  if (!writing_) do_write();
}

void WebSocketSession::cut_unread_client() {
  cut_ = true;
  log::warn("stream {}: the client reads nothing ({} messages wait to be sent): connection closed", id_, queue_.size());
  beast::error_code ec;
  beast::get_lowest_layer(ws_).socket().shutdown(net::ip::tcp::socket::shutdown_both, ec);
  beast::get_lowest_layer(ws_).socket().close(ec);
}

void WebSocketSession::do_write() {
  if (queue_.empty()) {
    writing_ = false;
    if (close_after_write_ && !closing_) {
      closing_ = true;
      ws_.async_close(close_reason_, [self = shared_from_this()](beast::error_code) {});
    }
    return;
  }
  writing_ = true;
  ws_.binary(queue_.front().binary);
  ws_.async_write(net::buffer(queue_.front().data),
                  beast::bind_front_handler(&WebSocketSession::on_write, shared_from_this()));
}

void WebSocketSession::on_write(beast::error_code ec, std::size_t) {
  if (!queue_.empty()) {
    if (queue_.front().binary) --queued_frames_;
    queue_.pop_front();
  }
  if (ec) {
    writing_ = false;
    queue_.clear();
    queued_frames_ = 0;
    finish();
    return;
  }
  do_write();
}

void WebSocketSession::close_with(websocket::close_code code, const std::string& reason) {
  close_reason_ = websocket::close_reason(code, reason);
  close_after_write_ = true;
  if (!writing_) do_write();
}

void WebSocketSession::shutdown() {
  net::dispatch(ws_.get_executor(), [self = shared_from_this()]() {
    // !has_slot_: not accepted yet (on_accept will see ctx_->stopping and refuse, a write now would race the
    // handshake's answer on the socket) or already finished.
    if (self->finished_ || self->closing_ || self->close_after_write_ || !self->has_slot_) return;
    const auto unsent = std::remove_if(self->queue_.begin() + (self->writing_ ? 1 : 0), self->queue_.end(),
                                       [](const Outgoing& o) { return o.binary; });
    // Results the model made that will not be sent: counted with the send queue's drops (frames_out = sent + those).
    if (self->stream_)
      for (auto it = unsent; it != self->queue_.end(); ++it) self->stream_->count_dropped_output();
    self->queue_.erase(unsent, self->queue_.end());
    self->queued_frames_ = (self->writing_ && !self->queue_.empty() && self->queue_.front().binary) ? 1 : 0;
    // After a reconnect message (a drain) the client is on its way elsewhere: no error for it to show.
    if (!self->reconnect_sent_) self->send_json({{"type", "error"}, {"message", "the server is shutting down"}});
    self->close_with(websocket::close_code::going_away, "server shutdown");
  });
}

void WebSocketSession::drain() {
  net::dispatch(ws_.get_executor(), [self = shared_from_this()]() {
    if (self->finished_ || self->closing_ || self->close_after_write_ || !self->has_slot_ || self->reconnect_sent_)
      return;
    self->reconnect_sent_ = true;
    self->ctx_->reconnects_sent.fetch_add(1);
    self->send_json({{"type", "reconnect"},
                     {"reason", "draining"},
                     {"worker", self->ctx_->worker_id},
                     {"message", "this worker is draining: open a new connection (another worker takes the stream)"}});
  });
}

void WebSocketSession::finish() {
  if (finished_) return;
  finished_ = true;
  if (stream_) {
    stream_->close();
    const auto s = stream_->stats();
    {
      std::lock_guard<std::mutex> lock(ctx_->totals_mutex);
      ctx_->closed_streams.add(s);
      retired_ = true;
    }
    log::info("stream {} closed: {} frames in, {} out, {} dropped in, {} dropped out, {} errors", id_,
              s["frames_in"].get<int64_t>(), s["frames_out"].get<int64_t>(), s["dropped_in"].get<int64_t>(),
              s["dropped_out"].get<int64_t>(), s["errors"].get<int64_t>());
  }
  if (has_slot_) {
    has_slot_ = false;
    ctx_->release_stream_slot();  // at once, not when the last handler lets go of the session
  }
}

nlohmann::json WebSocketSession::stats() const {
  const auto s = std::atomic_load(&stream_);
  return s ? s->stats() : nlohmann::json();
}

}  // namespace sd::server
