// The bench's kernel-trace summary (apps/cli/bench_profile.h, `bench --profile-kernels`): busy time as the union of
// the device events' intervals, the length buckets, the per-kernel table; and, off CUDA builds, the clear refusal.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "apps/cli/bench_profile.h"
#include "common/fixtures.h"
#include "core/cuda_graph.h"
#include "core/error.h"

namespace sd::bench {
namespace {

TEST(BenchKernelSummary, BusyTimeIsTheUnionOfTheEventsIntervals) {
  // Lengths in us: 2 and 3 (overlapping 1 us: together 4), a 10 us copy after a 6 us gap, a 50 us and a 150 us kernel
  // (the 150 us one on another stream, overlapping the 50 us one by 30 us).
  const std::vector<DeviceEvent> events{
      {"gemm", 1000, 3000},        {"add", 2000, 5000},          {"Memcpy DtoD", 11000, 21000},
      {"conv", 100000, 150000},    {"gemm", 120000, 270000},
  };
  const DeviceSummary s = summarize_device_events(events);
  EXPECT_EQ(s.events, 5);
  EXPECT_DOUBLE_EQ(s.sum_us, 2 + 3 + 10 + 50 + 150);
  EXPECT_DOUBLE_EQ(s.busy_us, 4 + 10 + 170);
  EXPECT_DOUBLE_EQ(s.span_us, 269);
  // < 5 us: 2 and 3; 5-20: 10; 20-100: 50; >= 100: 150.
  EXPECT_EQ(s.bucket_events, (std::array<int64_t, 4>{2, 1, 1, 1}));
  EXPECT_DOUBLE_EQ(s.bucket_us[0], 5);
  EXPECT_DOUBLE_EQ(s.bucket_us[3], 150);
  ASSERT_EQ(s.by_name.size(), 4u);
  EXPECT_EQ(s.by_name[0].name, "gemm");
  EXPECT_EQ(s.by_name[0].calls, 2);
  EXPECT_DOUBLE_EQ(s.by_name[0].self_cuda_us, 152);
  EXPECT_DOUBLE_EQ(s.by_name[0].max_self_us, 150);
  EXPECT_EQ(s.by_name[1].name, "conv");
  EXPECT_EQ(s.by_name.back().name, "add");
}

TEST(BenchKernelSummary, EdgesAndEmptyTraces) {
  const DeviceSummary empty = summarize_device_events({});
  EXPECT_EQ(empty.events, 0);
  EXPECT_EQ(empty.busy_us, 0);
  EXPECT_TRUE(empty.by_name.empty());
  // A bucket's lower edge belongs to it: exactly 5 us is "5-20", exactly 100 us ">= 100"; a zero-length event counts.
  const DeviceSummary s = summarize_device_events({{"a", 0, 5000}, {"b", 10000, 110000}, {"c", 200000, 200000}});
  EXPECT_EQ(s.bucket_events, (std::array<int64_t, 4>{1, 1, 0, 1}));
  EXPECT_DOUBLE_EQ(s.busy_us, 105);
  // Nested events (a kernel inside a longer one's interval) are busy once.
  const DeviceSummary nested = summarize_device_events({{"outer", 0, 100000}, {"inner", 10000, 20000}});
  EXPECT_DOUBLE_EQ(nested.busy_us, 100);
  EXPECT_DOUBLE_EQ(nested.sum_us, 110);
}

// On a GPU (test_device, SD_TEST_DEVICE=cuda): Kineto sees the kernels of eager work and of a replayed CUDA graph.
TEST(BenchKernelSummary, TracesTheGpusKernelsAlsoInsideAReplayedGraph) {
  const c10::Device device = test::test_device();
  if (!device_events_available() || !device.is_cuda()) GTEST_SKIP() << "needs a CUDA build and SD_TEST_DEVICE=cuda";
  const torch::Tensor a = torch::randn({512, 512}, torch::TensorOptions().device(device));
  GraphCache graphs;
  const auto fn = [](const std::vector<torch::Tensor>& in) {
    return std::vector<torch::Tensor>{torch::mm(in[0], in[0]).relu()};
  };
  for (int i = 0; i < 3; ++i) graphs.run("mm", {a}, fn);  // eager, then recorded
  ASSERT_GT(graphs.counts().captures, 0);
  const int64_t replays = graphs.counts().replays;
  const auto events = profile_device_events([&] {
    for (int i = 0; i < 4; ++i) graphs.run("mm", {a}, fn);
    torch::mm(a, a).sum().item<float>();
  });
  EXPECT_EQ(graphs.counts().replays, replays + 4);
  const DeviceSummary s = summarize_device_events(events);
  EXPECT_GE(s.events, 4 * 2 + 2) << "4 replays of a matmul and a relu, then an eager matmul and sum";
  EXPECT_GT(s.busy_us, 0);
  EXPECT_LE(s.busy_us, s.span_us + 1e-9);
  EXPECT_LE(s.busy_us, s.sum_us + 1e-9);
  for (const auto& e : events) EXPECT_FALSE(e.name.empty());
}

TEST(BenchKernelSummary, TheTraceNeedsACudaBuild) {
  if (device_events_available()) GTEST_SKIP() << "a CUDA build: the trace runs (scripts/gpu-check.sh shows it)";
  try {
    profile_device_events([] {});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("needs a CUDA build"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace sd::bench
