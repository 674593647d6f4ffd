// The stream watchdog (runtime/stage_watchdog.h): slow frames are logged with their stage, while they last and when
// they end, counted once; nothing is judged before the median is known; the longest output gap is measured.
#include <chrono>
#include <cmath>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "core/error.h"
#include "runtime/runtime_test_util.h"
#include "runtime/stage_watchdog.h"
#include "runtime/stream_runtime.h"

namespace sd {
namespace {

using namespace std::chrono_literals;

struct Lines {
  std::mutex m;
  std::vector<std::string> v;
  std::function<void(const std::string&)> sink() {
    return [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(m);
      v.push_back(line);
    };
  }
  std::vector<std::string> get() {
    std::lock_guard<std::mutex> lock(m);
    return v;
  }
};

StageWatchdog::Options opts(Lines& lines, double factor = 10, double min_ms = 50) {
  StageWatchdog::Options o;
  o.factor = factor;
  o.min_ms = min_ms;
  o.log = lines.sink();
  return o;
}

void frames(StageWatchdog& w, int stage, int64_t first, int n, std::chrono::milliseconds each) {
  for (int i = 0; i < n; ++i) {
    w.begin(stage, first + i);
    std::this_thread::sleep_for(each);
    w.end(stage);
  }
}

TEST(StageWatchdog, LogsASlowFrameWithItsStageAndCountsIt) {
  Lines lines;
  StageWatchdog w(opts(lines));
  frames(w, StageWatchdog::Model, 0, 20, 1ms);
  EXPECT_EQ(w.slow_frames(), 0);
  frames(w, StageWatchdog::Model, 20, 1, 400ms);  // > max(10 x ~1 ms, 50 ms), whatever the scheduler adds to 1 ms
  frames(w, StageWatchdog::Model, 21, 5, 1ms);
  ASSERT_EQ(w.slow_frames(), 1);
  const auto v = lines.get();
  ASSERT_EQ(v.size(), 1u);
  EXPECT_NE(v[0].find("frame 20 took"), std::string::npos) << v[0];
  EXPECT_NE(v[0].find("stage 'model'"), std::string::npos) << v[0];
  const auto j = w.summary();
  EXPECT_EQ(j["stages"]["model"]["frames"], 26);
  EXPECT_EQ(j["stages"]["model"]["slow"], 1);
  EXPECT_GE(j["stages"]["model"]["max_ms"].get<double>(), 400.0);
  EXPECT_LT(j["stages"]["model"]["median_ms"].get<double>(), 40.0);
  ASSERT_EQ(j["events"].size(), 1u);
  EXPECT_EQ(j["events"][0]["frame"], 20);
  EXPECT_EQ(j["events"][0]["stage"], "model");
}

TEST(StageWatchdog, JudgesNothingBeforeTheMedianIsKnown) {
  Lines lines;
  StageWatchdog w(opts(lines));
  // The first frames are slow by nature (lazy initialisation): not a stall.
  frames(w, StageWatchdog::Preprocess, 0, 1, 200ms);
  frames(w, StageWatchdog::Preprocess, 1, 10, 1ms);
  EXPECT_EQ(w.slow_frames(), 0);
  EXPECT_TRUE(lines.get().empty());
  EXPECT_TRUE(std::isinf(w.slow_bound_ms(StageWatchdog::Preprocess)));
}

TEST(StageWatchdog, TheMinimumKeepsFastStagesQuiet) {
  Lines lines;
  StageWatchdog w(opts(lines, 10, 100));
  frames(w, StageWatchdog::Sink, 0, 20, 0ms);
  frames(w, StageWatchdog::Sink, 20, 1, 20ms);  // 10x a ~0 ms median, but under 100 ms
  EXPECT_EQ(w.slow_frames(), 0);
  EXPECT_DOUBLE_EQ(w.slow_bound_ms(StageWatchdog::Sink), 100.0);
}

TEST(StageWatchdog, PollReportsAStageStillStuckOnceThenItsEnd) {
  Lines lines;
  StageWatchdog w(opts(lines));
  frames(w, StageWatchdog::Model, 0, 20, 1ms);
  w.begin(StageWatchdog::Model, 20);
  w.poll(StreamClock::now());  // not yet past the bound
  EXPECT_TRUE(lines.get().empty());
  std::this_thread::sleep_for(300ms);
  w.poll(StreamClock::now());
  w.poll(StreamClock::now());  // once per frame
  auto v = lines.get();
  ASSERT_EQ(v.size(), 1u);
  EXPECT_NE(v[0].find("frame 20 has been"), std::string::npos) << v[0];
  EXPECT_NE(v[0].find("is still there"), std::string::npos) << v[0];
  EXPECT_NE(v[0].find("'model'"), std::string::npos) << v[0];
  w.end(StageWatchdog::Model);
  v = lines.get();
  ASSERT_EQ(v.size(), 2u);
  EXPECT_NE(v[1].find("frame 20 took"), std::string::npos) << v[1];
  EXPECT_EQ(w.slow_frames(), 1) << "a frame reported while running and at its end counts once";
}

TEST(StageWatchdog, AnAbandonedFrameIsNeitherCountedNorReported) {
  Lines lines;
  StageWatchdog w(opts(lines));
  frames(w, StageWatchdog::Capture, 0, 20, 1ms);
  {
    StageWatchdog::Timer t(w, StageWatchdog::Capture, 20);  // the source ended: no finish()
  }
  std::this_thread::sleep_for(120ms);
  w.poll(StreamClock::now());
  EXPECT_TRUE(lines.get().empty());
  EXPECT_EQ(w.summary()["stages"]["capture"]["frames"], 20);
}

TEST(StageWatchdog, LongestGapBetweenOutputs) {
  Lines lines;
  StageWatchdog w(opts(lines));
  const auto t0 = StreamClock::now();
  w.on_output(t0);
  w.on_output(t0 + 5ms);
  w.on_output(t0 + 2505ms);
  w.on_output(t0 + 2510ms);
  EXPECT_DOUBLE_EQ(w.max_output_gap_ms(), 2500.0);
}

TEST(StageWatchdog, BadOptionsNameTheField) {
  StreamOptions o;
  o.watchdog_factor = 0.5;
  try {
    StreamRuntime rt(open_source("none"), std::make_shared<test::StubProcessor>(0, 0, 0, false),
                     std::make_unique<test::MemorySink>(), o);
    FAIL() << "a factor below 1 was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("watchdog factor"), std::string::npos) << e.what();
  }
}

// End to end: a model call that stalls is logged by the runtime with its stage and frame while it lasts, the other
// stages stay quiet, the summary carries the counts and the gap.
TEST(StageWatchdog, TheRuntimeNamesTheStageOfAStall) {
  for (bool synchronous : {false, true}) {
    SCOPED_TRACE(synchronous ? "synchronous" : "threads");
    Lines lines;
    auto stub = std::make_shared<test::StubProcessor>(1, 0, 0, /*images=*/false);
    stub->delay = 2ms;
    stub->slow_at = 40;
    stub->slow_delay = 500ms;
    StreamOptions o;
    o.status_interval_s = 0;
    o.max_frames = 60;
    o.synchronous = synchronous;
    o.watchdog_min_ms = 100;
    o.watchdog_log = lines.sink();
    StreamRuntime rt(open_source("none"), stub, std::make_unique<test::MemorySink>(), o);
    rt.run();
    const auto v = lines.get();
    const auto j = rt.summary()["watchdog"];
    bool took = false, still = false;
    for (const auto& l : v) {
      if (l.find("frame 40 ") == std::string::npos) continue;  // (a loaded machine may delay another stage too)
      EXPECT_NE(l.find("stage 'model'"), std::string::npos) << "the stall is in the model stage: " << l;
      if (l.find("frame 40 took") != std::string::npos) took = true;
      if (l.find("frame 40 has been") != std::string::npos) still = true;
    }
    EXPECT_TRUE(took);
    // The monitor polls only when stages run on their own threads.
    if (!synchronous) {
      EXPECT_TRUE(still) << "the stall is reported while it lasts";
    }
    EXPECT_EQ(j["stages"]["model"]["frames"], 60);
    EXPECT_GE(j["slow_frames"].get<int64_t>(), 1);
    EXPECT_GE(j["max_output_gap_ms"].get<double>(), 450.0);
  }
}

}  // namespace
}  // namespace sd
