#pragma once
// The one thread that runs the model (libtorch ops on the machine's few cores) for every client, fairly.
//
// Clients (stream sessions, API requests) are ModelTasks. A task that has work calls schedule(); the worker serves
// the scheduled tasks round robin, ONE unit of work (one frame, one API image) per turn, so a client with a steady
// supply of frames cannot starve the others: a task that gets new work while it runs is scheduled again at the back
// of the queue. schedule() never blocks on the model (a mutex held only to push to a deque), so the network threads
// stay responsive however slow the model is. A task is in the queue at most once (its `queued` flag).
//
// Multi-stream batching (set_max_batch_streams N > 1): when the worker takes a task whose batch_key() is set, it also
// takes the other queued tasks with the same key (in queue order, up to N in all; other tasks keep their places)
// and runs them as ONE step: each task's begin_batched_step (the first half of its run_model_step: its input and
// settings), one sd::run_stream_calls over their streams (their UNet rows in one UNet call, pipeline/multi_stream.h),
// then each task's begin_batched_output (on CUDA a session starts its frame's download there) and each task's
// end_batched_step (its result to its client, exactly as run_model_step delivers it). Tasks that arrive while a step
// runs wait for the next one, as before.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "pipeline/multi_stream.h"

namespace sd::server {

// One task's stream call in a gathered step.
struct BatchedStep {
  sd::StreamDiffusion* stream = nullptr;  // set by begin_batched_step
  torch::Tensor images;                   // img2img input (StreamDiffusion::img2img's); undefined = txt2img
  sd::InputReady ready = sd::InputReady::queued;  // as StreamDiffusion::img2img's
  torch::Tensor output;                   // set by the worker: the call's result, or
  std::exception_ptr error;               // why it failed
  int64_t shared_with = 0;                // streams in the UNet call that ran it (1 = its own)
};

class ModelTask {
 public:
  virtual ~ModelTask() = default;
  // Model thread: one unit of work. Exceptions are the task's business (the worker logs and drops escaping ones).
  virtual void run_model_step() = 0;
  // Multi-stream batching: tasks with the same non-null key may be gathered into one step (null: never, e.g. API
  // jobs). Called by the worker under its queue lock: must not block.
  virtual const void* batch_key() const { return nullptr; }
  // Model thread, gathered steps: the first half of run_model_step. False when this turn needs no stream call (it
  // was handled here: settings only, an error sent, the task closed); true with step.stream / step.images set.
  virtual bool begin_batched_step(BatchedStep& /*step*/) { return false; }
  // Model thread, gathered steps with a step.output: called for every such task of the step before the first
  // end_batched_step, to start what can run behind the device's queue (a session starts its frame's download, so
  // that on CUDA the step's conversions and copies are queued back to back and only the first wait is for the step).
  virtual void begin_batched_output(BatchedStep& /*step*/) {}
  // Model thread: the second half, with step.output or step.error (called only after a true begin_batched_step).
  virtual void end_batched_step(BatchedStep& /*step*/) {}

 private:
  friend class ModelWorker;
  std::atomic<bool> queued_{false};
};

class ModelWorker {
 public:
  ModelWorker() = default;
  ~ModelWorker();  // stop()
  ModelWorker(const ModelWorker&) = delete;
  ModelWorker& operator=(const ModelWorker&) = delete;

  void start();
  // Finishes the unit of work in progress, drops the queue (the tasks are released) and joins. Idempotent.
  void stop();
  // Thread-safe, non-blocking. False once stopped.
  bool schedule(const std::shared_ptr<ModelTask>& task);
  // Thread-safe, non-blocking: takes a task that waits for its turn out of the queue, so that it does not run (an API
  // request whose client has gone). False when it is not waiting: running, run already, or never scheduled.
  bool unschedule(const std::shared_ptr<ModelTask>& task);

  // Most tasks gathered into one step (1 = off, every task runs alone); call before start(). Values < 1 are 1.
  void set_max_batch_streams(int n) { max_batch_ = n < 1 ? 1 : n; }
  int max_batch_streams() const { return max_batch_; }

  // steps (task turns), busy_s (model time), queue length, uptime, utilisation; batching: max_batch_streams,
  // gathered_steps (steps that took >= 2 tasks), batched_calls (UNet calls shared by >= 2 streams), batched_streams
  // (stream calls that ran in them), max_batch (most streams in one UNet call), own_calls (stream calls of gathered
  // steps that ran alone: a stream that cannot share, see pipeline/multi_stream.h).
  nlohmann::json stats() const;
  int64_t steps() const { return steps_.load(); }

 private:
  void loop();
  void run_gathered(std::vector<std::shared_ptr<ModelTask>>& tasks);

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<ModelTask>> queue_;
  bool stopping_ = false;
  bool started_ = false;
  std::thread thread_;
  std::atomic<int64_t> steps_{0}, errors_{0};
  std::atomic<int64_t> busy_us_{0};
  int max_batch_ = 1;
  std::atomic<int64_t> gathered_steps_{0};
  mutable std::mutex batch_mutex_;
  sd::MultiStreamStats batch_stats_;
  sd::SharedGraphs graphs_;  // CUDA graphs of the gathered steps' shared calls (the worker thread's only)
  std::chrono::steady_clock::time_point t_start_;
};

}  // namespace sd::server
