#pragma once
// The one thread that runs the model (libtorch ops on the machine's few cores) for every client, fairly.
//
// Clients (stream sessions, API requests) are ModelTasks. A task that has work calls schedule(); the worker serves
// the scheduled tasks round robin, ONE unit of work (one frame, one API image) per turn, so a client with a steady
// supply of frames cannot starve the others: a task that gets new work while it runs is scheduled again at the back
// of the queue. schedule() never blocks on the model (a mutex held only to push to a deque), so the network threads
// stay responsive however slow the model is. A task is in the queue at most once (its `queued` flag).
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

namespace sd::server {

class ModelTask {
 public:
  virtual ~ModelTask() = default;
  // Model thread: one unit of work. Exceptions are the task's business (the worker logs and drops escaping ones).
  virtual void run_model_step() = 0;

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

  // steps, busy_s (model time), queue length, uptime, utilisation.
  nlohmann::json stats() const;
  int64_t steps() const { return steps_.load(); }

 private:
  void loop();

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<ModelTask>> queue_;
  bool stopping_ = false;
  bool started_ = false;
  std::thread thread_;
  std::atomic<int64_t> steps_{0}, errors_{0};
  std::atomic<int64_t> busy_us_{0};
  std::chrono::steady_clock::time_point t_start_;
};

}  // namespace sd::server
