#include "server/stream_session.h"

#include <torch/torch.h>

#include "core/error.h"
#include "core/log.h"
#include "models/ip_adapter.h"
#include "pipeline/image.h"

namespace sd::server {
namespace {

// A view of an RGB 8UC3 image as uint8 [H, W, 3], copied (the stream keeps what it is given).
torch::Tensor mat_tensor(const cv::Mat& rgb) {
  const cv::Mat m = rgb.isContinuous() ? rgb : rgb.clone();
  return torch::from_blob(m.data, {m.rows, m.cols, 3}, torch::kUInt8).clone();
}

cv::Mat preprocess(const ControlPreprocessor& p, const cv::Mat& rgb) {
  const torch::Tensor out = p.apply(mat_tensor(rgb)).contiguous();
  cv::Mat m(static_cast<int>(out.size(0)), static_cast<int>(out.size(1)), CV_8UC3);
  std::memcpy(m.data, out.data_ptr<uint8_t>(), static_cast<size_t>(out.numel()));
  return m;
}

std::vector<std::shared_ptr<const ControlPreprocessor>> make_preprocessors(const StreamSettings& s) {
  std::vector<std::shared_ptr<const ControlPreprocessor>> out;
  for (const auto& c : s.controlnets) out.push_back(make_control_preprocessor(c.preprocessor));
  return out;
}

}  // namespace

nlohmann::json dropped_message(DropPoint where) {
  const bool input = where == DropPoint::Input;
  return {{"type", "dropped"},
          {"where", input ? "input" : "output"},
          {"reason", input ? "replaced by a newer request" : "the send queue is full"}};
}

StreamSession::StreamSession(uint64_t id, std::shared_ptr<const DiffusionModels> models,
                             const StreamDefaults& defaults, ModelWorker& worker, SessionSink sink)
    : id_(id), models_(std::move(models)), defaults_(defaults), worker_(worker), sink_(std::move(sink)) {
  wanted_ = StreamSettings::defaults(defaults_, defaults_.txt2img_mode);
  preprocessors_ = make_preprocessors(wanted_);
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
  // The control images of this frame, here on the network thread (off the model thread, which every client shares).
  std::vector<std::shared_ptr<const ControlPreprocessor>> pre;
  std::vector<ControlSetting> cn;
  size_t steps = 0;
  bool static_image = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pre = preprocessors_;
    cn = wanted_.controlnets;
    steps = wanted_.t_index_list.size();
    static_image = !wanted_.control_image.empty() || wanted_.txt2img;
  }
  std::vector<cv::Mat> control(pre.size());
  std::vector<std::string> specs(pre.size());
  for (size_t i = 0; i < pre.size() && !static_image; ++i) {
    if (pre[i]->feedback() || i >= cn.size() || !cn[i].runs(steps)) continue;
    try {
      control[i] = preprocess(*pre[i], rgb);
      specs[i] = pre[i]->name();
    } catch (const std::exception& e) {
      log::debug("stream {}: control preprocessor {} failed here, the model thread retries: {}", id_, pre[i]->name(),
                 e.what());
    }
  }
  bool replaced = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    replaced = !pending_frame_.empty() || pending_generate_;
    pending_frame_ = std::move(rgb);  // the latest frame wins
    pending_since_ = Clock::now();
    pending_control_ = std::move(control);
    pending_control_specs_ = std::move(specs);
    pending_generate_ = false;
  }
  if (replaced) reply_dropped();
  schedule();
}

void StreamSession::reply_dropped() {
  // Every request gets one reply, a frame or this, in order: a client that keeps N requests in flight (the page's
  // ?window=2) stays in step instead of waiting for a result that will never come.
  dropped_in_.fetch_add(1, std::memory_order_relaxed);
  if (!closed_ && sink_.message) sink_.message(dropped_message(DropPoint::Input));
}

