#include "runtime/stream_runtime.h"

#include <algorithm>
#include <cstdio>
#include <iterator>

#include <ATen/Parallel.h>
#include <opencv2/core/utility.hpp>
#include <opencv2/imgproc.hpp>

#include "core/error.h"
#include "core/log.h"
#include "runtime/signal_guard.h"
#include "runtime/thread_setup.h"

namespace sd {
namespace {

bool resolve_lossless(StreamMode mode, const FrameSource* source, bool synchronous) {
  if (!source) throw InvalidArgument("StreamRuntime: no source");
  if (synchronous) return true;
  if (mode == StreamMode::Auto) return !source->live();
  return mode == StreamMode::Lossless;
}

// Live: one frame waits before the model at most (the newest), two after it.
size_t capacity(bool lossless, size_t lossless_capacity, bool before_model) {
  if (lossless) return std::max<size_t>(1, lossless_capacity);
  return before_model ? 1 : 2;
}

OverflowPolicy policy(bool lossless) { return lossless ? OverflowPolicy::Block : OverflowPolicy::DropOldest; }

}  // namespace

// A live queue drops the oldest frame, but not what only that frame brought: a new image prompt (read every N frames)
// or a control image the frames after it leave undefined would be lost with it, so they go on with the next frame
// unless it brings its own (which is newer). Not into a frame that keeps its control source (Frame::control_source):
// its missing images are of ControlNets that did not run, made from its own source should they run by its call.
void carry_frame_inputs(Frame& dropped, Frame& next) {
  if (next.image_prompt.empty() && !next.image_prompt_rgb.defined()) {
    next.image_prompt = std::move(dropped.image_prompt);
    next.image_prompt_rgb = std::move(dropped.image_prompt_rgb);
  }
  if (next.control_source.defined()) return;
  if (next.controls.empty()) {
    next.controls = std::move(dropped.controls);
  } else if (next.controls.size() == dropped.controls.size()) {
    for (size_t i = 0; i < next.controls.size(); ++i)
      if (!next.controls[i].defined()) next.controls[i] = std::move(dropped.controls[i]);
  }
}

namespace {

StageWatchdog::Options watchdog_options(const StreamOptions& o) {
  StageWatchdog::Options w;
  if (o.watchdog_factor != 0 && !(o.watchdog_factor >= 1))
    throw InvalidArgument("watchdog factor " + std::to_string(o.watchdog_factor) + ": expected 0 (off) or >= 1");
  if (!(o.watchdog_min_ms >= 0))
    throw InvalidArgument("watchdog minimum " + std::to_string(o.watchdog_min_ms) + " ms: expected >= 0");
  w.factor = o.watchdog_factor == 0 ? 1.0 : o.watchdog_factor;
  w.min_ms = o.watchdog_min_ms;
  if (o.watchdog_factor == 0)
    w.log = [](const std::string&) {};
  else
    w.log = o.watchdog_log;
  return w;
}

void default_status(const std::string& line) { std::fprintf(stderr, "[stream] %s\n", line.c_str()); }

// The frames a stage holds count as lost (in flight at stop) unless they leave it: handed on, or written by the sink.
// A stop that refuses them, or an error unwinding past them, leaves them behind.
class Holding {
 public:
  Holding(std::atomic<int64_t>& lost, size_t frames) : lost_(lost), frames_(static_cast<int64_t>(frames)) {}
  ~Holding() {
    if (frames_ > 0) lost_ += frames_;
  }
  Holding(const Holding&) = delete;
  Holding& operator=(const Holding&) = delete;
  void release() { --frames_; }

