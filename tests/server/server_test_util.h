#pragma once
// Loopback clients for the server tests, on Boost.Beast's client side: plain HTTP requests and a WebSocket client
// whose reads time out (each client runs its own io_context, so tests never hang on a silent server).
#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include "common/fixtures.h"
#include "server/image_codec.h"
#include "server/stream_settings.h"

namespace sd::test {

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;
using tcp = net::ip::tcp;

struct HttpResult {
  unsigned status = 0;
  std::string content_type;
  std::string body;
  nlohmann::json json() const { return nlohmann::json::parse(body, nullptr, false); }
};

inline HttpResult http_request(uint16_t port, http::verb method, const std::string& target, const std::string& body = "",
                               const std::string& content_type = "application/json") {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  http::request<http::string_body> req{method, target, 11};
  req.set(http::field::host, "127.0.0.1:" + std::to_string(port));
  if (!body.empty() || method == http::verb::post) {
    req.set(http::field::content_type, content_type);
    req.body() = body;
    req.prepare_payload();
  }
  beast::error_code ec;
  http::write(stream, req, ec);
  HttpResult r;
  beast::flat_buffer buf;
  http::response_parser<http::string_body> parser;
  parser.body_limit(64u << 20);
  stream.expires_after(std::chrono::seconds(120));
  // An oversize body may be answered (413) before it is all sent: read the answer even after a write error.
  http::read(stream, buf, parser, ec);
  if (ec && !parser.is_header_done()) return r;
  auto res = parser.release();
  r.status = res.result_int();
  r.content_type = std::string(res[http::field::content_type]);
  r.body = std::move(res.body());
  return r;
}

// The HTTP status of a WebSocket upgrade request on /ws with this Origin (101 = accepted), read directly (Beast's
// client handshake reports a refusal only as an error).
inline unsigned upgrade_status(uint16_t port, const std::string& origin) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  http::request<http::empty_body> req{http::verb::get, "/ws", 11};
  req.set(http::field::host, "127.0.0.1:" + std::to_string(port));
  req.set(http::field::upgrade, "websocket");
  req.set(http::field::connection, "Upgrade");
  req.set(http::field::sec_websocket_key, "dGhlIHNhbXBsZSBub25jZQ==");
  req.set(http::field::sec_websocket_version, "13");
  if (!origin.empty()) req.set(http::field::origin, origin);
  beast::error_code ec;
  http::write(stream, req, ec);
  if (ec) return 0;
  beast::flat_buffer buf;
  http::response_parser<http::string_body> parser;
  stream.expires_after(std::chrono::seconds(30));
  http::read_header(stream, buf, parser, ec);
  if (ec) return 0;
  return parser.get().result_int();
}

// The answer to a WebSocket upgrade request on `target` with extra headers, read directly: status and body (a
// refusal's JSON; empty for 101).
inline HttpResult upgrade_answer(uint16_t port, const std::string& target,
                                 const std::vector<std::pair<std::string, std::string>>& headers = {}) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  HttpResult r;
  beast::error_code ec;
  stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port), ec);
  if (ec) return r;
  http::request<http::empty_body> req{http::verb::get, target, 11};
  req.set(http::field::host, "127.0.0.1:" + std::to_string(port));
  req.set(http::field::upgrade, "websocket");
  req.set(http::field::connection, "Upgrade");
  req.set(http::field::sec_websocket_key, "dGhlIHNhbXBsZSBub25jZQ==");
  req.set(http::field::sec_websocket_version, "13");
  for (const auto& [k, v] : headers) req.set(k, v);
  http::write(stream, req, ec);
  if (ec) return r;
  beast::flat_buffer buf;
  http::response_parser<http::string_body> parser;
  stream.expires_after(std::chrono::seconds(30));
  http::read_header(stream, buf, parser, ec);
  if (ec) return r;
  r.status = parser.get().result_int();
  r.content_type = std::string(parser.get()[http::field::content_type]);
  if (r.status != 101) {
    http::read(stream, buf, parser, ec);
    r.body = parser.get().body();
  }
  return r;
}

// A raw request target (no normalisation by any client library), for traversal tests.
inline HttpResult http_get(uint16_t port, const std::string& target) { return http_request(port, http::verb::get, target); }

class WsClient {
 public:
  int receive_buffer = 0;  // SO_RCVBUF in bytes (0: the system's), for a client that reads slowly or not at all
  std::vector<std::pair<std::string, std::string>> headers;  // extra upgrade request headers (X-Forwarded-For, ...)

