// The server on loopback with the tiny fixture model: HTTP API round trips, WebSocket streams, rejections of bad
// input while another client keeps streaming, the stream limit, separate per-client streams, static files, and a
// load run (20 clients; SD_LOAD_SECONDS, default 10 s in CTest).
#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <numeric>
#include <thread>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/device.h"
#include "pipeline/diffusion_models.h"
#include "runtime/runtime_stats.h"
#include "server/http_server.h"
#include "server_test_util.h"

namespace fs = std::filesystem;
using namespace sd::server;
using sd::test::http_get;
using sd::test::http_request;
using sd::test::WsClient;
namespace http = boost::beast::http;

namespace {

constexpr int kSize = 64;
const char* kModel = "models/tiny-sd15";

std::shared_ptr<const sd::DiffusionModels> shared_model() {
  static std::shared_ptr<const sd::DiffusionModels> m = [] {
    sd::LoadOptions lo;
    lo.threads = -1;  // leave libtorch's setting alone (the test binary shares the machine)
    return sd::load_pipeline(sd::test::fixture_path(kModel), lo);
  }();
  return m;
}

StreamDefaults defaults() { return sd::test::tiny_stream_defaults(kSize); }

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!sd::test::fixture_exists(kModel)) GTEST_SKIP() << "no " << kModel << " under " << sd::test::fixtures_root();
  }
  void TearDown() override {
    if (server_) server_->stop();
    if (!tmp_.empty()) fs::remove_all(tmp_);
  }

  void start(ServerOptions o = {}, StreamDefaults d = defaults()) {
    tmp_ = sd::test::make_temp_dir("server");
    fs::create_directories(fs::path(tmp_) / "web");
    std::ofstream(fs::path(tmp_) / "web" / "index.html") << "<!doctype html><title>t</title>";
    std::ofstream(fs::path(tmp_) / "secret.txt") << "top secret";
    o.host = "127.0.0.1";
    o.port = 0;
    o.web_root = (fs::path(tmp_) / "web").string();
    server_ = std::make_unique<Server>(shared_model(), d, o);
    server_->start();
    port_ = server_->port();
  }

  std::string tmp_;
  std::unique_ptr<Server> server_;
  uint16_t port_ = 0;
};

// Connects and reads the hello; fails the test otherwise.
void open_stream(WsClient& c, uint16_t port) {
  ASSERT_EQ(c.connect(port), 101u);
  auto hello = c.read_type("hello", std::chrono::seconds(10));
  ASSERT_TRUE(hello) << "no hello";
  EXPECT_EQ((*hello)["width"], kSize);
}

// One frame out, its result back.
bool round_trip(WsClient& c, int k) {
  if (!c.send_binary(sd::test::test_jpeg(96, 72, k))) return false;
  return c.read_frame().has_value();
}

using Clock = std::chrono::steady_clock;

// A client streaming frames on its own thread (send, wait for the result, repeat), counting results and noting when
// each arrived.
class Streamer {
 public:
  explicit Streamer(uint16_t port) {
    const unsigned st = client_.connect(port);
    ok_ = st == 101 && client_.read_type("hello", std::chrono::seconds(10)).has_value();
    thread_ = std::thread([this] {
      int k = 0;
      while (ok_ && !stop_) {
        if (!client_.send_binary(sd::test::test_jpeg(80, 80, k++))) break;
        if (!client_.read_frame(nullptr, std::chrono::seconds(60))) break;
        {
          std::lock_guard<std::mutex> lock(arrivals_mutex_);
          arrivals_.push_back(Clock::now());
        }
        frames_.fetch_add(1);
      }
      alive_ = false;
    });
  }
  ~Streamer() { stop(); }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    client_.close();
  }
  int frames() const { return frames_.load(); }
  // Results that arrived within [from, to].
  int frames_between(Clock::time_point from, Clock::time_point to) const {
    std::lock_guard<std::mutex> lock(arrivals_mutex_);
    return static_cast<int>(std::count_if(arrivals_.begin(), arrivals_.end(),
                                           [&](Clock::time_point t) { return t >= from && t <= to; }));
  }
  // The longest wait for a result within [from, to], from `from` to the first result and from the last one to `to`
  // included: a client that stops getting frames shows here however many it got before.
  double longest_gap_s(Clock::time_point from, Clock::time_point to) const {
    std::lock_guard<std::mutex> lock(arrivals_mutex_);
    Clock::time_point last = from;
    double gap = 0;
    for (const auto t : arrivals_) {
      if (t <= from || t > to) continue;
      gap = std::max(gap, std::chrono::duration<double>(t - last).count());
      last = t;
    }
    return std::max(gap, std::chrono::duration<double>(to - last).count());
  }
  bool alive() const { return alive_.load(); }
  bool ok() const { return ok_; }
  // Waits until at least `more` further results arrived (false on timeout / death).
  bool advances(int more, std::chrono::seconds timeout = std::chrono::seconds(60)) {
    const int target = frames() + more;
    const auto deadline = std::chrono::steady_clock::now() + WsClient::scaled(timeout);
    while (frames() < target) {
      if (!alive() || std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return true;
  }

 private:
  WsClient client_;
  bool ok_ = false;
  std::atomic<bool> stop_{false}, alive_{true};
  std::atomic<int> frames_{0};
  mutable std::mutex arrivals_mutex_;
  std::vector<Clock::time_point> arrivals_;  // when each result arrived
  std::thread thread_;
};

std::string error_of(WsClient& c) {
  auto e = c.read_type("error", std::chrono::seconds(30));
  return e ? (*e)["message"].get<std::string>() : std::string("<no error message>");
}

}  // namespace

