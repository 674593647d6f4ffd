// Multi-stream batching in serve's model worker (ModelWorker::set_max_batch_streams, pipeline/multi_stream.h): the
// pending frames of two clients (StreamSessions on one model) run as one step with one UNet call, their results
// reach each client as before and equal what the one-client-per-step worker gives them; the worker's stats JSON
// counts it; clients whose streams cannot share (deep-feature cache) are gathered but run their own calls; a gathered
// step calls every client's begin_batched_output (where, on CUDA, a session starts its download) before it delivers
// the first result.
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>
#include <opencv2/core.hpp>

#include "common/fixtures.h"
#include "pipeline/diffusion_models.h"
#include "server/image_codec.h"
#include "server/model_worker.h"
#include "server/stream_session.h"
#include "server_test_util.h"

using namespace sd::server;

namespace {

constexpr int kSize = 64;
const char* kModel = "models/tiny-sd15";

std::shared_ptr<const sd::DiffusionModels> shared_model() {
  static std::shared_ptr<const sd::DiffusionModels> m = [] {
    sd::LoadOptions lo;
    lo.threads = -1;
    return sd::load_pipeline(sd::test::fixture_path(kModel), lo);
  }();
  return m;
}

// A client: what its session sends.
struct Client {
  std::mutex m;
  std::vector<cv::Mat> frames;
  std::vector<nlohmann::json> messages;
  SessionSink sink() {
    return {[this](cv::Mat rgb) {
              std::lock_guard<std::mutex> l(m);
              frames.push_back(rgb.clone());
            },
            [this](nlohmann::json j) {
              std::lock_guard<std::mutex> l(m);
              messages.push_back(std::move(j));
            },
            nullptr, nullptr};
  }
  size_t count() {
    std::lock_guard<std::mutex> l(m);
    return frames.size();
  }
  std::vector<std::string> errors() {
    std::lock_guard<std::mutex> l(m);
    std::vector<std::string> out;
    for (const auto& j : messages)
      if (j.value("type", "") == "error") out.push_back(j.value("message", ""));
    return out;
  }
};

// Holds the worker (a task that runs until released) so that the clients' frames queue up behind it.
class Gate : public ModelTask {
 public:
  void run_model_step() override {
    entered_.set_value();
    released_.get_future().wait();
  }
  std::future<void> entered() { return entered_.get_future(); }
  void release() { released_.set_value(); }

 private:
  std::promise<void> entered_, released_;
};

cv::Mat test_frame(int round, int client) {
  cv::Mat m(kSize, kSize, CV_8UC3);
  cv::RNG rng(1000 + 31 * round + client);
  rng.fill(m, cv::RNG::UNIFORM, cv::Scalar::all(0), cv::Scalar::all(256));
  return m;
}

bool wait_for(const std::function<bool()>& done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(static_cast<int>(60 * sd::test::time_scale()));
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// Runs `rounds` rounds: in each, both clients' frames are queued while the worker is held, then released. Client 0
// streams img2img (seed 2, "a cat"), client 1 txt2img when `mixed` (else img2img with another prompt and seed).
struct RunResult {
  std::vector<std::vector<cv::Mat>> frames;
  nlohmann::json worker_stats;
  std::vector<std::string> errors;
};

RunResult run_two_clients(int max_batch, int rounds, bool mixed, const StreamDefaults& d) {
  ModelWorker w;
  w.set_max_batch_streams(max_batch);
  Client c[2];
  auto s0 = std::make_shared<StreamSession>(1, shared_model(), d, w, c[0].sink());
  auto s1 = std::make_shared<StreamSession>(2, shared_model(), d, w, c[1].sink());
  if (mixed)
    s1->update_settings({{"mode", "txt2img"}, {"prompt", "a red car"}, {"seed", 7}});
  else
    s1->update_settings({{"prompt", "a red car"}, {"seed", 7}});
  w.start();
  for (int r = 0; r < rounds; ++r) {
    auto gate = std::make_shared<Gate>();
    auto entered = gate->entered();
    w.schedule(gate);
    entered.wait();  // the worker is inside the gate: what follows queues up
    s0->submit_frame(test_frame(r, 0));
    if (mixed)
      s1->request_generate();
    else
      s1->submit_frame(test_frame(r, 1));
    gate->release();
    EXPECT_TRUE(wait_for([&] { return c[0].count() > static_cast<size_t>(r) && c[1].count() > static_cast<size_t>(r); }))
        << "round " << r;
  }
  RunResult out;
  out.worker_stats = w.stats();
  w.stop();
  for (auto& cl : c) {
    std::lock_guard<std::mutex> l(cl.m);
    out.frames.push_back(cl.frames);
  }
  for (auto& cl : c)
    for (auto& e : cl.errors()) out.errors.push_back(e);
  return out;
}

// Largest per-channel difference between two RGB frames (uint8 levels).
double max_level_diff(const cv::Mat& a, const cv::Mat& b) {
  cv::Mat d;
  cv::absdiff(a, b, d);
  double mx = 0;
  cv::minMaxLoc(d.reshape(1), nullptr, &mx);
  return mx;
}

class ServerBatch : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (!sd::test::fixture_exists(kModel)) GTEST_SKIP() << "no " << kModel;
  }
};

