#include "apps/cli/bench_profile.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>

#include <torch/csrc/autograd/profiler_legacy.h>

#include "core/error.h"

#if SD_WITH_CUDA
#include <torch/csrc/autograd/profiler_kineto.h>
#endif

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

DeviceSummary summarize_device_events(const std::vector<DeviceEvent>& events) {
  DeviceSummary s;
  s.events = static_cast<int64_t>(events.size());
  if (events.empty()) return s;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  std::map<std::string, OpTime> by_name;
  for (const auto& e : events) {
    const uint64_t end = std::max(e.start_ns, e.end_ns);
    spans.emplace_back(e.start_ns, end);
    const double us = static_cast<double>(end - e.start_ns) * 1e-3;
    s.sum_us += us;
    size_t b = 0;
    while (b < DeviceSummary::kEdgesUs.size() && us >= DeviceSummary::kEdgesUs[b]) ++b;
    ++s.bucket_events[b];
    s.bucket_us[b] += us;
    OpTime& t = by_name[e.name];
    t.name = e.name;
    ++t.calls;
    t.self_cuda_us += us;
    t.max_self_us = std::max(t.max_self_us, us);
  }
  std::sort(spans.begin(), spans.end());
  uint64_t cur_start = spans.front().first, cur_end = spans.front().second, last_end = cur_end;
  double busy_ns = 0;
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first > cur_end) {
      busy_ns += static_cast<double>(cur_end - cur_start);
      cur_start = spans[i].first;
    }
    cur_end = std::max(cur_end, spans[i].second);
    last_end = std::max(last_end, spans[i].second);
  }
  busy_ns += static_cast<double>(cur_end - cur_start);
  s.busy_us = busy_ns * 1e-3;
  s.span_us = static_cast<double>(last_end - spans.front().first) * 1e-3;
  for (auto& [name, t] : by_name) s.by_name.push_back(std::move(t));
  std::sort(s.by_name.begin(), s.by_name.end(), [](const OpTime& a, const OpTime& b) {
    return a.self_cuda_us != b.self_cuda_us ? a.self_cuda_us > b.self_cuda_us : a.name < b.name;
  });
  return s;
}

bool device_events_available() {
#if SD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<DeviceEvent> profile_device_events(const std::function<void()>& work, const std::string& trace_path) {
#if SD_WITH_CUDA
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  using torch::profiler::impl::ProfilerConfig;
  using torch::profiler::impl::ProfilerState;
  // As PyTorch's Python profiler does where CUDA graphs are used: CUPTI torn down and set up again between sessions
  // has crashed graph replays (pytorch#112507) before CUDA 12.6. Set only where the user has not.
  setenv("TEARDOWN_CUPTI", "0", /*overwrite=*/0);
  const ProfilerConfig config(ProfilerState::KINETO);
  // The host's operators only for the Chrome trace (where the host leaves the GPU idle); the summary reads the GPU's.
  std::set<ActivityType> activities{ActivityType::CUDA};
  if (!trace_path.empty()) activities.insert(ActivityType::CPU);
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  std::unique_ptr<prof::ProfilerResult> result;
  try {
    work();
  } catch (...) {
    prof::disableProfiler();
    throw;
  }
  result = prof::disableProfiler();
  if (!trace_path.empty()) {
    const std::filesystem::path parent = std::filesystem::path(trace_path).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent);
    result->save(trace_path);
    if (!std::filesystem::exists(trace_path)) throw Error("could not write the kernel trace " + trace_path);
  }
  // libkineto::ActivityType: GPU_MEMCPY 3, GPU_MEMSET 4, CONCURRENT_KERNEL 5 (GPU_USER_ANNOTATION, 2, spans kernels
  // already counted).
  std::vector<DeviceEvent> out;
  for (const auto& e : result->events()) {
    const uint8_t kind = e.activityType();
    if (e.deviceType() != c10::DeviceType::CUDA || kind < 3 || kind > 5) continue;
    out.push_back({e.name(), e.startNs(), e.endNs()});
  }
  // Work on the GPU and no event: CUPTI recorded nothing (not loadable, or held by another tool such as nsys).
  if (out.empty()) throw Error("Kineto returned no GPU events (CUPTI inactive, or in use by another profiler?)");
  return out;
#else
  (void)work;
  (void)trace_path;
  throw Error("the device event profile needs a CUDA build (libtorch 2 with Kineto)");
#endif
}

}  // namespace sd::bench
