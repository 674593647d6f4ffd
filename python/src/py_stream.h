#pragma once
// The Python Stream object: the engine stream plus the prompts it was prepared with (the runtime's processor needs
// them to change either one on its own), and the lock that makes it safe to use from several Python threads.
//
// Threads: calls release the GIL while the engine works, so a second Python thread (a GUI changing settings while a
// worker thread runs frames) could change the stream in the middle of a call (buffers swapped under the UNet, the
// filter freed while it runs). Every access to the engine stream goes through locked(), which releases the GIL and
// then takes the stream's lock, in that order: engine code may take the GIL (to free a Python-owned tensor), so the
// lock is never waited for while holding the GIL. run_stream's model thread takes the same lock per frame.
//
// The weights are shared by every stream on a model set, and Models.set_lora_scale re-fuses them (tensor by tensor)
// from whatever thread calls it: weights_mutex() is the model set's lock, taken shared by whatever runs the models
// (every locked() call, a Batcher's step, run_stream's frames, Models.loras()) and exclusively by the scale setters
// (Models.set_lora_scale / set_ip_adapter_scale, a runtime's `lora` / `ip_adapter_scale` command), so a setter waits
// for the frames in progress and no frame sees half a change. Order: the GIL released, then the streams' locks, then
// this one; nothing is waited for while it is held shared.
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>

#include "pipeline/stream_diffusion.h"
#include "py_common.h"

namespace sdpy {

// A shared mutex whose exclusive side is not starved: libstdc++'s std::shared_mutex (a pthread rwlock) lets new readers
// in ahead of a waiting writer, so two threads running frames back to back could keep set_lora_scale waiting for
// good. A writer holds the gate while it waits; a reader passes the gate first, so it queues behind that writer.
class WeightsMutex {
 public:
  void lock_shared() {
    { const std::lock_guard<std::mutex> pass(gate_); }
    rw_.lock_shared();
  }
  void unlock_shared() { rw_.unlock_shared(); }
  void lock() {
    const std::lock_guard<std::mutex> hold(gate_);
    rw_.lock();
  }
  void unlock() { rw_.unlock(); }

 private:
  std::mutex gate_;
  std::shared_mutex rw_;
};

// The lock of the weights of `models` (one per model set, made on first use; see above).
std::shared_ptr<WeightsMutex> weights_mutex(const sd::DiffusionModels* models);

struct PyStream {
  std::shared_ptr<const sd::DiffusionModels> models;
  std::shared_ptr<sd::StreamDiffusion> stream;
  std::string prompt, negative_prompt;  // GIL-protected (Python side)
  std::shared_ptr<std::mutex> mu = std::make_shared<std::mutex>();
  std::shared_ptr<WeightsMutex> weights_mu = std::make_shared<WeightsMutex>();  // weights_mutex(models)
};

// The engine stream, GIL released and the stream's lock held until the end of the full expression:
//   locked(s)->set_seed(seed);   at::Tensor t = locked(s)->init_noise();   (then wrap t, with the GIL)
// Nothing Python may be touched inside that expression: convert arguments first, wrap results after.
class LockedStream {
 public:
  explicit LockedStream(const PyStream& s) : lock_(*s.mu), weights_(*s.weights_mu), stream_(s.stream.get()) {}
  sd::StreamDiffusion* operator->() const { return stream_; }
  sd::StreamDiffusion& operator*() const { return *stream_; }

 private:
  py::gil_scoped_release release_;  // first: released before the lock is waited for, taken back after it is let go
  std::unique_lock<std::mutex> lock_;
  std::shared_lock<WeightsMutex> weights_;
  sd::StreamDiffusion* stream_;
};
inline LockedStream locked(const PyStream& s) { return LockedStream(s); }

inline py::object maybe_wrap(const at::Tensor& t) { return t.defined() ? wrap(t) : py::none(); }

}  // namespace sdpy
