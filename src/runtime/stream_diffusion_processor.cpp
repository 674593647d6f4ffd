#include "runtime/stream_diffusion_processor.h"

#include <cmath>

#include <torch/torch.h>

#include "core/device.h"
#include "core/error.h"
#include "core/side_stream.h"
#include "pipeline/controlnet.h"
#include "pipeline/image.h"
#include "runtime/image_folder_source.h"

namespace sd {

StreamDiffusionProcessor::StreamDiffusionProcessor(std::shared_ptr<StreamDiffusion> stream, std::string prompt,
                                                   std::string negative_prompt, bool txt2img)
    : stream_(std::move(stream)),
      prompt_(std::move(prompt)),
      negative_prompt_(std::move(negative_prompt)),
      txt2img_(txt2img),
      width_(0),
      height_(0),
      frames_per_call_(1),
      dtype_(c10::kFloat),
      device_(c10::kCPU) {
  if (!stream_) throw InvalidArgument("StreamDiffusionProcessor: no stream");
  if (!stream_->prepared()) throw InvalidArgument("StreamDiffusionProcessor: the stream must be prepared first");
  const StreamConfig& c = stream_->config();
  width_ = c.width;
  height_ = c.height;
  frames_per_call_ = c.frame_buffer_size;
  dtype_ = stream_->models().dtype();
  device_ = stream_->models().device();
  // The runtime paces the stream; the original's sleep on a skip would only stall the model thread.
  SimilarityFilterOptions f = c.similarity_filter;
  if (f.sleep_on_skip) {
    f.sleep_on_skip = false;
    stream_->set_similarity_filter(f);
  }
  reset_warmup();
}

void StreamDiffusionProcessor::reset_warmup() {
  // A fresh (or restarted) stream: the first n−1 calls only fill the latent buffer. Padding entries stand for them.
  in_flight_.clear();
  const int64_t delay = (stream_->denoising_steps() - 1) * frames_per_call_;
  for (int64_t i = 0; i < delay; ++i) in_flight_.push_back({Kind::Padding, Frame{}});
  processed_pending_ = delay;
}

int64_t StreamDiffusionProcessor::latency_frames() const {
  return (stream_->denoising_steps() - 1) * frames_per_call_ + (frames_per_call_ - 1);
}

std::string StreamDiffusionProcessor::describe() const {
  const StreamConfig& c = stream_->config();
  std::string t;
  for (auto i : c.t_index_list) {
    if (!t.empty()) t += ',';
    t += std::to_string(i);
  }
  return std::string(txt2img_ ? "txt2img" : "img2img") + " " + std::to_string(width_) + "x" + std::to_string(height_) +
         " t_index_list [" + t + "] cfg " + cfg_type_name(c.cfg_type) + " F " + std::to_string(frames_per_call_) +
         " " + dtype_name(dtype_) + " (" + stream_->models().describe() + ")" + describe_controls();
}

std::string StreamDiffusionProcessor::describe_controls() const {
  const auto& units = stream_->controlnets();
  if (units.empty()) return "";
  const auto pre = control_preprocessors();
  std::string s = " + ControlNet";
  for (size_t i = 0; i < units.size(); ++i)
    s += std::string(i ? ", " : " ") + units[i].net->name() + " x" + std::to_string(units[i].scale).substr(0, 4) +
         (units[i].guidance_start > 0.0 || units[i].guidance_end < 1.0
              ? " steps " + std::to_string(units[i].guidance_start).substr(0, 4) + ".." +
                    std::to_string(units[i].guidance_end).substr(0, 4)
              : "") +
         (i < pre.size() ? " <- " + pre[i]->name() : "");
  if (stream_->controlnet_every() > 1) s += " every " + std::to_string(stream_->controlnet_every());
  return s;
}

torch::Tensor StreamDiffusionProcessor::preprocess(const torch::Tensor& rgb_u8) {
  // [H, W, 3] uint8 -> [1, 3, H, W] in [-1, 1], already in the model's dtype and on its device (off the model thread;
  // on CUDA uploaded and converted on a side stream, overlapping the model's previous frame).
  return image_to_device_tensor(rgb_u8, height_, width_, device_, dtype_);
}

torch::Tensor StreamDiffusionProcessor::postprocess(const torch::Tensor& out) {
  return tensor_to_image(out).squeeze(0);  // [1, 3, H, W] -> [H, W, 3] uint8
}

void StreamDiffusionProcessor::begin_postprocess(Frame& out) {
  if (!out.tensor.defined() || !out.tensor.is_cuda()) return;  // the CPU converts on the post-process thread
  auto download = std::make_shared<ImageDownload>(start_image_download(out.tensor));
  out.postprocessed = [download] { return download->get().squeeze(0); };
}

void StreamDiffusionProcessor::check_control_preprocessor(size_t index, const ControlPreprocessor& p) const {
  if (txt2img_ && !control_source_ && !p.feedback())
    throw InvalidArgument("control preprocessor " + std::to_string(index) + " '" + p.name() +
                          "': a txt2img stream has no input frames to preprocess; use feedback or a control input");
}

void StreamDiffusionProcessor::set_control_preprocessors(
    std::vector<std::shared_ptr<const ControlPreprocessor>> preprocessors, bool control_source) {
  const size_t n = stream_->controlnets().size();
  if (preprocessors.size() != n)
    throw InvalidArgument("control preprocessors: " + std::to_string(preprocessors.size()) + " given for " +
                          std::to_string(n) + " ControlNet(s)");
  std::lock_guard<std::mutex> lock(control_mutex_);
  const bool saved = control_source_;
  control_source_ = control_source;
  try {
    for (size_t i = 0; i < n; ++i) {
      if (!preprocessors[i]) throw InvalidArgument("control preprocessor " + std::to_string(i) + " is null");
      check_control_preprocessor(i, *preprocessors[i]);
    }
  } catch (...) {
    control_source_ = saved;
    throw;
  }
  preprocessors_ = std::move(preprocessors);
  control_needs_.clear();  // every one is made until the model thread's next frame refreshes it
  control_stale_.assign(n, 1);
}

void StreamDiffusionProcessor::refresh_control_needs() {
  const size_t n = stream_->controlnets().size();
  std::vector<char> need(n);
  control_stale_.resize(n, 1);
  for (size_t i = 0; i < n; ++i)
    need[i] = stream_->controlnet_runs(i) || !stream_->control_image(i).defined() || control_stale_[i];
  std::lock_guard<std::mutex> lock(control_mutex_);
  control_needs_ = std::move(need);
}

std::vector<std::shared_ptr<const ControlPreprocessor>> StreamDiffusionProcessor::control_preprocessors() const {
  std::lock_guard<std::mutex> lock(control_mutex_);
  return preprocessors_;
}

void StreamDiffusionProcessor::preprocess_controls(Frame& frame, const torch::Tensor& input_rgb_u8,
                                                   const torch::Tensor& control_rgb_u8) {
  std::vector<std::shared_ptr<const ControlPreprocessor>> pre;
  std::vector<char> need;
  {
    std::lock_guard<std::mutex> lock(control_mutex_);
    pre = preprocessors_;
    need = control_needs_;
  }
  frame.controls.assign(pre.size(), torch::Tensor());
  const torch::Tensor& source = control_rgb_u8.defined() ? control_rgb_u8 : input_rgb_u8;
  if (!source.defined()) return;
  for (size_t i = 0; i < pre.size(); ++i) {
    if (pre[i]->feedback()) continue;  // made on the model thread from the previous output
    if (i >= need.size() || need[i])
      frame.controls[i] = pre[i]->apply(source);
    else
      frame.control_source = source;  // should it run by this frame's call after all, process() makes its image
  }
}

void StreamDiffusionProcessor::set_feedback_controls() {
  const auto pre = control_preprocessors();
  for (size_t i = 0; i < pre.size(); ++i) {
    // One that does not run keeps its last image (as the frames' control images, refresh_control_needs).
    const bool stale = i >= control_stale_.size() || control_stale_[i];
    if (!pre[i]->feedback() || (!stream_->controlnet_runs(i) && stream_->control_image(i).defined() && !stale))
      continue;
    if (i < control_stale_.size()) control_stale_[i] = 0;
    const torch::Tensor img = last_output_.defined()
                                  ? (last_output_.to(torch::kFloat32) / 2 + 0.5).clamp(0, 1)
                                  : torch::zeros({1, 3, height_, width_});
    stream_->set_control_image(i, img);
  }
}

int64_t StreamDiffusionProcessor::real_pending() const {
  int64_t n = 0;
  for (const auto& e : in_flight_) n += e.kind != Kind::Padding;
  return n + static_cast<int64_t>(batch_.size());
}

void StreamDiffusionProcessor::set_image_prompt_change(double levels) {
  if (!(levels >= 0) || !std::isfinite(levels))
    throw InvalidArgument("image prompt change threshold must be a finite number >= 0 (uint8 levels), got " +
                          std::to_string(levels));
  image_prompt_change_ = levels;
}

void StreamDiffusionProcessor::set_current_image_prompt(const torch::Tensor& rgb_u8) { image_prompt_ = rgb_u8; }

void StreamDiffusionProcessor::apply_image_prompt(const torch::Tensor& rgb_u8) {
  if (image_prompt_.defined() && image_prompt_.sizes() == rgb_u8.sizes()) {
    const double change =
        (rgb_u8.to(torch::kInt16) - image_prompt_.to(torch::kInt16)).abs().to(torch::kFloat32).mean().item<double>();
    if (change <= image_prompt_change_) {
      ++image_prompts_unchanged_;
      return;
    }
  }
  stream_->set_image_prompt(rgb_u8);  // the image encoder runs here, once per new image
  image_prompt_ = rgb_u8;
}

std::vector<Frame> StreamDiffusionProcessor::process(Frame in) {
  if (!txt2img_) {
    if (!in.tensor.defined()) throw InvalidArgument("img2img stream: frame " + std::to_string(in.index) + " has no image");
    last_input_ = in.tensor;
  }
  std::vector<std::shared_ptr<const ControlPreprocessor>> pre;
  if (in.control_source.defined()) pre = control_preprocessors();
  for (size_t i = 0; i < in.controls.size() && i < stream_->controlnets().size(); ++i) {
    torch::Tensor image = in.controls[i];
    // Preprocessed while this ControlNet did not run, and it runs now (turned on since): the frame's own image, made
    // here, rather than the one the stream kept from before it went off.
    if (!image.defined() && in.control_source.defined() && i < pre.size() && !pre[i]->feedback() &&
        stream_->controlnet_runs(i))
      image = pre[i]->apply(in.control_source);
    if (image.defined()) {
      stream_->set_control_image(i, image);
      if (i < control_stale_.size()) control_stale_[i] = 0;
    }
  }
  in.controls.clear();
  in.control_source = torch::Tensor();
  refresh_control_needs();  // after this frame's images and the commands applied since the last frame
  if (in.image_prompt_rgb.defined()) apply_image_prompt(in.image_prompt_rgb);
  in.image_prompt_rgb = torch::Tensor();
  batch_.push_back(std::move(in));
  std::vector<Frame> outs;
  outs.swap(carry_);
  if (static_cast<int64_t>(batch_.size()) < frames_per_call_) return outs;
  std::vector<Frame> batch;
  batch.swap(batch_);
  for (auto& o : run_batch(std::move(batch), 0)) outs.push_back(std::move(o));
  return outs;
}

std::vector<Frame> StreamDiffusionProcessor::run_batch(std::vector<Frame> batch, int64_t pad) {
  const int64_t F = frames_per_call_;
  torch::Tensor images;
  bool skipped = false;
  set_feedback_controls();
  if (txt2img_) {
    images = stream_->txt2img();
  } else {
    std::vector<torch::Tensor> xs;
    for (const auto& f : batch) xs.push_back(f.tensor);
    const int64_t skipped_before = stream_->stats().skipped;
    // preprocess()'s frames are complete on the device (image_to_device_tensor; FrameProcessor::process requires it of
    // its callers); so is a cat of several made on a side stream, where the stream compares its inputs at once (else
    // the cat is queued on this thread's stream, no wait).
    if (xs.size() == 1)
      images = stream_->img2img(xs[0], InputReady::complete);
    else if (stream_->compares_inputs())
      images = stream_->img2img(complete_on_side_stream(device_, [&] { return torch::cat(xs, 0); }),
                                InputReady::complete);  // [F, 3, H, W]
    else
      images = stream_->img2img(torch::cat(xs, 0));
    skipped = stream_->stats().skipped > skipped_before;
  }
  std::vector<Frame> outs;
  const int64_t real = F - pad;
  if (skipped) {
    // Nothing advanced: each skipped frame repeats the image of its predecessor.
    skipped_frames_ += real;
    for (int64_t i = 0; i < real; ++i) {
      Frame meta;
      meta.index = batch[i].index;
      meta.t_capture = batch[i].t_capture;
      meta.tick = batch[i].tick;
      in_flight_.push_back({Kind::Duplicate, std::move(meta)});
    }
    emit_ready(torch::Tensor(), outs);
    return outs;
  }
  for (int64_t i = 0; i < F; ++i) {
    Frame meta;
    if (i < real) {
      meta.index = batch[i].index;
      meta.t_capture = batch[i].t_capture;
      meta.tick = batch[i].tick;
    }
    in_flight_.push_back({i < real ? Kind::Real : Kind::Padding, std::move(meta)});
  }
  processed_pending_ += F;
  last_output_ = images.slice(0, F - 1, F);
  emit_ready(images, outs);
  return outs;
}

void StreamDiffusionProcessor::emit_ready(const torch::Tensor& images, std::vector<Frame>& outs) {
  const int64_t delay = (stream_->denoising_steps() - 1) * frames_per_call_;
  // `images` (F rows) belong to the oldest F Real/Padding entries once more than `delay` are pending.
  int64_t row = 0;
  const bool have = images.defined() && processed_pending_ > delay;
  const int64_t rows = have ? frames_per_call_ : 0;
  while (!in_flight_.empty()) {
    Entry& e = in_flight_.front();
    if (e.kind == Kind::Duplicate) {
      if (!last_image_.defined()) break;  // cannot happen: the first frame is always processed
      Frame f = std::move(e.meta);
      f.tensor = last_image_;
      outs.push_back(std::move(f));
      in_flight_.pop_front();
      continue;
    }
    if (row >= rows) break;
    const torch::Tensor img = images.slice(0, row, row + 1);
    ++row;
    --processed_pending_;
    if (e.kind == Kind::Real) {
      Frame f = std::move(e.meta);
      f.tensor = img;
      last_image_ = img;
      outs.push_back(std::move(f));
    }
    in_flight_.pop_front();
  }
}

std::vector<Frame> StreamDiffusionProcessor::flush_in_flight() {
  std::vector<Frame> outs;
  if (real_pending() == 0) return outs;
  // Padding must run the model: no similarity filter while flushing.
  const SimilarityFilterOptions saved = stream_->config().similarity_filter;
  if (saved.enabled) {
    SimilarityFilterOptions off = saved;
    off.enabled = false;
    stream_->set_similarity_filter(off);
  }
  try {
    const int64_t F = frames_per_call_;
    auto pad_frame = [&] {
      Frame p;
      p.tick = txt2img_;
      if (!txt2img_) p.tensor = last_input_;
      return p;
    };
    if (!batch_.empty()) {  // a partial batch: complete it with padding
      std::vector<Frame> batch;
      batch.swap(batch_);
      const int64_t pad = F - static_cast<int64_t>(batch.size());
      for (int64_t i = 0; i < pad; ++i) batch.push_back(pad_frame());
      for (auto& o : run_batch(std::move(batch), pad)) outs.push_back(std::move(o));
    }
    while (real_pending() > 0) {
      std::vector<Frame> batch;
      for (int64_t i = 0; i < F; ++i) batch.push_back(pad_frame());
      for (auto& o : run_batch(std::move(batch), F)) outs.push_back(std::move(o));
    }
  } catch (...) {
    if (saved.enabled) stream_->set_similarity_filter(saved);
    throw;
  }
  if (saved.enabled) stream_->set_similarity_filter(saved);
  return outs;
}

std::vector<Frame> StreamDiffusionProcessor::flush() {
  std::vector<Frame> outs;
  outs.swap(carry_);
  for (auto& o : flush_in_flight()) outs.push_back(std::move(o));
  return outs;
}

std::vector<Frame> StreamDiffusionProcessor::apply(const ControlCommand& c) {
  using K = ControlCommand::Kind;
  switch (c.kind) {
    case K::Prompt:
      stream_->update_prompt(c.text, negative_prompt_);
      prompt_ = c.text;
      return {};
    case K::Negative:
      // The stream's own prompt (set by --prompt-list, a prompt_list command or --prompt): prompt_ is only what the
      // processor was made with.
      if (stream_->prompt_list().size() == 1)
        stream_->update_prompt(stream_->prompt_list()[0].text, c.text);
      else
        stream_->set_negative_prompt(c.text);  // keeps the prompt blend
      negative_prompt_ = c.text;
      return {};
    case K::Guidance:
      stream_->set_guidance_scale(c.number);
      return {};
    case K::Delta:
      stream_->set_delta(c.number);
      return {};
    case K::Seed:
      stream_->set_seed(c.seed);
      return {};
    case K::PromptList:
      stream_->set_prompt_list(c.prompts);  // only texts new to the stream are encoded, here
      prompt_ = c.prompts.size() == 1 ? c.prompts[0].text : prompt_;
      return {};
    case K::SeedList:
      stream_->set_seed_list(c.seeds);
      return {};
    case K::Transition:
      stream_->set_transition(c.transition);
      return {};
    case K::PromptBlend:
      stream_->set_prompt_blend(c.blend);
      return {};
    case K::LatentFeedback:
      stream_->set_latent_feedback(c.number);
      return {};
    case K::TIndexList: {
      if (static_cast<int64_t>(c.t_index_list.size()) == stream_->denoising_steps()) {
        stream_->set_t_index_list(c.t_index_list);  // same batch: buffers kept, nothing to flush
        return {};
      }
      // A new length restarts the stream: get the frames in flight out first (validated up front so that a refused
      // list does not flush needlessly).
      const std::vector<int64_t> old = stream_->config().t_index_list;
      const int64_t steps = stream_->config().num_inference_steps;
      for (int64_t t : c.t_index_list)
        if (t >= steps)
          throw InvalidArgument("t_index_list entry " + std::to_string(t) + " is out of range: num_inference_steps is " +
                                std::to_string(steps));
      std::vector<Frame> outs;
      try {
        outs = flush_in_flight();
      } catch (const InvalidArgument& e) {
        // Not a refusal (the list was checked above): the model failed on the frames in flight.
        throw Error(std::string("flushing the frames in flight for the new t_index_list: ") + e.what());
      }
      try {
        stream_->set_t_index_list(c.t_index_list);
      } catch (...) {
        // Refused after all: the stream is unchanged; the flushed frames still go out with the next call.
        for (auto& o : outs) carry_.push_back(std::move(o));
        throw;
      }
      reset_warmup();
      return outs;
    }
    case K::Filter: {
      SimilarityFilterOptions f = stream_->config().similarity_filter;
      f.enabled = c.on;
      f.sleep_on_skip = false;
      stream_->set_similarity_filter(f);
      return {};
    }
    case K::FilterThreshold: {
      SimilarityFilterOptions f = stream_->config().similarity_filter;
      f.threshold = c.number;
      f.sleep_on_skip = false;
      stream_->set_similarity_filter(f);
      return {};
    }
    case K::Lora:
      // The shared weights are re-fused here, on the model thread between two frames; the stream re-encodes its
      // prompts on its next call when the LoRA patches the text encoder. The latent buffer is kept.
      stream_->models().set_lora_scale(c.text, c.number);
      return {};
    case K::IpAdapterScale:
      // The shared adapter's scale, read by every attn2 on the next UNet call (the latent buffer is kept).
      stream_->models().set_ip_adapter_scale(c.number);
      return {};
    case K::ImagePrompt:
      // Encoded once here, on the model thread; the next call conditions on it.
      if (c.text.empty()) {
        stream_->clear_image_prompt();
        image_prompt_ = torch::Tensor();
      } else {
        torch::Tensor img;
        try {
          img = read_rgb_image(c.text);
        } catch (const FormatError& e) {
          throw InvalidArgument(e.what());  // a refusal: the stream keeps its image prompt
        }
        stream_->set_image_prompt(img);
        image_prompt_ = img;
      }
      return {};
    case K::ControlnetScale:
      stream_->set_controlnet_scale(static_cast<size_t>(c.index), c.number);
      return {};
    case K::ControlnetGuidance:
      stream_->set_controlnet_guidance(static_cast<size_t>(c.index), c.number, c.end);
      return {};
    case K::DeepCache:
      stream_->set_deep_cache(c.index,
                              std::isnan(c.number) ? stream_->config().deep_cache_min_similarity : c.number);
      return {};
    case K::ControlPreprocessor: {
      auto pre = control_preprocessors();
      if (c.index >= static_cast<int64_t>(pre.size()))
        throw InvalidArgument("control_preprocessor: ControlNet index " + std::to_string(c.index) +
                              " out of range (" + std::to_string(pre.size()) + " ControlNets)");
      auto p = make_control_preprocessor(c.text);
      check_control_preprocessor(static_cast<size_t>(c.index), *p);
      pre[static_cast<size_t>(c.index)] = std::move(p);
      // The stream's image is the old preprocessor's: the next frames make one even if the ControlNet is off now.
      if (static_cast<size_t>(c.index) < control_stale_.size()) control_stale_[static_cast<size_t>(c.index)] = 1;
      std::lock_guard<std::mutex> lock(control_mutex_);
      preprocessors_ = std::move(pre);
      if (static_cast<size_t>(c.index) < control_needs_.size()) control_needs_[static_cast<size_t>(c.index)] = 1;
      return {};
    }
    default:
      throw InvalidArgument("'" + c.line + "' is not a pipeline command");
  }
}

}  // namespace sd