void StreamSession::request_generate() {
  bool replaced = false;
  {
    // In img2img mode the model thread answers with an error (the mode may change before it runs).
    std::lock_guard<std::mutex> lock(mutex_);
    replaced = !pending_frame_.empty() || pending_generate_;
    pending_frame_ = cv::Mat();
    pending_control_.clear();
    pending_control_specs_.clear();
    pending_generate_ = true;
    pending_since_ = Clock::now();
  }
  frames_in_.fetch_add(1, std::memory_order_relaxed);
  if (replaced) reply_dropped();
  schedule();
}

void StreamSession::update_settings(const nlohmann::json& j) {
  // Applied outside the lock first: a control image or an image prompt is decoded here (up to 4096 x 4096 px, tens of
  // ms or more), and the model thread takes this lock at every step, which all clients share. Committed if wanted_ did
  // not change meanwhile, else applied again, under the lock, to what it is now.
  StreamSettings base;
  uint64_t version = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    base = wanted_;
    version = wanted_version_;
  }
  StreamSettings s = apply_settings_json(j, base, defaults_, {"type"});  // throws before changing anything
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (wanted_version_ != version) s = apply_settings_json(j, wanted_, defaults_, {"type"});
    // Specs were checked by apply_settings_json; only changed ones are made again.
    for (size_t i = 0; i < s.controlnets.size() && i < preprocessors_.size(); ++i)
      if (preprocessors_[i]->name() != s.controlnets[i].preprocessor)
        preprocessors_[i] = make_control_preprocessor(s.controlnets[i].preprocessor);
    wanted_ = std::move(s);
    ++wanted_version_;
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
  // A request the model had not taken yet gets no reply: counted, so that frames_in = frames_out + dropped_in +
  // errors + lost_at_close.
  if (!pending_frame_.empty() || pending_generate_) lost_at_close_.fetch_add(1, std::memory_order_relaxed);
  pending_frame_ = cv::Mat();
  pending_control_.clear();
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
  // So is the IP-Adapter's scale.
  const IPAdapterModels* ip = models_->ip_adapter();
  if (want.ip_adapter_scale && ip && ip->adapter->scale() != *want.ip_adapter_scale)
    models_->set_ip_adapter_scale(*want.ip_adapter_scale);
  if (!stream_ || want.txt2img != applied_.txt2img) {
    auto s = std::make_unique<StreamDiffusion>(models_, want.config(defaults_));
    s->prepare(want.prompts(), want.negative_prompt);
    if (!defaults_.controlnets.empty()) {
      s->set_controlnets(want.control_units(defaults_));  // the shared nets, this client's scales and ranges
      s->set_controlnet_every(defaults_.controlnet_every);
    }
    if (!want.image_prompt.empty()) s->set_image_prompt(mat_tensor(want.image_prompt));
    applied_preprocessors_ = make_preprocessors(want);
    stream_ = std::move(s);
    applied_ = want;
    applied_.lora.clear();  // a one-off request on the shared model, never re-applied from this session's state
    applied_.ip_adapter_scale.reset();
    return;
  }
  // The transition and blend method first: they shape the prompt / seed changes of the same message.
  if (!(want.transition == applied_.transition)) {
    stream_->set_transition(want.transition);
    applied_.transition = want.transition;
  }
  if (want.prompt_blend != applied_.prompt_blend) {
    stream_->set_prompt_blend(want.prompt_blend);
    applied_.prompt_blend = want.prompt_blend;
  }
  if (want.latent_feedback != applied_.latent_feedback) {
    stream_->set_latent_feedback(want.txt2img ? 0.0 : want.latent_feedback);
    applied_.latent_feedback = want.latent_feedback;
  }
  if (!want.prompt_list.empty()) {
    if (want.negative_prompt != applied_.negative_prompt) stream_->set_negative_prompt(want.negative_prompt);
    if (want.prompt_list != applied_.prompt_list) stream_->set_prompt_list(want.prompt_list);  // new texts encoded
    applied_.prompt = want.prompt;
    applied_.prompt_list = want.prompt_list;
    applied_.negative_prompt = want.negative_prompt;
  } else if (want.prompt != applied_.prompt || want.negative_prompt != applied_.negative_prompt ||
             !applied_.prompt_list.empty()) {
    stream_->update_prompt(want.prompt, want.negative_prompt);
    applied_.prompt = want.prompt;
    applied_.prompt_list.clear();
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
  if (!want.seed_list.empty()) {
    if (want.seed_list != applied_.seed_list) stream_->set_seed_list(want.seed_list);
    applied_.seed = want.seed;
    applied_.seed_list = want.seed_list;
  } else if (want.seed != applied_.seed || !applied_.seed_list.empty()) {
    stream_->set_seed(want.seed);
    applied_.seed = want.seed;
    applied_.seed_list.clear();
  }
  if (want.similarity_filter != applied_.similarity_filter) {
    stream_->set_similarity_filter(want.config(defaults_).similarity_filter);
    applied_.similarity_filter = want.similarity_filter;
  }
  for (size_t i = 0; i < want.controlnets.size() && i < applied_.controlnets.size(); ++i) {
    if (want.controlnets[i].scale != applied_.controlnets[i].scale) {
      stream_->set_controlnet_scale(i, want.controlnets[i].scale);
      applied_.controlnets[i].scale = want.controlnets[i].scale;
    }
    if (want.controlnets[i].guidance_start != applied_.controlnets[i].guidance_start ||
        want.controlnets[i].guidance_end != applied_.controlnets[i].guidance_end) {
      stream_->set_controlnet_guidance(i, want.controlnets[i].guidance_start, want.controlnets[i].guidance_end);
      applied_.controlnets[i].guidance_start = want.controlnets[i].guidance_start;
      applied_.controlnets[i].guidance_end = want.controlnets[i].guidance_end;
    }
    if (want.controlnets[i].preprocessor != applied_.controlnets[i].preprocessor) {
      applied_preprocessors_[i] = make_control_preprocessor(want.controlnets[i].preprocessor);
      applied_.controlnets[i].preprocessor = want.controlnets[i].preprocessor;
    }
  }
  applied_.control_image = want.control_image;  // set per call (set_control_images)
  if (want.image_prompt.data != applied_.image_prompt.data) {
    if (want.image_prompt.empty())
      stream_->clear_image_prompt();
    else
      stream_->set_image_prompt(mat_tensor(want.image_prompt));  // encoded once, here
    applied_.image_prompt = want.image_prompt;
  }
}

