#include "server/model_worker.h"

#include <chrono>

#include "core/log.h"

namespace sd::server {

ModelWorker::~ModelWorker() { stop(); }

void ModelWorker::start() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (started_) return;
  started_ = true;
  t_start_ = std::chrono::steady_clock::now();
  thread_ = std::thread([this] { loop(); });
}

void ModelWorker::stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::deque<std::shared_ptr<ModelTask>> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    dropped.swap(queue_);
  }
  // Released outside the lock: a task's destructor may schedule nothing, but may take its own locks.
  dropped.clear();
}

bool ModelWorker::schedule(const std::shared_ptr<ModelTask>& task) {
  if (!task) return false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return false;
    if (task->queued_.exchange(true)) return true;  // already waiting for its turn
    queue_.push_back(task);
  }
  cv_.notify_one();
  return true;
}

void ModelWorker::loop() {
  for (;;) {
    std::shared_ptr<ModelTask> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      task = std::move(queue_.front());
      queue_.pop_front();
      // Cleared before the step: work that arrives during it schedules the task again, at the back (round robin).
      task->queued_ = false;
    }
    const auto t0 = std::chrono::steady_clock::now();
    try {
      task->run_model_step();
    } catch (const std::exception& e) {
      errors_.fetch_add(1);
      log::error("model worker: a task failed: {}", e.what());
    }
    busy_us_.fetch_add(
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count());
    steps_.fetch_add(1);
    task.reset();  // a closed client's state is released here, not kept until the next turn
  }
}

nlohmann::json ModelWorker::stats() const {
  size_t queued = 0;
  bool started = false;
  std::chrono::steady_clock::time_point t0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queued = queue_.size();
    started = started_;
    t0 = t_start_;
  }
  const double up = started ? std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() : 0.0;
  const double busy = static_cast<double>(busy_us_.load()) * 1e-6;
  return {{"steps", steps_.load()},     {"errors", errors_.load()},
          {"busy_s", busy},             {"queued", queued},
          {"uptime_s", up},             {"utilisation", up > 0 ? busy / up : 0.0}};
}

}  // namespace sd::server
