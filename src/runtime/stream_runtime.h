#pragma once
// The frame runtime (spec §12, the paper's IO queues made a library part): five stage threads joined by bounded
// queues,
//
//   capture --q--> pre-process --q--> model --q--> post-process --q--> sink
//   (source)       (resize, RGB,       (FrameProcessor   (tensor -> uint8,   (FrameSink)
//                   preprocess())       process/apply)    postprocess())
//
// so the model thread only ever waits for its input queue (and, in lossless mode, for room downstream).
//
// Modes:
//  * live     — every queue keeps only the newest items (1 before the model, 2 after): a frame that a faster stage
//               would have to queue is dropped and counted, and the model always takes the most recent frame
//               ("latest frame wins"). Default for live sources (camera, screen, ticks at a fixed fps).
//  * lossless — blocking queues (back-pressure): every input frame produces exactly one output frame, in input order.
//               The processor's delay (StreamDiffusion: n−1 calls) is absorbed by the processor itself: its warm-up
//               outputs are not emitted, and at the end of input flush() pushes the frames still in flight through
//               (repeating the last input), so output i is the result for input i and the output count equals the
//               input count. Default for files, folders, raw stdin and txt2img ticks paced by the model.
//
// Shutdown: end of input closes the queues one after the other (everything in flight is drained and flushed);
// request_stop() (SIGINT/SIGTERM through a SignalGuard, the `quit` command, closing the window) and any stage error
// cancel every queue (in-flight frames are discarded) and raise the stop flag that sources/sinks poll; a source error
// (unreadable or truncated input) ends the input instead, so the frames before it are still written. In every case all
// threads are joined before run() returns, the sink is closed (video trailer written), and the first error is thrown
// from run() as sd::Error naming the stage. Stopping takes at most one model call plus ~100 ms. The frames a stop
// loses are counted: those waiting in a queue (discarded_at_stop) and those a stage or the processor held
// (in_flight_at_stop), so that frames_in == frames_out + dropped + discarded_at_stop + in_flight_at_stop always.
//
// Live control: post_control() queues a command that the model thread applies before the next frame (a frame
// boundary); `stats`, `quit` and `help` are answered at once. StreamOptions::scheduled applies commands at given input
// frame indices (reproducible scripted changes); a scheduled `quit` stops the stream before its frame. A command the
// processor refuses (sd::InvalidArgument, FrameProcessor::apply) is answered with the error and the stream goes on;
// any other exception from apply() is a model error that stops the stream.
//
// Watchdog: every stage's time per frame is tracked (stage_watchdog.h); a frame far slower than the stage's median is
// logged with the stage it is in, while it is still there, and the longest gap between outputs is in the summary.
#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/bounded_queue.h"
#include "runtime/control_command.h"
#include "runtime/frame.h"
#include "runtime/frame_processor.h"
#include "runtime/frame_sink.h"
#include "runtime/frame_source.h"
#include "runtime/runtime_stats.h"
#include "runtime/stage_watchdog.h"
#include "runtime/thread_governor.h"