 private:
  std::atomic<int64_t>& lost_;
  int64_t frames_;
};

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

void check_status_interval(double seconds) {
  if (!(seconds >= 0 && seconds <= kMaxStatusIntervalS))
    throw InvalidArgument("--status-interval " + number(seconds) + ": expected 0 (no status lines) or seconds up to " +
                          number(kMaxStatusIntervalS) + " (a year)");
}

StreamMode parse_stream_mode(const std::string& name) {
  if (name == "auto") return StreamMode::Auto;
  if (name == "live") return StreamMode::Live;
  if (name == "lossless") return StreamMode::Lossless;
  throw InvalidArgument("unknown stream mode '" + name + "' (expected auto, live or lossless)");
}

std::string stream_mode_name(StreamMode mode) {
  switch (mode) {
    case StreamMode::Auto: return "auto";
    case StreamMode::Live: return "live";
    case StreamMode::Lossless: return "lossless";
  }
  return "?";
}

ResizeMode parse_resize_mode(const std::string& name) {
  if (name == "crop") return ResizeMode::Crop;
  if (name == "stretch") return ResizeMode::Stretch;
  throw InvalidArgument("unknown resize mode '" + name + "' (expected crop or stretch)");
}

StreamRuntime::StreamRuntime(std::unique_ptr<FrameSource> source, std::shared_ptr<FrameProcessor> processor,
                             std::unique_ptr<FrameSink> sink, StreamOptions options)
    : source_(std::move(source)),
      processor_(std::move(processor)),
      sink_(std::move(sink)),
      options_(std::move(options)),
      lossless_(resolve_lossless(options_.mode, source_.get(), options_.synchronous)),
      q_capture_(capacity(lossless_, options_.queue_capacity, true), policy(lossless_)),
      q_model_(capacity(lossless_, options_.queue_capacity, true), policy(lossless_)),
      q_post_(capacity(lossless_, options_.queue_capacity, false), policy(lossless_)),
      q_sink_(capacity(lossless_, options_.queue_capacity, false), policy(lossless_)),
      stats_(options_.warmup_outputs),
      watchdog_(watchdog_options(options_)) {
  if (!processor_) throw InvalidArgument("StreamRuntime: no frame processor");
  if (!sink_) throw InvalidArgument("StreamRuntime: no sink");
  q_capture_.set_carry(carry_frame_inputs);
  q_model_.set_carry(carry_frame_inputs);
  if (source_->has_images() != processor_->takes_images())
    throw InvalidArgument(source_->has_images()
                              ? "the input gives images but the stream generates them (txt2img): use --input none"
                              : "--input none gives no images but the stream transforms images (img2img): give an "
                                "input");
  if (options_.max_frames < 0) throw InvalidArgument("max_frames must be >= 0");
  check_status_interval(options_.status_interval_s);
  std::stable_sort(options_.scheduled.begin(), options_.scheduled.end(),
                   [](const ScheduledCommand& a, const ScheduledCommand& b) { return a.frame < b.frame; });
  if (!options_.status) options_.status = default_status;
  source_name_ = source_->describe();
  sink_name_ = sink_->describe();
  processor_name_ = processor_->describe();
}

void StreamRuntime::set_control_source(std::unique_ptr<FrameSource> source) {
  if (started_) throw InvalidArgument("StreamRuntime::set_control_source() must come before run()");
  if (source && !source->has_images())
    throw InvalidArgument("the control input gives no images (" + source->describe() + "): give a video, folder, "
                          "camera or screen");
  control_source_ = std::move(source);
  control_source_name_ = control_source_ ? control_source_->describe() : "";
}

bool StreamRuntime::read_control(cv::Mat& image, int64_t index) {
  const bool got = control_source_->read(image, stop_);
  if (stop_.load()) return false;
  if (!got) {
    log::warn("control input {} ended after {} frames: the input ends there too", control_source_name_, index);
    std::lock_guard<std::mutex> lock(state_mutex_);
    stop_reason_ = "control input ended";
    return false;
  }
  if (image.empty() || image.type() != CV_8UC3)
    throw Error("control input " + control_source_name_ + " delivered an empty or non-BGR frame " +
                std::to_string(index));
  return true;
}

void StreamRuntime::set_image_prompt_source(std::unique_ptr<FrameSource> source, int64_t every) {
  if (started_) throw InvalidArgument("StreamRuntime::set_image_prompt_source() must come before run()");
  if (every < 1) throw InvalidArgument("image prompt input: read every " + std::to_string(every) + " frames; expected >= 1");
  if (source) {
    if (!processor_->takes_image_prompts())
      throw InvalidArgument("an image prompt input needs an IP-Adapter (" + processor_name_ + " takes no image prompts)");
    if (!source->has_images())
      throw InvalidArgument("the image prompt input gives no images (" + source->describe() + "): give an image, "
                            "video, folder, camera or screen");
  }
  image_prompt_source_ = std::move(source);
  image_prompt_source_name_ = image_prompt_source_ ? image_prompt_source_->describe() : "";
  image_prompt_every_ = every;
}

cv::Mat StreamRuntime::read_image_prompt(int64_t index) {
  cv::Mat image;
  if (!image_prompt_source_ || image_prompt_source_ended_.load() || index % image_prompt_every_ != 0) return image;
  if (!image_prompt_source_->read(image, stop_)) {
    if (stop_.load()) return cv::Mat();
    image_prompt_source_ended_ = true;
    const int64_t n = image_prompts_read_.load();
    if (n == 0)
      log::warn("image prompt input {} gave no image: the stream goes on with the image prompt it had",
                image_prompt_source_name_);
    else
      log::info("image prompt input {} ended after {} images: the last one stays", image_prompt_source_name_, n);
    return cv::Mat();
  }
  if (image.empty() || image.type() != CV_8UC3)
    throw Error("image prompt input " + image_prompt_source_name_ + " delivered an empty or non-BGR frame " +
                std::to_string(image_prompts_read_.load()));
  ++image_prompts_read_;
  return image;
}

StreamRuntime::~StreamRuntime() {
  request_stop("destroyed while running");
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void StreamRuntime::request_stop(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    if (stop_.load()) return;
    stop_reason_ = reason;
    stop_ = true;
  }
  cancel_queues();
}

void StreamRuntime::cancel_queues() {
  q_capture_.cancel();
  q_model_.cancel();
  q_post_.cancel();
  q_sink_.cancel();
}

void StreamRuntime::fail(const std::string& stage, const std::string& what) {
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    if (error_.empty()) error_ = stage + ": " + what;
  }
  if (stage == "capture") {
    // The input ended badly: what was read still goes through (drained and flushed), then run() reports the error.
    q_capture_.close();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    if (!stop_.load()) stop_reason_ = "error";
    stop_ = true;
  }
  cancel_queues();
}

void StreamRuntime::run_stage(const char* name, void (StreamRuntime::*loop)()) {
  try {
    // Only the model thread runs multi-threaded tensor operations (see thread_setup.h). libtorch's per-thread
    // initialisation, which these settings trigger, resets process-wide caches (oneDNN), so the model thread waits
    // until the I/O threads are done with it.
    if (loop != &StreamRuntime::model_loop) {
      try {
        use_single_threaded_torch_here();
      } catch (...) {
        std::lock_guard<std::mutex> lock(done_mutex_);
        --io_setup_pending_;
        done_cv_.notify_all();
        throw;
      }
      {
        std::lock_guard<std::mutex> lock(done_mutex_);
        --io_setup_pending_;
      }
      done_cv_.notify_all();
    } else {
      std::unique_lock<std::mutex> lock(done_mutex_);
      done_cv_.wait(lock, [&] { return io_setup_pending_ <= 0; });
    }
    (this->*loop)();
  } catch (const c10::Error& e) {
    fail(name, e.what_without_backtrace());
  } catch (const cv::Exception& e) {
    fail(name, std::string("OpenCV: ") + e.what());
  } catch (const std::exception& e) {
    fail(name, e.what());
  } catch (...) {
    fail(name, "unknown exception");
  }
  {
    std::lock_guard<std::mutex> lock(done_mutex_);
    --active_;
  }
  done_cv_.notify_all();
}

// ---- stages ---------------------------------------------------------------------------------------------------

void StreamRuntime::capture_loop() {
  // Whatever happens, downstream learns that no more input comes (cancel() already covers the stop path).
  struct CloseOnExit {
    BoundedQueue<Frame>& q;
    ~CloseOnExit() { q.close(); }
  } closer{q_capture_};
  const bool images = source_->has_images();
  int64_t n = 0;
  while (!stop_.load()) {
    if (options_.max_frames > 0 && n >= options_.max_frames) break;
    StageWatchdog::Timer capture_timer(watchdog_, StageWatchdog::Capture, n);
    cv::Mat image;
    if (!source_->read(image, stop_)) break;
    if (stop_.load()) break;
    cv::Mat control;
    if (control_source_ && !read_control(control, n)) break;
    Frame f;
    f.control = std::move(control);
    f.image_prompt = read_image_prompt(n);
    capture_timer.finish();
    f.index = n++;
    f.t_capture = StreamClock::now();
    f.tick = !images;
    if (images) {
      check_source_frame(image, f.index);
      f.image = std::move(image);
    }
    stats_.on_captured();
    if (!q_capture_.push(std::move(f))) {
      ++stage_lost_;  // the stream stopped: the queue takes nothing more
      break;
    }
  }
}

void StreamRuntime::check_source_frame(const cv::Mat& image, int64_t index) const {
  if (image.empty() || image.type() != CV_8UC3)
    throw Error("source " + source_name_ + " delivered an empty or non-BGR frame " + std::to_string(index));
}

cv::Mat StreamRuntime::fit(const cv::Mat& image) const {
  const int W = static_cast<int>(processor_->width()), H = static_cast<int>(processor_->height());
  if (W <= 0 || H <= 0 || (image.cols == W && image.rows == H)) return image;
  cv::Mat src = image;
  if (options_.resize == ResizeMode::Crop) {
    // Largest centred region with the target's aspect ratio.
    int cw = image.cols, ch = image.rows;
    if (static_cast<int64_t>(cw) * H > static_cast<int64_t>(ch) * W)
      cw = std::max(1, static_cast<int>(static_cast<int64_t>(ch) * W / H));
    else
      ch = std::max(1, static_cast<int>(static_cast<int64_t>(cw) * H / W));
    src = image(cv::Rect((image.cols - cw) / 2, (image.rows - ch) / 2, cw, ch));
  }
  cv::Mat out;
  const bool shrink = src.cols > W || src.rows > H;
  cv::resize(src, out, cv::Size(W, H), 0, 0, shrink ? cv::INTER_AREA : cv::INTER_LINEAR);
  return out;
}

void StreamRuntime::preprocess_loop() {
  struct CloseOnExit {
    BoundedQueue<Frame>& q;
    ~CloseOnExit() { q.close(); }
  } closer{q_model_};
  while (auto f = q_capture_.pop()) {
    Holding held(stage_lost_, 1);
    StageWatchdog::Timer pre_timer(watchdog_, StageWatchdog::Preprocess, f->index);
    preprocess_frame(*f);
    pre_timer.finish();
    if (!q_model_.push(std::move(*f))) break;
    held.release();
  }
}

namespace {

// BGR 8UC3 -> an owned uint8 RGB tensor [H, W, 3].
torch::Tensor rgb_tensor(const cv::Mat& bgr) {
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, {static_cast<int64_t>(rgb.step[0]), 3, 1},
                          torch::kUInt8)
      .clone();
}

}  // namespace