TEST_F(ServerTest, HealthAndStats) {
  start();
  auto h = http_get(port_, "/api/health");
  ASSERT_EQ(h.status, 200u);
  auto j = h.json();
  EXPECT_EQ(j["status"], "ok");
  EXPECT_EQ(j["width"], kSize);
  auto s = http_get(port_, "/api/stats");
  ASSERT_EQ(s.status, 200u);
  EXPECT_TRUE(s.json().contains("worker"));
  EXPECT_GT(s.json()["rss_mb"].get<double>(), 0.0);
  EXPECT_EQ(http_get(port_, "/api/nope").status, 404u);
  EXPECT_EQ(http_request(port_, http::verb::post, "/api/health", "{}").status, 405u);
}

TEST_F(ServerTest, Txt2ImgApiRoundTrip) {
  start();
  const auto a = http_request(port_, http::verb::post, "/api/txt2img", R"({"prompt":"a red cat","seed":5})");
  ASSERT_EQ(a.status, 200u) << a.body;
  EXPECT_EQ(a.content_type, "image/png");
  const cv::Mat ia = sd::test::decode_rgb(a.body);
  EXPECT_EQ(ia.cols, kSize);
  EXPECT_EQ(ia.rows, kSize);
  const auto b = http_request(port_, http::verb::post, "/api/txt2img", R"({"prompt":"a red cat","seed":5})");
  ASSERT_EQ(b.status, 200u);
  EXPECT_EQ(a.body, b.body) << "same request, same seed: same image";
  const auto c = http_request(port_, http::verb::post, "/api/txt2img", R"({"prompt":"a red cat","seed":6})");
  ASSERT_EQ(c.status, 200u);
  EXPECT_GT(sd::test::mean_abs_diff(ia, sd::test::decode_rgb(c.body)), 0.5) << "another seed, another image";
}

// prompt_list / seed_list through the API: weights (1, 0) are the single prompt / seed (same PNG bytes), a real blend
// is another image.
TEST_F(ServerTest, PromptAndSeedListsThroughTheApi) {
  start();
  auto png = [&](const std::string& body) {
    const auto r = http_request(port_, http::verb::post, "/api/txt2img", body);
    EXPECT_EQ(r.status, 200u) << body << " -> " << r.body;
    return r.body;
  };
  const std::string single = png(R"({"prompt":"a red cat","seed":5})");
  EXPECT_EQ(png(R"({"prompt_list":[["a red cat",1],["a blue house",0]],"seed":5})"), single);
  EXPECT_EQ(png(R"({"prompt":"a red cat","seed_list":[[5,1],[6,0]]})"), single);
  const std::string blend = png(R"({"prompt_list":[["a red cat",1],["a blue house",1]],"seed_list":[[5,1],[6,1]]})");
  EXPECT_GT(sd::test::mean_abs_diff(sd::test::decode_rgb(single), sd::test::decode_rgb(blend)), 0.5);
  const auto bad = http_request(port_, http::verb::post, "/api/txt2img", R"({"seed_list":[[5,-1]]})");
  EXPECT_EQ(bad.status, 400u);
  EXPECT_NE(bad.body.find("seed_list[0][1]"), std::string::npos) << bad.body;
}

TEST_F(ServerTest, Img2ImgApiRoundTripAndErrors) {
  start();
  const std::string img = sd::server::base64_encode(sd::test::test_jpeg(120, 90, 3));
  const auto a = http_request(port_, http::verb::post, "/api/img2img",
                              nlohmann::json{{"prompt", "oil painting"}, {"image", img}, {"t_index_list", {20, 40}}}.dump());
  ASSERT_EQ(a.status, 200u) << a.body;
  EXPECT_EQ(a.content_type, "image/png");
  EXPECT_EQ(sd::test::decode_rgb(a.body).cols, kSize);
  // A PNG data URL works too.
  const std::string png = sd::server::base64_encode(sd::server::encode_png(sd::test::decode_rgb(sd::test::test_jpeg(64, 64))));
  EXPECT_EQ(http_request(port_, http::verb::post, "/api/img2img",
                         nlohmann::json{{"image", "data:image/png;base64," + png}}.dump()).status, 200u);

  auto expect_400 = [&](const std::string& body, const std::string& needle) {
    const auto r = http_request(port_, http::verb::post, "/api/img2img", body);
    EXPECT_EQ(r.status, 400u) << body;
    EXPECT_NE(r.body.find(needle), std::string::npos) << r.body;
  };
  expect_400("{not json", "bad JSON");
  expect_400(nlohmann::json{{"image", img}, {"colour", 1}}.dump(), "unknown field 'colour'");
  expect_400(nlohmann::json{{"prompt", "x"}}.dump(), "field 'image'");
  expect_400(nlohmann::json{{"image", "!!!"}}.dump(), "invalid base64");
  expect_400(nlohmann::json{{"image", sd::server::base64_encode("\xFF\xD8\xFF garbage")}}.dump(), "JPEG");
  expect_400(nlohmann::json{{"image", img}, {"mode", "txt2img"}}.dump(), "mode");
  EXPECT_EQ(http_request(port_, http::verb::post, "/api/txt2img", "prompt=x", "application/x-www-form-urlencoded").status,
            415u);
  EXPECT_EQ(http_get(port_, "/api/txt2img").status, 405u);
}

