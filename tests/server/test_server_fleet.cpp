// The fleet parts of the server (src/server/fleet.h) on loopback with the tiny fixture model: /api/ready, the worker
// id in hellos, stats and /api/health, /metrics (parsed strictly, its counters equal to what the clients counted and
// to the page's stats messages), the drain (reconnect messages, 503 for new streams, exit within the deadline), the
// stream id checks and /api/drain's refusals. The multi-process fleet behind nginx is tests/fleet.
#include <chrono>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/stream_test_stubs.h"
#include "prometheus_text.h"
#include "server/fleet.h"
#include "server/http_server.h"
#include "server/server_context.h"
#include "server_test_util.h"

using namespace sd::server;
using sd::test::http_get;
using sd::test::http_request;
using sd::test::PromText;
using sd::test::WsClient;
namespace http = boost::beast::http;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kSize = 64;
const char* kModel = "models/tiny-sd15";

std::shared_ptr<const sd::DiffusionModels> fleet_model() {
  static std::shared_ptr<const sd::DiffusionModels> m = [] {
    sd::LoadOptions lo;
    lo.threads = -1;
    return sd::load_pipeline(sd::test::fixture_path(kModel), lo);
  }();
  return m;
}

class FleetServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!sd::test::fixture_exists(kModel)) GTEST_SKIP() << "no " << kModel << " under " << sd::test::fixtures_root();
  }
  void TearDown() override {
    if (server_) server_->stop();
  }
  void start(const std::string& worker_id, int max_streams = 4,
             std::shared_ptr<const sd::DiffusionModels> models = nullptr) {
    ServerOptions o;
    o.host = "127.0.0.1";
    o.port = 0;
    o.worker_id = worker_id;
    o.max_streams = max_streams;
    server_ = std::make_unique<Server>(models ? models : fleet_model(), sd::test::tiny_stream_defaults(kSize), o);
    server_->start();
    port_ = server_->port();
  }
  // Connects with this stream id and returns the hello (fails the test otherwise).
  nlohmann::json open(WsClient& c, const std::string& stream_id) {
    EXPECT_EQ(c.connect(port_, "", "/ws?stream=" + stream_id), 101u);
    auto hello = c.read_type("hello", std::chrono::seconds(20));
    EXPECT_TRUE(hello) << "no hello for " << stream_id;
    return hello ? *hello : nlohmann::json();
  }
  PromText metrics() {
    const auto r = http_get(port_, "/metrics");
    EXPECT_EQ(r.status, 200u);
    EXPECT_EQ(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
    return PromText(r.body);
  }
  std::unique_ptr<Server> server_;
  uint16_t port_ = 0;
};

// Counts of one client, as the page would keep them.
struct Counted {
  int64_t sent = 0, frames = 0, dropped_input = 0, dropped_output = 0, errors = 0;
};

// Reads until `n` replies (frames or "dropped") have come; counts them and error messages.
bool read_replies(WsClient& c, int n, Counted& k) {
  for (int got = 0; got < n;) {
    auto m = c.read(std::chrono::seconds(60));
    if (!m.ok) return false;
    if (m.binary) {
      ++k.frames;
      ++got;
      continue;
    }
    const auto j = m.json();
    const std::string type = j.value("type", "");
    if (type == "dropped") {
      (j.value("where", "") == "input" ? k.dropped_input : k.dropped_output) += 1;
      ++got;
    } else if (type == "error") {
      ++k.errors;
    }
  }
  return true;
}

}  // namespace