namespace sd {

enum class StreamMode { Auto, Live, Lossless };
// "auto" | "live" | "lossless"
StreamMode parse_stream_mode(const std::string& name);
std::string stream_mode_name(StreamMode mode);

// How a captured frame is fitted to the processor's size: centre-crop to its aspect ratio then resize, or resize only.
enum class ResizeMode { Crop, Stretch };
ResizeMode parse_resize_mode(const std::string& name);

struct ScheduledCommand {
  int64_t frame = 0;  // applied before the model processes the input frame with this index
  ControlCommand command;
};

// The longest status line period: far beyond any use, and far below where seconds stop fitting the clock's
// nanoseconds.
constexpr double kMaxStatusIntervalS = 86400.0 * 365;
// InvalidArgument naming --status-interval unless `seconds` is 0 or in (0, kMaxStatusIntervalS] (NaN included).
void check_status_interval(double seconds);

struct StreamOptions {
  StreamMode mode = StreamMode::Auto;
  size_t queue_capacity = 4;      // lossless queues
  int64_t max_frames = 0;         // stop reading the source after this many frames (0 = until it ends)
  double status_interval_s = 1.0; // status line period (0 = none; at most kMaxStatusIntervalS)
  std::function<void(const std::string&)> status;  // where status lines go (default: stderr)
  bool stop_on_signal = true;     // poll SignalGuard::pending() (install a SignalGuard to catch SIGINT/SIGTERM)
  ResizeMode resize = ResizeMode::Crop;
  std::vector<ScheduledCommand> scheduled;
  std::function<void(const Frame&)> on_output;  // sink thread, after each write (tests, previews)
  int64_t warmup_outputs = 100;   // outputs after which RSS counts as "after warm-up"
  // Run every stage one after the other on the calling thread, no queues: the bare loop, for comparisons. Always
  // lossless (nothing can be dropped), whatever `mode` says.
  bool synchronous = false;
  // OpenCV's own worker threads (cv::setNumThreads) while the stream runs; -1 = leave as is. The stages already run
  // in parallel, and on a few cores OpenCV's spinning workers steal time from the model's OpenMP team (whose
  // barriers spin too), so 1 (no OpenCV workers) is the default. Restored when run() returns.
  int opencv_threads = 1;
  // The watchdog (stage_watchdog.h): log a frame that a stage spends more than watchdog_factor × its median on (and
  // more than watchdog_min_ms). 0 = no log lines (the timings are still in the summary).
  double watchdog_factor = 10.0;
  double watchdog_min_ms = 100.0;
  std::function<void(const std::string&)> watchdog_log;  // default: log::warn
  // The model thread's intra-op team shrinks to one thread while other processes contend for the CPU and grows back
  // when they leave (thread_governor.h); false = keep the team size (--fixed-threads).
  bool adaptive_threads = true;
};

class StreamRuntime {
 public:
  using Reply = std::function<void(const std::string&)>;

  StreamRuntime(std::unique_ptr<FrameSource> source, std::shared_ptr<FrameProcessor> processor,
                std::unique_ptr<FrameSink> sink, StreamOptions options = {});
  ~StreamRuntime();  // a running stream is stopped and joined
  StreamRuntime(const StreamRuntime&) = delete;
  StreamRuntime& operator=(const StreamRuntime&) = delete;

  // A second source read in step with the input (ControlNet control images, --control-input): one of its frames is
  // captured with each input frame (Frame::control) and handed to FrameProcessor::preprocess_controls(). When it ends
  // first, the input ends there too (stop reason "control input ended"; what was read is drained as usual). Before
  // run().
  void set_control_source(std::unique_ptr<FrameSource> source);
  // A source of IP-Adapter image prompts (--image-prompt-input): one of its frames is read with input frames 0, every,
  // 2·every, … (Frame::image_prompt) and handed to the processor, which re-encodes it only when it changed. When it
  // ends, the last image prompt stays and the stream goes on. The processor must take image prompts. Before run().
  void set_image_prompt_source(std::unique_ptr<FrameSource> source, int64_t every);

  // Runs the stream to its end on the calling thread (which serves as the monitor: status lines, signals). Once.
  void run();
  // Thread-safe; the first reason is kept.
  void request_stop(const std::string& reason);
  // Thread-safe. `reply` (optional) receives "ok: ..." / "error: ..." once the command was applied or refused.
  // coalesce: last value wins - a pending command of the same kind (control_coalesce_key) that was also posted with
  // coalesce is dropped (counted as coalesced, not answered) and this one queued after the other pending ones, so a
  // flood of fader values costs one apply per kind and frame (OSC channels).
  void post_control(ControlCommand command, Reply reply = {}, bool coalesce = false);

  bool lossless() const { return lossless_; }
  StreamMode mode() const { return lossless_ ? StreamMode::Lossless : StreamMode::Live; }
  bool running() const { return running_.load(); }
  const RuntimeStats& stats() const { return stats_; }
  const StageWatchdog& watchdog() const { return watchdog_; }
  std::string status_line() const { return stats_.peek(); }
  // RuntimeStats::summary() plus mode, source, control_source, image_prompt_source ({name, every, read, ended} or
  // null), sink, processor, stop_reason, error, dropped per queue, discarded per queue (at stop), controls applied
  // ({frame, command}; the latest kMaxControlsListed) and control_counts: posted + scheduled (--at) = answered (stats,
  // quit, help; a scheduled quit too) + coalesced + applied + refused + unapplied (arrived after the last frame) +
  // pending. Once run() has returned, frames_in == frames_out + dropped + discarded_at_stop + in_flight_at_stop.
  nlohmann::json summary() const;

 private:
  struct PendingControl {
    ControlCommand command;
    Reply reply;
    bool coalesce = false;
  };
  static constexpr size_t kMaxControlsListed = 1000;  // summary()'s list of applied commands stays bounded

