// A fleet on loopback: three `streamdiffusion serve` workers with the tiny fixture model behind Debian's nginx, started
// and stopped by scripts/fleet.sh (nginx as a plain process, never a system service), and 30 WebSocket clients
// through nginx, each with its own stream id.
//   - every client's frames come from one worker (the worker id of its hello and stats messages), and it comes back
//     to that worker when it reconnects (nginx: hash $stream_id consistent);
//   - /metrics of each worker parses as Prometheus text and its counters equal what the clients counted there;
//   - SIGKILL of one worker: its clients reconnect to the others and get frames within 5 s, the others never stall;
//   - SIGTERM of another: its clients get {"type":"reconnect"}, no error message, move within 5 s, and the worker
//     exits within its --drain-seconds;
//   - 200 connection attempts beyond --max-streams across the fleet are each answered "busy", and no worker dies;
//   - /api/drain through nginx is refused; forged stream ids get nginx's 414 (10 kB) or the worker's 400.
// Skipped (with the reason) when nginx is not installed or the fixtures are absent.
#include <signal.h>
#include <sys/types.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "server/prometheus_text.h"
#include "server/server_test_util.h"

namespace fs = std::filesystem;
using sd::test::http_get;
using sd::test::http_request;
using sd::test::PromText;
using sd::test::WsClient;
namespace http = boost::beast::http;
using Clock = std::chrono::steady_clock;

namespace {

const char* kModel = "models/tiny-sd15";

std::string nginx_path() {
  for (const char* p : {"/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"})
    if (fs::exists(p)) return p;
  return "";
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Alive and not a zombie (the workers are not our children: nobody may reap them at once).
bool alive(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(f, line)) return false;
  const size_t close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z';
}

uint16_t free_port() {
  boost::asio::io_context ioc;
  boost::asio::ip::tcp::acceptor a(ioc, {boost::asio::ip::make_address("127.0.0.1"), 0});
  return a.local_endpoint().port();
}

// A fleet started by scripts/fleet.sh in its own run dir; stopped (and checked stopped) by the destructor.
class Fleet {
 public:
  Fleet(int n, int max_streams, int drain_seconds) {
    run_dir_ = sd::test::make_temp_dir("fleet");
    port_ = free_port();
    const std::string cmd = std::string(SD_FLEET_SCRIPT) + " " + std::to_string(n) + " --bin " + SD_FLEET_SERVE_BIN +
                            " --model " + sd::test::fixture_path(kModel) + " --threads 1 --port " +
                            std::to_string(port_) + " --max-streams " + std::to_string(max_streams) +
                            " --drain-seconds " + std::to_string(drain_seconds) + " --run-dir " + run_dir_ +
                            " --ready-timeout 60 -- --size 64x64 --t-index-list 32,45 --max-batch-streams 16 > " +
                            run_dir_ + "/fleet-start.log 2>&1";
    started_ = std::system(cmd.c_str()) == 0;
    log_ = read_file(fs::path(run_dir_) / "fleet-start.log");
    for (int i = 1; started_ && i <= n; ++i) {
      workers_.push_back({"w" + std::to_string(i),
                          static_cast<pid_t>(std::stol(read_file(fs::path(run_dir_) / ("worker-" + std::to_string(i) + ".pid")))),
                          static_cast<uint16_t>(std::stoi(read_file(fs::path(run_dir_) / ("worker-" + std::to_string(i) + ".port"))))});
    }
  }
  ~Fleet() {
    stop();
    // A safety net for a failed test: nothing this test started may outlive it.
    for (const auto& w : workers_)
      if (alive(w.pid)) kill(w.pid, SIGKILL);
  }
  void stop() {
    if (stopped_) return;
    stopped_ = true;
    std::system((std::string(SD_FLEET_SCRIPT) + " stop --run-dir " + run_dir_ + " > " + run_dir_ + "/fleet-stop.log 2>&1").c_str());
  }
  struct Worker {
    std::string id;
    pid_t pid;
    uint16_t port;
  };
  bool started() const { return started_; }
  const std::string& log() const { return log_; }
  uint16_t port() const { return port_; }
  const std::vector<Worker>& workers() const { return workers_; }
  const Worker& worker(const std::string& id) const {
    for (const auto& w : workers_)
      if (w.id == id) return w;
    throw std::runtime_error("no worker " + id);
  }
  const std::string& run_dir() const { return run_dir_; }