torch::Tensor StreamRuntime::fit_rgb(const cv::Mat& bgr) const { return rgb_tensor(fit(bgr)); }

void StreamRuntime::preprocess_frame(Frame& f) {
  torch::Tensor input, control;  // uint8 RGB [H, W, 3] at the model's size
  if (!f.tick) {
    input = fit_rgb(f.image);
    f.image.release();
  }
  if (!f.control.empty()) {
    control = fit_rgb(f.control);
    f.control.release();
  }
  processor_->preprocess_controls(f, input, control);
  if (!f.image_prompt.empty()) {
    f.image_prompt_rgb = rgb_tensor(f.image_prompt);  // its own size: the image encoder resizes and crops
    f.image_prompt.release();
  }
  if (input.defined()) f.tensor = processor_->preprocess(input);
}

bool StreamRuntime::push_outputs(std::vector<Frame>& outs) {
  for (auto& o : outs) processor_->begin_postprocess(o);
  model_handed_ += static_cast<int64_t>(outs.size());
  const bool ok = emit_(outs);
  outs.clear();
  return ok;
}

void StreamRuntime::model_loop() {
  struct CloseOnExit {
    BoundedQueue<Frame>& q;
    ~CloseOnExit() { q.close(); }
  } closer{q_post_};
  while (auto f = q_model_.pop()) {
    std::vector<Frame> outs = model_frame(std::move(*f));
    if (!push_outputs(outs)) return;
  }
  if (stop_.load() || q_model_.cancelled()) return;
  // End of input: the frames still in flight come out (lossless: one output per input).
  std::vector<Frame> outs = processor_->flush();
  push_outputs(outs);
  // Commands that arrived after the last frame can no longer be applied.
  std::deque<PendingControl> left;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    left.swap(pending_);
    controls_unapplied_ += static_cast<int64_t>(left.size());
  }
  for (auto& p : left)
    if (p.reply) p.reply("error: '" + p.command.line + "' not applied: the input has ended");
}

