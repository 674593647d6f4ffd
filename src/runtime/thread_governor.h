#pragma once
// Adaptive intra-op team size: the model thread's OpenMP team shrinks to one thread while the CPU is contended and
// grows back when it clears (the stall under CPU contention, src/runtime/README.md).
//
// Why: a team of N threads meets at a barrier at the end of every parallel region (hundreds per UNet call). When other
// processes keep the cores busy, a team member is often waiting for a CPU, and the members that have one wait for it
// at the barrier: frames become many short waits, 10-60x the median (measured, 2 cores next to `stress-ng --cpu 2`).
// One thread has no barriers, so its frames take what the CPU share allows and no more.
//
// The measure: the share of the model thread's frame time spent runnable but not running (the kernel's run-queue
// wait, /proc/thread-self/schedstat), smoothed over frames. On an idle machine it is ~0; contended, it is the share
// of the CPU other runnable threads take (~1/2 with two hogs on two cores). Above `enter` the team is cut to one
// thread; at one thread, once the share stays below `leave` for at least `hold` seconds, the full team comes back. A
// full team that is cut again soon after it came back (a competitor that leaves one core free: one thread sees no
// wait, two threads do) doubles the hold, so the stream does not flap (up to max_hold_s). And the full team comes
// back only when the cores it needs are free: the other runnable threads of the machine (/proc/loadavg's running
// count, minus this one), smoothed like the wait share, plus the team must fit in the cores. One thread can have a
// core to itself while two hogs share the other (no wait seen), but a second team member could only take a hog's
// core: on 2 cores next to `stress-ng --cpu 2` such restores came every few seconds, and the first frames after one
// could take 10x the median (measured).
#include <cstdint>

#include <nlohmann/json.hpp>

namespace sd {

class ThreadGovernor {
 public:
  struct Options {
    int max_threads = 1;      // the team size asked for (--threads); <= 1: nothing to govern
    double enter = 0.20;      // run-queue wait share that means contention
    double leave = 0.05;      // ... and below which it has cleared
    double smoothing = 0.3;   // weight of the newest frame in the running share
    int min_frames = 3;       // frames measured (since the last change) before a decision
    double min_hold_s = 2.0;  // at one thread at least this long before the full team is tried again
    double max_hold_s = 60.0;
    int cores = 0;            // cores this process may use (0: std::thread::hardware_concurrency())
  };
  explicit ThreadGovernor(Options options);

  bool active() const { return o_.max_threads > 1; }
  // One model frame: its wall time and the model thread's run-queue wait during it (seconds), at time `now_s` (any
  // monotonic clock, seconds), and the machine's other runnable threads at its end (< 0: unknown). Returns the team
  // size for the next frame.
  int update(double wall_s, double wait_s, double now_s, double others_runnable = -1);

  int threads() const { return threads_; }
  int max_threads() const { return o_.max_threads; }
  int64_t reductions() const { return reductions_; }  // full team -> one thread
  double wait_share() const { return share_; }        // the running share (0 before the first frame)
  // {max_threads, threads, reductions, restores, frames_reduced, frames, wait_share, hold_s}
  nlohmann::json summary() const;

 private:
  Options o_;
  int threads_;
  double share_ = 0;
  double others_ = -1;  // smoothed other runnable threads (-1: unknown)
  int frames_since_change_ = 0;
  double changed_at_ = 0, hold_s_;
  int64_t reductions_ = 0, restores_ = 0, frames_ = 0, frames_reduced_ = 0;
};

// The calling thread's total run-queue wait in seconds (/proc/thread-self/schedstat, 2nd field); -1 where the kernel
// does not report it.
double thread_runqueue_wait_s();
// The machine's runnable threads other than the calling one right now (/proc/loadavg's 4th field, minus 1); -1
// where unavailable.
double other_runnable_threads();

// The calling thread's OpenMP team size for its next parallel regions (omp_set_num_threads: this thread's ICV only;
// libtorch's and oneDNN's parallel regions read it through omp_get_max_threads).
void set_team_size_here(int n);

}  // namespace sd
