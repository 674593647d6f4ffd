#include "server/http_server.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <optional>
#include <sstream>
#include <string_view>

#include <boost/asio/ip/tcp.hpp>
#include <opencv2/core/utility.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>

#include "core/error.h"
#include "core/log.h"
#include "runtime/runtime_stats.h"
#include "server/server_context.h"
#include "server/websocket_session.h"

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;
using tcp = net::ip::tcp;

namespace sd::server {
namespace {

constexpr unsigned kMaxHeaderBytes = 16 * 1024;
constexpr auto kRequestTimeout = std::chrono::seconds(30);

// One HTTP connection: reads a request, answers it (maybe later, for API images), repeats; hands a WebSocket
// upgrade over to a WebSocketSession.
class HttpSession : public std::enable_shared_from_this<HttpSession> {
 public:
  HttpSession(tcp::socket&& socket, std::shared_ptr<ServerContext> ctx) : stream_(std::move(socket)), ctx_(std::move(ctx)) {}

  void run() {
    net::dispatch(stream_.get_executor(), beast::bind_front_handler(&HttpSession::do_read, shared_from_this()));
  }

 private:
  using Response = http::response<http::string_body>;

  void do_read() {
    parser_.emplace();
    parser_->body_limit(ctx_->options.max_http_body);
    parser_->header_limit(kMaxHeaderBytes);
    stream_.expires_after(kRequestTimeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            beast::bind_front_handler(&HttpSession::on_header, shared_from_this()));
  }

  // The header is in. A client that sent "Expect: 100-continue" waits before it sends the body (curl: up to a second,
  // then it sends it anyway): it gets "100 Continue", or at once the final answer when the request is refused
  // whatever the body; the refusal closes the connection, as the body it announced may still come (RFC 9110 10.1.1).
  void on_header(beast::error_code ec, std::size_t) {
    if (ec) return on_read(ec, 0);
    const auto& req = parser_->get();
    if (parser_->is_done() || req.version() < 11 || !beast::iequals(req[http::field::expect], "100-continue"))
      return read_body();
    if (auto refusal = refusal_before_body(req)) {
      ctx_->http_requests.fetch_add(1);
      refusal->keep_alive(false);
      return send(std::move(*refusal));
    }
    static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
    net::async_write(stream_, net::buffer(kContinue.data(), kContinue.size()),
                     [self = shared_from_this()](beast::error_code wec, std::size_t) {
                       if (wec) return self->close();
                       self->read_body();
                     });
  }

  void read_body() {
    http::async_read(stream_, buffer_, *parser_, beast::bind_front_handler(&HttpSession::on_read, shared_from_this()));
  }

  // The answer of a request that is refused whatever its body says (a wrong route, method or Content-Type, a busy
  // API); nullopt when the body is wanted. Bodies that are too large are refused by the parser already (413).
  std::optional<Response> refusal_before_body(const http::request<http::string_body>& req) {
    if (websocket::is_upgrade(req)) return std::nullopt;
    const std::string target(req.target());
    const std::string path = target.substr(0, target.find('?'));
    if (path == "/metrics" || path == "/api/ready" || path == "/api/drain") return std::nullopt;
    if (ApiHandlers::is_api(path)) {
      ApiRequest a;
      a.method = std::string(req.method_string());
      a.target = target;
      a.content_type = std::string(req[http::field::content_type]);
      auto r = ctx_->api->refusal_before_body(a);
      if (!r) return std::nullopt;
      return api_response(std::move(*r), req.version(), false, req.method() == http::verb::head);
    }
    if (req.method() != http::verb::get && req.method() != http::verb::head) return static_file(req);  // 405
    return std::nullopt;
  }