TEST_P(ServerBatch, TwoClientsShareOneUNetCallAndGetTheirOneAtATimeFrames) {
  const bool mixed = GetParam();
  const int rounds = 4;
  const StreamDefaults d = sd::test::tiny_stream_defaults(kSize);
  const RunResult batched = run_two_clients(8, rounds, mixed, d);
  const RunResult alone = run_two_clients(1, rounds, mixed, d);
  EXPECT_TRUE(batched.errors.empty()) << batched.errors.front();
  EXPECT_TRUE(alone.errors.empty()) << alone.errors.front();

  // The worker's counters: one gathered step and one shared UNet call per round, two streams in it.
  const auto& ws = batched.worker_stats;
  std::cout << "  [server batch] batched worker: " << ws.dump() << "\n  [server batch] one at a time: "
            << alone.worker_stats.dump() << "\n";
  EXPECT_EQ(ws["max_batch_streams"], 8);
  EXPECT_EQ(ws["gathered_steps"], rounds);
  EXPECT_EQ(ws["batched_calls"], rounds);
  EXPECT_EQ(ws["batched_streams"], 2 * rounds);
  EXPECT_EQ(ws["max_batch"], 2);
  EXPECT_EQ(ws["own_calls"], 0);
  EXPECT_EQ(ws["batched_graph_captures"], 0);  // CUDA graphs of the shared calls: none on the CPU
  EXPECT_EQ(ws["batched_graph_replays"], 0);
  EXPECT_EQ(ws["batched_graph_failures"], 0);
  EXPECT_EQ(ws["steps"], 1 + 3 * rounds);  // client 1's settings, then per round the gate and two task turns
  EXPECT_EQ(alone.worker_stats["max_batch_streams"], 1);
  EXPECT_EQ(alone.worker_stats["gathered_steps"], 0);
  EXPECT_EQ(alone.worker_stats["batched_calls"], 0);

  // Each client got one frame per request, equal to its one-at-a-time frame (uint8: float differences of ~1e-6
  // may move a value across a rounding boundary, one level at most).
  for (int k = 0; k < 2; ++k) {
    ASSERT_EQ(batched.frames[k].size(), static_cast<size_t>(rounds));
    ASSERT_EQ(alone.frames[k].size(), static_cast<size_t>(rounds));
    for (int r = 0; r < rounds; ++r) {
      const double diff = max_level_diff(batched.frames[k][r], alone.frames[k][r]);
      EXPECT_LE(diff, 1.0) << "client " << k << " round " << r;
    }
  }
  // The two clients' streams are their own: different prompts and seeds give different frames.
  EXPECT_GT(max_level_diff(batched.frames[0][rounds - 1], batched.frames[1][rounds - 1]), 10.0);
}

