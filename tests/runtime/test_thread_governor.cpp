// The model thread's adaptive team size (runtime/thread_governor.h): cut to one thread when the model thread waits
// for a CPU a large share of its frame time, back to the full team once that clears for the hold time, the hold
// doubled when the full team is cut again soon after it came back; the run-queue wait is read from the kernel; and in
// a running stream the model thread's OpenMP team really shrinks while other threads hog the cores.
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include "common/error_of.h"
#include "core/error.h"
#include "runtime/runtime_test_util.h"
#include "runtime/stream_runtime.h"
#include "runtime/thread_governor.h"

namespace sd {
namespace {

ThreadGovernor::Options two_threads() {
  ThreadGovernor::Options o;
  o.max_threads = 2;
  return o;
}

// Feeds `n` frames of 20 ms with the given wait share, 20 ms apart from `t`; returns the last team size.
int feed(ThreadGovernor& g, int n, double share, double& t) {
  int threads = g.threads();
  for (int i = 0; i < n; ++i) {
    t += 0.02;
    threads = g.update(0.02, 0.02 * share, t);
  }
  return threads;
}

TEST(ThreadGovernor, OneThreadAskedForHasNothingToGovern) {
  ThreadGovernor::Options o;
  o.max_threads = 1;
  ThreadGovernor g(o);
  EXPECT_FALSE(g.active());
  double t = 0;
  EXPECT_EQ(feed(g, 50, 0.9, t), 1);
  EXPECT_EQ(g.reductions(), 0);
}

TEST(ThreadGovernor, CutsToOneThreadAfterMinFramesOfContention) {
  ThreadGovernor g(two_threads());
  double t = 0;
  EXPECT_EQ(feed(g, 2, 0.5, t), 2);  // not judged before min_frames
  EXPECT_EQ(feed(g, 1, 0.5, t), 1);
  EXPECT_EQ(g.reductions(), 1);
  EXPECT_NEAR(g.wait_share(), 0.5, 1e-9);
}

TEST(ThreadGovernor, ModerateWaitOrUnknownWaitKeepsTheTeam) {
  ThreadGovernor g(two_threads());
  double t = 0;
  EXPECT_EQ(feed(g, 200, 0.1, t), 2);  // between leave and enter: no change
  for (int i = 0; i < 20; ++i) EXPECT_EQ(g.update(0.02, -1, t += 0.02), 2);  // no schedstat: no evidence
  EXPECT_EQ(g.reductions(), 0);
  // One very slow frame among quiet ones is smoothed, not acted on.
  ThreadGovernor h(two_threads());
  t = 0;
  feed(h, 10, 0.0, t);
  EXPECT_EQ(h.update(0.02, 0.02 * 0.6, t += 0.02), 2);
  EXPECT_EQ(feed(h, 10, 0.0, t), 2);
}

TEST(ThreadGovernor, StaysCutWhileContendedAndComesBackAfterTheHold) {
  ThreadGovernor g(two_threads());
  double t = 0;
  ASSERT_EQ(feed(g, 3, 0.5, t), 1);
  const double cut_at = t;
  EXPECT_EQ(feed(g, 500, 0.33, t), 1);  // one thread next to two hogs: still waiting a third of the time
  EXPECT_EQ(g.threads(), 1);
  ThreadGovernor h(two_threads());
  t = 0;
  ASSERT_EQ(feed(h, 3, 0.5, t), 1);
  // Cleared at once, but the full team waits for the hold (2 s = 100 frames of 20 ms).
  EXPECT_EQ(feed(h, 90, 0.0, t), 1);
  EXPECT_EQ(feed(h, 20, 0.0, t), 2);
  EXPECT_GE(t - 0.06, 2.0 - 1e-9);
  EXPECT_EQ(h.summary()["restores"].get<int64_t>(), 1);
  EXPECT_GT(h.summary()["frames_reduced"].get<int64_t>(), 90);
  (void)cut_at;
}

TEST(ThreadGovernor, ACompetitorThatLeavesOneCoreFreeDoublesTheHoldInsteadOfFlapping) {
  ThreadGovernor g(two_threads());
  double t = 0;
  ASSERT_EQ(feed(g, 3, 0.5, t), 1);
  EXPECT_DOUBLE_EQ(g.summary()["hold_s"].get<double>(), 2.0);
  double hold = 2.0;
  for (int round = 0; round < 8; ++round) {
    // One thread sees no wait (a core is free); the full team comes back after the hold and is cut again at once.
    const double cut = t;
    while (g.update(0.02, 0, t += 0.02) == 1) {
    }
    EXPECT_GE(t - cut, hold - 1e-9) << "round " << round;
    ASSERT_EQ(feed(g, 3, 0.4, t), 1);
    hold = std::min(2 * hold, 60.0);
    EXPECT_DOUBLE_EQ(g.summary()["hold_s"].get<double>(), hold) << "round " << round;
  }
  // A cut long after the last restore starts over at the minimum hold.
  while (g.update(0.02, 0, t += 0.02) == 1) {
  }
  feed(g, 10000, 0.0, t);  // 200 s at the full team, quiet
  ASSERT_EQ(feed(g, 3, 0.5, t), 1);
  EXPECT_DOUBLE_EQ(g.summary()["hold_s"].get<double>(), 2.0);
}

TEST(ThreadGovernor, TheFullTeamComesBackOnlyWhenTheCoresItNeedsAreFree) {
  ThreadGovernor::Options o = two_threads();
  o.cores = 2;
  ThreadGovernor g(o);
  double t = 0;
  for (int i = 0; i < 3; ++i) g.update(0.02, 0.01, t += 0.02, 3);  // two hogs and a team member runnable
  ASSERT_EQ(g.threads(), 1);
  // One thread has a core to itself (no wait), but the two hogs are still runnable: a second member has no core.
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(g.update(0.02, 0, t += 0.02, 2), 1) << "frame " << i;
  // The hogs leave: back to two threads once the smoothed count has come down (and the hold is long over).
  int frames = 0;
  while (g.update(0.02, 0, t += 0.02, 0) == 1) ASSERT_LT(++frames, 20);
  EXPECT_LE(g.summary()["other_runnable"].get<double>(), 0.5);
  EXPECT_EQ(g.summary()["restores"].get<int64_t>(), 1);
  // Unknown (no /proc/loadavg): the wait share alone decides, as before.
  ThreadGovernor h(o);
  t = 0;
  for (int i = 0; i < 3; ++i) h.update(0.02, 0.01, t += 0.02, -1);
  ASSERT_EQ(h.threads(), 1);
  int n = 0;
  while (h.update(0.02, 0, t += 0.02, -1) == 1) ASSERT_LT(++n, 200);
}

TEST(ThreadGovernor, BadOptionsAreRefusedWithTheirNames) {
  ThreadGovernor::Options o = two_threads();
  o.leave = 0.3;
  o.enter = 0.2;
  EXPECT_NE(test::error_of([&] { ThreadGovernor g(o); }).find("leave < enter"), std::string::npos);
  o = two_threads();
  o.smoothing = 0;
  EXPECT_NE(test::error_of([&] { ThreadGovernor g(o); }).find("smoothing"), std::string::npos);
}

// Busy threads that keep every core taken (plus two) while they live.
struct Hogs {
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  explicit Hogs(int n) {
    for (int i = 0; i < n; ++i)
      threads.emplace_back([this] {
        volatile uint64_t x = 0;
        while (!stop.load(std::memory_order_relaxed)) x = x + 1;
      });
  }
  ~Hogs() {
    stop = true;
    for (auto& t : threads) t.join();
  }
};
int hog_count() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) + 2; }

