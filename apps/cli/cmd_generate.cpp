// `streamdiffusion txt2img` and `streamdiffusion img2img`: one stream on a model folder, images in and out with
// OpenCV (files are BGR on disk; the pipeline is RGB).
#include <algorithm>
#include <chrono>
#include <deque>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <torch/torch.h>

#include "apps/cli/commands.h"
#include "apps/cli/controlnet_options.h"
#include "apps/cli/pipeline_options.h"
#include "core/device.h"
#include "core/error.h"
#include "core/log.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/stream_diffusion.h"
#include "runtime/image_folder_source.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

const char* kResizePolicy =
    "Input images are centre-cropped to the target aspect ratio, then resized to --size with INTER_AREA when "
    "shrinking and INTER_LANCZOS4 when enlarging (no-op when the size already matches).";

// The pipeline options (shared with `stream`, apps/cli/pipeline_options.h) plus what only these commands take.
struct GenerateOptions : sd::cli::PipelineOptions {
  int warmup = -1;
  std::string output;
  std::string input;      // img2img
  bool one_shot = false;  // txt2img
};

void add_shared_options(CLI::App& app, GenerateOptions& o, bool txt2img) {
  sd::cli::add_pipeline_options(app, o, txt2img ? sd::cli::PipelineMode::Txt2Img : sd::cli::PipelineMode::Img2Img);
  sd::cli::add_ip_adapter_options(app, o);
  sd::cli::add_controlnet_options(app, o,
                                  txt2img ? "control image file (preprocessed once; default preprocessor passthrough)"
                                          : "control image file used for every frame instead of the input frames "
                                            "(preprocessed once; default preprocessor passthrough)");
  app.add_option("--warmup", o.warmup,
                 txt2img ? "calls before the saved one (default n-1 with the denoising batch, so the saved image "
                           "is not a warm-up frame)"
                         : "extra calls with the first frame before the sequence (default 0; outputs are always "
                           "aligned with their inputs, so warm-up frames are never saved)")
      ->check(sd::cli::at_least(0));
}

using sd::cli::stream_config;

// One-shot commands never change a LoRA scale: no need to keep the unfused weights.
sd::cli::LoadedModels load(const GenerateOptions& o) {
  sd::cli::PipelineOptions p = o;
  p.lora_live = false;
  return sd::cli::load_models(p);
}

// --image-prompt: encoded once, before the stream starts (without one, an IP-Adapter sees the zero image).
void set_image_prompt(const sd::cli::PipelineOptions& o, sd::StreamDiffusion& stream) {
  if (!o.image_prompt.empty())
    stream.set_image_prompt(sd::read_rgb_image(o.image_prompt));
  else if (!o.ip_adapter.empty())
    sd::log::warn("--ip-adapter without --image-prompt: the adapter conditions on the zero image");
}

torch::Tensor read_image(const std::string& path, int64_t width, int64_t height);

// --controlnet for txt2img / img2img: the ControlNets are set on the stream; with --control-input their control images
// are made once from that file. Returns the setup (img2img without --control-input preprocesses each frame).
sd::cli::ControlNetSetup setup_controlnets(const sd::cli::PipelineOptions& o, const sd::DiffusionModels& models,
                                           sd::StreamDiffusion& stream, bool txt2img) {
  sd::cli::ControlNetSetup c = sd::cli::load_controlnets(o, models, !txt2img);
  if (c.units.empty()) return c;
  for (const auto& p : c.preprocessors)
    if (p->feedback())
      throw sd::InvalidArgument("--control-preprocessor feedback needs a stream (streamdiffusion stream)");
  stream.set_controlnets(c.units);
  stream.set_controlnet_every(o.controlnet_every);
  if (!o.control_input.empty()) {
    const torch::Tensor src = read_image(o.control_input, stream.config().width, stream.config().height);
    for (size_t i = 0; i < c.units.size(); ++i) stream.set_control_image(i, c.preprocessors[i]->apply(src));
  }
  return c;
}

// uint8 RGB [H, W, 3] from a file, centre-cropped and resized to width x height.
torch::Tensor read_image(const std::string& path, int64_t width, int64_t height) {
  cv::Mat bgr = cv::imread(path, cv::IMREAD_COLOR);
  if (bgr.empty()) throw sd::FormatError(path, "cannot read as an image (missing, or a format OpenCV cannot decode)");
  // Centre crop to the target aspect ratio.
  const double target = static_cast<double>(width) / static_cast<double>(height);
  const double aspect = static_cast<double>(bgr.cols) / static_cast<double>(bgr.rows);
  cv::Rect roi(0, 0, bgr.cols, bgr.rows);
  if (aspect > target + 1e-9) {
    roi.width = std::max(1, static_cast<int>(std::lround(bgr.rows * target)));
    roi.x = (bgr.cols - roi.width) / 2;
  } else if (aspect < target - 1e-9) {
    roi.height = std::max(1, static_cast<int>(std::lround(bgr.cols / target)));
    roi.y = (bgr.rows - roi.height) / 2;
  }
  cv::Mat cropped = bgr(roi);
  cv::Mat sized;
  if (cropped.cols == width && cropped.rows == height) {
    sized = cropped;
  } else {
    const bool shrink = cropped.cols > width || cropped.rows > height;
    cv::resize(cropped, sized, cv::Size(static_cast<int>(width), static_cast<int>(height)), 0, 0,
               shrink ? cv::INTER_AREA : cv::INTER_LANCZOS4);
  }
  cv::Mat rgb;
  cv::cvtColor(sized, rgb, cv::COLOR_BGR2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, torch::kUInt8).clone();
}