INSTANTIATE_TEST_SUITE_P(Modes, ServerBatch, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Img2imgAndTxt2img" : "TwoImg2img"; });

TEST(ServerBatchFallback, StreamsThatCannotShareAreNotGathered) {
  if (!sd::test::fixture_exists(kModel)) GTEST_SKIP() << "no " << kModel;
  StreamDefaults d = sd::test::tiny_stream_defaults(kSize);
  d.img2img.deep_cache_every = 2;  // per-stream UNet features: no shared calls
  const RunResult batched = run_two_clients(8, 2, false, d);
  const RunResult alone = run_two_clients(1, 2, false, d);
  EXPECT_TRUE(batched.errors.empty()) << batched.errors.front();
  // Client 1's stream exists from its settings turn and cannot share (batch_key null), so client 0's first step,
  // before it has a stream, finds nobody to gather, and after that neither session is gathered: each runs its own
  // step and gets its result without waiting for the other's.
  const auto& ws = batched.worker_stats;
  EXPECT_EQ(ws["gathered_steps"], 0);
  EXPECT_EQ(ws["batched_calls"], 0);
  EXPECT_EQ(ws["own_calls"], 0);
  EXPECT_EQ(ws["steps"], 1 + 3 * 2);
  for (int k = 0; k < 2; ++k)
    for (int r = 0; r < 2; ++r) EXPECT_EQ(max_level_diff(batched.frames[k][r], alone.frames[k][r]), 0.0);
}

// Forwards a session's halves to it, logging each call (the model thread's order).
class Recorder : public ModelTask {
 public:
  Recorder(std::shared_ptr<StreamSession> s, int k, std::mutex& m, std::vector<std::string>& log)
      : s_(std::move(s)), k_(k), m_(m), log_(log) {}
  void run_model_step() override { note("alone"); }
  const void* batch_key() const override { return s_->batch_key(); }
  bool begin_batched_step(BatchedStep& step) override {
    note("begin");
    return s_->begin_batched_step(step);
  }
  void begin_batched_output(BatchedStep& step) override {
    note("output");
    s_->begin_batched_output(step);
  }
  void end_batched_step(BatchedStep& step) override {
    s_->end_batched_step(step);
    note("end");
  }

 private:
  void note(const char* what) {
    std::lock_guard<std::mutex> l(m_);
    log_.push_back(std::string(what) + " " + std::to_string(k_));
  }
  std::shared_ptr<StreamSession> s_;
  int k_;
  std::mutex& m_;
  std::vector<std::string>& log_;
};

TEST(ServerBatchOrder, EveryClientsDownloadStartsBeforeTheFirstResultIsDelivered) {
  if (!sd::test::fixture_exists(kModel)) GTEST_SKIP() << "no " << kModel;
  const StreamDefaults d = sd::test::tiny_stream_defaults(kSize);
  // The sessions schedule themselves on `idle`, which never runs; `w` runs the recorders that wrap them instead.
  ModelWorker idle;
  ModelWorker w;
  w.set_max_batch_streams(8);
  constexpr int kClients = 3;
  Client c[kClients];
  std::mutex m;
  std::vector<std::string> log;
  std::vector<std::shared_ptr<Recorder>> recorders;
  std::vector<std::shared_ptr<StreamSession>> sessions;
  for (int k = 0; k < kClients; ++k) {
    sessions.push_back(std::make_shared<StreamSession>(10 + k, shared_model(), d, idle, c[k].sink()));
    sessions.back()->update_settings({{"seed", 3 + k}});
    recorders.push_back(std::make_shared<Recorder>(sessions.back(), k, m, log));
  }
  w.start();
  // Two rounds: the first frame of a two-step stream batch is its buffer's start, alike for every client.
  constexpr int kRounds = 2;
  for (int r = 0; r < kRounds; ++r) {
    for (int k = 0; k < kClients; ++k) sessions[k]->submit_frame(test_frame(r, k));
    auto gate = std::make_shared<Gate>();
    auto entered = gate->entered();
    w.schedule(gate);
    entered.wait();
    for (auto& rec : recorders) w.schedule(rec);
    gate->release();
    ASSERT_TRUE(wait_for([&] {
      std::lock_guard<std::mutex> l(m);
      return log.size() >= static_cast<size_t>(3 * kClients * (r + 1));
    })) << "round " << r;
  }
  w.stop();
  std::vector<std::string> expected;
  for (int r = 0; r < kRounds; ++r)
    for (const char* what : {"begin", "output", "end"})
      for (int k = 0; k < kClients; ++k) expected.push_back(std::string(what) + " " + std::to_string(k));
  EXPECT_EQ(log, expected);
  EXPECT_EQ(w.stats()["batched_streams"], kRounds * kClients);
  for (int k = 0; k < kClients; ++k) {
    EXPECT_EQ(c[k].count(), static_cast<size_t>(kRounds)) << "client " << k;
    EXPECT_TRUE(c[k].errors().empty()) << c[k].errors().front();
  }
  // Each client's frame is its own (frames and seeds differ).
  std::lock_guard<std::mutex> l0(c[0].m), l1(c[1].m), l2(c[2].m);
  EXPECT_GT(max_level_diff(c[0].frames[1], c[1].frames[1]), 10.0);
  EXPECT_GT(max_level_diff(c[1].frames[1], c[2].frames[1]), 10.0);
}

}  // namespace