TEST(FleetParts, StreamIdsAreBoundedAndChecked) {
  EXPECT_TRUE(valid_stream_id("a"));
  EXPECT_TRUE(valid_stream_id("Abc_123-xyz"));
  EXPECT_TRUE(valid_stream_id(std::string(64, 'z')));
  EXPECT_FALSE(valid_stream_id(""));
  EXPECT_FALSE(valid_stream_id(std::string(65, 'z')));
  EXPECT_FALSE(valid_stream_id("a b"));
  EXPECT_FALSE(valid_stream_id("a%20b"));
  EXPECT_FALSE(valid_stream_id("é"));
  EXPECT_EQ(stream_id_of("/ws?stream=abc", ""), "abc");
  EXPECT_EQ(stream_id_of("/ws?x=1&stream=abc&y=2", "sd_stream=other"), "abc");  // the query wins
  EXPECT_EQ(stream_id_of("/ws", "theme=dark; sd_stream=fromcookie; x=y"), "fromcookie");
  EXPECT_EQ(stream_id_of("/ws?streams=abc", "other=1"), "");
  try {
    stream_id_of("/ws?stream=" + std::string(10240, 'A'), "");
    FAIL() << "a 10 kB stream id was taken";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_STREQ(e.what(),
                 "stream id (query parameter 'stream'): expected 1 to 64 characters of [A-Za-z0-9_-], got 10240 "
                 "characters");
  }
  EXPECT_THROW(stream_id_of("/ws?stream=", ""), sd::InvalidArgument);
  EXPECT_EQ(stream_id_of("/ws", "sd_stream=a;b"), "a");  // ";" ends the cookie
  try {
    stream_id_of("/ws", "sd_stream=no spaces");
    FAIL() << "a cookie with a space was taken";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("cookie 'sd_stream'"), std::string::npos) << e.what();
  }
}

TEST(FleetParts, LoopbackAddresses) {
  for (const char* a : {"127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"}) EXPECT_TRUE(is_loopback_address(a)) << a;
  for (const char* a : {"10.1.2.3", "192.168.0.1", "0.0.0.0", "::", "::ffff:10.0.0.1", "fe80::1", "localhost", "", "x"})
    EXPECT_FALSE(is_loopback_address(a)) << a;
}

TEST(FleetParts, HistogramPutsEachValueInItsBucket) {
  StageHistogram h;
  h.observe(0.0001);  // <= 0.0005
  h.observe(0.0005);  // == the bound: that bucket (le is "less or equal")
  h.observe(0.003);   // <= 0.005
  h.observe(100.0);   // +Inf
  EXPECT_EQ(h.bucket(0), 2u);
  EXPECT_EQ(h.bucket(1), 0u);
  EXPECT_EQ(h.bucket(3), 1u);
  EXPECT_EQ(h.bucket(StageHistogram::kBounds.size()), 1u);
  EXPECT_EQ(h.count(), 4u);
  EXPECT_NEAR(h.sum(), 100.0036, 1e-9);
}

// /api/drain's refusals, at the handler with fake peer addresses (a test cannot bind a non-loopback address).
TEST(FleetParts, DrainIsRefusedFromNonLoopbackPeersAndThroughProxies) {
  ServerContext ctx;
  ctx.worker_id = "w-x";
  int drains = 0;
  ctx.request_drain = [&] {
    ++drains;
    ctx.draining = true;
  };
  auto call = [&](const std::string& method, const std::string& peer, bool forwarded) {
    FleetRequest r;
    r.method = method;
    r.path = "/api/drain";
    r.peer_address = peer;
    r.forwarded = forwarded;
    return *handle_fleet_request(ctx, r);
  };
  for (const char* peer : {"10.1.2.3", "192.168.1.20", "::ffff:10.0.0.7", "2001:db8::1"}) {
    const auto r = call("POST", peer, false);
    EXPECT_EQ(r.status, 403u) << peer;
    EXPECT_EQ(nlohmann::json::parse(r.body)["error"],
              std::string("/api/drain is accepted only from a loopback address (this request came from ") + peer + ")");
  }
  auto r = call("POST", "127.0.0.1", true);
  EXPECT_EQ(r.status, 403u);
  EXPECT_NE(r.body.find("not through a proxy"), std::string::npos) << r.body;
  EXPECT_EQ(drains, 0);
  EXPECT_FALSE(ctx.draining);
  EXPECT_EQ(call("GET", "127.0.0.1", false).status, 405u);
  r = call("POST", "::1", false);
  EXPECT_EQ(r.status, 202u);
  EXPECT_EQ(drains, 1);
  EXPECT_TRUE(ctx.draining);
  // Not ready while draining, with the reason.
  FleetRequest ready_req;
  ready_req.method = "GET";
  ready_req.path = "/api/ready";
  const auto ready = *handle_fleet_request(ctx, ready_req);
  EXPECT_EQ(ready.status, 503u);
  EXPECT_EQ(nlohmann::json::parse(ready.body)["reason"], "draining");
  ready_req.path = "/api/other";
  EXPECT_FALSE(handle_fleet_request(ctx, ready_req).has_value());
}