// Like other SD servers, the API takes the output size per request: "width" / "height" in the steps the stream
// needs, up to the server's --max-size; anything else is a 400 naming the field and what it expects.
TEST_F(ServerTest, ApiRequestSizes) {
  StreamDefaults d = defaults();
  d.max_width = 128;
  d.max_height = 96;
  start({}, d);
  const int64_t step = std::lcm<int64_t>(8, shared_model()->vae_scale_factor());
  const auto health = http_get(port_, "/api/health").json();
  EXPECT_EQ(health["max_width"], 128);
  EXPECT_EQ(health["max_height"], 96);
  EXPECT_EQ(health["size_multiple"], step);

  auto png_size = [&](const std::string& endpoint, nlohmann::json body) {
    const auto r = http_request(port_, http::verb::post, endpoint, body.dump());
    EXPECT_EQ(r.status, 200u) << body.dump() << " -> " << r.body;
    EXPECT_EQ(r.content_type, "image/png");
    const cv::Mat m = r.status == 200u ? sd::test::decode_rgb(r.body) : cv::Mat();
    return std::make_pair(m.cols, m.rows);
  };
  EXPECT_EQ(png_size("/api/txt2img", {{"prompt", "a red cat"}, {"width", 128}, {"height", 96}}),
            std::make_pair(128, 96));
  EXPECT_EQ(png_size("/api/txt2img", {{"prompt", "a red cat"}, {"width", 8 * step}}), std::make_pair(8 * int(step), kSize))
      << "an absent side keeps the server's size";
  EXPECT_EQ(png_size("/api/txt2img", {{"prompt", "a red cat"}, {"height", 80.0}}), std::make_pair(kSize, 80))
      << "a whole number written as a float is fine";
  const std::string img = sd::server::base64_encode(sd::test::test_jpeg(120, 90, 3));
  EXPECT_EQ(png_size("/api/img2img", {{"image", img}, {"width", 96}, {"height", 48}, {"t_index_list", {20, 40}}}),
            std::make_pair(96, 48));
  EXPECT_EQ(png_size("/api/img2img", {{"image", img}}), std::make_pair(kSize, kSize));

  auto expect_400 = [&](const std::string& endpoint, nlohmann::json body, const std::vector<std::string>& needles) {
    if (endpoint == "/api/img2img") body["image"] = img;
    const auto r = http_request(port_, http::verb::post, endpoint, body.dump());
    EXPECT_EQ(r.status, 400u) << body.dump() << " -> " << r.body;
    const std::string error = r.json().value("error", "");
    for (const auto& n : needles) EXPECT_NE(error.find(n), std::string::npos) << n << " in " << r.body;
  };
  const std::string multiple = "multiple of " + std::to_string(step);
  expect_400("/api/txt2img", {{"width", 8 * step + step / 2}}, {"field 'width'", multiple, "128x96"});
  expect_400("/api/txt2img", {{"width", 136}}, {"field 'width'", "in [" + std::to_string(step) + ", 128]", "got 136"});
  expect_400("/api/img2img", {{"height", 104}}, {"field 'height'", "in [" + std::to_string(step) + ", 96]", "got 104"});
  expect_400("/api/txt2img", {{"height", 0}}, {"field 'height'", multiple});
  expect_400("/api/txt2img", {{"width", -64}}, {"field 'width'", "got -64"});
  expect_400("/api/txt2img", {{"width", "64"}}, {"field 'width'", "integer", "got \"64\""});
  expect_400("/api/txt2img", {{"width", 64.5}}, {"field 'width'", "integer", "got 64.5"});
  expect_400("/api/img2img", {{"height", nullptr}}, {"field 'height'", "got null"});
  expect_400("/api/txt2img", {{"size", 64}}, {"unknown field 'size'", "width, height"});
}

// The stream of each size is kept for the next request of that size and prepared again: its images equal those of a
// freshly built stream, with the same seed and with another one.
TEST_F(ServerTest, ApiKeepsAStreamPerSizeThatGivesWhatAFreshOneWould) {
  StreamDefaults d = defaults();
  d.max_width = d.max_height = 128;
  start({}, d);
  auto txt2img = [&](int w, int h, int seed) {
    const auto r = http_request(port_, http::verb::post, "/api/txt2img",
                                nlohmann::json{{"prompt", "a red cat"}, {"seed", seed}, {"width", w}, {"height", h}}.dump());
    EXPECT_EQ(r.status, 200u) << r.body;
    return r.body;
  };
  auto api_stats = [&] { return http_get(port_, "/api/stats").json()["api"]; };
  const std::string a5 = txt2img(64, 64, 5);      // built
  const std::string a6 = txt2img(64, 64, 6);      // kept, another seed
  const std::string b = txt2img(128, 96, 5);      // built
  const std::string a5_again = txt2img(64, 64, 5);  // kept
  auto st = api_stats();
  EXPECT_EQ(st["streams_built"], 2) << st.dump();
  EXPECT_EQ(st["streams_reused"], 2) << st.dump();
  EXPECT_EQ(st["streams_cached"], 2) << st.dump();
  for (const char* k : {"graph_captures", "graph_replays", "graph_failures"})  // the CPU: no CUDA graphs
    EXPECT_EQ(st.at(k), 0) << k;
  EXPECT_EQ(a5_again, a5) << "a kept stream gives the image of the fresh one";
  EXPECT_NE(a6, a5);
  EXPECT_EQ(sd::test::decode_rgb(b).cols, 128);
  // Four other sizes push 64x64 out (at most 4 are kept); the next 64x64 stream is fresh again.
  for (const auto& [w, h] : std::vector<std::pair<int, int>>{{128, 128}, {96, 64}, {64, 96}, {80, 80}}) txt2img(w, h, 1);
  st = api_stats();
  EXPECT_EQ(st["streams_cached"], 4) << st.dump();
  EXPECT_EQ(txt2img(64, 64, 6), a6) << "another seed on a kept stream gives the image of a fresh one";
  EXPECT_EQ(api_stats()["streams_built"], 7);
}