std::vector<cv::Mat> StreamSession::set_control_images(const cv::Mat& frame, const std::vector<cv::Mat>& control,
                                                       const std::vector<std::string>& control_specs) {
  std::vector<cv::Mat> used(applied_.controlnets.size());
  for (size_t i = 0; i < used.size(); ++i) {
    const ControlSetting& c = applied_.controlnets[i];
    if (!c.runs(applied_.t_index_list.size())) continue;  // skipped by the stream: needs no image
    const ControlPreprocessor& pre = *applied_preprocessors_[i];
    cv::Mat img;
    if (!applied_.control_image.empty()) {
      img = applied_.control_image;
    } else if (pre.feedback()) {
      // Before the first result there is no previous output: the input frame, or black in txt2img.
      img = !last_output_.empty() ? last_output_
            : !frame.empty()      ? frame
                                  : cv::Mat(height(), width(), CV_8UC3, cv::Scalar::all(0));
    } else if (frame.empty()) {
      throw InvalidArgument("txt2img mode: controlnets[" + std::to_string(i) + "] (preprocessor " + c.preprocessor +
                            ") has no input frame to preprocess: send a control_image ({\"type\":\"config\","
                            "\"control_image\":\"<base64 JPEG/PNG>\"}), choose the feedback preprocessor, or set its "
                            "scale to 0");
    } else if (i < control.size() && !control[i].empty() && control_specs[i] == c.preprocessor) {
      img = control[i];  // made on the network thread
    } else {
      img = preprocess(pre, frame);  // the preprocessor changed after the frame arrived
    }
    stream_->set_control_image(i, mat_tensor(img));
    used[i] = img;
  }
  return used;
}

