// How a stream ends early, with a stub processor (no model): every frame a stop loses is counted (frames_in ==
// frames_out + dropped + discarded_at_stop + in_flight_at_stop), a scheduled quit stops the stream, a command the
// processor refuses is answered once while other errors from apply() stop the stream, and the options that become
// clock periods are checked.
#include <cmath>
#include <limits>
#include <mutex>

#include <gtest/gtest.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "runtime/runtime_test_util.h"
#include "runtime/stream_runtime.h"

namespace sd {
namespace {

using namespace std::chrono_literals;
using test::error_of;
using test::MemorySink;
using test::quiet;
using test::StubProcessor;
using test::SyntheticSource;

int64_t count(const nlohmann::json& j, const char* key) { return j.at(key).get<int64_t>(); }

// The summary's accounting of the frames read: written, dropped, or lost to the stop.
void expect_every_frame_counted(const nlohmann::json& s) {
  EXPECT_EQ(count(s, "frames_in"), count(s, "frames_out") + count(s, "dropped") + count(s, "discarded_at_stop") +
                                        count(s, "in_flight_at_stop"))
      << s.dump();
}

// Polls `done` until it holds; false after 30 s (scaled), so that a broken stream fails the test instead of hanging.
template <class F>
bool wait_until(F done) {
  const auto deadline = StreamClock::now() + std::chrono::duration<double>(30 * test::time_scale());
  while (!done()) {
    if (StreamClock::now() > deadline) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// A sink whose writes wait until the stream stops, as a real sink's write is cut short by a stop: upstream fills
// every queue behind it meanwhile.
class StuckSink : public FrameSink {
 public:
  std::atomic<int> writes{0};
  void write(const cv::Mat&, const std::atomic<bool>& stop) override {
    ++writes;
    while (!stop.load()) std::this_thread::sleep_for(1ms);
  }
  void close() override {}
  std::string describe() const override { return "stuck"; }
};

TEST(StreamStop, FramesQueuedAndInFlightAtAStopAreCounted) {
  // Lossless queues of 4 and a processor 3 frames deep: once the sink is stuck on its first frame, the capture is
  // ahead by every queue's worth. The stop loses them all, and says where.
  auto stub = std::make_shared<StubProcessor>(/*latency=*/3);
  auto sink = std::make_unique<StuckSink>();
  StuckSink* stuck = sink.get();
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, false), stub, std::move(sink), quiet());
  ASSERT_TRUE(rt.lossless());
  bool filled = false;
  std::thread stopper([&] {
    // 21 read: at least one frame waits in the sink's queue (the stages and queues before it hold 20 at most).
    filled = wait_until([&] { return stuck->writes.load() > 0 && rt.stats().captured() >= 21; });
    rt.request_stop("test");
  });
  rt.run();
  stopper.join();
  ASSERT_TRUE(filled);
  const auto s = rt.summary();
  std::cout << "  in " << s["frames_in"] << " discarded " << s["discarded_at_stop"] << " " << s["discarded_by_queue"]
            << " in flight " << s["in_flight_at_stop"] << "\n";
  EXPECT_EQ(count(s, "frames_out"), 0);
  EXPECT_GE(count(s, "discarded_at_stop"), 1);
  EXPECT_GE(count(s, "in_flight_at_stop"), 4) << "the processor's 3 and the frame the sink was writing";
  expect_every_frame_counted(s);
}

TEST(StreamStop, SynchronousStopCountsTheProcessorsFrames) {
  // One thread: the stop comes while the first output is being written (input frame 3 with 3 frames of delay), so
  // the frames 1-3 inside the processor and frame 0 in the sink are lost.
  auto stub = std::make_shared<StubProcessor>(3);
  auto sink = std::make_unique<StuckSink>();
  StuckSink* stuck = sink.get();
  StreamOptions o = quiet();
  o.synchronous = true;
  StreamRuntime rt(std::make_unique<SyntheticSource>(-1, false), stub, std::move(sink), o);
  bool stuck_once = false;
  std::thread stopper([&] {
    stuck_once = wait_until([&] { return stuck->writes.load() > 0; });
    rt.request_stop("test");
  });
  rt.run();
  stopper.join();
  ASSERT_TRUE(stuck_once);
  const auto s = rt.summary();
  EXPECT_EQ(count(s, "frames_in"), 4);
  EXPECT_EQ(count(s, "frames_out"), 0);
  EXPECT_EQ(count(s, "discarded_at_stop"), 0);
  EXPECT_EQ(count(s, "in_flight_at_stop"), 4);
  expect_every_frame_counted(s);
}

TEST(StreamStop, LiveStopAndModelErrorKeepTheCount) {
  {
    // Live: drops and a stop together.
    auto stub = std::make_shared<StubProcessor>(2, 64, 64);
    stub->delay = 5ms;
    std::atomic<int> outputs{0};
    StreamOptions o = quiet();
    o.on_output = [&](const Frame&) { ++outputs; };
    StreamRuntime rt(std::make_unique<SyntheticSource>(-1, true, 64, 64, 1000), stub, std::make_unique<MemorySink>(),
                     o);
    bool ran = false;
    std::thread stopper([&] {
      ran = wait_until([&] { return outputs.load() >= 5; });
      rt.request_stop("test");
    });
    rt.run();
    stopper.join();
    ASSERT_TRUE(ran);
    const auto s = rt.summary();
    EXPECT_GE(count(s, "in_flight_at_stop"), 2) << "the processor's delay line";
    expect_every_frame_counted(s);
  }
  for (bool synchronous : {false, true}) {
    SCOPED_TRACE(synchronous ? "synchronous" : "threads");
    // A model error: the frame it failed on and the ones behind it are counted too.
    auto stub = std::make_shared<StubProcessor>(2);
    stub->throw_at = 10;
    auto sink = std::make_unique<MemorySink>();
    sink->delay = 2ms;
    StreamOptions o = quiet();
    o.synchronous = synchronous;
    StreamRuntime rt(std::make_unique<SyntheticSource>(-1, false), stub, std::move(sink), o);
    EXPECT_EQ(error_of<Error>([&] { rt.run(); }), "model: stub model failure at frame 10");
    const auto s = rt.summary();
    EXPECT_GE(count(s, "in_flight_at_stop"), 3) << "frames 8, 9 in the processor and 10";
    expect_every_frame_counted(s);
  }
}

TEST(StreamStop, TheCountsAreZeroWhenTheInputEnds) {
  auto stub = std::make_shared<StubProcessor>(3);
  StreamRuntime rt(std::make_unique<SyntheticSource>(30, false), stub, std::make_unique<MemorySink>(), quiet());
  rt.run();
  const auto s = rt.summary();
  EXPECT_EQ(count(s, "frames_out"), 30);
  EXPECT_EQ(count(s, "discarded_at_stop"), 0);
  EXPECT_EQ(count(s, "in_flight_at_stop"), 0);
}

TEST(StreamStop, ScheduledQuitStopsTheStreamBeforeItsFrame) {
  for (bool synchronous : {false, true}) {
    SCOPED_TRACE(synchronous ? "synchronous" : "threads");
    auto stub = std::make_shared<StubProcessor>(2);
    StreamOptions o = quiet();
    o.synchronous = synchronous;
    o.scheduled.push_back({3, *parse_control_command("guidance 2")});
    o.scheduled.push_back({6, *parse_control_command("quit")});
    o.scheduled.push_back({6, *parse_control_command("guidance 3")});  // after the quit: never applied
    StreamRuntime rt(std::make_unique<SyntheticSource>(200, false), stub, std::make_unique<MemorySink>(), o);
    rt.run();  // a stop, not an error
    const auto s = rt.summary();
    EXPECT_EQ(s["stop_reason"], "quit command (--at)");
    EXPECT_EQ(stub->processed(), (std::vector<int64_t>{0, 1, 2, 3, 4, 5})) << "frame 6 is not processed";
    EXPECT_DOUBLE_EQ(stub->guidance, 2.0);
    const auto c = s["control_counts"];
    EXPECT_EQ(count(c, "scheduled"), 3);
    EXPECT_EQ(count(c, "answered"), 1) << "the quit";
    EXPECT_EQ(count(c, "applied"), 1);
    EXPECT_EQ(count(c, "refused"), 0);
    EXPECT_EQ(count(c, "pending"), 1) << "guidance 3";
    expect_every_frame_counted(s);
    if (synchronous) {
      EXPECT_EQ(count(s, "frames_in"), 7);
      EXPECT_EQ(count(s, "frames_out"), 4);
      EXPECT_EQ(count(s, "in_flight_at_stop"), 3) << "frames 4 and 5 in the processor, frame 6 before it";
    }
  }
}

// Returns what the stub held as the outputs of a command that restarts the pipeline (a t_index_list change of length
// in StreamDiffusionProcessor), or fails while making them, as a model error would.
class FlushingStub : public StubProcessor {
 public:
  using StubProcessor::StubProcessor;
  bool fail_flush = false;
  std::vector<Frame> apply(const ControlCommand& c) override {
    if (c.kind != ControlCommand::Kind::TIndexList) return StubProcessor::apply(c);
    if (fail_flush) throw Error("stub: the model failed while flushing");
    StubProcessor::apply(c);
    return flush();
  }
};

struct Replies {
  std::mutex mutex;
  std::vector<std::string> lines;
  StreamRuntime::Reply reply() {
    return [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(mutex);
      lines.push_back(line);
    };
  }
};

TEST(StreamStop, ASinkErrorAfterAnAppliedCommandIsTheSinksNotARefusal) {
  // Synchronous, so the command's outputs go to the sink inside the model stage: the sink fails on the second of them.
  auto stub = std::make_shared<FlushingStub>(2);
  auto sink = std::make_unique<MemorySink>();
  sink->fail_at = 2;
  Replies replies;
  StreamOptions o = quiet();
  o.synchronous = true;
  StreamRuntime* runtime = nullptr;
  o.on_output = [&](const Frame& f) {
    if (f.index == 0) runtime->post_control(*parse_control_command("t_index_list 10,20"), replies.reply());
  };
  StreamRuntime rt(std::make_unique<SyntheticSource>(20, false), stub, std::move(sink), o);
  runtime = &rt;
  EXPECT_EQ(error_of<Error>([&] { rt.run(); }), "sink: memory sink: disk full (simulated)");
  EXPECT_EQ(replies.lines, (std::vector<std::string>{"ok: 't_index_list 10,20' applied before frame 3"}));
  const auto s = rt.summary();
  const auto c = s["control_counts"];
  EXPECT_EQ(count(c, "applied"), 1);
  EXPECT_EQ(count(c, "refused"), 0);
  EXPECT_EQ(count(s, "frames_out"), 2);
  expect_every_frame_counted(s);
}

TEST(StreamStop, AFailureInsideApplyIsAModelErrorAndARefusalIsAnsweredOnce) {
  {
    auto stub = std::make_shared<FlushingStub>(2);
    stub->fail_flush = true;
    StreamOptions o = quiet();
    o.scheduled.push_back({5, *parse_control_command("t_index_list 10,20")});
    StreamRuntime rt(std::make_unique<SyntheticSource>(50, false), stub, std::make_unique<MemorySink>(), o);
    EXPECT_EQ(error_of<Error>([&] { rt.run(); }), "model: stub: the model failed while flushing");
    const auto s = rt.summary();
    const auto c = s["control_counts"];
    EXPECT_EQ(count(c, "refused"), 0);
    EXPECT_EQ(count(c, "pending"), 1) << "not applied, not refused";
    EXPECT_EQ(s["stop_reason"], "error");
    expect_every_frame_counted(s);
  }
  {
    auto stub = std::make_shared<StubProcessor>(2);
    Replies replies;
    StreamRuntime rt(std::make_unique<SyntheticSource>(10, false), stub, std::make_unique<MemorySink>(), quiet());
    rt.post_control(*parse_control_command("guidance 500"), replies.reply());
    rt.run();
    EXPECT_EQ(replies.lines, (std::vector<std::string>{"error: stub: guidance too large"}));
    const auto s = rt.summary();
    EXPECT_EQ(count(s["control_counts"], "refused"), 1);
    EXPECT_EQ(count(s["control_counts"], "applied"), 0);
    EXPECT_EQ(count(s, "frames_out"), 10) << "a refusal does not stop the stream";
  }
}

TEST(StreamOptionsCheck, StatusIntervalAndInputFpsMustBeFiniteAndInRange) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  auto runtime_error = [](double interval) {
    StreamOptions o;
    o.status_interval_s = interval;
    return error_of<InvalidArgument>([&] {
      StreamRuntime(std::make_unique<SyntheticSource>(1, false), std::make_shared<StubProcessor>(0),
                    std::make_unique<MemorySink>(), o);
    });
  };
  for (double bad : {-1.0, nan, inf, 1e10, 1e300}) {
    SCOPED_TRACE(bad);
    const std::string e = runtime_error(bad);
    EXPECT_NE(e.find("--status-interval"), std::string::npos) << e;
    EXPECT_NE(e.find("expected 0 (no status lines) or seconds up to"), std::string::npos) << e;
  }
  EXPECT_EQ(runtime_error(nan), "--status-interval nan: expected 0 (no status lines) or seconds up to 3.1536e+07 (a "
                                "year)");
  for (double good : {0.0, 0.25, kMaxStatusIntervalS}) EXPECT_EQ(runtime_error(good), "") << good;

  for (double bad : {-1.0, nan, inf, 1e-11, 1e-300}) {
    SCOPED_TRACE(bad);
    SourceOptions so;
    so.fps = bad;
    const std::string e = error_of<InvalidArgument>([&] { open_source("none", so); });
    EXPECT_NE(e.find("--input-fps"), std::string::npos) << e;
    EXPECT_THROW(FramePacer{bad}, InvalidArgument);
  }
  SourceOptions so;
  so.fps = 1e-11;
  EXPECT_EQ(error_of<InvalidArgument>([&] { open_source("none", so); }),
            "--input-fps 1e-11: expected 0 (the default) or a finite rate of at least 1e-06 frames per second");
  for (double good : {0.0, kMinFps, 30.0, 1e12}) {
    so.fps = good;
    EXPECT_NO_THROW(open_source("none", so)) << good;
  }
}

}  // namespace
}  // namespace sd
