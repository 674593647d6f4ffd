#include "server/model_worker.h"

#include <algorithm>
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

bool ModelWorker::unschedule(const std::shared_ptr<ModelTask>& task) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = std::find(queue_.begin(), queue_.end(), task);
  if (it == queue_.end()) return false;
  queue_.erase(it);
  task->queued_ = false;
  return true;
}

void ModelWorker::loop() {
  for (;;) {
    std::vector<std::shared_ptr<ModelTask>> tasks;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      tasks.push_back(std::move(queue_.front()));
      queue_.pop_front();
      // Cleared before the step: work that arrives during it schedules the task again, at the back (round robin).
      tasks.front()->queued_ = false;
      // Gathering: the other queued tasks that can share the step, in queue order; the rest keep their places.
      const void* key = max_batch_ > 1 ? tasks.front()->batch_key() : nullptr;
      for (auto it = queue_.begin(); key && it != queue_.end() && static_cast<int>(tasks.size()) < max_batch_;) {
        if ((*it)->batch_key() == key) {
          (*it)->queued_ = false;
          tasks.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
    }
    const auto t0 = std::chrono::steady_clock::now();
    if (tasks.size() == 1) {
      try {
        tasks.front()->run_model_step();
      } catch (const std::exception& e) {
        errors_.fetch_add(1);
        log::error("model worker: a task failed: {}", e.what());
      }
    } else {
      run_gathered(tasks);
    }
    busy_us_.fetch_add(
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count());
    steps_.fetch_add(static_cast<int64_t>(tasks.size()));
    tasks.clear();  // a closed client's state is released here, not kept until the next turn
  }
}

void ModelWorker::run_gathered(std::vector<std::shared_ptr<ModelTask>>& tasks) {
  gathered_steps_.fetch_add(1);
  std::vector<BatchedStep> steps(tasks.size());
  std::vector<size_t> running;
  for (size_t k = 0; k < tasks.size(); ++k) {
    try {
      if (tasks[k]->begin_batched_step(steps[k])) running.push_back(k);
    } catch (const std::exception& e) {
      errors_.fetch_add(1);
      log::error("model worker: a task failed: {}", e.what());
    }
  }
  std::vector<sd::StreamCall> calls;
  for (size_t k : running) calls.push_back({steps[k].stream, steps[k].images, steps[k].ready});
  sd::MultiStreamStats ms;
  sd::MultiStreamOptions options;
  options.max_streams = max_batch_;
  options.graphs = &graphs_;
  std::vector<sd::StreamCallResult> results(calls.size());
  try {
    if (!calls.empty()) results = sd::run_stream_calls(calls, options, &ms);
  } catch (const std::exception& e) {
    // Its failures are per call; this is one outside them (out of memory while grouping, say). Every running task
    // still answers its client, with the error, in end_batched_step.
    errors_.fetch_add(1);
    log::error("model worker: a gathered step failed: {}", e.what());
    const std::exception_ptr error = std::current_exception();
    results.assign(calls.size(), sd::StreamCallResult());
    for (auto& r : results) r.error = error;
  }
  {
    std::lock_guard<std::mutex> lock(batch_mutex_);
    batch_stats_.add(ms);
  }
  for (size_t j = 0; j < running.size(); ++j) {
    BatchedStep& step = steps[running[j]];
    step.output = std::move(results[j].output);
    step.error = results[j].error;
    step.shared_with = results[j].shared_with;
    if (step.error || !step.output.defined()) continue;
    try {
      tasks[running[j]]->begin_batched_output(step);
    } catch (const std::exception& e) {
      // Its end_batched_step still runs: the task answers its client there.
      log::error("model worker: a task failed to start its output: {}", e.what());
    }
  }
  for (size_t j = 0; j < running.size(); ++j) {
    BatchedStep& step = steps[running[j]];
    try {
      tasks[running[j]]->end_batched_step(step);
    } catch (const std::exception& e) {
      errors_.fetch_add(1);
      log::error("model worker: a task failed: {}", e.what());
    }
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
  sd::MultiStreamStats b;
  {
    std::lock_guard<std::mutex> lock(batch_mutex_);
    b = batch_stats_;
  }
  return {{"steps", steps_.load()},     {"errors", errors_.load()},
          {"busy_s", busy},             {"queued", queued},
          {"uptime_s", up},             {"utilisation", up > 0 ? busy / up : 0.0},
          {"max_batch_streams", max_batch_},
          {"gathered_steps", gathered_steps_.load()},
          {"batched_calls", b.shared_unet_calls},
          {"batched_streams", b.batched_calls},
          {"max_batch", b.max_batch},
          {"own_calls", b.own_calls},
          {"batched_graph_captures", b.graph_captures},
          {"batched_graph_replays", b.graph_replays},
          {"batched_graph_failures", b.graph_failures},
          {"batched_call_failures", b.shared_call_failures}};
}

}  // namespace sd::server