TEST_F(ServerTest, OversizeHttpBodyIs413) {
  ServerOptions o;
  o.max_http_body = 64 * 1024;
  start(o);
  const auto r = http_request(port_, http::verb::post, "/api/img2img", std::string(200 * 1024, 'a'));
  EXPECT_EQ(r.status, 413u) << r.body;
  EXPECT_EQ(http_get(port_, "/api/health").status, 200u) << "the server goes on";
}

// Error messages quote the request target and headers; raw bytes >= 0x80 in them (not UTF-8) must give an answer,
// not an exception out of the I/O loop.
TEST_F(ServerTest, NonUtf8BytesInTargetAndBodyAreAnswered) {
  start();
  EXPECT_EQ(http_get(port_, "/\xff\xfe.js").status, 404u);
  EXPECT_EQ(http_get(port_, "/api/\xff").status, 404u);
  const auto r = http_request(port_, http::verb::post, "/api/txt2img", "{\"prompt\": \"\xff\xc3\"}");
  EXPECT_EQ(r.status, 400u) << r.body;
  EXPECT_EQ(sd::test::upgrade_status(port_, "http://\xff\xff"), 403u);
  EXPECT_EQ(http_get(port_, "/api/health").status, 200u) << "the server goes on";
}

TEST_F(ServerTest, StaticFilesAndTraversal) {
  start();
  const auto index = http_get(port_, "/");
  ASSERT_EQ(index.status, 200u);
  EXPECT_EQ(index.content_type, "text/html; charset=utf-8");
  EXPECT_EQ(http_get(port_, "/missing.js").status, 404u);
  for (const std::string t : {"/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", "/%2E%2E%5Csecret.txt",
                              "/web/../../secret.txt"}) {
    const auto r = http_get(port_, t);
    EXPECT_TRUE(r.status == 403u || r.status == 404u || r.status == 400u) << t << " -> " << r.status;
    EXPECT_EQ(r.body.find("top secret"), std::string::npos) << t;
  }
}

TEST_F(ServerTest, WebSocketStreamsFrames) {
  start();
  WsClient c;
  open_stream(c, port_);
  for (int k = 0; k < 3; ++k) {
    ASSERT_TRUE(c.send_binary(sd::test::test_jpeg(96, 72, k)));
    auto f = c.read_frame();
    ASSERT_TRUE(f) << "frame " << k;
    const cv::Mat img = sd::test::decode_rgb(*f);
    EXPECT_EQ(img.cols, kSize);
    EXPECT_EQ(img.rows, kSize);
  }
  // txt2img on the same connection.
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"mode", "txt2img"}, {"prompt", "a dog"}}));
  auto cfg = c.read_type("config");
  ASSERT_TRUE(cfg);
  EXPECT_EQ((*cfg)["settings"]["mode"], "txt2img");
  ASSERT_TRUE(c.send_json({{"type", "generate"}}));
  EXPECT_TRUE(c.read_frame());
  ASSERT_TRUE(c.send_json({{"type", "stats"}}));
  auto st = c.read_type("stats");
  ASSERT_TRUE(st);
  EXPECT_GE((*st)["frames_out"].get<int>(), 4);
}

// Each bad input is answered with an error to that client only; its stream and another client's stream go on.
TEST_F(ServerTest, BadInputsAreRejectedWhileAnotherClientStreams) {
  ServerOptions o;
  o.max_ws_message = 256 * 1024;
  start(o);
  Streamer a(port_);
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(a.advances(2));

  WsClient b;
  open_stream(b, port_);
  std::string junk = "\xFF\xD8\xFF\xE0";
  junk += std::string(500, 'x');
  ASSERT_TRUE(b.send_binary(junk));
  EXPECT_NE(error_of(b).find("JPEG"), std::string::npos);
  ASSERT_TRUE(b.send_binary("definitely not an image"));
  EXPECT_NE(error_of(b).find("not a JPEG"), std::string::npos);
  ASSERT_TRUE(b.send_binary(sd::test::test_jpeg(4, 4)));
  EXPECT_NE(error_of(b).find("out of range"), std::string::npos);
  ASSERT_TRUE(b.send_text("{\"type\": \"config\", \"prompt\": "));
  EXPECT_NE(error_of(b).find("bad JSON"), std::string::npos);
  ASSERT_TRUE(b.send_json({{"type", "config"}, {"prompt", "x"}, {"strength", 0.5}}));
  EXPECT_NE(error_of(b).find("unknown field 'strength'"), std::string::npos);
  ASSERT_TRUE(b.send_json({{"type", "explode"}}));
  EXPECT_NE(error_of(b).find("unknown message type"), std::string::npos);
  ASSERT_TRUE(b.send_json({{"type", "generate"}}));  // img2img without a frame
  EXPECT_NE(error_of(b).find("img2img mode"), std::string::npos);
  EXPECT_TRUE(a.advances(2)) << "client A stalled after B's bad messages";
  EXPECT_TRUE(round_trip(b, 1)) << "B's own stream goes on after its errors";

  // Wrong Origin: the upgrade is refused (403) before a stream slot is taken.
  EXPECT_EQ(sd::test::upgrade_status(port_, "http://evil.example"), 403u);
  EXPECT_EQ(sd::test::upgrade_status(port_, "http://localhost:1"), 403u);
  WsClient evil;
  EXPECT_NE(evil.connect(port_, "http://evil.example"), 101u);
  WsClient good_origin;
  EXPECT_EQ(good_origin.connect(port_, "http://127.0.0.1:" + std::to_string(port_)), 101u);
  good_origin.close();

  // Oversize message: that connection is closed with 1009, A goes on. The server refuses it at the frame header, so
  // on a loaded machine it may close while the payload is still arriving: the client's write fails, or the unread
  // bytes make the close a reset before the close frame is read (both seen in full suites beside a build). Either
  // way the connection has ended.
  (void)b.send_binary(std::string(300 * 1024, 'x'));
  WsClient::Message m;
  do {
    m = b.read(std::chrono::seconds(30));
  } while (m.ok);
  EXPECT_TRUE(m.closed) << m.error;  // not a timeout: the server ended it
  if (m.close_code != 0) {
    EXPECT_EQ(m.close_code, 1009);  // 0: a reset before the close frame was read
  }
  EXPECT_TRUE(a.advances(3)) << "client A stalled after B's oversize message";

  const auto stats = http_get(port_, "/api/stats").json();
  EXPECT_GE(stats["rejected_origin"].get<int>(), 1);
  a.stop();
}