std::vector<Frame> StreamRuntime::model_frame(Frame f) {
  ++model_taken_;  // the model stage's from here: in flight until its output is handed on
  if (!governor_) {
    ThreadGovernor::Options g;
    g.max_threads = options_.adaptive_threads ? at::get_num_threads() : 1;
    std::lock_guard<std::mutex> lock(governor_mutex_);
    governor_ = std::make_unique<ThreadGovernor>(g);
  }
  const auto t0 = StreamClock::now();
  const double wait0 = governor_->active() ? thread_runqueue_wait_s() : -1;
  StageWatchdog::Timer model_timer(watchdog_, StageWatchdog::Model, f.index);
  apply_controls(f.index);
  // A scheduled quit (or any stop meanwhile): the outputs could not be handed on, so the model call is not made.
  if (stop_.load()) return {};
  stats_.on_model_frame();
  std::vector<Frame> outs = processor_->process(std::move(f));
  stats_.set_skipped(processor_->skipped());
  model_timer.finish();
  if (wait0 >= 0) {
    const auto t1 = StreamClock::now();
    const double wall = std::chrono::duration<double>(t1 - t0).count();
    const double wait = thread_runqueue_wait_s() - wait0;
    const double others = other_runnable_threads();
    std::lock_guard<std::mutex> lock(governor_mutex_);
    const int before = governor_->threads();
    const int now =
        governor_->update(wall, wait, std::chrono::duration<double>(t1.time_since_epoch()).count(), others);
    if (now != before) {
      set_team_size_here(now);
      if (now == 1)
        log::info("model: the CPU is contended (the model thread waited for a CPU {:.0f}% of its frame time): 1 "
                  "intra-op thread until it clears", 100 * governor_->wait_share());
      else
        log::info("model: CPU contention cleared: {} intra-op threads again", now);
    }
  }
  return outs;
}

