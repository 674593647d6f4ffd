#include "core/cuda_graph.h"

#include <sstream>

#include <ATen/ATen.h>

#include "core/log.h"

#if SD_WITH_CUDA
// cuda.h first: it defines CUDA_VERSION, which changes at::cuda::CUDAGraph's members. Without it our view of the
// class would not match the library's (a different size for the object we allocate).
#include <cuda.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sd {

struct GraphCache::Entry {
  int seen = 0;          // calls with this key so far
  bool failed = false;   // capture failed: eager from now on
  uint64_t last_use = 0;
  std::vector<at::Tensor> static_inputs, static_outputs;
#if SD_WITH_CUDA
  std::unique_ptr<at::cuda::CUDAGraph> graph;
#endif
};

namespace {

std::string key_of(const std::string& name, const std::vector<at::Tensor>& inputs) {
  std::ostringstream o;
  o << name;
  for (const auto& t : inputs) {
    o << '|';
    if (!t.defined()) {
      o << 'u';
      continue;
    }
    o << t.device() << ',' << c10::toString(t.scalar_type()) << ',' << t.sizes();
  }
  return o.str();
}

bool all_cuda(const std::vector<at::Tensor>& inputs) {
  bool any = false;
  for (const auto& t : inputs) {
    if (!t.defined()) continue;
    if (!t.is_cuda()) return false;
    any = true;
  }
  return any;
}

}  // namespace

GraphCache::GraphCache(size_t max_graphs) : max_graphs_(max_graphs == 0 ? 1 : max_graphs) {}
GraphCache::~GraphCache() = default;

bool GraphCache::compiled() {
#if SD_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void GraphCache::set_enabled(bool on) {
  enabled_ = on;
  if (!on) clear();
}

void GraphCache::clear() {
  entries_.clear();
  counts_.graphs = 0;
}

GraphCache::Counts GraphCache::counts() const { return counts_; }

std::vector<at::Tensor> GraphCache::run(const std::string& name, const std::vector<at::Tensor>& inputs,
                                        const Fn& fn) {
  if (!compiled() || !enabled_ || !all_cuda(inputs)) {
    ++counts_.eager;
    return fn(inputs);
  }
  const std::string key = key_of(name, inputs);
  auto it = entries_.find(key);
  if (it == entries_.end()) it = entries_.emplace(key, std::make_unique<Entry>()).first;
  Entry& e = *it->second;
  e.last_use = ++tick_;
  ++e.seen;
#if SD_WITH_CUDA
  if (e.graph) return replay(e, inputs);
  if (!e.failed && e.seen >= 2) {
    // Keep at most max_graphs_ graphs: drop the least recently used one (its pool goes back to the allocator).
    if (counts_.graphs >= max_graphs_) {
      auto victim = entries_.end();
      for (auto j = entries_.begin(); j != entries_.end(); ++j)
        if (j->second->graph && j != it && (victim == entries_.end() || j->second->last_use < victim->second->last_use))
          victim = j;
      if (victim != entries_.end()) {
        entries_.erase(victim);
        --counts_.graphs;
      }
    }
    if (capture(e, key, inputs, fn)) return replay(e, inputs);
  }
#endif
  ++counts_.eager;
  return fn(inputs);
}

#if SD_WITH_CUDA

bool GraphCache::capture(Entry& e, const std::string& key, const std::vector<at::Tensor>& inputs, const Fn& fn) {
  const c10::Device device = [&] {
    for (const auto& t : inputs)
      if (t.defined()) return t.device();
    return c10::Device(c10::kCUDA, 0);
  }();
  c10::cuda::CUDAGuard device_guard(device);
  // The static inputs: the graph reads these addresses on every replay.
  e.static_inputs.clear();
  for (const auto& t : inputs) e.static_inputs.push_back(t.defined() ? t.clone() : at::Tensor());
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  // From the high-priority pool: the side streams of other threads (uploads, downloads, the filter's cosine:
  // core/side_stream) come from the low-priority one, and work another thread queued on a stream under capture would
  // be recorded into the graph instead of running.
  auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device.index());
  // Once per key, so a host wait here costs nothing per frame: the side stream must see the clones above.
  c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
  try {
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      // Thread-local mode: the capture or pre-processing threads of the runtime may allocate or copy meanwhile.
      graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      try {
        e.static_outputs = fn(e.static_inputs);
      } catch (...) {
        try {
          graph->capture_end();
        } catch (...) {
        }
        throw;
      }
      graph->capture_end();
    }
    side.synchronize();
  } catch (const std::exception& ex) {
    e.failed = true;
    e.static_inputs.clear();
    e.static_outputs.clear();
    ++counts_.failures;
    std::string what = ex.what();
    if (const auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
    log::warn("CUDA graph capture of {} failed ({}); it runs without a graph", key, what);
    (void)cudaGetLastError();  // a failed capture leaves a non-sticky error behind
    return false;
  }
  e.graph = std::move(graph);
  ++counts_.captures;
  ++counts_.graphs;
  log::debug("CUDA graph captured: {}", key);
  return true;
}

std::vector<at::Tensor> GraphCache::replay(Entry& e, const std::vector<at::Tensor>& inputs) {
  for (size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].defined() && inputs[i].data_ptr() != e.static_inputs[i].data_ptr())
      e.static_inputs[i].copy_(inputs[i], /*non_blocking=*/true);
  e.graph->replay();
  ++counts_.replays;
  std::vector<at::Tensor> out;
  out.reserve(e.static_outputs.size());
  // Clones: the next replay overwrites the static outputs, and callers keep results across calls.
  for (const auto& t : e.static_outputs) out.push_back(t.defined() ? t.clone() : at::Tensor());
  return out;
}

bool cuda_stream_capturing(const c10::Device& device) {
  if (!device.is_cuda()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()), &status));
  return status != cudaStreamCaptureStatusNone;
}

#else

bool cuda_stream_capturing(const c10::Device&) { return false; }
bool GraphCache::capture(Entry&, const std::string&, const std::vector<at::Tensor>&, const Fn&) { return false; }
std::vector<at::Tensor> GraphCache::replay(Entry&, const std::vector<at::Tensor>&) { return {}; }

#endif

}  // namespace sd