  void capture_loop();
  void preprocess_loop();
  void model_loop();
  void postprocess_loop();
  void sink_loop();
  void run_threads();
  void run_synchronous();
  void run_stage(const char* name, void (StreamRuntime::*loop)());
  // Signals, the sink's stop request, dropped counts, the status line when due.
  void monitor_tick(StreamClock::time_point& next_status);
  void preprocess_frame(Frame& f);
  // The control source's frame for input frame `index`; false when it has ended (input ends) or the stream stops.
  bool read_control(cv::Mat& image, int64_t index);
  // The image-prompt source's next frame when input frame `index` is due one (empty otherwise or once it has ended).
  cv::Mat read_image_prompt(int64_t index);
  void check_source_frame(const cv::Mat& image, int64_t index) const;  // throws Error: empty or not BGR 8UC3
  void postprocess_frame(Frame& f);
  // Writes and counts an output; false: not counted (a stop came during the write). The caller calls on_output.
  bool write_frame(const Frame& f);
  void fail(const std::string& stage, const std::string& what);
  void cancel_queues();
  void apply_controls(int64_t frame_index);
  // The model stage on one frame (controls due, the processor, the watchdog's timing, the thread governor).
  std::vector<Frame> model_frame(Frame f);
  // Hands model outputs on: to the post-process queue (threads) or straight through post-process and sink
  // (synchronous). false = the stream is stopping.
  bool push_outputs(std::vector<Frame>& outs);
  std::function<bool(std::vector<Frame>&)> emit_;
  int64_t dropped_total() const;
  int64_t discarded_total() const;  // lost to the queues' cancel()
  // Frames a stage held when the stream stopped or failed, and those still inside the processor.
  int64_t in_flight_total() const;
  cv::Mat fit(const cv::Mat& image) const;
  torch::Tensor fit_rgb(const cv::Mat& bgr) const;  // fit() + RGB uint8 [H, W, 3]

  std::unique_ptr<FrameSource> source_;
  std::unique_ptr<FrameSource> control_source_;  // optional (set_control_source)
  std::string control_source_name_;
  std::unique_ptr<FrameSource> image_prompt_source_;  // optional (set_image_prompt_source); capture side only
  std::string image_prompt_source_name_;
  int64_t image_prompt_every_ = 1;
  std::atomic<int64_t> image_prompts_read_{0};
  std::atomic<bool> image_prompt_source_ended_{false};
  std::shared_ptr<FrameProcessor> processor_;
  std::unique_ptr<FrameSink> sink_;
  StreamOptions options_;
  bool lossless_ = true;
  std::string source_name_, sink_name_, processor_name_;

  BoundedQueue<Frame> q_capture_, q_model_, q_post_, q_sink_;
  RuntimeStats stats_;
  StageWatchdog watchdog_;
  // Made by the model thread on its first frame (it knows the team size); summary() reads it from other threads.
  std::unique_ptr<ThreadGovernor> governor_;
  mutable std::mutex governor_mutex_;

  // Frame accounting for stops (in_flight_total): frames a stage thread could not hand on, and the frames the model
  // stage took minus the outputs it handed on (the difference is inside the processor: its delay line, a partial
  // batch).
  std::atomic<int64_t> stage_lost_{0}, model_taken_{0}, model_handed_{0};

  std::atomic<bool> stop_{false};
  std::atomic<bool> running_{false};
  bool started_ = false;
  std::vector<std::thread> threads_;
  std::atomic<int> active_{0};
  int io_setup_pending_ = 0;  // I/O threads that have not yet made their torch settings (guarded by done_mutex_)
  std::mutex done_mutex_;
  std::condition_variable done_cv_;

  mutable std::mutex state_mutex_;  // guards the fields below
  std::string stop_reason_ = "end of input";
  std::string error_;
  std::deque<PendingControl> pending_;
  nlohmann::json controls_applied_ = nlohmann::json::array();
  int64_t controls_posted_ = 0, controls_scheduled_ = 0, controls_answered_ = 0, controls_coalesced_ = 0, controls_applied_count_ = 0,
          controls_refused_ = 0, controls_unapplied_ = 0;
  size_t next_scheduled_ = 0;  // model thread only
};

// What a live queue carries from a frame it drops into the next one (a new image prompt, control images the next
// lacks); the queues' carry function, declared for its tests.
void carry_frame_inputs(Frame& dropped, Frame& next);

}  // namespace sd