  void on_read(beast::error_code ec, std::size_t) {
    if (ec == http::error::end_of_stream) return close();
    if (ec == http::error::body_limit) {
      return send(error_response(413, "request body over " + std::to_string(ctx_->options.max_http_body) +
                                          " bytes (--max-http-body)", 11, false));
    }
    if (ec == http::error::header_limit) return send(error_response(431, "request headers too large", 11, false));
    if (ec) {
      if (ec != net::error::operation_aborted && ec != beast::error::timeout)
        log::debug("http read: {}", ec.message());
      if (ec != beast::error::timeout && ec != net::error::operation_aborted && ec != net::error::eof &&
          ec != net::error::connection_reset)
        return send(error_response(400, "malformed request: " + ec.message(), 11, false));
      return close();
    }
    ctx_->http_requests.fetch_add(1);
    auto req = parser_->release();
    const std::string target(req.target());
    const std::string path = target.substr(0, target.find('?'));

    if (websocket::is_upgrade(req)) {
      if (path != "/ws") return send(error_response(404, "WebSocket endpoint is /ws", req.version(), false));
      const std::string origin(req[http::field::origin]);
      const std::string host(req[http::field::host]);
      if (!origin_allowed(origin, host, ctx_->options.allow_origins)) {
        ctx_->rejected_origin.fetch_add(1);
        log::warn("websocket from origin '{}' refused (host '{}'; allow it with --allow-origin)", origin, host);
        return send(error_response(403, "origin '" + origin + "' is not allowed (see --allow-origin)", req.version(),
                                   false));
      }
      // The stream id (the routing key of a fleet): a bad one is refused before any slot is taken.
      std::string stream_id;
      try {
        stream_id = stream_id_of(target, std::string(req[http::field::cookie]));
      } catch (const std::exception& e) {
        ctx_->rejected_stream_id.fetch_add(1);
        return send(error_response(400, e.what(), req.version(), false));
      }
      // Draining, or full behind a load balancer: refused here, before the handshake, so that the balancer (nginx
      // proxy_next_upstream http_503) hands the stream to another worker instead of passing a "busy" WebSocket on
      // while others have free slots. A direct client that finds every slot taken gets the "busy" message in the
      // WebSocket instead (a browser cannot read the status of a refused upgrade), and so does the balancer's last
      // try (X-SD-Last-Try, deploy/nginx/fleet.conf.template: every worker refused, one is asked to say why).
      const bool last_try = req.find("X-SD-Last-Try") != req.end();
      const bool draining = ctx_->draining && !ctx_->stopping;
      if (!last_try && (draining || (forwarded(req) && ctx_->active_streams.load() >= ctx_->options.max_streams))) {
        (draining ? ctx_->rejected_draining : ctx_->rejected_busy).fetch_add(1);
        Response res{http::status::service_unavailable, req.version()};
        res.set(http::field::content_type, "application/json");
        res.set(http::field::retry_after, "1");
        res.keep_alive(false);
        res.body() = nlohmann::json{{"type", "busy"},
                                    {"reason", draining ? "draining" : "full"},
                                    {"worker", ctx_->worker_id},
                                    {"max_streams", ctx_->options.max_streams},
                                    {"error", draining ? std::string("this worker is draining: connect again to get "
                                                                     "another one")
                                                       : "all " + std::to_string(ctx_->options.max_streams) +
                                                             " stream slots of this worker are in use"}}
                         .dump();
        res.prepare_payload();
        return send(std::move(res));
      }
      stream_.expires_never();
      std::make_shared<WebSocketSession>(std::move(stream_), ctx_)->run(std::move(req), std::move(stream_id));
      return;
    }

    const unsigned version = req.version();
    const bool keep_alive = req.keep_alive();
    if (path == "/metrics" || path == "/api/ready" || path == "/api/drain") {
      FleetRequest f;
      f.method = std::string(req.method_string());
      f.path = path;
      beast::error_code pec;
      const auto peer = stream_.socket().remote_endpoint(pec);
      f.peer_address = pec ? std::string("unknown") : peer.address().to_string();
      f.forwarded = forwarded(req);
      return send(api_response(*handle_fleet_request(*ctx_, f), version, keep_alive,
                               req.method() == http::verb::head));
    }
    if (ApiHandlers::is_api(path)) {
      ApiRequest a;
      a.method = std::string(req.method_string());
      a.target = target;
      a.content_type = std::string(req[http::field::content_type]);
      a.body = std::move(req.body());
      const bool head = req.method() == http::verb::head;
      stream_.expires_never();  // an image may wait for its turn on the model
      auto cancel = ctx_->api->handle(a, [self = shared_from_this(), version, keep_alive, head](ApiResponse r) {
        net::post(self->stream_.get_executor(), [self, r = std::move(r), version, keep_alive, head]() mutable {
          self->stop_watching();
          self->send(api_response(std::move(r), version, keep_alive, head));
        });
      });
      if (cancel) watch_for_hangup(std::move(cancel));
      return;
    }
    send(static_file(req));
  }

