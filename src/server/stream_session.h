#pragma once
// One client's stream: its own sd::StreamDiffusion (prompt, caches, latent buffer, RNG) on the shared model, its
// settings, its latest pending input and its counters. Nothing here is shared between clients, so one client's
// frames can never reach another.
//
// Threads: the network side (any Asio thread) calls submit_frame() / request_generate() / update_settings(), which
// only store the input under the session's mutex and schedule the session on the ModelWorker; the model thread
// calls run_model_step(), which takes the LATEST input (an older pending one was dropped and counted when it was
// replaced), applies pending settings, runs one stream call and hands the result to the sink. The sink must not
// block (the WebSocket session queues it on its strand).
//
// ControlNets (StreamDefaults::controlnets, shared and immutable) get per-client scales, preprocessors and guidance
// ranges. A frame's control images are made where it arrives (submit_frame, on the network thread that decoded it), so
// the model thread only sets them; `feedback` (the previous output) and a preprocessor changed in between are done on
// the model thread. A static control_image replaces the preprocessing.
//
// One output per input: the stream answers each call with the frame that entered n−1 calls earlier (spec §3.3), so
// the first n−1 outputs of a fresh stream are warm-up frames. For live video that is what the original demo does;
// the client's send-after-receive pacing needs exactly one answer per frame.
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/core/mat.hpp>

#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/stream_diffusion.h"
#include "runtime/control_preprocessor.h"
#include "server/graph_counters.h"
#include "server/model_worker.h"
#include "server/stream_settings.h"

namespace sd::server {

// Where a request lost its frame: replaced by a newer one while it waited for the model (input), or pushed out of
// the client's full send queue after it was made (output).
enum class DropPoint { Input, Output };
// The reply such a request gets instead of its frame: {"type": "dropped", "where": "input" | "output", "reason"}.
// One definition for both places that drop, so the page sees one message shape.
nlohmann::json dropped_message(DropPoint where);

struct SessionSink {
  std::function<void(cv::Mat rgb)> frame;            // model thread: a result (RGB 8UC3 at the stream size)
  std::function<void(nlohmann::json)> message;       // any thread: a JSON message for this client only
  // Model thread, after each frame: the control image ControlNet `index` got for it (RGB 8UC3 at the stream size;
  // shared, never written again). The sink decides how often it is worth sending.
  std::function<void(size_t index, cv::Mat rgb)> control;
  // Model thread, with each result (before `frame`): seconds its request waited for the model (queue) and the
  // step took (model). Optional: the server's stage histograms (/metrics).
  std::function<void(double queue_s, double model_s)> timing;
};

class StreamSession : public ModelTask, public std::enable_shared_from_this<StreamSession> {
 public:
  StreamSession(uint64_t id, std::shared_ptr<const DiffusionModels> models, const StreamDefaults& defaults,
                ModelWorker& worker, SessionSink sink);

  uint64_t id() const { return id_; }
  int width() const { return static_cast<int>(defaults_.img2img.width); }
  int height() const { return static_cast<int>(defaults_.img2img.height); }

  // Network threads. `rgb` is an RGB 8UC3 frame already fitted to width() x height(). In txt2img mode a frame only
  // asks for the next generated image (its pixels are not used). A request still pending when a newer one arrives
  // is replaced and answered with {"type": "dropped", "where": "input"}: every request gets exactly one reply.
  void submit_frame(cv::Mat rgb);
  // Asks for one generated image (txt2img mode); in img2img mode an error message is sent instead.
  void request_generate();
  // Validates `j` (a "config" message, "type" already checked) and makes it the settings the next step applies.
  // Throws sd::InvalidArgument (nothing changed) for bad or unknown fields.
  void update_settings(const nlohmann::json& j);
  StreamSettings settings() const;
  // No more outputs or work after this (the client is gone); the model state is released on the next turn.
  void close();
  bool closed() const { return closed_.load(); }

  // Counters for stats: frames_in, dropped_in (replaced before the model took them), frames_out, dropped_out (send
  // queue full, or left unsent when the stream closed), skipped (similarity filter), errors, lost_at_close (a request
  // the model had not taken when the stream closed: no reply), model_ms (EMA), fps_out (last second window), mode,
  // prompt;
  // with ControlNets controlnet_calls, controlnet_reused (--controlnet-every) and controlnet_s (total seconds).
  nlohmann::json stats() const;
  void count_dropped_output() { dropped_out_.fetch_add(1, std::memory_order_relaxed); }
  void count_error() { errors_.fetch_add(1, std::memory_order_relaxed); }