  struct Message {
    bool ok = false;        // false: timeout or error (see error / closed)
    bool binary = false;
    std::string data;
    bool closed = false;    // the server closed the connection
    int close_code = 0;
    std::string error;
    nlohmann::json json() const { return nlohmann::json::parse(data, nullptr, false); }
  };

  // Connects and completes the handshake; returns the HTTP status of the upgrade answer (101 on success).
  unsigned connect(uint16_t port, const std::string& origin = "", const std::string& target = "/ws") {
    beast::error_code ec;
    if (receive_buffer > 0) {  // before connecting: the TCP window the client offers
      auto& socket = beast::get_lowest_layer(ws_).socket();
      socket.open(tcp::v4(), ec);
      if (!ec) socket.set_option(net::socket_base::receive_buffer_size(receive_buffer), ec);
      if (ec) return 0;
    }
    beast::get_lowest_layer(ws_).connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port), ec);
    if (ec) return 0;
    ws_.set_option(websocket::stream_base::decorator([origin, extra = headers](websocket::request_type& req) {
      if (!origin.empty()) req.set(http::field::origin, origin);
      for (const auto& [k, v] : extra) req.set(k, v);
    }));
    ws_.read_message_max(64u << 20);
    websocket::response_type res;
    ws_.handshake(res, "127.0.0.1:" + std::to_string(port), target, ec);
    if (ec) {
      dead_ = true;
      return 0;  // refused (see upgrade_status for the HTTP status)
    }
    return res.result_int();
  }

  bool send_text(const std::string& s) {
    beast::error_code ec;
    ws_.text(true);
    ws_.write(net::buffer(s), ec);
    return !ec;
  }
  bool send_json(const nlohmann::json& j) { return send_text(j.dump()); }
  bool send_binary(const std::string& s) {
    beast::error_code ec;
    ws_.binary(true);
    ws_.write(net::buffer(s), ec);
    return !ec;
  }

  // Every wait below is scaled by sd::test::time_scale() (sanitizer builds).
  static std::chrono::milliseconds scaled(std::chrono::milliseconds timeout) {
    return std::chrono::milliseconds(static_cast<int64_t>(timeout.count() * sd::test::time_scale()));
  }

  Message read(std::chrono::milliseconds timeout = std::chrono::seconds(60)) { return read_for(scaled(timeout)); }

  Message read_for(std::chrono::milliseconds timeout) {
    Message m;
    if (dead_) {
      m.closed = true;
      m.error = "connection already failed";
      return m;
    }
    buffer_.consume(buffer_.size());
    bool done = false;
    beast::error_code ec;
    ws_.async_read(buffer_, [&](beast::error_code e, std::size_t) {
      ec = e;
      done = true;
    });
    ioc_.restart();
    ioc_.run_for(timeout);
    if (!done) {
      beast::get_lowest_layer(ws_).socket().cancel();
      ioc_.restart();
      ioc_.run();
      dead_ = true;
      m.error = "timeout";
      return m;
    }
    if (ec) {
      dead_ = true;
      m.closed = true;
      m.close_code = ws_.reason().code;
      m.error = ec.message();
      return m;
    }
    m.ok = true;
    m.binary = ws_.got_binary();
    m.data = beast::buffers_to_string(buffer_.data());
    return m;
  }

  // Reads until a binary message (skipping text messages, which go to `texts`); nullopt on close / timeout.
  std::optional<std::string> read_frame(std::vector<nlohmann::json>* texts = nullptr,
                                        std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    const auto deadline = std::chrono::steady_clock::now() + scaled(timeout);
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      Message m = read_for(left);
      if (!m.ok) return std::nullopt;
      if (m.binary) return m.data;
      if (texts) texts->push_back(m.json());
    }
  }

  // Reads until a text message of `type` (binary frames are counted in `frames`).
  std::optional<nlohmann::json> read_type(const std::string& type, std::chrono::milliseconds timeout = std::chrono::seconds(60),
                                          int* frames = nullptr) {
    const auto deadline = std::chrono::steady_clock::now() + scaled(timeout);
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      Message m = read_for(left);
      if (!m.ok) return std::nullopt;
      if (m.binary) {
        if (frames) ++*frames;
        continue;
      }
      auto j = m.json();
      if (j.is_object() && j.value("type", "") == type) return j;
    }
  }

  void close() {
    beast::error_code ec;
    if (!dead_) ws_.close(websocket::close_code::normal, ec);
    dead_ = true;
  }

 private:
  net::io_context ioc_;
  websocket::stream<beast::tcp_stream> ws_{ioc_};
  beast::flat_buffer buffer_;
  bool dead_ = false;
};