void StreamRuntime::apply_controls(int64_t frame_index) {
  std::deque<PendingControl> todo;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    todo.swap(pending_);
  }
  while (next_scheduled_ < options_.scheduled.size() && options_.scheduled[next_scheduled_].frame <= frame_index) {
    todo.push_back({options_.scheduled[next_scheduled_++].command, {}});
    std::lock_guard<std::mutex> lock(state_mutex_);
    ++controls_scheduled_;
  }
  // Commands not reached (the stream stops, or apply() failed on one) are pending again, so the counts add up.
  struct Requeue {
    StreamRuntime& rt;
    std::deque<PendingControl>& todo;
    ~Requeue() {
      if (todo.empty()) return;
      std::lock_guard<std::mutex> lock(rt.state_mutex_);
      rt.pending_.insert(rt.pending_.begin(), std::make_move_iterator(todo.begin()),
                         std::make_move_iterator(todo.end()));
    }
  } requeue{*this, todo};
  while (!todo.empty()) {
    const ControlCommand& c = todo.front().command;
    if (c.kind == ControlCommand::Kind::Quit) {
      // Only a scheduled quit comes this way: post_control() answers a posted one at once.
      PendingControl p = std::move(todo.front());
      todo.pop_front();
      {
        std::lock_guard<std::mutex> lock(state_mutex_);
        ++controls_answered_;
      }
      log::info("control: '{}' before frame {}: stopping", p.command.line, frame_index);
      request_stop("quit command (--at)");
      if (p.reply) p.reply("ok: stopping");
      return;
    }
    std::vector<Frame> outs;
    try {
      outs = processor_->apply(c);
    } catch (const InvalidArgument& e) {
      // A refused command changes nothing and does not stop the stream. Any other error is the processor failing
      // (a model call while flushing): it stops the stream as a model error.
      PendingControl p = std::move(todo.front());
      todo.pop_front();
      {
        std::lock_guard<std::mutex> lock(state_mutex_);
        ++controls_refused_;
      }
      log::warn("control: '{}' refused: {}", p.command.line, e.what());
      if (p.reply) p.reply(std::string("error: ") + e.what());
      continue;
    }
    PendingControl p = std::move(todo.front());
    todo.pop_front();
    {
      std::lock_guard<std::mutex> lock(state_mutex_);
      ++controls_applied_count_;
      if (controls_applied_.size() >= kMaxControlsListed) controls_applied_.erase(controls_applied_.begin());
      controls_applied_.push_back({{"frame", frame_index}, {"command", p.command.line}});
    }
    log::info("control: '{}' applied before frame {}", p.command.line, frame_index);
    if (p.reply) p.reply("ok: '" + p.command.line + "' applied before frame " + std::to_string(frame_index));
    // Outside the refusal's reach: the command was applied, and an error on the way to the sink is that stage's.
    if (!push_outputs(outs)) return;
  }
}

void StreamRuntime::postprocess_loop() {
  struct CloseOnExit {
    BoundedQueue<Frame>& q;
    ~CloseOnExit() { q.close(); }
  } closer{q_sink_};
  while (auto f = q_post_.pop()) {
    Holding held(stage_lost_, 1);
    StageWatchdog::Timer post_timer(watchdog_, StageWatchdog::Postprocess, f->index);
    postprocess_frame(*f);
    post_timer.finish();
    if (!q_sink_.push(std::move(*f))) break;
    held.release();
  }
}

void StreamRuntime::postprocess_frame(Frame& f) {
  torch::Tensor rgb = f.postprocessed ? f.postprocessed() : processor_->postprocess(f.tensor);
  f.postprocessed = nullptr;
  if (!rgb.defined() || rgb.dim() != 3 || rgb.size(2) != 3 || rgb.scalar_type() != torch::kUInt8)
    throw InvalidArgument("processor output for frame " + std::to_string(f.index) + " is not a uint8 [H, W, 3] image");
  rgb = rgb.to(torch::kCPU).contiguous();
  const cv::Mat view(static_cast<int>(rgb.size(0)), static_cast<int>(rgb.size(1)), CV_8UC3, rgb.data_ptr());
  cv::cvtColor(view, f.image, cv::COLOR_RGB2BGR);
  f.tensor = torch::Tensor();
}