  // Whether the request came through a proxy (what a load balancer in front of a fleet adds).
  static bool forwarded(const http::request<http::string_body>& req) {
    return req.find("X-Forwarded-For") != req.end() || req.find("Forwarded") != req.end() ||
           req.find("X-Real-IP") != req.end();
  }

  // An API handler's answer as the HTTP response (never cached; HEAD gets the headers only).
  static Response api_response(ApiResponse r, unsigned version, bool keep_alive, bool head) {
    Response res{static_cast<http::status>(r.status), version};
    res.set(http::field::content_type, r.content_type);
    res.set(http::field::cache_control, "no-store");
    res.keep_alive(keep_alive);
    res.body() = std::move(r.body);
    res.prepare_payload();
    if (head) res.body().clear();
    return res;
  }

  Response error_response(unsigned status, const std::string& message, unsigned version, bool keep_alive) {
    Response res{static_cast<http::status>(status), version};
    res.set(http::field::content_type, "application/json");
    res.keep_alive(keep_alive);
    // replace: `message` may quote raw request bytes (target, Origin) that are not UTF-8; a strict dump would throw.
    res.body() = nlohmann::json{{"error", message}}.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    res.prepare_payload();
    return res;
  }

  Response static_file(const http::request<http::string_body>& req) {
    const bool head = req.method() == http::verb::head;
    if (req.method() != http::verb::get && !head)
      return error_response(405, "only GET and HEAD for files", req.version(), req.keep_alive());
    if (!ctx_->files) return error_response(404, "no web root configured", req.version(), req.keep_alive());
    const auto r = ctx_->files->resolve(std::string(req.target()));
    if (r.status == StaticFiles::Status::Forbidden)
      return error_response(403, "forbidden path", req.version(), req.keep_alive());
    std::string body;
    if (r.status == StaticFiles::Status::Ok) {
      std::ifstream f(r.path, std::ios::binary);
      std::ostringstream ss;
      ss << f.rdbuf();
      if (!f) return error_response(404, "not found", req.version(), req.keep_alive());
      body = ss.str();
    } else {
      return error_response(404, "not found: " + std::string(req.target()), req.version(), req.keep_alive());
    }
    Response res{http::status::ok, req.version()};
    res.set(http::field::content_type, r.mime);
    res.set(http::field::cache_control, "no-cache");
    res.set("X-Content-Type-Options", "nosniff");
    res.keep_alive(req.keep_alive());
    res.body() = std::move(body);
    res.prepare_payload();
    if (head) res.body().clear();
    return res;
  }

  // While an API image waits for the model, a wait on the socket notices a client that hangs up, so that its request
  // is dropped before it costs model time. A peek tells what made the socket readable: EOF or an error is a hang-up;
  // data is a pipelined request (read after this answer): the client is still there, and the watch ends; nothing
  // (a readiness left over from the request's own bytes, which epoll reports by edge) means wait again.
  void watch_for_hangup(ApiHandlers::Cancel cancel) {
    cancel_ = std::move(cancel);
    wait_readable();
  }
  void wait_readable() {
    stream_.socket().async_wait(tcp::socket::wait_read,
                                [self = shared_from_this()](beast::error_code ec) { self->on_readable(ec); });
  }
  void on_readable(beast::error_code ec) {
    if (!cancel_ || ec == net::error::operation_aborted) return;  // answered meanwhile
    if (!ec) {
      auto& socket = stream_.socket();
      char byte = 0;
      socket.non_blocking(true, ec);  // a peek that returns at once; asynchronous operations do not look at it
      const std::size_t pipelined = ec ? 0 : socket.receive(net::buffer(&byte, 1), tcp::socket::message_peek, ec);
      beast::error_code ignored;
      socket.non_blocking(false, ignored);
      if (ec == net::error::would_block || ec == net::error::try_again) return wait_readable();
      if (!ec && pipelined > 0) {
        cancel_ = nullptr;
        return;
      }
    }
    const auto cancel = std::move(cancel_);
    cancel_ = nullptr;
    if (cancel()) {
      log::debug("api: the client left before the model took its request ({}); dropped", ec.message());
      close();
    }  // else the model has it: its answer is sent as usual (a client that only half-closed still reads it)
  }
  void stop_watching() {
    if (!cancel_) return;
    cancel_ = nullptr;
    beast::error_code ec;
    stream_.socket().cancel(ec);  // the wait is the only operation pending on the socket now
  }
  ApiHandlers::Cancel cancel_;  // set while a wait for a hang-up is pending