TEST_F(ServerTest, BusyBeyondMaxStreams) {
  ServerOptions o;
  o.max_streams = 2;
  start(o);
  WsClient a, b, c;
  open_stream(a, port_);
  open_stream(b, port_);
  ASSERT_EQ(c.connect(port_), 101u);
  auto busy = c.read(std::chrono::seconds(10));
  ASSERT_TRUE(busy.ok);
  const auto j = busy.json();
  EXPECT_EQ(j["type"], "busy");
  EXPECT_EQ(j["max_streams"], 2);
  auto closed = c.read(std::chrono::seconds(10));
  EXPECT_TRUE(closed.closed);
  EXPECT_EQ(closed.close_code, 1013);  // try again later
  EXPECT_TRUE(round_trip(a, 0)) << "the admitted clients are unaffected";
  // A slot freed is a slot for the next client.
  b.close();
  bool admitted = false;
  for (int i = 0; i < 100 && !admitted; ++i) {
    WsClient d;
    ASSERT_EQ(d.connect(port_), 101u);
    auto m = d.read(std::chrono::seconds(10));
    admitted = m.ok && m.json()["type"] == "hello";
    if (!admitted) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(admitted);
  EXPECT_GE(http_get(port_, "/api/stats").json()["rejected_busy"].get<int>(), 1);
}

// Two clients with different prompts on the same input: different outputs, and each receives exactly its own frames.
TEST_F(ServerTest, ClientsHaveSeparateStreams) {
  start();
  WsClient a, b;
  open_stream(a, port_);
  open_stream(b, port_);
  ASSERT_TRUE(a.send_json({{"type", "config"}, {"prompt", "a red fox in the snow"}, {"seed", 1}}));
  ASSERT_TRUE(b.send_json({{"type", "config"}, {"prompt", "a blue submarine"}, {"seed", 1}}));
  ASSERT_TRUE(a.read_type("config"));
  ASSERT_TRUE(b.read_type("config"));
  std::string fa, fb;
  for (int k = 0; k < 3; ++k) {  // past the warm-up (n - 1 = 1 call)
    const std::string in = sd::test::test_jpeg(64, 64, k);
    ASSERT_TRUE(a.send_binary(in));
    ASSERT_TRUE(b.send_binary(in));
    auto ra = a.read_frame(), rb = b.read_frame();
    ASSERT_TRUE(ra && rb);
    fa = *ra;
    fb = *rb;
  }
  EXPECT_GT(sd::test::mean_abs_diff(sd::test::decode_rgb(fa), sd::test::decode_rgb(fb)), 0.5);
  // B sends nothing more: it must receive nothing while A streams.
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(round_trip(a, 10 + k));
  auto stray = b.read(std::chrono::milliseconds(500));
  EXPECT_FALSE(stray.ok && stray.binary) << "B received a frame it did not ask for";
}

TEST_F(ServerTest, PromptChangeChangesTheOutput) {
  start();
  WsClient c;
  open_stream(c, port_);
  const std::string in = sd::test::test_jpeg(64, 64, 5);
  auto settle = [&](const std::string& prompt) {
    EXPECT_TRUE(c.send_json({{"type", "config"}, {"prompt", prompt}, {"similarity_filter", 0}}));
    std::string last;
    for (int k = 0; k < 3; ++k) {
      EXPECT_TRUE(c.send_binary(in));
      auto f = c.read_frame();
      if (!f) return cv::Mat();
      last = *f;
    }
    return sd::test::decode_rgb(last);
  };
  const cv::Mat x = settle("a castle at night");
  const cv::Mat y = settle("a castle at night");
  const cv::Mat z = settle("green jelly beans");
  ASSERT_FALSE(x.empty() || y.empty() || z.empty());
  const double same = sd::test::mean_abs_diff(x, y), changed = sd::test::mean_abs_diff(y, z);
  std::cout << "  mean |diff| same prompt " << same << ", new prompt " << changed << "\n";
  EXPECT_GT(changed, same + 0.5);
}

// A client that never reads does not stall the model thread or others: its frames are dropped and counted.
TEST_F(ServerTest, SlowClientDoesNotStallOthers) {
  start();
  WsClient slow;
  open_stream(slow, port_);
  ASSERT_TRUE(slow.send_json({{"type", "config"}, {"mode", "txt2img"}}));
  // Many requests, never read: the server keeps only the latest pending request and a bounded send queue.
  for (int i = 0; i < 200; ++i) ASSERT_TRUE(slow.send_json({{"type", "generate"}}));
  Streamer a(port_);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a.advances(5));
  const auto stats = http_get(port_, "/api/stats").json();
  int64_t dropped_in = 0;
  for (const auto& c : stats["clients"]) {
    dropped_in += c["dropped_in"].get<int64_t>();
    for (const char* k : {"graph_captures", "graph_replays", "graph_failures"})  // the CPU: no CUDA graphs
      EXPECT_EQ(c.at(k), 0) << k;
  }
  EXPECT_GT(dropped_in, 0) << stats.dump();
  a.stop();
}