bool StreamRuntime::write_frame(const Frame& f) {
  StageWatchdog::Timer sink_timer(watchdog_, StageWatchdog::Sink, f.index);
  sink_->write(f.image, stop_);
  sink_timer.finish();
  // A stop may have cut the write short: the frame is not counted as written (the caller counts it lost).
  if (stop_.load()) return false;
  const auto now = StreamClock::now();
  watchdog_.on_output(now);
  stats_.on_output(f.t_capture, now);
  return true;
}

void StreamRuntime::sink_loop() {
  try {
    while (auto f = q_sink_.pop()) {
      Holding held(stage_lost_, 1);
      if (write_frame(*f)) {
        held.release();  // before the callback: a frame it fails on was still written
        if (options_.on_output) options_.on_output(*f);
      }
      if (stop_.load()) break;
    }
  } catch (...) {
    try {
      sink_->close();  // finish what can be finished; the first error is the one reported
    } catch (...) {
    }
    throw;
  }
  sink_->close();
}

// ---- control ---------------------------------------------------------------------------------------------------

void StreamRuntime::post_control(ControlCommand command, Reply reply, bool coalesce) {
  using K = ControlCommand::Kind;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    ++controls_posted_;
    if (command.kind == K::Stats || command.kind == K::Quit || command.kind == K::Help) ++controls_answered_;
  }
  switch (command.kind) {
    case K::Stats:
      if (reply) reply(stats_.peek());
      return;
    case K::Quit:
      request_stop("quit command");
      if (reply) reply("ok: stopping");
      return;
    case K::Help:
      if (reply) reply(control_help());
      return;
    default:
      break;
  }
  std::lock_guard<std::mutex> lock(state_mutex_);
  if (coalesce) {
    // Last value wins: the older pending command of this kind goes (at most one exists, as each post removes it).
    const std::string key = control_coalesce_key(command);
    for (auto it = pending_.begin(); it != pending_.end(); ++it)
      if (it->coalesce && control_coalesce_key(it->command) == key) {
        pending_.erase(it);
        ++controls_coalesced_;
        break;
      }
  }
  pending_.push_back({std::move(command), std::move(reply), coalesce});
}

// ---- run --------------------------------------------------------------------------------------------------------

int64_t StreamRuntime::dropped_total() const {
  return q_capture_.dropped() + q_model_.dropped() + q_post_.dropped() + q_sink_.dropped();
}

int64_t StreamRuntime::discarded_total() const {
  return q_capture_.discarded() + q_model_.discarded() + q_post_.discarded() + q_sink_.discarded();
}

int64_t StreamRuntime::in_flight_total() const {
  return stage_lost_.load() + model_taken_.load() - model_handed_.load();
}

void StreamRuntime::monitor_tick(StreamClock::time_point& next_status) {
  if (options_.stop_on_signal && SignalGuard::pending() != 0)
    request_stop("interrupted by " + SignalGuard::name(SignalGuard::pending()));
  if (sink_->wants_stop()) request_stop("stopped from the output window");
  stats_.set_dropped(dropped_total());
  watchdog_.poll(StreamClock::now());
  if (options_.status_interval_s > 0 && StreamClock::now() >= next_status) {
    options_.status(stats_.tick());
    const auto interval = std::chrono::duration_cast<StreamClock::duration>(
        std::chrono::duration<double>(options_.status_interval_s));
    next_status += interval;
    if (next_status < StreamClock::now()) next_status = StreamClock::now() + interval;
  }
}

void StreamRuntime::run() {
  if (started_) throw InvalidArgument("StreamRuntime::run() can only be called once");
  started_ = true;
  running_ = true;
  stats_.start();
  log::info("stream: {}{} -> {} -> {} ({} mode{})", source_name_,
            control_source_ ? " + control " + control_source_name_ : std::string(), processor_name_, sink_name_,
            lossless_ ? "lossless" : "live", options_.synchronous ? ", synchronous" : "");
  const int opencv_threads_before = cv::getNumThreads();
  if (options_.opencv_threads >= 0) cv::setNumThreads(options_.opencv_threads);
  if (options_.synchronous)
    run_synchronous();
  else
    run_threads();
  if (options_.opencv_threads >= 0) cv::setNumThreads(opencv_threads_before);
  stats_.set_dropped(dropped_total());
  stats_.set_lost_at_stop(discarded_total(), in_flight_total());
  stats_.finish();
  running_ = false;
  std::string error, reason;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    error = error_;
    reason = stop_reason_;
  }
  log::info("stream ended ({}): {} frames in, {} out, {} dropped, {} skipped{}", reason, stats_.captured(),
            stats_.outputs(), stats_.dropped(), stats_.skipped(),
            stats_.discarded_at_stop() + stats_.in_flight_at_stop() > 0
                ? ", lost at stop: " + std::to_string(stats_.discarded_at_stop()) + " discarded from the queues, " +
                      std::to_string(stats_.in_flight_at_stop()) + " in flight"
                : std::string());
  if (!error.empty()) throw Error(error);
}