  void send(Response&& res) {
    auto msg = std::make_shared<Response>(std::move(res));
    stream_.expires_after(kRequestTimeout);
    http::async_write(stream_, *msg, [self = shared_from_this(), msg](beast::error_code ec, std::size_t) {
      if (ec) return self->close();
      if (!msg->keep_alive()) return self->drain_and_close();
      self->do_read();
    });
  }

  void close() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);
  }

  // After an answer that ends the connection early (413, 400), the client may still be sending its request: read and
  // discard it for a moment, so that closing with unread data (a TCP reset) does not destroy the answer in flight.
  void drain_and_close() {
    close();
    drain_ = std::make_shared<std::array<char, 16384>>();
    stream_.expires_after(std::chrono::seconds(2));
    do_drain();
  }
  void do_drain() {
    stream_.async_read_some(net::buffer(*drain_), [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (!ec) self->do_drain();
    });
  }
  std::shared_ptr<std::array<char, 16384>> drain_;

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::shared_ptr<ServerContext> ctx_;
  std::optional<http::request_parser<http::string_body>> parser_;
};

}  // namespace

struct Server::Impl {
  net::io_context ioc;
  tcp::acceptor acceptor{net::make_strand(ioc)};
  std::vector<std::thread> threads;
  std::shared_ptr<ServerContext> ctx;

  void do_accept() {
    acceptor.async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
      if (ec) {
        if (ec == net::error::operation_aborted || !acceptor.is_open()) return;
        log::warn("accept: {}", ec.message());
      } else {
        std::make_shared<HttpSession>(std::move(socket), ctx)->run();
      }
      do_accept();
    });
  }
};

Server::Server(std::shared_ptr<const DiffusionModels> models, StreamDefaults defaults, ServerOptions options)
    : ctx_(std::make_shared<ServerContext>()) {
  if (!models) throw InvalidArgument("Server: no model");
  if (options.max_streams < 1) throw InvalidArgument("--max-streams must be >= 1");
  if (options.io_threads < 1) throw InvalidArgument("--io-threads must be >= 1");
  if (options.max_ws_message < 1024) throw InvalidArgument("--max-ws-message must be >= 1024 bytes");
  if (options.max_http_body < 1024) throw InvalidArgument("--max-http-body must be >= 1024 bytes");
  if (options.send_queue_frames < 1) throw InvalidArgument("send queue must hold at least one frame");
  if (defaults.img2img.frame_buffer_size != 1 || defaults.txt2img.frame_buffer_size != 1)
    throw InvalidArgument("serve: each client's stream takes one frame per call (--frame-buffer-size must be 1)");
  if (defaults.img2img.width != defaults.txt2img.width || defaults.img2img.height != defaults.txt2img.height)
    throw InvalidArgument("Server: img2img and txt2img streams must have the same size");
  ctx_->models = std::move(models);
  ctx_->defaults = std::move(defaults);
  ctx_->options = std::move(options);
  if (!ctx_->options.web_root.empty()) ctx_->files.emplace(ctx_->options.web_root);
  ctx_->api = std::make_unique<ApiHandlers>(ctx_->models, ctx_->defaults, ctx_->worker, ctx_->options.max_api_pending,
                                            [this] { return stats(); });
  ctx_->request_drain = [this] { begin_drain(); };
}

Server::~Server() { stop(); }

