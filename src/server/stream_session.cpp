#include "server/stream_session.h"

#include <torch/torch.h>

#include "core/error.h"
#include "core/log.h"
#include "pipeline/image.h"

namespace sd::server {

StreamSession::StreamSession(uint64_t id, std::shared_ptr<const DiffusionModels> models,
                             const StreamDefaults& defaults, ModelWorker& worker, SessionSink sink)
    : id_(id), models_(std::move(models)), defaults_(defaults), worker_(worker), sink_(std::move(sink)) {
  wanted_ = StreamSettings::defaults(defaults_, defaults_.txt2img_mode);
  settings_dirty_ = true;
}

void StreamSession::schedule() {
  if (!closed_) worker_.schedule(shared_from_this());
}

void StreamSession::send_error(const std::string& message) {
  errors_.fetch_add(1, std::memory_order_relaxed);
  if (!closed_ && sink_.message) sink_.message({{"type", "error"}, {"message", message}});
}

void StreamSession::submit_frame(cv::Mat rgb) {
  frames_in_.fetch_add(1, std::memory_order_relaxed);
  bool replaced = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    replaced = !pending_frame_.empty() || pending_generate_;
    pending_frame_ = std::move(rgb);  // the latest frame wins
    pending_generate_ = false;
  }
  if (replaced) reply_dropped();
  schedule();
}

void StreamSession::reply_dropped() {
  // Every request gets one reply, a frame or this, in order: a client that keeps N requests in flight (the page's
  // ?window=2) stays in step instead of waiting for a result that will never come.
  dropped_in_.fetch_add(1, std::memory_order_relaxed);
  if (!closed_ && sink_.message) sink_.message({{"type", "dropped"}, {"where", "input"}, {"reason", "replaced by a newer request"}});
}

void StreamSession::request_generate() {
  bool replaced = false;
  {
    // In img2img mode the model thread answers with an error (the mode may change before it runs).
    std::lock_guard<std::mutex> lock(mutex_);
    replaced = !pending_frame_.empty() || pending_generate_;
    pending_frame_ = cv::Mat();
    pending_generate_ = true;
  }
  frames_in_.fetch_add(1, std::memory_order_relaxed);
  if (replaced) reply_dropped();
  schedule();
}

void StreamSession::update_settings(const nlohmann::json& j) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    wanted_ = apply_settings_json(j, wanted_, defaults_, {"type"});  // throws before changing anything
    settings_dirty_ = true;
  }
  schedule();
}

StreamSettings StreamSession::settings() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return wanted_;
}

void StreamSession::close() {
  closed_ = true;
  std::lock_guard<std::mutex> lock(mutex_);
  pending_frame_ = cv::Mat();
  pending_generate_ = false;
}

void StreamSession::apply_settings(const StreamSettings& want) {
  // LoRA scales belong to the shared model (server-wide); every stream re-encodes its prompts on its next call.
  for (const auto& [name, scale] : want.lora) {
    bool same = false;
    for (const auto& r : models_->loras())
      if (r.name == name) same = r.scale == scale;
    if (!same) models_->set_lora_scale(name, scale);
  }
  if (!stream_ || want.txt2img != applied_.txt2img) {
    auto s = std::make_unique<StreamDiffusion>(models_, want.config(defaults_));
    s->prepare(want.prompt, want.negative_prompt);
    stream_ = std::move(s);
    applied_ = want;
    applied_.lora.clear();  // a one-off request on the shared model, never re-applied from this session's state
    return;
  }
  if (want.prompt != applied_.prompt || want.negative_prompt != applied_.negative_prompt) {
    stream_->update_prompt(want.prompt, want.negative_prompt);
    applied_.prompt = want.prompt;
    applied_.negative_prompt = want.negative_prompt;
  }
  if (want.guidance != applied_.guidance) {
    stream_->set_guidance_scale(want.guidance);
    applied_.guidance = want.guidance;
  }
  if (want.delta != applied_.delta) {
    stream_->set_delta(want.delta);
    applied_.delta = want.delta;
  }
  if (want.t_index_list != applied_.t_index_list) {
    stream_->set_t_index_list(want.t_index_list);
    applied_.t_index_list = want.t_index_list;
  }
  if (want.seed != applied_.seed) {
    stream_->set_seed(want.seed);
    applied_.seed = want.seed;
  }
  if (want.similarity_filter != applied_.similarity_filter) {
    stream_->set_similarity_filter(want.config(defaults_).similarity_filter);
    applied_.similarity_filter = want.similarity_filter;
  }
}