void spin_for(std::chrono::milliseconds d) {
  const auto end = std::chrono::steady_clock::now() + d;
  volatile uint64_t x = 0;
  while (std::chrono::steady_clock::now() < end) x = x + 1;
}

TEST(RunQueueWait, OtherRunnableThreadsCountTheHogs) {
  if (other_runnable_threads() < 0) GTEST_SKIP() << "no /proc/loadavg";
  Hogs hogs(hog_count());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  // This thread is not counted; the hogs are (other processes' threads may add to them).
  double most = 0;
  for (int i = 0; i < 20; ++i) most = std::max(most, other_runnable_threads());
  EXPECT_GE(most, hog_count() - 0.5);
}

TEST(RunQueueWait, GrowsWhenEveryCoreIsTaken) {
  const double w0 = thread_runqueue_wait_s();
  if (w0 < 0) GTEST_SKIP() << "this kernel does not report /proc/thread-self/schedstat";
  double hogged;
  {
    Hogs hogs(hog_count());
    const double a = thread_runqueue_wait_s();
    spin_for(std::chrono::milliseconds(400));
    hogged = thread_runqueue_wait_s() - a;
  }
  // More runnable threads than cores: this one waits a good part of the 400 ms (about (n - cores) / n of it).
  EXPECT_GT(hogged, 0.04) << "run-queue wait while every core was taken: " << hogged << " s";
}

// A processor that computes (busy) for `ms` per frame and records the team size its thread would use.
class BusyProcessor : public test::StubProcessor {
 public:
  BusyProcessor() : StubProcessor(0) {}
  int ms = 8;
  std::vector<int> team;
  std::vector<Frame> process(Frame in) override {
    spin_for(std::chrono::milliseconds(ms));
    team.push_back(at::get_num_threads());
    return StubProcessor::process(std::move(in));
  }
};

nlohmann::json run_busy_stream(bool adaptive, int frames, std::vector<int>& team) {
  auto processor = std::make_shared<BusyProcessor>();
  StreamOptions o;
  o.mode = StreamMode::Lossless;
  o.status_interval_s = 0;
  o.max_frames = frames;
  o.watchdog_factor = 0;
  o.adaptive_threads = adaptive;
  StreamRuntime rt(std::make_unique<test::SyntheticSource>(frames, false, 8, 8), processor,
                   std::make_unique<test::MemorySink>(), o);
  rt.run();
  team = processor->team;
  return rt.summary();
}

TEST(ThreadGovernorStream, TheModelThreadsTeamShrinksWhileTheCoresAreHogged) {
  if (thread_runqueue_wait_s() < 0) GTEST_SKIP() << "no /proc/thread-self/schedstat";
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  std::vector<int> team;
  nlohmann::json s;
  {
    Hogs hogs(hog_count());
    s = run_busy_stream(true, 40, team);
  }
  const auto& g = s["thread_governor"];
  ASSERT_TRUE(g.is_object()) << s.dump();
  EXPECT_TRUE(g["active"].get<bool>());
  EXPECT_EQ(g["max_threads"].get<int>(), 2);
  EXPECT_GE(g["reductions"].get<int64_t>(), 1) << g.dump();
  ASSERT_EQ(team.size(), 40u);
  EXPECT_EQ(team.front(), 2);
  EXPECT_EQ(team.back(), 1) << "the processor's thread still used a team of " << team.back();
  // --fixed-threads: the same load leaves the team alone.
  {
    Hogs hogs(hog_count());
    s = run_busy_stream(false, 20, team);
  }
  EXPECT_FALSE(s["thread_governor"]["active"].get<bool>());
  for (int n : team) EXPECT_EQ(n, 2);
  at::set_num_threads(before);
}

}  // namespace
}  // namespace sd