void Server::start() {
  if (started_) return;
  impl_ = std::make_unique<Impl>();
  impl_->ctx = ctx_;
  const auto& o = ctx_->options;
  beast::error_code ec;
  const auto address = net::ip::make_address(o.host, ec);
  if (ec) throw InvalidArgument("--host '" + o.host + "': not an IP address (" + ec.message() + ")");
  const tcp::endpoint ep{address, o.port};
  auto& a = impl_->acceptor;
  a.open(ep.protocol(), ec);
  if (!ec) a.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) a.bind(ep, ec);
  if (!ec) a.listen(net::socket_base::max_listen_connections, ec);
  if (ec) throw Error("cannot listen on " + o.host + ":" + std::to_string(o.port) + ": " + ec.message());
  port_ = a.local_endpoint().port();
  started_ = true;
  ctx_->worker_id = o.worker_id.empty() ? (o.host.find(':') != std::string::npos ? "[" + o.host + "]" : o.host) + ":" +
                                              std::to_string(port_)
                                        : o.worker_id;
  // JPEG coding runs on the network threads; OpenCV's own spinning workers would only steal the model's cores.
  cv::setNumThreads(1);
  ctx_->worker.set_max_batch_streams(o.max_batch_streams);
  ctx_->worker.start();
  impl_->do_accept();
  for (int i = 0; i < o.io_threads; ++i) impl_->threads.emplace_back([this] { impl_->ioc.run(); });
}

void Server::begin_drain() {
  if (ctx_->draining.exchange(true)) return;
  log::info("draining: no new streams; {} open stream(s) told to reconnect", ctx_->active_streams.load());
  for (auto& s : ctx_->live_sessions()) s->drain();
}

bool Server::draining() const { return ctx_->draining.load(); }

int Server::drain_and_stop(double seconds, const std::function<bool()>& cut_short) {
  begin_drain();
  const auto t0 = std::chrono::steady_clock::now();
  const auto deadline = t0 + std::chrono::microseconds(static_cast<int64_t>(std::max(0.0, seconds) * 1e6));
  auto api_pending = [this] { return ctx_->api ? ctx_->api->stats().value("pending", 0) : 0; };
  while ((ctx_->active_streams.load() > 0 || api_pending() > 0) && std::chrono::steady_clock::now() < deadline &&
         !(cut_short && cut_short()))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const int left = ctx_->active_streams.load();
  log::info("drain done in {:.2f} s, {} stream(s) still open{}",
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), left,
            left ? " (cut off at the deadline)" : "");
  stop();
  return left;
}

void Server::stop() {
  if (!started_ || stopped_) return;
  stopped_ = true;
  ctx_->stopping = true;
  net::post(impl_->acceptor.get_executor(), [this] {
    beast::error_code ec;
    impl_->acceptor.close(ec);
  });
  for (auto& s : ctx_->live_sessions()) s->shutdown();
  // Give the clients a moment to receive the close (bounded: a client that does not answer is cut off).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(1000);
  while (ctx_->active_streams.load() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ctx_->worker.stop();
  impl_->ioc.stop();
  for (auto& t : impl_->threads) t.join();
  impl_->threads.clear();
  log::info("server stopped");
}

nlohmann::json Server::stats() const {
  nlohmann::json streams = nlohmann::json::array();
  for (const auto& s : ctx_->live_sessions()) {
    auto j = s->stats();
    if (!j.is_null()) streams.push_back(std::move(j));
  }
  const double up = std::chrono::duration<double>(std::chrono::steady_clock::now() - ctx_->t_start).count();
  nlohmann::json out = {{"uptime_s", up},
          {"worker_id", ctx_->worker_id},
          {"draining", ctx_->draining.load()},
          {"rejected_draining", ctx_->rejected_draining.load()},
          {"rejected_stream_id", ctx_->rejected_stream_id.load()},
          {"reconnects_sent", ctx_->reconnects_sent.load()},
          {"streams", ctx_->active_streams.load()},
          {"max_streams", ctx_->options.max_streams},
          {"streams_total", ctx_->streams_total.load()},
          {"rejected_busy", ctx_->rejected_busy.load()},
          {"rejected_origin", ctx_->rejected_origin.load()},
          {"http_requests", ctx_->http_requests.load()},
          {"worker", ctx_->worker.stats()},
          {"rss_mb", resident_memory_mb()},
          {"clients", streams}};
  // --compiled-unet: how many UNet calls the package ran, and how many the model's own UNet ran instead (a shape it
  // does not take, e.g. more batched rows than its range; ControlNet residuals) with the last reason.
  if (ctx_->models)
    if (const auto c = ctx_->models->compiled_unet_stats(); !c.path.empty())
      out["compiled_unet"] = {
          {"file", c.path}, {"calls", c.calls}, {"fallbacks", c.fallbacks}, {"last_fallback", c.last_fallback}};
  return out;
}

}  // namespace sd::server