void write_image(const std::string& path, const torch::Tensor& hwc_u8) {
  const torch::Tensor t = hwc_u8.contiguous();
  cv::Mat rgb(static_cast<int>(t.size(0)), static_cast<int>(t.size(1)), CV_8UC3, t.data_ptr<uint8_t>());
  cv::Mat bgr;
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  bool ok = false;
  try {
    ok = cv::imwrite(path, bgr);
  } catch (const cv::Exception& e) {
    throw sd::FormatError(path, std::string("cannot write image: ") + e.what());
  }
  if (!ok) throw sd::FormatError(path, "cannot write image (unknown extension or unwritable location)");
}

// out.png -> out.png (one image) or out_0.png, out_1.png, ... (F > 1)
std::string numbered(const std::string& path, int64_t k, int64_t count) {
  if (count == 1) return path;
  const fs::path p(path);
  return (p.parent_path() / (p.stem().string() + "_" + std::to_string(k) + p.extension().string())).string();
}

void print_timing(const sd::StreamStats& s, double load_s, int64_t frames) {
  const auto ms = [](double sec, int64_t n) { return n > 0 ? 1000.0 * sec / static_cast<double>(n) : 0.0; };
  std::ostringstream o;
  o << std::fixed << std::setprecision(2) << "timing: load " << load_s << " s" << std::setprecision(1)
    << " | text encode " << ms(s.text_encode_s, 1) << " ms";
  if (s.image_encode_s > 0) o << " | image encode " << ms(s.image_encode_s, s.processed) << " ms/call";
  o << " | UNet " << ms(s.unet_s, s.unet_calls) << " ms/call"
    << " | decode " << ms(s.decode_s, s.processed) << " ms/call"
    << " | " << s.calls << " calls (" << s.skipped << " skipped), " << std::setprecision(2)
    << (s.total_s > 0 ? static_cast<double>(frames) / s.total_s : 0.0) << " fps";
  std::cout << o.str() << std::endl;
}

// ---- txt2img ---------------------------------------------------------------------------------------------------

sd::cli::Runner setup_txt2img(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  add_shared_options(app, *o, true);
  app.add_option("-o,--output", o->output, "output image file (F > 1: name_0.png, name_1.png, ...)")->required();
  app.add_flag("--one-shot", o->one_shot,
               "sd-turbo one-shot batch: n*F independent images from one UNet call, no buffer or latency");
  app.footer(
      "The stream returns the image whose noise entered n-1 calls earlier; --warmup (default n-1) calls run "
      "first so the saved image is a real one. Example (sd-turbo): --t-index-list 0 --cfg-type none.");
  return [o] {
    sd::cli::apply_threads(o->common);
    const sd::StreamConfig cfg = stream_config(*o, true);
    const sd::cli::LoadedModels l = load(*o);
    sd::StreamDiffusion stream(l.models, cfg);
    set_image_prompt(*o, stream);
    setup_controlnets(*o, *l.models, stream, true);
    stream.prepare(sd::cli::prompt_list_from(*o), o->negative_prompt);
    const int64_t n = stream.denoising_steps();
    torch::Tensor out;
    int64_t frames = 0;
    if (o->one_shot) {
      out = stream.txt2img_one_shot();
      frames = out.size(0);
    } else {
      const int64_t latency = cfg.use_denoising_batch ? n - 1 : 0;
      const int64_t warmup = o->warmup >= 0 ? o->warmup : latency;
      for (int64_t i = 0; i <= warmup; ++i) out = stream.txt2img();
      frames = out.size(0) * (warmup + 1);
    }
    const torch::Tensor images = sd::tensor_to_image(out);
    for (int64_t k = 0; k < images.size(0); ++k) {
      const std::string path = numbered(o->output, k, images.size(0));
      write_image(path, images[k]);
      std::cout << "wrote " << path << "\n";
    }
    print_timing(stream.stats(), l.load_s, frames);
    return 0;
  };
}

// ---- img2img ---------------------------------------------------------------------------------------------------