void StreamSession::run_model_step() {
  PendingStep p;
  if (!begin_step(p)) return;
  torch::Tensor out;
  try {
    out = p.txt2img ? stream_->txt2img() : stream_->img2img(p.x, InputReady::complete);
  } catch (const std::exception& e) {
    count_stream_stats(p);
    send_error(std::string("generation failed: ") + e.what());
    return;
  }
  end_step(p, out);
}

const void* StreamSession::batch_key() const {
  if (stream_ && !stream_->batch_blocker().empty()) return nullptr;
  return models_.get();
}

bool StreamSession::begin_batched_step(BatchedStep& step) {
  batch_step_ = PendingStep();
  if (!begin_step(batch_step_)) return false;
  step.stream = stream_.get();
  step.images = batch_step_.txt2img ? torch::Tensor() : batch_step_.x;
  step.ready = InputReady::complete;  // image_to_device_tensor's
  return true;
}

void StreamSession::begin_batched_output(BatchedStep& step) {
  // On the CPU the conversion is the work itself: end_step does it, so the first clients get theirs first.
  if (!step.output.is_cuda()) return;
  try {
    batch_pixels_ = start_image_download(step.output.slice(0, 0, 1));
  } catch (const std::exception&) {
    // end_step converts the frame itself then, and sends the client the error this would have been.
    batch_pixels_.reset();
  }
}

void StreamSession::end_batched_step(BatchedStep& step) {
  PendingStep p = std::move(batch_step_);
  batch_step_ = PendingStep();
  std::optional<ImageDownload> pixels = std::move(batch_pixels_);
  batch_pixels_.reset();
  if (step.error) {
    count_stream_stats(p);
    try {
      std::rethrow_exception(step.error);
    } catch (const std::exception& e) {
      send_error(std::string("generation failed: ") + e.what());
    }
    return;
  }
  end_step(p, step.output, std::move(pixels));
}

bool StreamSession::begin_step(PendingStep& p) {
  if (closed_) {
    stream_.reset();
    return false;
  }
  cv::Mat frame;
  std::vector<cv::Mat> control;
  std::vector<std::string> control_specs;
  bool generate = false, dirty = false;
  StreamSettings want;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    frame = std::move(pending_frame_);
    pending_frame_ = cv::Mat();
    control = std::move(pending_control_);
    control_specs = std::move(pending_control_specs_);
    pending_control_.clear();
    pending_control_specs_.clear();
    generate = pending_generate_ || !frame.empty();
    pending_generate_ = false;
    p.requested = pending_since_;
    dirty = settings_dirty_;
    settings_dirty_ = false;
    want = wanted_;
    wanted_.lora.clear();  // a one-shot request: another client may change the scales later
    wanted_.ip_adapter_scale.reset();
    ++wanted_version_;
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
        if (models_->ip_adapter()) settings["ip_adapter_scale"] = models_->ip_adapter()->adapter->scale();
        sink_.message({{"type", "config"}, {"settings", settings}});
      }
    } catch (const std::exception& e) {
      // Refused by the pipeline: the stream keeps the settings it had, and so does the session.
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!settings_dirty_) {
          wanted_ = stream_ ? applied_ : StreamSettings::defaults(defaults_, want.txt2img);
          ++wanted_version_;
          preprocessors_ = make_preprocessors(wanted_);
        }
      }
      send_error(std::string("config not applied: ") + e.what());
      if (!stream_) return false;
    }
  }
  if (!generate) return false;
  if (!applied_.txt2img && frame.empty()) {
    send_error("img2img mode: send a JPEG frame (binary message), or switch to {\"type\":\"config\",\"mode\":\"txt2img\"}");
    return false;
  }
  p.t0 = Clock::now();
  p.txt2img = applied_.txt2img;
  try {
    p.before = stream_->stats();
    // txt2img does not use a frame's pixels (a frame only asks for the next image): nothing to preprocess.
    if (!applied_.controlnets.empty())
      p.used_control = set_control_images(applied_.txt2img ? cv::Mat() : frame, control, control_specs);
    if (!applied_.txt2img) {
      if (frame.cols != width() || frame.rows != height() || frame.type() != CV_8UC3 || !frame.isContinuous())
        throw InvalidArgument("frame is not a continuous RGB image of the stream size");
      const torch::Tensor hwc = torch::from_blob(frame.data, {frame.rows, frame.cols, 3}, torch::kUInt8);
      p.x = image_to_device_tensor(hwc, height(), width(), models_->device(), models_->dtype());
    }
  } catch (const std::exception& e) {
    send_error(std::string("generation failed: ") + e.what());
    return false;
  }
  return true;
}