void StreamRuntime::run_threads() {
  emit_ = [this](std::vector<Frame>& outs) {
    Holding held(stage_lost_, outs.size());
    for (auto& o : outs) {
      if (!q_post_.push(std::move(o))) return false;
      held.release();
    }
    return true;
  };
  using Loop = void (StreamRuntime::*)();
  const std::pair<const char*, Loop> stages[] = {{"capture", &StreamRuntime::capture_loop},
                                                 {"pre-process", &StreamRuntime::preprocess_loop},
                                                 {"model", &StreamRuntime::model_loop},
                                                 {"post-process", &StreamRuntime::postprocess_loop},
                                                 {"sink", &StreamRuntime::sink_loop}};
  active_ = static_cast<int>(std::size(stages));
  io_setup_pending_ = static_cast<int>(std::size(stages)) - 1;
  for (const auto& [name, loop] : stages) {
    try {
      threads_.emplace_back([this, name = name, loop = loop] { run_stage(name, loop); });
    } catch (const std::system_error& e) {  // could not start a thread: stop the ones that did
      {
        std::lock_guard<std::mutex> lock(done_mutex_);
        active_ -= 1;
        if (loop != &StreamRuntime::model_loop) --io_setup_pending_;
      }
      done_cv_.notify_all();
      fail(name, std::string("cannot start the thread: ") + e.what());
    }
  }
  // This thread is the monitor until every stage has finished.
  auto next_status = StreamClock::now() + std::chrono::duration_cast<StreamClock::duration>(
                                              std::chrono::duration<double>(options_.status_interval_s));
  {
    std::unique_lock<std::mutex> lock(done_mutex_);
    while (active_ > 0) {
      done_cv_.wait_for(lock, std::chrono::milliseconds(20));
      lock.unlock();
      monitor_tick(next_status);
      lock.lock();
    }
  }
  for (auto& t : threads_) t.join();
  threads_.clear();
  // A stop requested from another thread may still be cancelling the queues: finish that here, so that what is left
  // in them is discarded, and counted, before run() reads the counts.
  if (stop_.load()) cancel_queues();
}