 private:
  std::string run_dir_, log_;
  uint16_t port_ = 0;
  bool started_ = false, stopped_ = false;
  std::vector<Worker> workers_;
};

// What one connection of a client counted.
struct Conn {
  std::string worker;  // from the hello
  int64_t sent = 0, frames = 0, dropped_in = 0, dropped_out = 0, errors = 0;
  bool stats_worker_mismatch = false;
};

// A client streaming frames through nginx on its own thread (send, wait for the reply, repeat). It reconnects by
// itself (backoff 100 ms doubling) after a reconnect message or a dropped connection, with the same stream id.
class FleetClient {
 public:
  FleetClient(uint16_t port, std::string id) : port_(port), id_(std::move(id)) {
    thread_ = std::thread([this] { loop(); });
  }
  ~FleetClient() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  void pause(bool p) { pause_ = p; }
  bool idle() const { return idle_; }
  void reconnect_now() { reconnect_request_ = true; }
  void finish() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }

  std::vector<Conn> conns() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return conns_;
  }
  std::string worker() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return connected_ && !conns_.empty() ? conns_.back().worker : "";
  }
  int64_t frames() const {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t n = 0;
    for (const auto& c : conns_) n += c.frames;
    return n;
  }
  std::vector<std::string> errors() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return errors_;
  }
  std::vector<double> moves() const {  // seconds from losing a worker to the first frame of the next one
    std::lock_guard<std::mutex> lock(mutex_);
    return moves_;
  }
  int reconnect_messages() const { return reconnect_messages_; }
  double max_gap() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return max_gap_;
  }
  void reset_gap() {
    std::lock_guard<std::mutex> lock(mutex_);
    max_gap_ = 0;
    last_frame_ = Clock::time_point{};
  }
  const std::string& id() const { return id_; }

 private:
  bool connect() {
    ws_ = std::make_unique<WsClient>();
    if (ws_->connect(port_, "", "/ws?stream=" + id_) != 101) return false;
    auto hello = ws_->read_type("hello", std::chrono::seconds(10));
    if (!hello) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    Conn c;
    c.worker = (*hello).value("worker", "");
    conns_.push_back(c);
    connected_ = true;
    last_frame_ = Clock::time_point{};
    return true;
  }
  void lost() {
    std::lock_guard<std::mutex> lock(mutex_);
    connected_ = false;
    lost_at_ = Clock::now();
    ws_.reset();
  }
  void loop() {
    int failures = 0;
    int k = 0;
    while (!stop_) {
      if (!ws_) {
        if (!connect()) {
          ws_.reset();
          if (++failures > 12) {
            std::lock_guard<std::mutex> lock(mutex_);
            errors_.push_back("could not reconnect");
            return;
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(std::min(2000, 100 << std::min(failures, 5))));
          continue;
        }
        failures = 0;
      }
      if (pause_) {
        idle_ = true;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        std::lock_guard<std::mutex> lock(mutex_);
        last_frame_ = Clock::time_point{};
        continue;
      }
      idle_ = false;
      if (reconnect_request_.exchange(false)) {
        ws_->close();
        ws_.reset();
        std::lock_guard<std::mutex> lock(mutex_);
        connected_ = false;
        continue;
      }
      if (!ws_->send_binary(sd::test::test_jpeg(64, 64, k++))) {
        lost();
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        conns_.back().sent += 1;
      }
      // One reply (a frame or "dropped"); a reconnect message means: go after this reply.
      bool go = false, replied = false;
      while (!replied) {
        auto m = ws_->read(std::chrono::seconds(go ? 5 : 30));
        if (!m.ok) break;
        std::lock_guard<std::mutex> lock(mutex_);
        Conn& c = conns_.back();
        if (m.binary) {
          ++c.frames;
          replied = true;
          const auto now = Clock::now();
          if (last_frame_ != Clock::time_point{})
            max_gap_ = std::max(max_gap_, std::chrono::duration<double>(now - last_frame_).count());
          else if (lost_at_ != Clock::time_point{}) {
            moves_.push_back(std::chrono::duration<double>(now - lost_at_).count());
            lost_at_ = Clock::time_point{};
          }
          last_frame_ = now;
          continue;
        }
        const auto j = m.json();
        const std::string type = j.value("type", "");
        if (type == "dropped") {
          (j.value("where", "") == "input" ? c.dropped_in : c.dropped_out) += 1;
          replied = true;
        } else if (type == "error") {
          ++c.errors;
          errors_.push_back(j.value("message", ""));
        } else if (type == "reconnect") {
          ++reconnect_messages_;
          go = true;
        } else if (type == "stats") {
          if (j.value("worker", "") != c.worker) c.stats_worker_mismatch = true;
        }
      }
      if (!replied || go) {
        if (go && ws_) ws_->close();
        lost();
      }
    }
    if (ws_) ws_->close();
  }

  const uint16_t port_;
  const std::string id_;
  std::thread thread_;
  std::atomic<bool> stop_{false}, pause_{false}, idle_{false}, reconnect_request_{false};
  std::atomic<int> reconnect_messages_{0};
  std::unique_ptr<WsClient> ws_;  // loop thread only
  mutable std::mutex mutex_;
  std::vector<Conn> conns_;
  std::vector<std::string> errors_;
  std::vector<double> moves_;
  bool connected_ = false;
  Clock::time_point last_frame_{}, lost_at_{};
  double max_gap_ = 0;
};