void StreamSession::count_stream_stats(const PendingStep& p) {
  if (!stream_) return;
  const StreamStats& before = p.before;
  const StreamStats& after = stream_->stats();
  graphs_.add(before, after);
  if (!applied_.controlnets.empty()) {
    controlnet_calls_.fetch_add(after.controlnet_calls - before.controlnet_calls, std::memory_order_relaxed);
    controlnet_reused_.fetch_add(after.controlnet_reused - before.controlnet_reused, std::memory_order_relaxed);
    controlnet_s_.store(controlnet_s_.load() + (after.controlnet_s - before.controlnet_s));
  }
}

void StreamSession::end_step(PendingStep& p, const torch::Tensor& out, std::optional<ImageDownload> pixels) {
  if (stream_->stats().skipped > p.before.skipped) skipped_.fetch_add(1, std::memory_order_relaxed);
  count_stream_stats(p);
  const std::vector<cv::Mat>& used_control = p.used_control;
  const auto t0 = p.t0;
  cv::Mat rgb;
  try {
    // Inside a try too: an exception here would reach the worker, and the client would get neither a frame nor an
    // error for its request.
    if (!pixels) pixels = start_image_download(out.slice(0, 0, 1));
    const torch::Tensor img = pixels->get().squeeze(0).contiguous();  // [H, W, 3] uint8
    rgb.create(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), CV_8UC3);
    std::memcpy(rgb.data, img.data_ptr<uint8_t>(), static_cast<size_t>(img.numel()));
  } catch (const std::exception& e) {
    send_error(std::string("generation failed: ") + e.what());
    return;
  }
  last_output_ = rgb;  // shares the buffer with the frame handed over below; neither side writes it again
  const auto t_end = Clock::now();
  const double ms = std::chrono::duration<double, std::milli>(t_end - t0).count();
  if (sink_.timing && p.requested != Clock::time_point{})
    sink_.timing(std::chrono::duration<double>(t0 - p.requested).count(), ms / 1000.0);
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
  if (!closed_ && sink_.control)
    for (size_t i = 0; i < used_control.size(); ++i)
      if (!used_control[i].empty()) sink_.control(i, used_control[i]);
}

nlohmann::json StreamSession::stats() const {
  StreamSettings s = settings();
  double fps = 0;
  {
    std::lock_guard<std::mutex> lock(rate_mutex_);
    fps = fps_out_;
  }
  nlohmann::json j = {{"id", id_},
          {"mode", s.txt2img ? "txt2img" : "img2img"},
          {"frames_in", frames_in_.load()},
          {"dropped_in", dropped_in_.load()},
          {"frames_out", frames_out_.load()},
          {"dropped_out", dropped_out_.load()},
          {"skipped", skipped_.load()},
          {"errors", errors_.load()},
          {"lost_at_close", lost_at_close_.load()},
          {"model_ms", model_ms_ema_.load()},
          {"fps_out", fps}};
  graphs_.put(j);
  if (!defaults_.controlnets.empty()) {
    j["controlnet_calls"] = controlnet_calls_.load();
    j["controlnet_reused"] = controlnet_reused_.load();
    j["controlnet_s"] = controlnet_s_.load();
  }
  return j;
}

}  // namespace sd::server
