#pragma once
// CUDA graphs for the fixed-shape parts of a stream call (UNet, TAESD encode / decode): a frame at 512 px launches
// about a thousand small kernels, and on a fast GPU the host's launch time, not the GPU, sets the frame rate. A graph
// records those launches once and replays them with one call.
//
// GraphCache::run(name, inputs, fn) on a CUDA device:
//   - the first call with a given (name, input shapes and dtypes) key runs fn eagerly (the warm-up: lazy cuBLAS /
//     cuDNN set-up and the caching allocator's first blocks must not happen inside a capture);
//   - the second captures fn into a graph over static copies of the inputs (on a side stream, thread-local capture
//     mode, so other threads that allocate or copy meanwhile do not break it), then replays it;
//   - later calls copy the inputs into the static tensors, replay, and return clones of the static outputs (the
//     next replay overwrites them, and callers keep outputs across calls).
// A shape change is a new key (its own graph, up to max_graphs kept, least recently used dropped first); clear()
// drops them all (weights replaced, e.g. a LoRA re-fused). A capture that fails (an op that syncs with the host, a
// CPU tensor inside) logs once, and that key runs eagerly from then on. Elsewhere (CPU, or a build without CUDA)
// run() is fn(inputs).
//
// fn must be a pure function of its inputs and of state that stays at the same address between calls (module
// weights); undefined tensors may be passed as inputs (optional arguments) and stay undefined.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/Tensor.h>
#include <c10/core/Device.h>

namespace sd {

class GraphCache {
 public:
  using Fn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

  explicit GraphCache(size_t max_graphs = 8);
  ~GraphCache();
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;

  std::vector<at::Tensor> run(const std::string& name, const std::vector<at::Tensor>& inputs, const Fn& fn);
  void clear();

  void set_enabled(bool on);
  bool enabled() const { return enabled_; }
  // Whether this build can capture graphs at all (libtorch with CUDA).
  static bool compiled();

  struct Counts {
    int64_t captures = 0;  // graphs recorded
    int64_t replays = 0;   // calls answered by a replay
    int64_t eager = 0;     // calls run eagerly (warm-ups, failed keys, disabled, not CUDA)
    int64_t failures = 0;  // captures that failed (their keys run eagerly)
    size_t graphs = 0;     // graphs held now
  };
  Counts counts() const;

 private:
  struct Entry;
  std::vector<at::Tensor> replay(Entry& e, const std::vector<at::Tensor>& inputs);
  bool capture(Entry& e, const std::string& key, const std::vector<at::Tensor>& inputs, const Fn& fn);

  size_t max_graphs_;
  bool enabled_ = true;
  uint64_t tick_ = 0;
  std::map<std::string, std::unique_ptr<Entry>> entries_;
  Counts counts_;
};

// Whether this thread's current stream on `device` is recording a CUDA graph (false for other devices and in builds
// without CUDA): code that would wait for the device, or try something that may fail, checks it first.
bool cuda_stream_capturing(const c10::Device& device);

}  // namespace sd
