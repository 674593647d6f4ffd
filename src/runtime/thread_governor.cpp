#include "runtime/thread_governor.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <thread>

#include "core/error.h"

namespace sd {

ThreadGovernor::ThreadGovernor(Options options) : o_(options), threads_(options.max_threads), hold_s_(options.min_hold_s) {
  if (o_.cores <= 0) o_.cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (!(o_.leave >= 0 && o_.leave < o_.enter && o_.enter <= 1))
    throw InvalidArgument("thread governor: expected 0 <= leave < enter <= 1, got leave " + std::to_string(o_.leave) +
                          ", enter " + std::to_string(o_.enter));
  if (!(o_.smoothing > 0 && o_.smoothing <= 1)) throw InvalidArgument("thread governor: smoothing must be in (0, 1]");
  if (o_.min_frames < 1 || !(o_.min_hold_s >= 0) || !(o_.max_hold_s >= o_.min_hold_s))
    throw InvalidArgument("thread governor: expected min_frames >= 1 and 0 <= min_hold_s <= max_hold_s");
}

int ThreadGovernor::update(double wall_s, double wait_s, double now_s, double others_runnable) {
  ++frames_;
  if (!active()) return threads_;
  if (threads_ == 1) ++frames_reduced_;
  if (wall_s > 0 && wait_s >= 0) {
    const double share = std::min(1.0, wait_s / wall_s);
    share_ = frames_since_change_ == 0 ? share : o_.smoothing * share + (1 - o_.smoothing) * share_;
    ++frames_since_change_;
  }
  if (others_runnable >= 0)
    others_ = others_ < 0 ? others_runnable : o_.smoothing * others_runnable + (1 - o_.smoothing) * others_;
  if (frames_since_change_ < o_.min_frames) return threads_;
  if (threads_ > 1 && share_ > o_.enter) {
    // Cut again soon after the full team came back: the contention is still there for a full team; wait longer.
    hold_s_ = (restores_ > 0 && now_s - changed_at_ < 2 * hold_s_) ? std::min(2 * hold_s_, o_.max_hold_s) : o_.min_hold_s;
    threads_ = 1;
    ++reductions_;
  } else if (threads_ == 1 && share_ < o_.leave && now_s - changed_at_ >= hold_s_ &&
             (others_ < 0 || others_ + o_.max_threads <= o_.cores + 0.5)) {
    threads_ = o_.max_threads;
    ++restores_;
  } else {
    return threads_;
  }
  changed_at_ = now_s;
  frames_since_change_ = 0;
  return threads_;
}

nlohmann::json ThreadGovernor::summary() const {
  return {{"max_threads", o_.max_threads}, {"threads", threads_},       {"reductions", reductions_},
          {"restores", restores_},       {"frames", frames_},           {"frames_reduced", frames_reduced_},
          {"wait_share", share_},        {"hold_s", hold_s_},           {"active", active()},
          {"other_runnable", others_},   {"cores", o_.cores}};
}

double thread_runqueue_wait_s() {
  std::FILE* f = std::fopen("/proc/thread-self/schedstat", "r");
  if (!f) return -1;
  unsigned long long run = 0, wait = 0;
  const int n = std::fscanf(f, "%llu %llu", &run, &wait);
  std::fclose(f);
  return n == 2 ? static_cast<double>(wait) * 1e-9 : -1;
}

double other_runnable_threads() {
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  if (!f) return -1;
  double l1, l5, l15;
  long running = 0, total = 0;
  const int n = std::fscanf(f, "%lf %lf %lf %ld/%ld", &l1, &l5, &l15, &running, &total);
  std::fclose(f);
  return n == 5 ? std::max(0.0, static_cast<double>(running) - 1) : -1;
}

void set_team_size_here(int n) {
  // Looked up at run time, as in thread_setup.cpp: libgomp comes with libtorch and the runtime does not link OpenMP.
  using SetNumThreads = void (*)(int);
  static const auto set_num_threads = reinterpret_cast<SetNumThreads>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (set_num_threads && n >= 1) set_num_threads(n);
}

}  // namespace sd