bool is_image_file(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  for (const char* e : {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
    if (ext == e) return true;
  return false;
}

sd::cli::Runner setup_img2img(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  add_shared_options(app, *o, false);
  app.add_option("-i,--input", o->input, "an image file, or a folder of images processed as one stream in sorted order")
      ->required();
  app.add_option("-o,--output", o->output,
                 "output file (single input) or folder (input folder: each output named like its input)")
      ->required();
  app.footer(std::string(kResizePolicy) +
             " Frames go through the stream in sorted file-name order; the stream's n-1 call latency is flushed by "
             "repeating the last frame, so every input gets its own output.");
  return [o] {
    sd::cli::apply_threads(o->common);
    const sd::StreamConfig cfg = stream_config(*o, false);
    // Inputs.
    std::vector<fs::path> inputs;
    const bool folder = fs::is_directory(o->input);
    if (folder) {
      for (const auto& e : fs::directory_iterator(o->input))
        if (e.is_regular_file() && is_image_file(e.path())) inputs.push_back(e.path());
      std::sort(inputs.begin(), inputs.end());
      if (inputs.empty()) throw sd::InvalidArgument("--input folder '" + o->input + "' holds no image files");
    } else {
      if (!fs::is_regular_file(o->input)) throw sd::InvalidArgument("--input '" + o->input + "' does not exist");
      inputs.push_back(o->input);
    }
    const auto out_path = [&](size_t k) {
      return folder ? (fs::path(o->output) / inputs[k].filename()).string() : o->output;
    };

    const sd::cli::LoadedModels l = load(*o);
    sd::StreamDiffusion stream(l.models, cfg);
    set_image_prompt(*o, stream);
    const sd::cli::ControlNetSetup control = setup_controlnets(*o, *l.models, stream, false);
    const bool control_per_frame = !control.units.empty() && o->control_input.empty();
    stream.prepare(sd::cli::prompt_list_from(*o), o->negative_prompt);
    const int64_t F = cfg.frame_buffer_size, n = stream.denoising_steps();
    const int64_t latency = cfg.use_denoising_batch ? n - 1 : 0;
    // F frames from `first`, the last frame repeated past the end. Each input frame's control images are made as it
    // is read (the newest frame of a batch gives the batch's, as in the stream runtime).
    const auto batch_of = [&](size_t first) {
      std::vector<torch::Tensor> xs;
      for (int64_t k = 0; k < F; ++k) {
        const torch::Tensor rgb =
            read_image(inputs[std::min(first + k, inputs.size() - 1)].string(), cfg.width, cfg.height);
        if (control_per_frame)
          for (size_t i = 0; i < control.units.size(); ++i)
            stream.set_control_image(i, control.preprocessors[i]->apply(rgb));
        xs.push_back(sd::image_to_tensor(rgb));
      }
      return torch::cat(xs, 0);
    };

    // One entry per processed call (the first input index of its batch, or kPad for warm-up/flush calls): a
    // processed call returns the batch submitted `latency` processed calls earlier; a call skipped by the
    // similarity filter returns the previous images, which become its own batch's output.
    constexpr size_t kPad = static_cast<size_t>(-1);
    std::deque<size_t> line;
    size_t written = 0;
    const auto save = [&](size_t first, const torch::Tensor& out) {
      const torch::Tensor images = sd::tensor_to_image(out);
      for (int64_t k = 0; k < F && first + k < inputs.size(); ++k) {
        write_image(out_path(first + k), images[k]);
        ++written;
      }
    };
    const auto call = [&](const torch::Tensor& batch, size_t entry) {
      const torch::Tensor out = stream.img2img(batch);
      if (cfg.similarity_filter.enabled && !stream.last_filter_decision().process) {
        if (entry != kPad) save(entry, out);
        return;
      }
      line.push_back(entry);
      if (static_cast<int64_t>(line.size()) > latency) {
        const size_t e = line.front();
        line.pop_front();
        if (e != kPad) save(e, out);
      }
    };
    if (o->warmup > 0) {
      const torch::Tensor first = batch_of(0);
      for (int i = 0; i < o->warmup; ++i) call(first, kPad);
    }
    torch::Tensor last_batch;
    const size_t groups = (inputs.size() + F - 1) / F;
    for (size_t g = 0; g < groups; ++g) {
      last_batch = batch_of(g * F);
      call(last_batch, g * F);
    }
    // Flush the delay line with the last batch (filter off so the repeats are processed).
    if (cfg.similarity_filter.enabled) stream.set_similarity_filter({});
    while (std::any_of(line.begin(), line.end(), [&](size_t e) { return e != kPad; })) call(last_batch, kPad);
    std::cout << "wrote " << written << " image" << (written == 1 ? "" : "s") << " to " << o->output << "\n";
    print_timing(stream.stats(), l.load_s, static_cast<int64_t>(inputs.size()));
    return 0;
  };
}

REGISTER_COMMAND("txt2img", "generate images from a prompt with the stream batch", 10, setup_txt2img);
REGISTER_COMMAND("img2img", "transform an image or a folder of frames as one stream", 11, setup_img2img);

}  // namespace