// Every request gets exactly one reply - its result or {"type": "dropped"} - in order, so a client keeping several
// requests in flight (the page's ?window=2) stays in step instead of waiting for a result that never comes.
TEST_F(ServerTest, EveryRequestGetsAResultOrADroppedReply) {
  start();
  WsClient c;
  open_stream(c, port_);
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"mode", "txt2img"}}));
  ASSERT_TRUE(c.read_type("config"));
  const int n = 30;
  for (int i = 0; i < n; ++i) ASSERT_TRUE(c.send_json({{"type", "generate"}}));
  int frames = 0, dropped = 0;
  while (frames + dropped < n) {
    const auto m = c.read(std::chrono::seconds(60));
    ASSERT_TRUE(m.ok) << "after " << frames << " frames and " << dropped << " dropped replies: " << m.error;
    if (m.binary) {
      ++frames;
      continue;
    }
    const auto j = m.json();
    if (j.value("type", "") != "dropped") continue;
    ++dropped;
    EXPECT_TRUE(j["where"] == "input" || j["where"] == "output") << j.dump();
  }
  EXPECT_GE(frames, 1);
  EXPECT_GE(dropped, 1) << "30 requests at once: those still pending when a newer one came must be replaced";
  // Nothing beyond one reply per request arrives before the stats answer, and the counters match the replies.
  ASSERT_TRUE(c.send_json({{"type", "stats"}}));
  nlohmann::json st;
  for (;;) {
    const auto m = c.read(std::chrono::seconds(30));
    ASSERT_TRUE(m.ok) << m.error;
    ASSERT_FALSE(m.binary) << "a reply beyond the " << n << " requests";
    const auto j = m.json();
    ASSERT_NE(j.value("type", ""), "dropped") << "a reply beyond the " << n << " requests";
    if (j.value("type", "") == "stats") {
      st = j;
      break;
    }
  }
  EXPECT_EQ(st["dropped_in"].get<int>() + st["dropped_out"].get<int>(), dropped) << st.dump();
  // frames_out counts generated frames, including any the send queue then replaced.
  EXPECT_EQ(st["frames_out"].get<int>() - st["dropped_out"].get<int>(), frames) << st.dump();
}

TEST_F(ServerTest, StopClosesClients) {
  start();
  WsClient c;
  open_stream(c, port_);
  ASSERT_TRUE(round_trip(c, 0));
  std::thread stopper([this] { server_->stop(); });
  WsClient::Message m;
  do {
    m = c.read(std::chrono::seconds(10));
  } while (m.ok);
  stopper.join();
  EXPECT_TRUE(m.closed) << m.error;
  EXPECT_EQ(m.close_code, 1001);  // going away
}