template <class F>
bool wait_for(F f, double seconds) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while (!f()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

void pause_all(std::vector<std::unique_ptr<FleetClient>>& clients, bool p) {
  for (auto& c : clients) c->pause(p);
  if (!p) return;
  ASSERT_TRUE(wait_for([&] {
    for (auto& c : clients)
      if (!c->idle()) return false;
    return true;
  }, 30)) << "clients did not finish their requests";
}

// The sums over every connection a client made to `worker`.
Conn totals(const std::vector<std::unique_ptr<FleetClient>>& clients, const std::string& worker) {
  Conn t;
  for (const auto& c : clients)
    for (const auto& k : c->conns())
      if (k.worker == worker) {
        t.sent += k.sent;
        t.frames += k.frames;
        t.dropped_in += k.dropped_in;
        t.dropped_out += k.dropped_out;
        t.errors += k.errors;
      }
  return t;
}

void expect_metrics_match(uint16_t port, const Conn& t, const std::string& worker) {
  const auto r = http_get(port, "/metrics");
  ASSERT_EQ(r.status, 200u) << worker;
  std::unique_ptr<PromText> m;
  try {
    m = std::make_unique<PromText>(r.body);
  } catch (const std::exception& e) {
    FAIL() << worker << ": " << e.what();
  }
  EXPECT_EQ(m->value("sd_frames_in_total"), t.sent) << worker;
  EXPECT_EQ(m->value("sd_frames_out_total"), t.frames + t.dropped_out) << worker;
  EXPECT_EQ(m->value("sd_frames_dropped_total", {{"reason", "input"}}), t.dropped_in) << worker;
  EXPECT_EQ(m->value("sd_frames_dropped_total", {{"reason", "output"}}), t.dropped_out) << worker;
  EXPECT_EQ(m->value("sd_stage_seconds_count", {{"stage", "model"}}), t.frames + t.dropped_out) << worker;
  EXPECT_GT(t.frames, 0) << worker << " served no frames";
}

class FleetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (nginx_path().empty())
      GTEST_SKIP() << "nginx is not installed (apt-get install nginx-light): the fleet test needs Debian's nginx";
    if (!sd::test::fixture_exists(kModel)) GTEST_SKIP() << "no " << kModel << " under " << sd::test::fixtures_root();
  }
};

}  // namespace

