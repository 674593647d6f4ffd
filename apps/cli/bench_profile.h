#pragma once
// Operator times of a piece of work, through libtorch's profiler (`bench --sections profile`).
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace sd::bench {

struct OpTime {
  std::string name;           // "aten::mkldnn_convolution", ...; with shapes: "aten::mm [4096, 320] [320, 320]"
  int64_t calls = 0;
  double self_cpu_us = 0;     // host time inside the operator, its child operators' removed
  double self_cuda_us = 0;    // the same on the GPU (CUDA events around each operator); 0 off CUDA
  double max_self_us = 0;     // the longest single call's self time (GPU when profiled on CUDA): a preempted host
                              // thread shows up here, on whichever operator was running
};

// Runs `work` under the profiler and returns every operator's self time, summed by name over its calls, most first
// (by GPU time when `cuda`, else by host time). Self time: aten::conv2d -> aten::convolution -> ... ->
// aten::mkldnn_convolution puts the convolution's time on the last one, where the work is. Operators of every
// thread that ran one are counted (the profiler follows libtorch's own worker tasks). `by_shapes`: one entry per
// operator and input shapes (which convolution is slow), else per operator.
std::vector<OpTime> profile_ops(bool cuda, const std::function<void()>& work, bool by_shapes = false);

// A device-side event of a Kineto trace (a kernel, a copy or a memset) on the GPU's clock.
struct DeviceEvent {
  std::string name;
  uint64_t start_ns = 0, end_ns = 0;
};

// What the device events of a piece of work say: how busy the GPU was, and in how many events of which lengths. A GPU
// that is busy most of a frame in thousands of few-microsecond kernels is bound by their count (launch, ramp and
// tail of each), not by arithmetic: only fewer, fused kernels make such a frame faster.
struct DeviceSummary {
  static constexpr std::array<double, 3> kEdgesUs{5, 20, 100};  // buckets: < 5 us, 5-20, 20-100, >= 100
  int64_t events = 0;
  double busy_us = 0;  // the union of the events' intervals (concurrent events counted once)
  double sum_us = 0;   // the sum of their durations
  double span_us = 0;  // first start to last end
  std::array<int64_t, 4> bucket_events{};
  std::array<double, 4> bucket_us{};
  std::vector<OpTime> by_name;  // per event name: calls, total (self_cuda_us) and longest (max_self_us); most first
};
DeviceSummary summarize_device_events(const std::vector<DeviceEvent>& events);

// Whether profile_device_events runs in this build (CUDA builds: libtorch 2's Kineto with CUPTI).
bool device_events_available();
// Runs `work` under Kineto (CPU and CUDA activities) and returns the GPU's kernels, copies and memsets; a CUDA
// graph's replay shows its kernels one by one. A non-empty `trace_path` also gets the Chrome trace (chrome://tracing,
// Perfetto). Throws sd::Error where unavailable.
std::vector<DeviceEvent> profile_device_events(const std::function<void()>& work, const std::string& trace_path = "");

}  // namespace sd::bench