TEST_F(FleetServerTest, ReadyHealthAndTheWorkerIdInHelloAndStats) {
  start("w-ready", 2);
  auto r = http_get(port_, "/api/ready");
  ASSERT_EQ(r.status, 200u) << r.body;
  EXPECT_EQ(r.json()["ready"], true);
  EXPECT_EQ(r.json()["worker_id"], "w-ready");
  EXPECT_EQ(http_get(port_, "/api/health").json()["worker_id"], "w-ready");
  EXPECT_EQ(http_request(port_, http::verb::post, "/api/ready", "{}").status, 405u);

  WsClient a, b;
  const auto ha = open(a, "stream-A_1");
  EXPECT_EQ(ha["worker"], "w-ready");
  EXPECT_EQ(ha["stream"], "stream-A_1");
  const auto hb = open(b, "stream-B");
  EXPECT_EQ(hb["stream"], "stream-B");
  r = http_get(port_, "/api/ready");
  EXPECT_EQ(r.status, 503u);
  EXPECT_EQ(r.json()["ready"], false);
  EXPECT_EQ(r.json()["reason"], "full");
  EXPECT_EQ(r.json()["message"], "all 2 stream slots are in use (--max-streams)");
  // The status messages carry the worker id too.
  ASSERT_TRUE(a.send_json({{"type", "stats"}}));
  auto st = a.read_type("stats", std::chrono::seconds(20));
  ASSERT_TRUE(st);
  EXPECT_EQ((*st)["worker"], "w-ready");
  // A slot frees: ready again.
  b.close();
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (http_get(port_, "/api/ready").status != 200 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(http_get(port_, "/api/ready").status, 200u);
}

// A full worker behind a load balancer refuses the upgrade with 503, so that nginx (proxy_next_upstream http_503)
// gives the stream a worker with a free slot; it answered "busy" after the handshake, which kept the stream there
// while others were free. A direct client and the balancer's last try (X-SD-Last-Try) get "busy" in the WebSocket.
TEST_F(FleetServerTest, AFullWorkerRefusesAProxiedUpgradeSoTheBalancerTriesAnother) {
  start("w-full", 1);
  WsClient holder;
  open(holder, "holder");
  const auto proxied = sd::test::upgrade_answer(port_, "/ws?stream=next", {{"X-Forwarded-For", "10.0.0.7"}});
  EXPECT_EQ(proxied.status, 503u) << proxied.body;
  EXPECT_EQ(proxied.json()["type"], "busy");
  EXPECT_EQ(proxied.json()["reason"], "full");
  EXPECT_EQ(proxied.json()["worker"], "w-full");
  EXPECT_EQ(proxied.json()["error"], "all 1 stream slots of this worker are in use");
  for (const bool last_try : {false, true}) {
    WsClient c;
    if (last_try) c.headers = {{"X-Forwarded-For", "10.0.0.7"}, {"X-SD-Last-Try", "1"}};
    ASSERT_EQ(c.connect(port_, "", "/ws?stream=direct"), 101u) << "last try: " << last_try;
    const auto busy = c.read_type("busy", std::chrono::seconds(10));
    ASSERT_TRUE(busy) << "last try: " << last_try;
    EXPECT_EQ((*busy)["reason"], "full");
  }
  EXPECT_EQ(metrics().value("sd_streams_rejected_total", {{"reason", "busy"}}), 3);
  // A free slot takes a proxied stream.
  holder.close();
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (http_get(port_, "/api/ready").status != 200 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  WsClient next;
  next.headers = {{"X-Forwarded-For", "10.0.0.7"}};
  EXPECT_EQ(open(next, "next")["worker"], "w-full");
}

TEST_F(FleetServerTest, DefaultWorkerIdIsHostAndPort) {
  start("");
  EXPECT_EQ(http_get(port_, "/api/health").json()["worker_id"], "127.0.0.1:" + std::to_string(port_));
}

TEST_F(FleetServerTest, ForgedStreamIdsAreRefusedAndTheServerGoesOn) {
  start("w-ids");
  auto r = sd::test::upgrade_answer(port_, "/ws?stream=" + std::string(10240, 'A'));
  EXPECT_EQ(r.status, 400u);
  EXPECT_EQ(r.json()["error"],
            "stream id (query parameter 'stream'): expected 1 to 64 characters of [A-Za-z0-9_-], got 10240 characters");
  r = sd::test::upgrade_answer(port_, "/ws", {{"Cookie", "sd_stream=" + std::string(10240, 'B')}});
  EXPECT_EQ(r.status, 400u);
  EXPECT_NE(r.body.find("cookie 'sd_stream'"), std::string::npos) << r.body;
  r = sd::test::upgrade_answer(port_, "/ws?stream=a%22%3Cscript%3E");
  EXPECT_EQ(r.status, 400u);
  // A good id by cookie is taken; the server is alive and counted the refusals.
  WsClient c;
  ASSERT_EQ(c.connect(port_, "", "/ws"), 101u);
  auto hello = c.read_type("hello", std::chrono::seconds(20));
  ASSERT_TRUE(hello);
  EXPECT_EQ((*hello)["stream"], "");
  EXPECT_EQ(sd::test::upgrade_answer(port_, "/ws", {{"Cookie", "x=1; sd_stream=okay-123"}}).status, 101u);
  const auto stats = http_get(port_, "/api/stats").json();
  EXPECT_EQ(stats["rejected_stream_id"], 3);
  EXPECT_EQ(metrics().value("sd_streams_rejected_total", {{"reason", "stream_id"}}), 3);
}

// Models that report a compiled UNet (--compiled-unet) and its counts, as DiffusionModels keeps them.
class CompiledUNetStub : public sd::test::StubModels {
 public:
  CompiledUNetStats compiled_unet_stats() const override {
    return {"/models/unet-rows-1-16.pt2", 41, 3, "sample [18, 4, 8, 8], compiled for [1-16, 4, 8, 8]"};
  }
};

// With a compiled UNet, /api/stats and /metrics say how many UNet calls it ran and how many the model's own UNet ran
// instead (with the last reason: e.g. more batched rows than its range); without one, neither mentions it.
TEST_F(FleetServerTest, CompiledUNetCallsAreInStatsAndMetrics) {
  start("w-own");
  EXPECT_FALSE(http_get(port_, "/api/stats").json().contains("compiled_unet"));
  EXPECT_FALSE(metrics().has("sd_unet_calls_total", {{"unet", "compiled"}}));
  server_->stop();
  start("w-compiled", 4, std::make_shared<CompiledUNetStub>());
  const auto c = http_get(port_, "/api/stats").json().at("compiled_unet");
  EXPECT_EQ(c["file"], "/models/unet-rows-1-16.pt2");
  EXPECT_EQ(c["calls"], 41);
  EXPECT_EQ(c["fallbacks"], 3);
  EXPECT_EQ(c["last_fallback"], "sample [18, 4, 8, 8], compiled for [1-16, 4, 8, 8]");
  const PromText m = metrics();
  EXPECT_EQ(m.type("sd_unet_calls_total"), "counter");
  EXPECT_EQ(m.value("sd_unet_calls_total", {{"unet", "compiled"}}), 41);
  EXPECT_EQ(m.value("sd_unet_calls_total", {{"unet", "own"}}), 3);
}

// /metrics parses as Prometheus text, and its counters are what the clients counted and what the page's stats
// messages say (the same counters), before and after the streams close.
TEST_F(FleetServerTest, MetricsParseAndMatchWhatTheClientsCounted) {
  start("w-metrics");
  constexpr int kClients = 3, kFrames = 4;
  std::vector<std::unique_ptr<WsClient>> clients;
  std::vector<Counted> counted(kClients);
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(std::make_unique<WsClient>());
    const auto hello = open(*clients.back(), "metrics-" + std::to_string(i));
    ASSERT_EQ(hello["worker"], "w-metrics");
  }
  for (int f = 0; f < kFrames; ++f)
    for (int i = 0; i < kClients; ++i) {
      ASSERT_TRUE(clients[i]->send_binary(sd::test::test_jpeg(80, 80, f + i)));
      ++counted[i].sent;
      ASSERT_TRUE(read_replies(*clients[i], 1, counted[i]));
    }
  // Client 0: three frames at once (the older ones may be replaced while waiting: "dropped" input) and one that is
  // no image (an error, not a frame in).
  for (int f = 0; f < 3; ++f) {
    ASSERT_TRUE(clients[0]->send_binary(sd::test::test_jpeg(80, 80, 10 + f)));
    ++counted[0].sent;
  }
  ASSERT_TRUE(read_replies(*clients[0], 3, counted[0]));
  ASSERT_TRUE(clients[0]->send_binary("not a jpeg"));
  auto err = clients[0]->read_type("error", std::chrono::seconds(20));
  ASSERT_TRUE(err);
  ++counted[0].errors;

  Counted total;
  for (const auto& k : counted) {
    total.sent += k.sent;
    total.frames += k.frames;
    total.dropped_input += k.dropped_input;
    total.dropped_output += k.dropped_output;
    total.errors += k.errors;
  }
  ASSERT_EQ(total.frames + total.dropped_input + total.dropped_output, total.sent) << "one reply per request";

  auto check = [&](const PromText& m, int open_streams) {
    EXPECT_EQ(m.value("sd_frames_in_total"), total.sent);
    EXPECT_EQ(m.value("sd_frames_out_total"), total.frames + total.dropped_output);
    EXPECT_EQ(m.value("sd_frames_dropped_total", {{"reason", "input"}}), total.dropped_input);
    EXPECT_EQ(m.value("sd_frames_dropped_total", {{"reason", "output"}}), total.dropped_output);
    EXPECT_EQ(m.value("sd_stream_errors_total"), total.errors);
    EXPECT_EQ(m.value("sd_streams_open"), open_streams);
    EXPECT_EQ(m.value("sd_streams_opened_total"), kClients);
    EXPECT_EQ(m.value("sd_worker_info", {{"worker_id", "w-metrics"}, {"model", fleet_model()->describe()}}), 1);
    // Every result went through the model and the encoder once; every decoded frame through the decoder.
    EXPECT_EQ(m.value("sd_stage_seconds_count", {{"stage", "model"}}), total.frames + total.dropped_output);
    EXPECT_EQ(m.value("sd_stage_seconds_count", {{"stage", "queue"}}), total.frames + total.dropped_output);
    EXPECT_EQ(m.value("sd_stage_seconds_count", {{"stage", "encode"}}), total.frames + total.dropped_output);
    EXPECT_EQ(m.value("sd_stage_seconds_count", {{"stage", "decode"}}), total.sent);
    EXPECT_GT(m.value("sd_stage_seconds_sum", {{"stage", "model"}}), 0);
    EXPECT_EQ(m.type("sd_stage_seconds"), "histogram");
    EXPECT_EQ(m.type("sd_frames_dropped_total"), "counter");
    // CUDA graphs: none on the CPU (the streams' own calls and the shared ones alike), every event listed.
    EXPECT_EQ(m.type("sd_cuda_graphs_total"), "counter");
    for (const char* event : {"capture", "replay", "failure"})
      EXPECT_EQ(m.value("sd_cuda_graphs_total", {{"event", event}}), 0) << event;
    EXPECT_GT(m.value("sd_model_busy_seconds_total"), 0);
    const double busy = m.value("sd_model_busy_ratio");
    EXPECT_GT(busy, 0);
    EXPECT_LE(busy, 1);
    EXPECT_GT(m.value("process_resident_memory_bytes"), 10e6);
    EXPECT_EQ(m.value("sd_ready"), 1);
    EXPECT_EQ(m.value("sd_draining"), 0);
  };
  check(metrics(), kClients);

  // The page's numbers (its stats messages) are the same counters.
  int64_t page_in = 0, page_out = 0, page_dropped_in = 0;
  for (auto& c : clients) {
    ASSERT_TRUE(c->send_json({{"type", "stats"}}));
    auto s = c->read_type("stats", std::chrono::seconds(20));
    ASSERT_TRUE(s);
    page_in += (*s)["frames_in"].get<int64_t>();
    page_out += (*s)["frames_out"].get<int64_t>();
    page_dropped_in += (*s)["dropped_in"].get<int64_t>();
  }
  EXPECT_EQ(page_in, total.sent);
  EXPECT_EQ(page_out, total.frames + total.dropped_output);
  EXPECT_EQ(page_dropped_in, total.dropped_input);

  // Closed streams keep counting in the totals.
  clients[1]->close();
  clients[2]->close();
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (metrics().value("sd_streams_open") != 1 && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  check(metrics(), 1);
}

// POST /api/drain: each stream gets {"type":"reconnect"} and no error, a frame in flight is still answered, new
// streams and /api/ready get 503 "draining", and drain_and_stop returns as soon as the clients have gone.
TEST_F(FleetServerTest, DrainTellsClientsToReconnectAndRefusesNewStreams) {
  start("w-drain");
  WsClient a, b;
  open(a, "drain-a");
  open(b, "drain-b");
  Counted ka;
  ASSERT_TRUE(a.send_binary(sd::test::test_jpeg(80, 80, 1)));
  ASSERT_TRUE(read_replies(a, 1, ka));
  ASSERT_TRUE(a.send_binary(sd::test::test_jpeg(80, 80, 2)));  // in flight while the drain begins
  const auto r = http_request(port_, http::verb::post, "/api/drain", "");
  ASSERT_EQ(r.status, 202u) << r.body;
  EXPECT_EQ(r.json()["worker_id"], "w-drain");
  // a: the reconnect message and the reply of its frame in flight (in either order), never an error.
  bool reconnect_a = false;
  int replies = 0;
  while (!reconnect_a || replies < 1) {
    auto m = a.read(std::chrono::seconds(30));
    ASSERT_TRUE(m.ok) << m.error;
    if (m.binary) {
      ++replies;
      continue;
    }
    const auto j = m.json();
    ASSERT_NE(j.value("type", ""), "error") << m.data;
    if (j["type"] == "dropped") ++replies;
    if (j["type"] == "reconnect") {
      reconnect_a = true;
      EXPECT_EQ(j["worker"], "w-drain");
      EXPECT_EQ(j["reason"], "draining");
    }
  }
  EXPECT_EQ(replies, 1);
  auto rb = b.read_type("reconnect", std::chrono::seconds(30));
  ASSERT_TRUE(rb);
  // New streams and the readiness probe: 503 "draining"; health stays 200 (alive).
  auto ready = http_get(port_, "/api/ready");
  EXPECT_EQ(ready.status, 503u);
  EXPECT_EQ(ready.json()["reason"], "draining");
  const auto up = sd::test::upgrade_answer(port_, "/ws?stream=late");
  EXPECT_EQ(up.status, 503u);
  EXPECT_EQ(up.json()["reason"], "draining");
  EXPECT_EQ(up.json()["type"], "busy");
  EXPECT_EQ(http_get(port_, "/api/health").status, 200u);
  EXPECT_EQ(http_get(port_, "/api/health").json()["draining"], true);
  const auto m = metrics();
  EXPECT_EQ(m.value("sd_reconnects_sent_total"), 2);
  EXPECT_EQ(m.value("sd_streams_rejected_total", {{"reason", "draining"}}), 1);
  EXPECT_EQ(m.value("sd_draining"), 1);
  // The clients go; the drain ends at once, well before its deadline.
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    a.close();
    b.close();
  });
  const auto t0 = Clock::now();
  const int left = server_->drain_and_stop(10.0);
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  closer.join();
  EXPECT_EQ(left, 0);
  EXPECT_LT(took, 3.0);
}

// A client that ignores the reconnect message is cut off at the deadline, with a close and no error message.
TEST_F(FleetServerTest, DrainDeadlineClosesStubbornClientsWithoutAnError) {
  start("w-stubborn");
  WsClient c;
  open(c, "stubborn");
  const auto t0 = Clock::now();
  std::thread drainer([&] { EXPECT_EQ(server_->drain_and_stop(1.0), 1); });
  bool reconnect = false, closed = false;
  while (!closed) {
    auto m = c.read(std::chrono::seconds(30));
    if (!m.ok) {
      closed = m.closed;
      EXPECT_EQ(m.close_code, 1001) << m.error;  // going away
      break;
    }
    const auto j = m.json();
    EXPECT_NE(j.value("type", ""), "error") << m.data;
    if (j.value("type", "") == "reconnect") reconnect = true;
  }
  drainer.join();
  const double took = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_TRUE(reconnect);
  EXPECT_TRUE(closed);
  EXPECT_GE(took, 0.9);
  EXPECT_LT(took, 4.0);
}
