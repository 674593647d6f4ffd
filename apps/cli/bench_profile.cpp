#include "apps/cli/bench_profile.h"

#include <algorithm>
#include <map>

#include <torch/csrc/autograd/profiler_legacy.h>

namespace sd::bench {

namespace {

std::string shapes_of(const torch::autograd::profiler::LegacyEvent& e) {
  std::string out;
  for (const auto& shape : e.shapes()) {
    out += out.empty() ? " [" : " [";
    for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
    out += "]";
  }
  return out;
}

}  // namespace

std::vector<OpTime> profile_ops(bool cuda, const std::function<void()>& work, bool by_shapes) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ProfilerConfig;
  using torch::profiler::impl::ProfilerState;
  prof::enableProfilerLegacy(ProfilerConfig(cuda ? ProfilerState::CUDA : ProfilerState::CPU, by_shapes));
  prof::thread_event_lists lists;
  try {
    work();
  } catch (...) {
    prof::disableProfilerLegacy();
    throw;
  }
  lists = prof::disableProfilerLegacy();

  // Each thread's events come in order: a push opens an operator, the pop closes the innermost open one.
  struct Open {
    const prof::LegacyEvent* push;
    double child_cpu = 0, child_cuda = 0;
  };
  std::map<std::string, OpTime> by_name;
  for (const auto& events : lists) {
    std::vector<Open> stack;
    for (const auto& e : events) {
      if (e.kind() == prof::EventKind::PushRange) {
        stack.push_back({&e});
      } else if (e.kind() == prof::EventKind::PopRange && !stack.empty()) {
        const Open open = stack.back();
        stack.pop_back();
        const double cpu = open.push->cpuElapsedUs(e);
        const double gpu = cuda && open.push->hasCuda() && e.hasCuda() ? open.push->cudaElapsedUs(e) : 0.0;
        const std::string name = open.push->name() + (by_shapes ? shapes_of(*open.push) : std::string());
        OpTime& t = by_name[name];
        t.name = name;
        ++t.calls;
        const double self_cpu = std::max(0.0, cpu - open.child_cpu), self_gpu = std::max(0.0, gpu - open.child_cuda);
        t.self_cpu_us += self_cpu;
        t.self_cuda_us += self_gpu;
        t.max_self_us = std::max(t.max_self_us, cuda ? self_gpu : self_cpu);
        if (!stack.empty()) {
          stack.back().child_cpu += cpu;
          stack.back().child_cuda += gpu;
        }
      }
    }
  }
  std::vector<OpTime> out;
  for (auto& [name, t] : by_name) out.push_back(std::move(t));
  std::sort(out.begin(), out.end(), [cuda](const OpTime& a, const OpTime& b) {
    const double x = cuda ? a.self_cuda_us : a.self_cpu_us, y = cuda ? b.self_cuda_us : b.self_cpu_us;
    return x != y ? x > y : a.name < b.name;
  });
  return out;
}

}  // namespace sd::bench