namespace {

// Review finding: a request the model had not taken when the stream closed got no reply and no counter, so the
// server's frames_in no longer added up after disconnects.
TEST(ServerSessionClose, ARequestTheModelHadNotTakenIsCountedAsLostAtClose) {
  if (!sd::test::fixture_exists(kModel)) GTEST_SKIP() << "no " << kModel;
  ModelWorker idle;  // never started: the requests wait for a turn that does not come
  Client c;
  auto s = std::make_shared<StreamSession>(1, shared_model(), sd::test::tiny_stream_defaults(kSize), idle, c.sink());
  s->submit_frame(test_frame(0, 0));
  s->submit_frame(test_frame(1, 0));  // the latest wins: the first is answered "dropped"
  s->close();
  const nlohmann::json j = s->stats();
  EXPECT_EQ(j["frames_in"], 2);
  EXPECT_EQ(j["dropped_in"], 1);
  EXPECT_EQ(j["lost_at_close"], 1);
  EXPECT_EQ(j["frames_out"], 0);
  EXPECT_EQ(j["frames_in"].get<int64_t>(), j["frames_out"].get<int64_t>() + j["dropped_in"].get<int64_t>() +
                                               j["errors"].get<int64_t>() + j["lost_at_close"].get<int64_t>());
  s->close();  // again: nothing more
  EXPECT_EQ(s->stats()["lost_at_close"], 1);
}

// Review finding: update_settings decoded a client's control image / image prompt (up to 4096 x 4096 px) while
// holding the session's lock, which the shared model thread takes at every step (and /metrics, /api/stats too).
TEST(ServerSessionSettings, ImagesAreDecodedOutsideTheLockTheModelThreadTakes) {
  if (!sd::test::fixture_exists(kModel)) GTEST_SKIP() << "no " << kModel;
  StreamDefaults d = sd::test::tiny_stream_defaults(kSize);
  d.ip_adapter = true;  // the field is accepted (only decoded here: the idle worker never runs a step)
  ModelWorker idle;
  Client c;
  auto s = std::make_shared<StreamSession>(1, shared_model(), d, idle, c.sink());
  cv::Mat big(2048, 2048, CV_8UC3);
  cv::randu(big, cv::Scalar::all(0), cv::Scalar::all(255));
  const nlohmann::json j = {{"image_prompt", base64_encode(encode_png(big))}};
  std::atomic<bool> updating{false}, done{false};
  std::atomic<int64_t> during{0};
  std::thread reader([&] {
    while (!done.load()) {
      const bool before = updating.load();
      (void)s->settings();  // what the model thread's step and the stats take
      if (before && updating.load()) ++during;
    }
  });
  updating = true;
  const auto t0 = std::chrono::steady_clock::now();
  s->update_settings(j);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  updating = false;
  done = true;
  reader.join();
  EXPECT_EQ(s->settings().image_prompt.cols, 2048);
  EXPECT_GT(took, 0.02) << "the decode is long enough to tell";
  EXPECT_GE(during.load(), 10) << "settings() waited for the " << took << " s decode";
}

}  // namespace