// N clients stream at once for SD_LOAD_SECONDS (default 10): no crash, every client served, RSS bounded.
TEST_F(ServerTest, LoadManyClients) {
  const int clients = std::getenv("SD_LOAD_CLIENTS") ? std::atoi(std::getenv("SD_LOAD_CLIENTS")) : 20;
  const double seconds = std::getenv("SD_LOAD_SECONDS") ? std::atof(std::getenv("SD_LOAD_SECONDS")) : 10.0;
  ServerOptions o;
  o.max_streams = clients;
  // SD_LOAD_BATCH_STREAMS: serve's --max-batch-streams (default 8; 1 = one client per model step, for comparison).
  if (std::getenv("SD_LOAD_BATCH_STREAMS")) o.max_batch_streams = std::atoi(std::getenv("SD_LOAD_BATCH_STREAMS"));
  std::cout << "  [load] max_batch_streams " << o.max_batch_streams << "\n";
  start(o);
  // Warm-up: one client, a few frames (allocator pools, lazy init).
  {
    WsClient w;
    open_stream(w, port_);
    for (int k = 0; k < 3; ++k) ASSERT_TRUE(round_trip(w, k));
  }
  const double rss_start = sd::resident_memory_mb();
  std::vector<std::unique_ptr<Streamer>> ss;
  for (int i = 0; i < clients; ++i) {
    ss.push_back(std::make_unique<Streamer>(port_));
    ASSERT_TRUE(ss.back()->ok()) << "client " << i;
  }
  double rss_peak = rss_start;
  std::vector<double> samples;
  const auto t0 = std::chrono::steady_clock::now();
  auto total_frames = [&] {
    int n = 0;
    for (auto& s : ss) n += s->frames();
    return n;
  };
  double next_report = 10;
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const double r = sd::resident_memory_mb();
    samples.push_back(r);
    rss_peak = std::max(rss_peak, r);
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (t >= next_report) {
      std::printf("  [load] %.0f s: %d frames, RSS %.1f MiB\n", t, total_frames(), r);
      std::fflush(stdout);
      next_report += 10;
    }
  }
  const auto t_end = std::chrono::steady_clock::now();
  const double elapsed = std::chrono::duration<double>(t_end - t0).count();
  int total = 0, min_frames = 1 << 30, max_frames = 0, alive = 0;
  std::vector<int> in_run;     // per client: results within the timed run
  std::vector<double> gaps;    // per client: the longest wait for a result within it
  for (auto& s : ss) {
    total += s->frames();
    min_frames = std::min(min_frames, s->frames());
    max_frames = std::max(max_frames, s->frames());
    alive += s->alive();
    in_run.push_back(s->frames_between(t0, t_end));
    gaps.push_back(s->longest_gap_s(t0, t_end));
  }
  const double rss_mid = samples.empty() ? rss_start : samples[samples.size() / 2];
  const auto during = http_get(port_, "/api/stats").json();
  std::printf("  [load] worker %s\n", during["worker"].dump().c_str());
  for (const auto& c : during["clients"]) std::printf("  [load] client %s\n", c.dump().c_str());
  for (auto& s : ss) s->stop();
  ss.clear();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const double rss_end = sd::resident_memory_mb();
  const auto health = http_get(port_, "/api/health");
  std::printf("  [load] %d clients, %.1f s: %d frames served (%.1f fps total, %.2f fps per client; min %d max %d per "
              "client), RSS start %.1f MiB, mid %.1f, peak %.1f, end %.1f\n",
              clients, elapsed, total, total / elapsed, total / elapsed / clients, min_frames, max_frames, rss_start,
              rss_mid, rss_peak, rss_end);
  EXPECT_EQ(alive, clients) << "a client connection died";
  EXPECT_GE(min_frames, 1) << "a client was starved (round robin)";
  // Every client keeps getting frames for the whole run, not only at some point of it. Measured here (2 shared
  // cores, 20 clients): 2.9 fps per client, a result every ~0.35 s. The bounds leave room for a loaded machine:
  // at least one frame per 2 s on average (~6x below that) and no wait over 5 s (~14x above it).
  const double kMaxGapS = 5.0 * sd::test::time_scale();
  const int min_in_run = std::max(1, static_cast<int>(seconds / (2.0 * sd::test::time_scale())));
  std::printf("  [load] per client: at least %d frames in the run, longest wait for a frame %.2f s\n",
              *std::min_element(in_run.begin(), in_run.end()), *std::max_element(gaps.begin(), gaps.end()));
  for (int i = 0; i < clients; ++i) {
    EXPECT_GE(in_run[i], min_in_run) << "client " << i << " got too few frames in " << elapsed << " s";
    EXPECT_LE(gaps[i], kMaxGapS) << "client " << i << " waited that long for a frame: the stream stalled";
  }
  EXPECT_EQ(health.status, 200u);
  // 20 small streams: each has its own buffers (tiny model: well under 1 MiB each). Bounded: no growth with time.
  // Under ASan, freed blocks wait in its quarantine (256 MiB by default) before they are reused, and it fills over
  // the run: both bounds get that much more (LeakSanitizer checks for leaks there).
  // Under TSan, memory freed by one thread and allocated by another goes through its allocator's caches, and every
  // page the heap touches gets shadow memory (several times its size) that is never given back: measured 42 MiB more
  // after the clients closed than at the run's peak (mid 665.8, peak 675.2, end 717.1 MiB), while the uninstrumented
  // build ends within 4 MiB of the middle; it gets 100 MiB for that.
#if defined(__SANITIZE_ADDRESS__)
  const double sanitizer_allowance = 256.0;
#elif defined(__SANITIZE_THREAD__)
  const double sanitizer_allowance = 100.0;
#else
  const double sanitizer_allowance = 0.0;
#endif
  EXPECT_LT(rss_peak - rss_start, 300.0 + sanitizer_allowance);
  EXPECT_LT(rss_end - rss_mid, 50.0 + sanitizer_allowance) << "RSS grows while streaming";
  EXPECT_LE(max_frames, 4 * min_frames + 4) << "unfair scheduling";
}