// A plain TCP client that writes bytes as given and reads with deadlines, for exchanges an HTTP client library does
// not show step by step (Expect: 100-continue; a request and then a hang-up; pipelining).
class RawClient {
 public:
  bool connect(uint16_t port) {
    beast::error_code ec;
    stream_.socket().connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port), ec);
    return !ec;
  }
  bool write(const std::string& bytes) {
    beast::error_code ec;
    net::write(stream_.socket(), net::buffer(bytes), ec);
    return !ec;
  }
  // The bytes up to and including `delimiter`, or nullopt when it has not come within `timeout` (or the connection
  // ended first).
  std::optional<std::string> read_until(const std::string& delimiter, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const std::string have = beast::buffers_to_string(buffer_.data());
      if (const auto at = have.find(delimiter); at != std::string::npos) {
        buffer_.consume(at + delimiter.size());
        return have.substr(0, at + delimiter.size());
      }
      bool done = false;
      beast::error_code ec;
      stream_.async_read_some(buffer_.prepare(4096), [&](beast::error_code e, std::size_t n) {
        ec = e;
        buffer_.commit(n);
        done = true;
      });
      if (!run_until(deadline, done) || ec) return std::nullopt;
    }
  }
  // One HTTP response (a 1xx one too), or nullopt when none has come whole within `timeout`.
  std::optional<http::response<http::string_body>> read_response(std::chrono::milliseconds timeout) {
    http::response_parser<http::string_body> parser;
    parser.body_limit(64u << 20);
    bool done = false;
    beast::error_code ec;
    http::async_read(stream_, buffer_, parser, [&](beast::error_code e, std::size_t) {
      ec = e;
      done = true;
    });
    if (!run_until(std::chrono::steady_clock::now() + timeout, done) || ec) return std::nullopt;
    return parser.release();
  }
  // True when the server ends the connection (EOF or reset) within `timeout` with nothing more sent.
  bool closed_by_server(std::chrono::milliseconds timeout) {
    if (buffer_.size() > 0) return false;
    char byte = 0;
    bool done = false;
    beast::error_code ec;
    stream_.async_read_some(net::buffer(&byte, 1), [&](beast::error_code e, std::size_t) {
      ec = e;
      done = true;
    });
    return run_until(std::chrono::steady_clock::now() + timeout, done) && ec;
  }
  void close() {
    beast::error_code ec;
    stream_.socket().close(ec);
  }

 private:
  // Runs the pending read until it completes (true) or the deadline passes (false: the read is cancelled).
  bool run_until(std::chrono::steady_clock::time_point deadline, const bool& done) {
    ioc_.restart();
    ioc_.run_until(deadline);
    if (done) return true;
    beast::error_code ec;
    stream_.socket().cancel(ec);
    ioc_.restart();
    ioc_.run();
    return false;
  }

  net::io_context ioc_;
  beast::tcp_stream stream_{ioc_};
  beast::flat_buffer buffer_;
};

// A test picture: gradients and a square whose place depends on `k`, as JPEG (w x h).
inline std::string test_jpeg(int w, int h, int k = 0) {
  cv::Mat rgb(h, w, CV_8UC3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      rgb.at<cv::Vec3b>(y, x) = cv::Vec3b(static_cast<uchar>(255 * x / w), static_cast<uchar>(255 * y / h),
                                          static_cast<uchar>((k * 37) % 256));
  cv::rectangle(rgb, cv::Rect((k * 7) % (w / 2), h / 4, w / 3, h / 3), cv::Scalar(255, 255, 255), cv::FILLED);
  return server::encode_jpeg(rgb, 90);
}

inline cv::Mat decode_rgb(const std::string& bytes) { return server::decode_image(bytes, true, "test"); }

inline double mean_abs_diff(const cv::Mat& a, const cv::Mat& b) {
  cv::Mat d;
  cv::absdiff(a, b, d);
  const cv::Scalar s = cv::mean(d);
  return (s[0] + s[1] + s[2]) / 3.0;
}

// The server defaults the loopback tests run the tiny fixture model with: size x size, img2img self-CFG at 32,45,
// txt2img without guidance at 0,16,32,45, prompt "a cat".
inline sd::server::StreamDefaults tiny_stream_defaults(int64_t size) {
  sd::server::StreamDefaults d;
  d.img2img.width = d.img2img.height = size;
  d.img2img.t_index_list = {32, 45};
  d.img2img.cfg_type = sd::CfgType::Self;
  d.txt2img = d.img2img;
  d.txt2img.t_index_list = {0, 16, 32, 45};
  d.txt2img.cfg_type = sd::CfgType::None;
  d.prompt = "a cat";
  return d;
}

}  // namespace sd::test
