// The HTTP side of the server byte by byte, on loopback with stub models (no fixtures): Expect: 100-continue (the
// interim answer before the body; refusals without it) and API requests whose client hangs up while they wait.
#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "pipeline/stream_test_stubs.h"
#include "prometheus_text.h"
#include "server/http_server.h"
#include "server_test_util.h"

using namespace sd::server;
using sd::test::http_get;
using sd::test::http_request;
using sd::test::RawClient;
using sd::test::WsClient;
namespace http = boost::beast::http;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

constexpr int kSize = 64;
const std::string kTxt2ImgBody = R"({"prompt": "a cat", "seed": 3})";

// Stub models whose UNet holds its first call until release(): an API image that keeps the model worker busy, so
// that the requests after it wait in the queue.
class BlockingModels : public sd::test::StubModels {
 public:
  torch::Tensor unet(const torch::Tensor& sample, const torch::Tensor& t, const torch::Tensor& ehs,
                     const sd::AddedConditioning& added, const sd::ControlResiduals& control) const override {
    {
      std::unique_lock<std::mutex> lock(m_);
      if (!entered_) {
        entered_ = true;
        cv_.notify_all();
        cv_.wait(lock, [this] { return released_; });
      }
    }
    return StubModels::unet(sample, t, ehs, added, control);
  }
  bool wait_entered(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(m_);
    return cv_.wait_for(lock, timeout, [this] { return entered_; });
  }
  void release() {
    std::lock_guard<std::mutex> lock(m_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  mutable std::mutex m_;
  mutable std::condition_variable cv_;
  mutable bool entered_ = false;
  bool released_ = false;
};

// A request's header alone (the body is the caller's to send, or not).
std::string post_header(const std::string& target, const std::string& content_type, size_t content_length,
                        const std::string& expect) {
  std::string h = "POST " + target + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + content_type +
                  "\r\nContent-Length: " + std::to_string(content_length) + "\r\n";
  if (!expect.empty()) h += "Expect: " + expect + "\r\n";
  return h + "\r\n";
}

class ServerHttp : public ::testing::Test {
 protected:
  void TearDown() override {
    if (models_) models_->release();  // a test that failed half way must not leave the model thread held
    if (server_) server_->stop();
  }
  void start(ServerOptions o = {}) {
    models_ = std::make_shared<BlockingModels>();
    models_->release();
    start_with(o, models_);
  }
  // With the model held at the first UNet call until models_->release().
  void start_blocking(ServerOptions o = {}) { start_with(o, models_ = std::make_shared<BlockingModels>()); }
  void start_with(ServerOptions o, std::shared_ptr<const sd::DiffusionModels> models) {
    o.host = "127.0.0.1";
    o.port = 0;
    server_ = std::make_unique<Server>(std::move(models), sd::test::tiny_stream_defaults(kSize), o);
    server_->start();
    port_ = server_->port();
  }
  nlohmann::json api_stats() { return http_get(port_, "/api/stats").json().value("api", nlohmann::json::object()); }
  // Polls `done` until it holds or 30 s (scaled) passed.
  static bool wait_for(const std::function<bool()>& done) {
    const auto deadline = Clock::now() + WsClient::scaled(30s);
    while (!done()) {
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(5ms);
    }
    return true;
  }

  std::shared_ptr<BlockingModels> models_;
  std::unique_ptr<Server> server_;
  uint16_t port_ = 0;
};

}  // namespace

// curl sends "Expect: 100-continue" with a large body (over 1 MiB in 7.88, over 1 KiB in older versions: a base64
// image) and waits a second for "100 Continue" before it sends the body anyway: the server never answered it, so
// every such request took a second longer.
TEST_F(ServerHttp, ExpectContinueIsAnsweredBeforeTheBody) {
  start();
  RawClient c;
  ASSERT_TRUE(c.connect(port_));
  // The expectation's name is case-insensitive (RFC 9110 10.1.1).
  ASSERT_TRUE(c.write(post_header("/api/txt2img", "application/json", kTxt2ImgBody.size(), "100-Continue")));
  // Within curl's own wait: any later and the client has sent the body without being asked.
  const auto interim = c.read_until("\r\n\r\n", WsClient::scaled(1000ms));
  ASSERT_TRUE(interim) << "no answer to the header within 1 s (the server waits for the body)";
  EXPECT_EQ(*interim, "HTTP/1.1 100 Continue\r\n\r\n");
  ASSERT_TRUE(c.write(kTxt2ImgBody));
  auto res = c.read_response(WsClient::scaled(30s));
  ASSERT_TRUE(res) << "no final answer after the body";
  EXPECT_EQ(res->result_int(), 200u) << res->body();
  EXPECT_EQ((*res)[http::field::content_type], "image/png");
  EXPECT_EQ(sd::test::decode_rgb(res->body()).cols, kSize);
  EXPECT_TRUE(res->keep_alive());
  // The connection goes on: a request with no body gets its answer directly (no "100 Continue" to wait for).
  ASSERT_TRUE(c.write("GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n\r\n"));
  res = c.read_response(WsClient::scaled(10s));
  ASSERT_TRUE(res);
  EXPECT_EQ(res->result_int(), 200u) << res->body();
  EXPECT_EQ(nlohmann::json::parse(res->body(), nullptr, false).value("status", ""), "ok") << res->body();
}

// A request refused whatever its body says gets the refusal at once, without "100 Continue" and without the body
// being sent, and the connection closes (the body the client announced is never read as a request).
TEST_F(ServerHttp, ExpectContinueRefusalsComeAtOnceWithoutTheBody) {
  ServerOptions o;
  o.max_http_body = 64 * 1024;
  o.max_api_pending = 1;
  start_blocking(o);
  // The one pending slot: an image that holds the model, so that the next image request finds the server busy.
  auto held = std::async(std::launch::async, [&] {
    return http_request(port_, http::verb::post, "/api/txt2img", kTxt2ImgBody);
  });
  ASSERT_TRUE(models_->wait_entered(WsClient::scaled(30s)));
  struct ReleaseOnExit {  // before `held` waits for its answer, also when an assertion ends the test early
    BlockingModels& models;
    ~ReleaseOnExit() { models.release(); }
  } release_on_exit{*models_};

  struct Case {
    std::string target, content_type;
    size_t length;
    unsigned status;
    std::string error;  // the JSON "error" field
  };
  const std::vector<Case> cases = {
      {"/api/img2img", "application/json", 200 * 1024, 413, "request body over 65536 bytes (--max-http-body)"},
      {"/api/txt2img", "text/plain", 2000, 415, "txt2img: expected Content-Type: application/json, got 'text/plain'"},
      {"/api/nothing", "application/json", 2000, 404,
       "no API endpoint /api/nothing (expected /api/health, /api/ready, /api/stats, /api/txt2img, /api/img2img, or "
       "POST /api/drain)"},
      {"/api/health", "application/json", 2000, 405, "use GET for /api/health"},
      {"/index.html", "application/json", 2000, 405, "only GET and HEAD for files"},
      {"/api/txt2img", "application/json", 2000, 503, "busy"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.target + " -> " + std::to_string(k.status));
    RawClient c;
    ASSERT_TRUE(c.connect(port_));
    ASSERT_TRUE(c.write(post_header(k.target, k.content_type, k.length, "100-continue")));
    const auto res = c.read_response(WsClient::scaled(5s));
    if (!res) {
      ADD_FAILURE() << "no answer to the header within 5 s (the server waits for the body)";
      continue;
    }
    EXPECT_EQ(res->result_int(), k.status) << res->body();
    EXPECT_EQ(nlohmann::json::parse(res->body(), nullptr, false).value("error", ""), k.error) << res->body();
    EXPECT_FALSE(res->keep_alive()) << "the announced body may still come: the connection must end";
    EXPECT_TRUE(c.closed_by_server(WsClient::scaled(5s)));
  }
  // Counted as handle() counts them: each refused API request once; 404 and 415 as errors, the 503 as busy.
  const auto api = api_stats();
  EXPECT_EQ(api["requests"], 6) << api.dump();  // the held image, 415, 404, 405, 503 and this /api/stats
  EXPECT_EQ(api["errors"], 2) << api.dump();
  EXPECT_EQ(api["rejected_busy"], 1) << api.dump();
  EXPECT_EQ(api["pending"], 1) << api.dump();
  models_->release();
  const auto r = held.get();
  EXPECT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.content_type, "image/png");
}