TEST_F(FleetTest, StickyStreamsSurviveAKilledAndADrainedWorker) {
  const auto t_start = Clock::now();
  Fleet fleet(3, 30, 5);
  ASSERT_TRUE(fleet.started()) << fleet.log();
  ASSERT_EQ(fleet.workers().size(), 3u);
  for (const auto& w : fleet.workers()) {
    const auto h = http_get(w.port, "/api/health").json();
    EXPECT_EQ(h["worker_id"], w.id);
  }
  // nginx refuses /api/drain (each worker also refuses a proxied one).
  const auto drain = http_request(fleet.port(), http::verb::post, "/api/drain", "");
  EXPECT_EQ(drain.status, 403u) << drain.body;
  EXPECT_EQ(http_get(fleet.port(), "/api/ready").status, 200u);

  constexpr int kClients = 30;
  std::vector<std::unique_ptr<FleetClient>> clients;
  for (int i = 0; i < kClients; ++i)
    clients.push_back(std::make_unique<FleetClient>(fleet.port(), "fleet-client-" + std::to_string(i)));
  // Everyone streams a little.
  ASSERT_TRUE(wait_for([&] {
    for (auto& c : clients)
      if (c->frames() < 3) return false;
    return true;
  }, 40)) << "not every client got 3 frames";

  // Stickiness: each client reconnects once and lands on the same worker.
  std::map<std::string, std::string> first;
  std::map<std::string, int> per_worker;
  for (auto& c : clients) {
    first[c->id()] = c->worker();
    per_worker[c->worker()] += 1;
    c->reconnect_now();
  }
  ASSERT_TRUE(wait_for([&] {
    for (auto& c : clients)
      if (c->conns().size() < 2 || c->conns().back().frames < 2) return false;
    return true;
  }, 30)) << "clients did not stream again after reconnecting";
  for (auto& c : clients) {
    const auto conns = c->conns();
    ASSERT_EQ(conns.size(), 2u) << c->id();
    EXPECT_EQ(conns[0].worker, conns[1].worker) << c->id() << " moved without cause";
  }
  EXPECT_EQ(per_worker.size(), 3u) << "the 30 stream ids should spread over the 3 workers";
  for (const auto& [w, n] : per_worker) std::printf("  %s: %d clients\n", w.c_str(), n);

  // /metrics of each worker = what the clients counted there.
  pause_all(clients, true);
  for (const auto& w : fleet.workers()) expect_metrics_match(w.port, totals(clients, w.id), w.id);
  pause_all(clients, false);

  // SIGKILL w1: its clients reconnect to the others within 5 s; nobody else stalls.
  for (auto& c : clients) c->reset_gap();
  const auto& w1 = fleet.worker("w1");
  std::set<std::string> on_w1;
  for (auto& c : clients)
    if (c->worker() == "w1") on_w1.insert(c->id());
  ASSERT_FALSE(on_w1.empty());
  ASSERT_EQ(kill(w1.pid, SIGKILL), 0);
  ASSERT_TRUE(wait_for([&] {
    for (auto& c : clients)
      if (on_w1.count(c->id()) && (c->worker().empty() || c->worker() == "w1" || c->moves().empty())) return false;
    return true;
  }, 20)) << "w1's clients did not move";
  for (auto& c : clients) {
    if (!on_w1.count(c->id())) {
      EXPECT_EQ(c->conns().size(), 2u) << c->id() << " was not on w1 but reconnected";
      continue;
    }
    const auto moves = c->moves();
    ASSERT_FALSE(moves.empty());
    EXPECT_LT(moves.back(), 5.0) << c->id() << " took " << moves.back() << " s to get a frame from another worker";
    EXPECT_NE(c->worker(), "w1");
  }
  std::this_thread::sleep_for(std::chrono::seconds(2));
  double worst_move = 0, worst_gap = 0;
  for (auto& c : clients) {
    EXPECT_LT(c->max_gap(), 5.0) << c->id() << " stalled";
    worst_gap = std::max(worst_gap, c->max_gap());
    if (on_w1.count(c->id())) worst_move = std::max(worst_move, c->moves().back());
  }
  std::printf("  SIGKILL w1: %zu clients moved, slowest first frame elsewhere after %.2f s; longest wait between frames "
              "on one connection %.2f s\n", on_w1.size(), worst_move, worst_gap);

  // SIGTERM w2: a drain. Its clients get a reconnect message, no error, and move within 5 s; w2 exits in time.
  const auto& w2 = fleet.worker("w2");
  std::set<std::string> on_w2;
  for (auto& c : clients)
    if (c->worker() == "w2") on_w2.insert(c->id());
  ASSERT_FALSE(on_w2.empty());
  std::map<std::string, size_t> moves_before;
  for (auto& c : clients) moves_before[c->id()] = c->moves().size();
  const auto t_term = Clock::now();
  ASSERT_EQ(kill(w2.pid, SIGTERM), 0);
  ASSERT_TRUE(wait_for([&] {
    for (auto& c : clients)
      if (on_w2.count(c->id()) && (c->worker().empty() || c->worker() == "w2" || c->moves().size() <= moves_before[c->id()]))
        return false;
    return true;
  }, 20)) << "w2's clients did not move";
  for (auto& c : clients) {
    if (!on_w2.count(c->id())) continue;
    EXPECT_GE(c->reconnect_messages(), 1) << c->id();
    EXPECT_LT(c->moves().back(), 5.0) << c->id();
    EXPECT_EQ(c->worker(), "w3");
  }
  ASSERT_TRUE(wait_for([&] { return !alive(w2.pid); }, 5.0 + 3)) << "w2 did not exit after its drain";
  const double drain_s = std::chrono::duration<double>(Clock::now() - t_term).count();
  double worst_drain_move = 0;
  for (auto& c : clients)
    if (on_w2.count(c->id())) worst_drain_move = std::max(worst_drain_move, c->moves().back());
  std::printf("  SIGTERM w2: %zu clients moved, slowest after %.2f s; w2 gone after %.2f s\n", on_w2.size(),
              worst_drain_move, drain_s);
  EXPECT_LT(drain_s, 5.0 + 1);
  const std::string w2_log = read_file(fs::path(fleet.run_dir()) / "worker-2.log");
  EXPECT_NE(w2_log.find("SIGTERM: draining"), std::string::npos) << w2_log.substr(w2_log.size() > 2000 ? w2_log.size() - 2000 : 0);
  EXPECT_NE(w2_log.find("s, 0 stream(s) still open"), std::string::npos) << "w2 cut clients off at the deadline";

  // No client ever saw an error message (a drain and a killed worker look like reconnects, never errors).
  for (auto& c : clients) EXPECT_TRUE(c->errors().empty()) << c->id() << ": " << c->errors().front();

  // w3 (the survivor) counted what its clients counted, and the frames of each connection came from its worker.
  pause_all(clients, true);
  expect_metrics_match(fleet.worker("w3").port, totals(clients, "w3"), "w3");
  const Conn t3 = totals(clients, "w3");
  std::printf("  w3 /metrics = the clients' counts: %lld frames in, %lld results, %lld dropped\n",
              static_cast<long long>(t3.sent), static_cast<long long>(t3.frames + t3.dropped_out),
              static_cast<long long>(t3.dropped_in + t3.dropped_out));
  for (auto& c : clients)
    for (const auto& k : c->conns()) EXPECT_FALSE(k.stats_worker_mismatch) << c->id();
  for (auto& c : clients) c->finish();
  clients.clear();

  fleet.stop();
  for (const auto& w : fleet.workers()) EXPECT_FALSE(alive(w.pid)) << w.id << " still runs after fleet.sh stop";
  {
    boost::asio::io_context ioc;
    boost::asio::ip::tcp::socket s(ioc);
    boost::system::error_code ec;
    s.connect({boost::asio::ip::make_address("127.0.0.1"), fleet.port()}, ec);
    EXPECT_TRUE(ec) << "nginx still listens after fleet.sh stop";
  }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t_start).count(), 150.0);
}