  void run_model_step() override;
  // Multi-stream batching (ModelWorker::set_max_batch_streams): sessions on the same models may share a step; the
  // halves of run_model_step, with the stream call made by the worker for several sessions at once.
  // Not gathered (null) while its stream cannot share UNet calls (StreamDiffusion::batch_blocker: ControlNets at a
  // non-zero scale, the deep-feature cache, sequential mode): it would run alone anyway, and its result would wait for
  // the whole gathered step. Read on the model thread (the worker's loop), which owns stream_; a session without a
  // stream yet (its first step) is gathered.
  const void* batch_key() const override;
  bool begin_batched_step(BatchedStep& step) override;
  void begin_batched_output(BatchedStep& step) override;  // on CUDA starts the frame's download (start_image_download)
  void end_batched_step(BatchedStep& step) override;

 private:
  using Clock = std::chrono::steady_clock;
  // One step between its halves (model thread).
  struct PendingStep {
    bool txt2img = false;
    torch::Tensor x;  // img2img input [1, 3, H, W] in the model's dtype
    std::vector<cv::Mat> used_control;
    StreamStats before;
    Clock::time_point t0;
    Clock::time_point requested;  // when the request it answers arrived (the latest one, if it replaced others)
  };
  // Takes the pending input, applies settings, sets control images, makes the input tensor. False: no stream call
  // this turn (handled: settings only, closed, or an error sent to the client).
  bool begin_step(PendingStep& p);
  // The result to the client (frame, counters, control images); its pixels from `pixels` when the download was
  // started (begin_batched_output), else converted here.
  void end_step(PendingStep& p, const torch::Tensor& out, std::optional<ImageDownload> pixels = std::nullopt);
  // The stream's counters of a step begun (ControlNet calls, CUDA graphs) into the session's: every step that
  // called the stream, failed ones included.
  void count_stream_stats(const PendingStep& p);
  void schedule();
  void send_error(const std::string& message);
  void reply_dropped();  // counts a replaced request and tells the client ({"type": "dropped"})
  // Model thread: brings stream_ in line with `want` (builds it on first use or a mode change).
  void apply_settings(const StreamSettings& want);
  // Model thread: sets the control image of every ControlNet with a non-zero scale for this call (`frame` empty in
  // txt2img) and returns them (for the sink). Throws InvalidArgument when one has no source (txt2img, no
  // control_image, not feedback).
  std::vector<cv::Mat> set_control_images(const cv::Mat& frame, const std::vector<cv::Mat>& control,
                                          const std::vector<std::string>& control_specs);

  const uint64_t id_;
  const std::shared_ptr<const DiffusionModels> models_;
  const StreamDefaults defaults_;
  ModelWorker& worker_;
  const SessionSink sink_;
  std::atomic<bool> closed_{false};

  mutable std::mutex mutex_;  // guards the pending input and the wanted settings
  StreamSettings wanted_;
  uint64_t wanted_version_ = 0;  // moves with every change of wanted_ (update_settings commits against it)
  bool settings_dirty_ = false;
  cv::Mat pending_frame_;
  bool pending_generate_ = false;
  Clock::time_point pending_since_{};  // arrival of the pending request
  // The preprocessors of wanted_ (what submit_frame runs), and the control images made from the pending frame with
  // the preprocessor spec each was made by (empty = none made).
  std::vector<std::shared_ptr<const ControlPreprocessor>> preprocessors_;
  std::vector<cv::Mat> pending_control_;
  std::vector<std::string> pending_control_specs_;

  // Model thread only.
  std::unique_ptr<StreamDiffusion> stream_;
  StreamSettings applied_;
  std::vector<std::shared_ptr<const ControlPreprocessor>> applied_preprocessors_;
  cv::Mat last_output_;  // the previous result (the `feedback` control image)
  PendingStep batch_step_;  // between begin_batched_step and end_batched_step
  std::optional<ImageDownload> batch_pixels_;  // between begin_batched_output and end_batched_step

  std::atomic<int64_t> frames_in_{0}, dropped_in_{0}, frames_out_{0}, dropped_out_{0}, errors_{0}, lost_at_close_{0};
  std::atomic<int64_t> skipped_{0};
  std::atomic<double> model_ms_ema_{0};
  std::atomic<int64_t> controlnet_calls_{0}, controlnet_reused_{0};
  GraphCounters graphs_;  // the stream's own CUDA graphs, over every stream the session made
  std::atomic<double> controlnet_s_{0};
  mutable std::mutex rate_mutex_;
  Clock::time_point window_start_ = Clock::now();
  int64_t window_frames_ = 0;
  double fps_out_ = 0;
};

}  // namespace sd::server