void StreamSession::run_model_step() {
  if (closed_) {
    stream_.reset();
    return;
  }
  cv::Mat frame;
  bool generate = false, dirty = false;
  StreamSettings want;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    frame = std::move(pending_frame_);
    pending_frame_ = cv::Mat();
    generate = pending_generate_ || !frame.empty();
    pending_generate_ = false;
    dirty = settings_dirty_;
    settings_dirty_ = false;
    want = wanted_;
    wanted_.lora.clear();  // a one-shot request: another client may change the scales later
  }
  torch::NoGradGuard no_grad;
  if (dirty || !stream_) {
    try {
      apply_settings(want);
      if (sink_.message) {
        nlohmann::json settings = applied_.to_json();
        if (!defaults_.lora_names.empty()) {
          nlohmann::json scales = nlohmann::json::object();
          for (const auto& r : models_->loras()) scales[r.name] = r.scale;
          settings["lora"] = scales;
        }
        sink_.message({{"type", "config"}, {"settings", settings}});
      }
    } catch (const std::exception& e) {
      // Refused by the pipeline: the stream keeps the settings it had, and so does the session.
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!settings_dirty_) wanted_ = stream_ ? applied_ : StreamSettings::defaults(defaults_, want.txt2img);
      }
      send_error(std::string("config not applied: ") + e.what());
      if (!stream_) return;
    }
  }
  if (!generate) return;
  if (!applied_.txt2img && frame.empty()) {
    send_error("img2img mode: send a JPEG frame (binary message), or switch to {\"type\":\"config\",\"mode\":\"txt2img\"}");
    return;
  }
  const auto t0 = Clock::now();
  torch::Tensor out;
  try {
    if (applied_.txt2img) {
      out = stream_->txt2img();
    } else {
      if (frame.cols != width() || frame.rows != height() || frame.type() != CV_8UC3 || !frame.isContinuous())
        throw InvalidArgument("frame is not a continuous RGB image of the stream size");
      const torch::Tensor hwc = torch::from_blob(frame.data, {frame.rows, frame.cols, 3}, torch::kUInt8);
      const torch::Tensor x = image_to_tensor(hwc, height(), width()).to(models_->device(), models_->dtype());
      const int64_t skipped_before = stream_->stats().skipped;
      out = stream_->img2img(x);
      if (stream_->stats().skipped > skipped_before) skipped_.fetch_add(1, std::memory_order_relaxed);
    }
  } catch (const std::exception& e) {
    send_error(std::string("generation failed: ") + e.what());
    return;
  }
  cv::Mat rgb;
  try {
    // Inside a try too: an exception here would reach the worker, and the client would get neither a frame nor an
    // error for its request.
    const torch::Tensor img = tensor_to_image(out.slice(0, 0, 1)).squeeze(0).contiguous();  // [H, W, 3] uint8
    rgb.create(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), CV_8UC3);
    std::memcpy(rgb.data, img.data_ptr<uint8_t>(), static_cast<size_t>(img.numel()));
  } catch (const std::exception& e) {
    send_error(std::string("generation failed: ") + e.what());
    return;
  }
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  const double prev = model_ms_ema_.load();
  model_ms_ema_.store(prev == 0 ? ms : 0.9 * prev + 0.1 * ms);
  frames_out_.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(rate_mutex_);
    ++window_frames_;
    const double dt = std::chrono::duration<double>(Clock::now() - window_start_).count();
    if (dt >= 1.0) {
      fps_out_ = static_cast<double>(window_frames_) / dt;
      window_frames_ = 0;
      window_start_ = Clock::now();
    }
  }
  if (!closed_ && sink_.frame) sink_.frame(std::move(rgb));
}

nlohmann::json StreamSession::stats() const {
  StreamSettings s = settings();
  double fps = 0;
  {
    std::lock_guard<std::mutex> lock(rate_mutex_);
    fps = fps_out_;
  }
  return {{"id", id_},
          {"mode", s.txt2img ? "txt2img" : "img2img"},
          {"frames_in", frames_in_.load()},
          {"dropped_in", dropped_in_.load()},
          {"frames_out", frames_out_.load()},
          {"dropped_out", dropped_out_.load()},
          {"skipped", skipped_.load()},
          {"errors", errors_.load()},
          {"model_ms", model_ms_ema_.load()},
          {"fps_out", fps}};
}

}  // namespace sd::server