// An API request queued behind other work kept its place after its client had gone and ran the model for no one. A
// hang-up (EOF) while it waits drops it: it never runs, its pending place is free at once, and it is counted. Data
// from a client that waits (a pipelined request) is not a hang-up.
TEST_F(ServerHttp, AQueuedApiRequestWhoseClientHangsUpNeverRuns) {
  ServerOptions o;
  o.max_api_pending = 4;
  start_blocking(o);
  auto queued = [&] { return server_->stats()["worker"].value("queued", -1); };
  // A holds the model.
  auto a = std::async(std::launch::async, [&] {
    return http_request(port_, http::verb::post, "/api/txt2img", kTxt2ImgBody);
  });
  ASSERT_TRUE(models_->wait_entered(WsClient::scaled(30s)));
  struct ReleaseOnExit {  // before `a` waits for its answer, also when an assertion ends the test early
    BlockingModels& models;
    ~ReleaseOnExit() { models.release(); }
  } release_on_exit{*models_};
  const size_t unet_calls_per_image = sd::test::tiny_stream_defaults(kSize).txt2img.t_index_list.size();

  // C waits, and pipelines a second request on its connection meanwhile: readable, but not gone.
  RawClient c;
  ASSERT_TRUE(c.connect(port_));
  ASSERT_TRUE(c.write(post_header("/api/txt2img", "application/json", kTxt2ImgBody.size(), "") + kTxt2ImgBody));
  ASSERT_TRUE(wait_for([&] { return queued() == 1; })) << "C is not waiting: " << server_->stats().dump();
  ASSERT_TRUE(c.write("GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));

  // B waits, then its client hangs up.
  RawClient b;
  ASSERT_TRUE(b.connect(port_));
  ASSERT_TRUE(b.write(post_header("/api/txt2img", "application/json", kTxt2ImgBody.size(), "") + kTxt2ImgBody));
  ASSERT_TRUE(wait_for([&] { return queued() == 2; })) << "B and C are not both waiting: " << server_->stats().dump();
  EXPECT_EQ(api_stats()["pending"], 3);
  b.close();
  EXPECT_TRUE(wait_for([&] { return api_stats().value("cancelled", -1) == 1; }))
      << "B's hang-up did not drop its request: " << api_stats().dump();
  EXPECT_EQ(api_stats()["pending"], 2) << "B's pending place is free at once";
  EXPECT_EQ(queued(), 1) << "only C waits";

  models_->release();
  const auto ra = a.get();
  EXPECT_EQ(ra.status, 200u) << ra.body;
  EXPECT_EQ(ra.content_type, "image/png");
  auto rc = c.read_response(WsClient::scaled(30s));
  ASSERT_TRUE(rc) << "C was not answered";
  EXPECT_EQ(rc->result_int(), 200u) << rc->body();
  EXPECT_EQ((*rc)[http::field::content_type], "image/png");
  rc = c.read_response(WsClient::scaled(30s));
  ASSERT_TRUE(rc) << "C's pipelined request was not answered";
  EXPECT_EQ(rc->result_int(), 200u) << rc->body();
  EXPECT_EQ(nlohmann::json::parse(rc->body(), nullptr, false).value("status", ""), "ok") << rc->body();

  // The model ran A and C only. A job answers before its turn ends (its pending place freed, the turn counted).
  EXPECT_TRUE(wait_for([&] { return api_stats()["pending"] == 0 && server_->stats()["worker"]["steps"] >= 2; }))
      << api_stats().dump();
  const auto stats = server_->stats();
  EXPECT_EQ(stats["worker"]["steps"], 2) << stats.dump();
  EXPECT_EQ(models_->unet_calls().size(), 2 * unet_calls_per_image);
  const auto api = api_stats();
  EXPECT_EQ(api["images"], 2) << api.dump();
  EXPECT_EQ(api["cancelled"], 1) << api.dump();
  EXPECT_EQ(api["pending"], 0) << api.dump();
  const sd::test::PromText metrics(http_get(port_, "/metrics").body);
  EXPECT_EQ(metrics.type("sd_api_cancelled_total"), "counter");
  EXPECT_EQ(metrics.value("sd_api_cancelled_total"), 1);
}
