#pragma once
// Operator times of a piece of work, through libtorch's profiler (`bench --sections profile`).
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

}  // namespace sd::bench