TEST_F(FleetTest, ConnectionsBeyondMaxStreamsAreAnsweredBusyAndNoWorkerDies) {
  Fleet fleet(3, 2, 2);
  ASSERT_TRUE(fleet.started()) << fleet.log();
  // Fill every worker's two slots with six streams whose ids all hash to one worker: a full worker refuses the
  // upgrade before the handshake, so nginx hands each stream to the next worker in the ring that has a free slot
  // (it answered "busy" after the handshake, and the stream stayed on the full worker while others were free).
  std::vector<std::unique_ptr<WsClient>> held;
  std::map<std::string, int> per_worker;
  for (int i = 0; i < 6; ++i) {
    auto c = std::make_unique<WsClient>();
    ASSERT_EQ(c->connect(fleet.port(), "", "/ws?stream=same-id"), 101u);
    auto m = c->read(std::chrono::seconds(10));
    ASSERT_TRUE(m.ok) << m.error;
    const auto j = m.json();
    ASSERT_EQ(j.value("type", ""), "hello") << "stream " << i << ": " << m.data;
    per_worker[j.value("worker", "")] += 1;
    held.push_back(std::move(c));
  }
  for (const auto& w : fleet.workers()) {
    EXPECT_EQ(per_worker[w.id], 2) << w.id;
    EXPECT_EQ(http_get(w.port, "/api/ready").json()["reason"], "full") << w.id;
  }
  // 200 more attempts from 8 threads: each one a "busy" answer (every worker refused: nginx's last try asks one to
  // say why in the WebSocket).
  std::atomic<int> busy{0}, other{0};
  std::mutex mu;
  std::vector<std::string> others;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      for (int i = t; i < 200; i += 8) {
        WsClient c;
        std::string what;
        if (c.connect(fleet.port(), "", "/ws?stream=beyond-" + std::to_string(i)) != 101) {
          what = "refused upgrade";
        } else {
          auto m = c.read(std::chrono::seconds(20));
          const auto j = m.json();
          if (m.ok && j.is_object() && j.value("type", "") == "busy" && j.value("reason", "") == "full" &&
              j.value("message", "").find("all 2 stream slots are in use") != std::string::npos)
            ++busy;
          else
            what = m.ok ? m.data : m.error;
        }
        if (!what.empty()) {
          ++other;
          std::lock_guard<std::mutex> lock(mu);
          others.push_back(what);
        }
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(busy.load(), 200);
  EXPECT_EQ(other.load(), 0) << (others.empty() ? "" : others.front());
  // Every worker alive and well, and its counters add up.
  double rejected = 0;
  for (const auto& w : fleet.workers()) {
    EXPECT_TRUE(alive(w.pid)) << w.id;
    EXPECT_EQ(http_get(w.port, "/api/health").status, 200u) << w.id;
    const PromText m(http_get(w.port, "/metrics").body);
    rejected += m.value("sd_streams_rejected_total", {{"reason", "busy"}});
    EXPECT_EQ(m.value("sd_streams_open"), 2) << w.id;
  }
  // Each attempt's last try, plus the refusals before the handshake that left the full workers out of the ring.
  EXPECT_GE(rejected, 200 + 3);
  // Forged stream ids through nginx: 10 kB does not fit nginx's request line buffers (its own 414); a 100-character
  // one reaches a worker and gets the worker's 400 naming what it expects.
  EXPECT_EQ(sd::test::upgrade_answer(fleet.port(), "/ws?stream=" + std::string(10240, 'A')).status, 414u);
  const auto forged = sd::test::upgrade_answer(fleet.port(), "/ws?stream=" + std::string(100, 'A'));
  EXPECT_EQ(forged.status, 400u);
  EXPECT_EQ(forged.json()["error"],
            "stream id (query parameter 'stream'): expected 1 to 64 characters of [A-Za-z0-9_-], got 100 characters");
  for (const auto& w : fleet.workers()) EXPECT_TRUE(alive(w.pid)) << w.id;
  // The held streams still work.
  for (auto& c : held) {
    ASSERT_TRUE(c->send_binary(sd::test::test_jpeg(64, 64, 1)));
    EXPECT_TRUE(c->read_frame(nullptr, std::chrono::seconds(30)));
  }
}