// A LoRA scale change in one client's settings re-fuses the one shared model (server-wide): the config reply carries
// the new scale, and images from then on (API and WebSocket) equal those of a server loaded at that scale.
TEST(ServerLora, LiveScaleChangeEqualsAServerLoadedAtThatScale) {
  const std::string lora = sd::test::fixture_path("lora/files/sd15_kohya_unet_te.safetensors");
  if (!sd::test::fixture_exists(kModel) || !fs::exists(lora)) GTEST_SKIP() << "fixtures absent";
  auto serve = [&](double scale) {
    sd::LoadOptions lo;
    lo.threads = -1;
    lo.loras = {{lora, scale, ""}};
    auto models = sd::load_pipeline(sd::test::fixture_path(kModel), lo);
    StreamDefaults d = defaults();
    for (const auto& r : models->loras()) d.lora_names.push_back(r.name);
    ServerOptions o;
    o.host = "127.0.0.1";
    o.port = 0;
    o.web_root.clear();
    auto s = std::make_unique<Server>(models, d, o);
    s->start();
    return s;
  };
  auto live = serve(1.0), fresh = serve(0.7);
  const std::string req = R"({"prompt":"a red cat","seed":5})";
  const auto before = http_request(live->port(), http::verb::post, "/api/txt2img", req);
  const auto want = http_request(fresh->port(), http::verb::post, "/api/txt2img", req);
  ASSERT_EQ(before.status, 200u) << before.body;
  ASSERT_EQ(want.status, 200u) << want.body;
  EXPECT_NE(before.body, want.body) << "scale 1 and 0.7 differ";

  WsClient c;
  ASSERT_EQ(c.connect(live->port()), 101u);
  auto hello = c.read_type("hello", std::chrono::seconds(10));
  ASSERT_TRUE(hello);
  EXPECT_EQ((*hello)["loras"], nlohmann::json::array({"sd15_kohya_unet_te"}));
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"lora", {{"nope", 0.5}}}}));
  EXPECT_NE(c.read_type("error", std::chrono::seconds(30)).value_or(nlohmann::json())["message"].dump().find(
                "no LoRA named 'nope'"),
            std::string::npos);
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"lora", {{"sd15_kohya_unet_te", 0.7}}}}));
  std::optional<nlohmann::json> cfg;
  for (int i = 0; i < 5 && !(cfg && cfg->at("settings").contains("lora")); ++i)
    cfg = c.read_type("config", std::chrono::seconds(30));
  ASSERT_TRUE(cfg && cfg->at("settings").contains("lora")) << "no config reply with the LoRA scales";
  EXPECT_EQ((*cfg)["settings"]["lora"]["sd15_kohya_unet_te"], 0.7);
  const auto after = http_request(live->port(), http::verb::post, "/api/txt2img", req);
  ASSERT_EQ(after.status, 200u);
  EXPECT_EQ(after.body, want.body) << "after the live change the API image equals the 0.7 server's";
  c.close();
  live->stop();
  fresh->stop();
}


// SDXL folders serve with no new option: the API and a WebSocket img2img stream on tiny-sdxl (fixtures sdxl/).
TEST(ServerSdxl, ApiAndWebSocketStreamOnAnSdxlModel) {
  const std::string model = "sdxl/models/tiny-sdxl";
  if (!sd::test::fixture_exists(model)) GTEST_SKIP() << "no " << model;
  sd::LoadOptions lo;
  lo.threads = -1;
  auto models = sd::load_pipeline(sd::test::fixture_path(model), lo);
  ASSERT_EQ(models->family(), "sdxl");
  ServerOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.web_root.clear();
  Server s(models, defaults(), o);
  s.start();
  const auto a = http_request(s.port(), http::verb::post, "/api/txt2img", R"({"prompt":"a red cat","seed":5})");
  ASSERT_EQ(a.status, 200u) << a.body;
  const cv::Mat ia = sd::test::decode_rgb(a.body);
  EXPECT_EQ(ia.cols, kSize);
  const auto b = http_request(s.port(), http::verb::post, "/api/txt2img", R"({"prompt":"a blue dog","seed":5})");
  ASSERT_EQ(b.status, 200u) << b.body;
  EXPECT_GT(sd::test::mean_abs_diff(ia, sd::test::decode_rgb(b.body)), 0.5) << "the prompt reaches the SDXL encoders";
  WsClient c;
  ASSERT_EQ(c.connect(s.port()), 101u);
  ASSERT_TRUE(c.read_type("hello", std::chrono::seconds(10)));
  int frames = 0;
  for (int k = 0; k < 4; ++k) {
    ASSERT_TRUE(c.send_binary(sd::test::test_jpeg(80, 80, k)));
    if (c.read_frame(nullptr, std::chrono::seconds(60))) ++frames;
  }
  EXPECT_EQ(frames, 4);
  c.close();
  s.stop();
}

namespace {

// Review finding: a client that sends requests but never reads filled its TCP window; its write stayed pending, and
// each step pushed a frame out of its send queue and left a "dropped" reply in its place, so the queue grew by one
// per step for good, holding the stream slot and a share of the model. Now the connection is cut.
TEST_F(ServerTest, AClientThatReadsNothingIsCutOffInsteadOfQueueingForever) {
  ServerOptions o;
  o.send_queue_frames = 1;
  start(o);
  WsClient c;
  c.receive_buffer = 2048;  // a small window: the server's writes stall soon
  open_stream(c, port_);
  ASSERT_TRUE(c.send_json({{"type", "config"}, {"mode", "txt2img"}}));
  const auto t0 = Clock::now();
  int sent = 0, streams = -1;
  while (Clock::now() - t0 < std::chrono::seconds(120)) {
    if (!c.send_json({{"type", "generate"}})) break;  // the server closed the connection
    if (++sent % 20 == 0) {
      streams = nlohmann::json::parse(http_get(port_, "/api/stats").body).value("streams", -1);
      if (streams == 0) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  for (int i = 0; i < 100 && streams != 0; ++i) {  // the close may still be on its way
    streams = nlohmann::json::parse(http_get(port_, "/api/stats").body).value("streams", -1);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(streams, 0) << "the client that reads nothing still holds its stream after " << sent << " requests";
  // The server goes on: a new client streams.
  WsClient d;
  open_stream(d, port_);
  EXPECT_TRUE(round_trip(d, 1));
}

}  // namespace