void StreamRuntime::run_synchronous() {
  // The same stages, one frame at a time: read, pre-process, model, and each output through post-process and sink.
  const char* stage = "capture";
  emit_ = [this, &stage](std::vector<Frame>& outs) {
    Holding held(stage_lost_, outs.size());
    for (auto& o : outs) {
      stage = "post-process";
      StageWatchdog::Timer post_timer(watchdog_, StageWatchdog::Postprocess, o.index);
      postprocess_frame(o);
      post_timer.finish();
      stage = "sink";
      if (write_frame(o)) {
        held.release();  // before the callback: a frame it fails on was still written
        if (options_.on_output) options_.on_output(o);
      }
      if (stop_.load()) return false;
    }
    return true;
  };
  auto next_status = StreamClock::now() + std::chrono::duration_cast<StreamClock::duration>(
                                              std::chrono::duration<double>(options_.status_interval_s));
  // A source or sink blocked in a read or a write (a pipe, a camera, a paced input) only watches stop_, and this
  // thread cannot poll the signal meanwhile: a watcher does, as the monitor does in threaded mode.
  struct SignalWatcher {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    std::thread thread;
    ~SignalWatcher() {
      if (!thread.joinable()) return;
      {
        std::lock_guard<std::mutex> lock(m);
        done = true;
      }
      cv.notify_all();
      thread.join();
    }
  } watcher;
  if (options_.stop_on_signal)
    watcher.thread = std::thread([this, &watcher] {
      std::unique_lock<std::mutex> lock(watcher.m);
      while (!watcher.cv.wait_for(lock, std::chrono::milliseconds(20), [&] { return watcher.done; }))
        if (const int sig = SignalGuard::pending()) {
          request_stop("interrupted by " + SignalGuard::name(sig));
          return;
        }
    });
  const bool images = source_->has_images();
  try {
    int64_t n = 0;
    while (true) {
      monitor_tick(next_status);
      if (stop_.load() || (options_.max_frames > 0 && n >= options_.max_frames)) break;
      stage = "capture";
      StageWatchdog::Timer capture_timer(watchdog_, StageWatchdog::Capture, n);
      cv::Mat image;
      bool got = false;
      try {
        got = source_->read(image, stop_);
      } catch (const std::exception& e) {
        fail("capture", e.what());  // ends the input; what was read is still flushed
      }
      if (!got || stop_.load()) break;
      cv::Mat control;
      if (control_source_) {
        bool got_control = false;
        try {
          got_control = read_control(control, n);
        } catch (const std::exception& e) {
          fail("capture", e.what());
        }
        if (!got_control) break;
      }
      Frame f;
      f.control = std::move(control);
      try {
        f.image_prompt = read_image_prompt(n);
      } catch (const std::exception& e) {
        fail("capture", e.what());
        break;
      }
      capture_timer.finish();
      f.index = n++;
      f.t_capture = StreamClock::now();
      f.tick = !images;
      if (images) {
        try {
          check_source_frame(image, f.index);
        } catch (const std::exception& e) {
          fail("capture", e.what());
          break;
        }
        f.image = std::move(image);
      }
      stats_.on_captured();
      Holding held(stage_lost_, 1);
      stage = "pre-process";
      StageWatchdog::Timer pre_timer(watchdog_, StageWatchdog::Preprocess, f.index);
      preprocess_frame(f);
      pre_timer.finish();
      held.release();
      stage = "model";
      std::vector<Frame> outs = model_frame(std::move(f));
      if (!push_outputs(outs)) break;
    }
    if (!stop_.load()) {
      stage = "model";
      std::vector<Frame> outs = processor_->flush();
      push_outputs(outs);
    }
  } catch (const c10::Error& e) {
    fail(stage, e.what_without_backtrace());
  } catch (const cv::Exception& e) {
    fail(stage, std::string("OpenCV: ") + e.what());
  } catch (const std::exception& e) {
    fail(stage, e.what());
  }
  // The calling thread keeps its team size (the governor may have cut it).
  if (governor_ && governor_->threads() != governor_->max_threads()) set_team_size_here(governor_->max_threads());
  try {
    sink_->close();
  } catch (const std::exception& e) {
    fail("sink", e.what());
  }
}

nlohmann::json StreamRuntime::summary() const {
  nlohmann::json j = stats_.summary();
  j["mode"] = lossless_ ? "lossless" : "live";
  j["source"] = source_name_;
  j["control_source"] = control_source_ ? nlohmann::json(control_source_name_) : nlohmann::json(nullptr);
  j["image_prompt_source"] = image_prompt_source_ ? nlohmann::json{{"name", image_prompt_source_name_},
                                                                     {"every", image_prompt_every_},
                                                                     {"read", image_prompts_read_.load()},
                                                                     {"ended", image_prompt_source_ended_.load()}}
                                                  : nlohmann::json(nullptr);
  j["sink"] = sink_name_;
  j["processor"] = processor_name_;
  j["latency_frames"] = processor_->latency_frames();
  j["watchdog"] = watchdog_.summary();
  {
    std::lock_guard<std::mutex> lock(governor_mutex_);
    j["thread_governor"] = governor_ ? governor_->summary() : nlohmann::json(nullptr);
  }
  j["dropped_by_queue"] = {{"capture", q_capture_.dropped()},
                           {"model_input", q_model_.dropped()},
                           {"post_process", q_post_.dropped()},
                           {"sink", q_sink_.dropped()}};
  j["discarded_by_queue"] = {{"capture", q_capture_.discarded()},
                             {"model_input", q_model_.discarded()},
                             {"post_process", q_post_.discarded()},
                             {"sink", q_sink_.discarded()}};
  std::lock_guard<std::mutex> lock(state_mutex_);
  j["stop_reason"] = stop_reason_;
  j["error"] = error_.empty() ? nlohmann::json(nullptr) : nlohmann::json(error_);
  j["controls"] = controls_applied_;
  j["control_counts"] = {{"posted", controls_posted_},       {"scheduled", controls_scheduled_},
                         {"answered", controls_answered_},
                         {"coalesced", controls_coalesced_}, {"applied", controls_applied_count_},
                         {"refused", controls_refused_},     {"unapplied", controls_unapplied_},
                         {"pending", static_cast<int64_t>(pending_.size())}};
  return j;
}

}  // namespace sd
