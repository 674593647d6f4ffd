// `streamdiffusion bench`: what each StreamDiffusion technique buys on a model folder (use make-random-model for the
// real architectures), measured in ONE run so the figures share the machine state:
//   components  text encode, UNet, TAESD / AutoencoderKL encode and decode: median seconds, GFLOP/s from the known
//               FLOP counts and % of the machine's ceiling;
//   e2e         txt2img and img2img frames through sd::load_pipeline + sd::StreamDiffusion (fps, per-stage split);
//   ablation    our own naive diffusers-like txt2img (text encoded per call, full VAE, CFG batch 2, fp32, fresh
//               allocations) and then one technique added per row, with speed-up factors (the paper's ablation);
//   batch       stream batch (one UNet call on n rows) vs sequential denoising (n calls of one row), same steps;
//   cfg         RCFG self / initialize vs full CFG (the paper's 2.05x) vs none;
//   vae         TAESD vs the full AutoencoderKL (components and whole frames);
//   filter      the stochastic similarity filter on a static scene (frames skipped, compute saved, effective fps);
//   flicker     latent feedback (--latent-feedback A): the mean absolute frame-to-frame difference of the img2img
//               outputs (0..255 levels) on a static scene with sensor noise, without and with the feedback (not a
//               timing: the same frames through two streams).
// With --controlnet (repeatable), --controlnet-every and --control-guidance-start / -end every stream row except the
// ablation's runs with those ControlNets on a fixed synthetic control image, and components gains one "controlnet"
// line per ControlNet.
// Every timing is a median over timed runs after warm-up (device-synchronised). Prints tables, writes JSON (--json)
// and a PNG chart (--chart, builds with OpenCV).
#include <algorithm>
#include <chrono>
#include <deque>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "apps/cli/bench_chart.h"
#include "apps/cli/bench_naive.h"
#include "apps/cli/bench_profile.h"
#include "apps/cli/bench_util.h"
#include "apps/cli/commands.h"
#include "apps/cli/pipeline_options.h"
#include "core/device.h"
#include "models/int8.h"
#include "core/error.h"
#include "core/text.h"
#include "io/model_folder.h"
#include "pipeline/control_guidance.h"
#include "pipeline/controlnet.h"
#include "models/conv_layout.h"
#include "models/layers.h"
#include "models/unet_2d_condition.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/multi_stream.h"
#include "pipeline/stream_diffusion.h"

namespace {

using namespace sd::bench;
using Clock = std::chrono::steady_clock;

const std::vector<std::string> kSections{"components", "e2e", "ablation", "batch", "cfg", "vae", "filter", "flicker"};
// Sections that run only when named (not part of "all"): multistream times K streams one by one vs batched; profile
// lists the operators that take an img2img frame's time.
const std::vector<std::string> kExtraSections{"multistream", "profile"};

struct BenchOptions {
  std::string model;
  std::string config;  // single files: a diffusers folder of config files (sd::LoadOptions::config)
  std::string variant;  // --variant: the model folder's <stem>.NAME.safetensors (sd::LoadOptions::variant)
  std::string sizes;   // "" = the model's native size
  std::string dtypes = "auto";
  std::string device = "cpu";
  std::string sections = "all";
  int threads = 0;
  int iters = 5;
  int warmup = 1;
  int frames = 10;
  int naive_iters = 3;
  int filter_frames = 30;
  std::string prompt = "a photo of a cat, trending on artstation";
  std::string negative_prompt = "";
  std::string txt2img_t = "0";
  std::string img2img_t = "35";
  std::string multi_t = "32,45";
  std::string ablation_t = "0";
  int num_inference_steps = 50;
  double guidance = 1.2;
  double naive_guidance = 7.5;
  double filter_threshold = 0.98;
  int max_skip_frame = 10;
  double filter_noise = 0.01;
  double latent_feedback = 0.5;  // flicker section: A of the "with" row
  int flicker_frames = 24;       // flicker section: measured frames (after the stream latency and settling)
  double flicker_noise = 0.04;   // flicker section: per-frame sensor noise std ([-1, 1] scale)
  std::string json_path;
  std::string chart_path;
  std::vector<std::string> loras;  // --lora / --lcm-lora: fused into every model set the bench loads
  std::string lcm_lora;
  bool strict_lora = false;
  std::vector<std::string> controlnets;  // --controlnet DIR|FILE[:SCALE], repeatable
  int controlnet_every = 1;              // --controlnet-every N
  double control_guidance_start = 0.0, control_guidance_end = 1.0;  // --control-guidance-start / -end (all nets)
  int deep_cache_every = 1;              // --deep-cache-every K (extra e2e rows)
  std::string streams = "1,2,4,8,16";    // --streams: stream counts of the multistream section
  bool profile_shapes = false;           // --profile-shapes: the profile section per operator and input shapes
  int profile_streams = 0;               // --profile-streams K: the profile section also over K batched streams
  bool profile_kernels = false;          // --profile-kernels: the profile section also traces graphed frames' kernels
  std::string profile_trace;             // --profile-trace DIR: Chrome traces of the kernel profiles go there
  std::string compiled_unet;             // --compiled-unet FILE: every model set runs its UNet calls of that shape
  int pipelined_frames = -1;             // --pipelined-frames N: e2e frames queued back to back (-1: auto)
  bool frame_on_device = false;          // --frame-on-device: the e2e img2img row with the frame on the device also
                                         // off CUDA (on CUDA it is always added)
  bool unfused_rows = false;             // --unfused-rows: TAESD rows with the fused convolution + ReLU off also
                                         // off CUDA (on CUDA they are added while it is on)
};

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);  // not "," + to_string(...): GCC 12 -O2 warns falsely on that (-Wstringop-overflow)
  }
  return s;
}

struct AblationRow {
  std::string label;
  std::string id;
};

class Bench {
 public:
  explicit Bench(const BenchOptions& o) : o_(o), device_(sd::parse_device(o.device)) {}

  int run() {
    validate();
    loras_ = sd::cli::lora_specs(o_.loras, o_.lcm_lora);  // bad --lora arguments fail before anything loads
    threads_ = sd::set_threads(o_.threads);
    arch_ = inspect_architecture(o_.model, o_.variant);
    has_taesd_ = sd::is_directory(o_.model) && sd::ModelFolder::open(o_.model).taesd_dir().has_value();
    has_vae_ = arch_.vae_params > 0;
    if (!has_vae_ && !has_taesd_)
      throw sd::FormatError(o_.model, "neither vae/ weights nor a TAESD: nothing can encode or decode");
    if (!has_vae_ && o_.sections == "all") {
      // "all" means all that this model can do.
      sections_.erase(std::remove_if(sections_.begin(), sections_.end(),
                                     [](const std::string& x) { return x == "vae" || x == "ablation"; }),
                      sections_.end());
      std::cout << "bench: " << o_.model << "/vae has no weights (TAESD-only model): sections vae and ablation left out\n";
    }
    if (!has_vae_ && (want("vae") || want("ablation")))
      throw sd::InvalidArgument("bench: " + o_.model + "/vae has no weights (a TAESD-only model); the vae and "
                                "ablation sections need an AutoencoderKL (use e.g. --sections components,e2e,batch,"
                                "cfg,filter)");
    reduced_ = device_.is_cuda() ? c10::kHalf : c10::kBFloat16;
    std::cout << "bench: " << o_.model << " (" << arch_.name << "), device " << device_ << ", " << threads_
              << " threads, libtorch " << TORCH_VERSION << ", sections " << join_sections() << "\n"
              << "  timings: median of " << o_.iters << " runs (components), " << o_.frames << " frames (streams), "
              << o_.naive_iters << " (naive path), after " << o_.warmup << " warm-up run(s) (+ the stream latency)\n";
    // The stated ceilings are of the machine the issue measured; this run also measures its own (a plain GEMM),
    // so "% of ceiling" holds on whatever CPU or GPU runs the bench.
    std::cout << "  CPU SIMD: " << sd::cpu_simd_level()
              << (device_.is_cpu() && !sd::cpu_has_native_bf16() ? " (no native bf16: bf16 is emulated here)" : "")
              << (device_.is_cpu() && sd::onednn_amx_active() ? " (oneDNN AMX kernels on)" : "")
              << "\n  measured matmul ceiling (2048^3 product as the engine runs it, best of 3):";
    for (auto d : requested_) {
      measured_ceiling_[d] = measure_matmul_gflops(d, device_);
      std::cout << " " << sd::dtype_name(d) << " " << std::fixed << std::setprecision(0) << measured_ceiling_[d]
                << " GFLOP/s";
    }
    std::cout << "\n";
    if (!cn_specs_.empty()) {
      std::cout << "  ControlNets (every stream row but the ablation's; synthetic edge-map control image):";
      for (const auto& [path, scale] : cn_specs_) std::cout << " " << path << " (scale " << scale << ")";
      std::cout << ", residuals recomputed every " << o_.controlnet_every << " call(s)";
      if (partial_range())
        std::cout << ", steps " << o_.control_guidance_start << ".." << o_.control_guidance_end << " of each stream";
      std::cout << "\n";
    }
    print_header();

    // The ablation needs fp32 and the reduced dtype whatever --dtypes says; they are loaded in addition.
    std::vector<c10::ScalarType> dts = requested_;
    if (want("ablation"))
      for (auto d : {c10::kFloat, reduced_})
        if (std::find(dts.begin(), dts.end(), d) == dts.end()) dts.push_back(d);
    for (auto dt : dts) {
      const bool req = std::find(requested_.begin(), requested_.end(), dt) != requested_.end();
      // Two model sets per dtype, loaded one after the other (one UNet in memory at a time): the AutoencoderKL
      // pipeline (VAE rows, the naive path) and the TAESD pipeline (everything else). Without a TAESD folder the
      // AutoencoderKL set does everything.
      const bool vae_phase = !has_taesd_ || (req && (want("components") || want("vae"))) ||
                             (want("ablation") && dt == c10::kFloat);
      if (vae_phase && has_vae_) {
        auto models = load(dt, "none");
        phase(models, dt, req, "vae");
      }
      if (has_taesd_) {
        auto models = load(dt, "");
        phase(models, dt, req, "taesd");
      }
    }
    summarize_all();
    write_outputs();
    return 0;
  }

 private:
  // ---- options ------------------------------------------------------------------------------------------------
  void validate() {
    if (o_.iters < 1 || o_.frames < 1 || o_.naive_iters < 1 || o_.filter_frames < 1 || o_.warmup < 0)
      throw sd::InvalidArgument("bench: --iters, --frames, --naive-iters and --filter-frames must be >= 1 and "
                                "--warmup >= 0");
    for (const auto& s : sd::split(o_.sections, ',')) {
      if (s == "all") {
        sections_ = kSections;
        continue;
      }
      if (std::find(kSections.begin(), kSections.end(), s) == kSections.end() &&
          std::find(kExtraSections.begin(), kExtraSections.end(), s) == kExtraSections.end())
        throw sd::InvalidArgument("bench --sections: unknown section '" + s +
                                  "' (expected all or any of components,e2e,ablation,batch,cfg,vae,filter,flicker,"
                                  "multistream,profile)");
      if (std::find(sections_.begin(), sections_.end(), s) == sections_.end()) sections_.push_back(s);
    }
    if (sections_.empty()) throw sd::InvalidArgument("bench --sections is empty");
    std::string sizes = o_.sizes;
    const sd::ModelDefaults md = sd::read_model_defaults(o_.model, o_.config);
    if (sizes.empty()) {  // the model's native size (pipeline/model_defaults.h)
      if (md.native_width <= 0)
        throw sd::InvalidArgument("bench: the model's native size is unknown (no UNet sample_size); give --sizes");
      if (md.native_width != md.native_height)
        throw sd::InvalidArgument("bench: the model's native size " + std::to_string(md.native_width) + "x" +
                                  std::to_string(md.native_height) + " is not square; give --sizes");
      sizes = std::to_string(md.native_width);
    }
    for (const auto& s : sd::split(sizes, ',')) {
      const auto wh = sd::cli::parse_size(s + "x" + s, "--sizes");
      sizes_.push_back(wh.first);
    }
    if (sizes_.empty()) throw sd::InvalidArgument("bench --sizes is empty (expected e.g. 256,512)");
    for (const auto& name : sd::split(o_.dtypes, ',')) {
      c10::ScalarType d = c10::kQInt8;
      if (name == "int8") {
        // The UNet's matrix products in int8 over int8_float_dtype(); rows labelled "int8".
        if (!device_.is_cpu()) throw sd::InvalidArgument("bench --dtypes int8 runs on the CPU only");
        if (!sd::int8::available())
          throw sd::InvalidArgument("bench --dtypes int8: " + sd::int8::unavailable_reason());
      } else {
        // "auto" is the dtype a plain command would run this model in here (its cpu_dtype on a CPU where it names
        // one); rows and JSON name what it resolved to.
        d = sd::parse_dtype(sd::dtype_request(md, name, device_.is_cpu()), device_);
      }
      if (std::find(requested_.begin(), requested_.end(), d) == requested_.end()) requested_.push_back(d);
    }
    if (requested_.empty()) throw sd::InvalidArgument("bench --dtypes is empty (expected e.g. fp32,bf16)");
    for (auto d : requested_)
      if (d == c10::kHalf && device_.is_cpu())
        throw sd::InvalidArgument("bench --dtypes fp16 needs --device cuda (no CPU half-precision kernels); use bf16");
    t_txt_ = sd::cli::parse_index_list(o_.txt2img_t);
    t_img_ = sd::cli::parse_index_list(o_.img2img_t);
    t_multi_ = sd::cli::parse_index_list(o_.multi_t);
    t_abl_ = sd::cli::parse_index_list(o_.ablation_t);
    for (const auto& k : sd::split(o_.streams, ',')) {
      int64_t v = 0;
      try {
        size_t used = 0;
        v = std::stoll(k, &used);
        if (used != k.size()) v = 0;
      } catch (const std::exception&) {
        v = 0;
      }
      if (v < 1 || v > 256)
        throw sd::InvalidArgument("bench --streams: '" + k + "' is not a stream count in 1..256 (e.g. 1,2,4,8,16)");
      streams_.push_back(v);
    }
    if (want("multistream") && streams_.empty()) throw sd::InvalidArgument("bench --streams is empty");
    if (want("cfg") && !(o_.guidance > 1.0))
      throw sd::InvalidArgument("bench --guidance must be > 1 for the cfg section (guidance is off at <= 1)");
    if (!o_.chart_path.empty() && !chart_available())
      throw sd::InvalidArgument("bench --chart: this build has no OpenCV (SD_ENGINE_ONLY), so it cannot draw PNGs");
    if (o_.filter_threshold <= 0 || o_.filter_threshold >= 1)
      throw sd::InvalidArgument("bench --filter-threshold must be in (0, 1)");
    if (!(o_.latent_feedback > 0 && o_.latent_feedback <= 1))
      throw sd::InvalidArgument("bench --latent-feedback must be in (0, 1]");
    if (o_.flicker_frames < 2) throw sd::InvalidArgument("bench --flicker-frames must be >= 2");
    if (!(o_.flicker_noise >= 0) || o_.flicker_noise > 1)
      throw sd::InvalidArgument("bench --flicker-noise must be in [0, 1]");
    if (o_.controlnet_every < 1) throw sd::InvalidArgument("bench --controlnet-every must be >= 1");
    if (o_.deep_cache_every < 1) throw sd::InvalidArgument("bench --deep-cache-every must be >= 1");
    if (o_.controlnet_every > 1 && o_.controlnets.empty())
      throw sd::InvalidArgument("bench --controlnet-every needs --controlnet");
    if (!sd::valid_control_guidance(o_.control_guidance_start, o_.control_guidance_end))
      throw sd::InvalidArgument("bench --control-guidance-start " + std::to_string(o_.control_guidance_start) +
                                " and --control-guidance-end " + std::to_string(o_.control_guidance_end) +
                                " must satisfy " + sd::kControlGuidanceRule);
    if (partial_range() && o_.controlnets.empty())
      throw sd::InvalidArgument("bench --control-guidance-start / --control-guidance-end need --controlnet");
    for (const auto& spec : o_.controlnets) {
      auto ps = sd::cli::parse_controlnet_spec(spec);
      if (!sd::is_directory(ps.first) && !sd::is_file(ps.first))
        throw sd::InvalidArgument("bench --controlnet " + spec + ": no such file or folder '" + ps.first +
                                  "' (a diffusers ControlNet folder, e.g. from make-random-model --arch "
                                  "controlnet-sd21, or a control_*.safetensors file)");
      cn_specs_.push_back(std::move(ps));
    }
  }

  bool want(const std::string& s) const {
    return std::find(sections_.begin(), sections_.end(), s) != sections_.end();
  }
  std::string join_sections() const {
    std::string s;
    for (size_t i = 0; i < sections_.size(); ++i) s += (i ? "," : "") + sections_[i];
    return s;
  }

  // ---- models -------------------------------------------------------------------------------------------------
  std::shared_ptr<const sd::DiffusionModels> load(c10::ScalarType dt, const std::string& taesd) {
    sd::LoadOptions lo;
    lo.dtype = compute_dtype(dt);
    lo.int8 = dt == c10::kQInt8;
    lo.device = o_.device;
    lo.threads = -1;  // set once above
    lo.taesd = taesd;
    lo.config = o_.config;
    lo.variant = o_.variant;
    lo.loras = loras_;
    lo.strict_lora = o_.strict_lora;
    lo.compiled_unet = o_.compiled_unet;
    const auto t0 = Clock::now();
    auto m = sd::load_pipeline(o_.model, lo);
    m->set_compiled_unet_enabled(false);  // on only for its own rows (compiled_rows)
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    const std::string ae = taesd == "none" || !has_taesd_ ? "vae" : "taesd";
    std::cout << std::fixed << std::setprecision(2) << "  load pipeline (" << sd::dtype_name(dt) << ", " << ae
              << (loras_.empty() ? "" : ", LoRAs fused") << "): " << s << " s, RSS " << std::setprecision(0)
              << rss_mib() << " MiB";
    nlohmann::json load = {{"dtype", sd::dtype_name(dt)}, {"autoencoder", ae}, {"seconds", s}, {"rss_mib", rss_mib()}};
    // On CUDA the tensors the model set holds on the device (weights, caches, a compiled UNet's folded constants).
    if (const double dev = device_allocated_mib(device_); dev >= 0) {
      std::cout << ", device " << dev << " MiB allocated";
      load["device_mib"] = dev;
    }
    if (!o_.compiled_unet.empty()) load["compiled_unet"] = o_.compiled_unet;
    std::cout << "\n";
    // A live scale change (the control channel's `lora NAME SCALE`) re-fuses that LoRA's modules: timed here at the
    // same scale, so the weights stay as loaded.
    for (const auto& r : m->loras()) {
      const auto t1 = Clock::now();
      m->set_lora_scale(r.name, r.scale);
      const double rs = std::chrono::duration<double>(Clock::now() - t1).count();
      std::cout << std::setprecision(3) << "    LoRA " << r.name << " (" << r.summary() << "): live re-fuse " << rs
                << " s\n";
      load["loras"].push_back({{"name", r.name}, {"file", r.path}, {"scale", r.scale}, {"refuse_s", rs},
                               {"unet_modules", r.module_count("unet")},
                               {"text_encoder_modules", r.module_count("text_encoder")}});
    }
    // The ControlNets for this model set (its dtype and device), replacing the previous set's.
    cn_units_.clear();
    for (const auto& [path, scale] : cn_specs_) {
      const auto t1 = Clock::now();
      auto net = sd::ControlNet::load(path, *m);
      const double cs = std::chrono::duration<double>(Clock::now() - t1).count();
      std::cout << std::setprecision(2) << "    " << net->describe() << ": loaded in " << cs << " s\n";
      load["controlnets"].push_back({{"path", path}, {"scale", scale}, {"seconds", cs}, {"describe", net->describe()}});
      cn_units_.push_back({std::move(net), scale});
      cn_units_.back().guidance_start = o_.control_guidance_start;
      cn_units_.back().guidance_end = o_.control_guidance_end;
    }
    loads_.push_back(load);
    return m;
  }

  // ---- one model set: every row that needs it -------------------------------------------------------------------
  void phase(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, bool req,
             const std::string& ae) {
    const bool primary = ae == "taesd" || !has_taesd_;  // rows that do not depend on the autoencoder
    if (req && want("components") && primary) text_encode(m, dt);
    for (int64_t size : sizes_) {
      if (req && want("components")) {
        if (primary) unet_component(m, dt, size, 1, "components");
        if (primary && device_.is_cpu()) unet_component(m, dt, size, 1, "components", FastOff::AttentionTiles);
        if (primary) controlnet_components(m, dt, size);
        autoencoder_components(m, dt, size, ae, "components");
      }
      // Rows shared by two sections are recorded under the first that runs them: e2e before vae.
      if (req && primary && want("e2e")) {
        stream_row(m, "e2e", "txt2img", dt, size, ae, sd::CfgType::None, t_txt_, true);
        stream_row(m, "e2e", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true);
        if (o_.deep_cache_every > 1) {
          stream_row(m, "e2e", "txt2img", dt, size, ae, sd::CfgType::None, t_txt_, true, o_.deep_cache_every);
          stream_row(m, "e2e", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true, o_.deep_cache_every);
        }
        if (device_.is_cuda()) {
          // The same streams launching every kernel (StreamConfig::cuda_graphs off), side by side.
          graphs_ = false;
          stream_row(m, "e2e", "txt2img", dt, size, ae, sd::CfgType::None, t_txt_, true);
          stream_row(m, "e2e", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true);
          graphs_ = true;
        }
        // The frame already on the device (the runtime's case; the original's --frame-on-device row).
        if (device_.is_cuda() || o_.frame_on_device)
          stream_row(m, "e2e", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true, 1, /*frame_on_device=*/true);
        if (ae == "taesd" && unfused_rows()) {
          // TAESD's convolutions unfused (variant " fused-conv=off"): both frames that use its encoder and decoder.
          with_fused_conv_off([&] {
            stream_row(m, "e2e", "txt2img", dt, size, ae, sd::CfgType::None, t_txt_, true);
            stream_row(m, "e2e", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true, 1,
                       device_.is_cuda() || o_.frame_on_device);
          });
        }
        if (!m->compiled_unet_stats().path.empty()) compiled_rows(m, dt, size, ae);
      }
      if (req && want("vae")) {
        autoencoder_components(m, dt, size, ae, "vae");
        stream_row(m, "vae", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true);
        stream_row(m, "vae", "txt2img", dt, size, ae, sd::CfgType::None, t_txt_, true);
      }
      if (req && primary) {
        if (want("batch")) batch_rows(m, dt, size, ae);
        if (want("cfg"))
          for (auto c : {sd::CfgType::None, sd::CfgType::Self, sd::CfgType::Initialize, sd::CfgType::Full})
            stream_row(m, "cfg", "img2img", dt, size, ae, c, t_multi_, true);
        if (want("filter")) filter_row(m, dt, size, ae);
        if (want("flicker")) flicker_rows(m, dt, size, ae);
        if (want("multistream")) {
          multistream_rows(m, dt, size, ae);
          // --compiled-unet: the same table with the package running the UNet calls it fits (a row range, --rows
          // MIN-MAX, fits the one-by-one and the batched calls alike), after the model's own.
          if (!m->compiled_unet_stats().path.empty()) with_compiled_unet(m, [&] { multistream_rows(m, dt, size, ae); });
        }
        if (want("profile")) {
          profile_rows(m, dt, size, ae);
          if (o_.profile_kernels) {
            try {
              kernel_rows(m, dt, size, ae);
            } catch (const std::exception& e) {  // the operator tables above stand; the trace is an extra
              std::cout << "profile    kernels: failed: " << e.what() << "\n";
            }
          }
        }
      }
      if (want("ablation")) ablation_rows(m, dt, size, ae, primary);
    }
  }

  // ---- measurements (memoised by configuration, so a row shared by two sections runs once) -----------------------
  const Result* find(const std::string& id) const {
    auto it = results_.find(id);
    return it == results_.end() ? nullptr : &it->second;
  }

  const Result& add(const std::string& id, Result r) {
    r.rss_mib = rss_mib();
    const c10::ScalarType rdt = r.dtype == "int8" ? c10::kQInt8 : sd::parse_dtype(r.dtype);
    const double ceil = ceiling_gflops(rdt, device_);
    if (r.gflop > 0 && r.timing.median > 0) r.gflops = r.gflop / r.timing.median;
    if (r.gflops > 0 && ceil > 0) r.pct_ceiling = 100.0 * r.gflops / ceil;
    const auto mc = measured_ceiling_.find(rdt);
    if (r.gflops > 0 && mc != measured_ceiling_.end() && mc->second > 0)
      r.pct_measured = 100.0 * r.gflops / mc->second;
    order_.push_back(id);
    print(r);
    return results_.emplace(id, std::move(r)).first->second;
  }

  const Result& text_encode(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt) {
    const std::string id = "text_encode/" + sd::dtype_name(dt);
    if (auto r = find(id)) return *r;
    Result r;
    r.section = "components";
    r.name = "text_encode";
    r.variant = "tokenize+encode";
    r.dtype = sd::dtype_name(dt);
    r.timing = time_runs(device_, o_.warmup, o_.iters, [&] { m->encode_prompt(o_.prompt); });
    r.gflop = known_gflop(arch_, "text_encode", 0);
    return add(id, r);
  }

  int64_t text_dim(const std::shared_ptr<const sd::DiffusionModels>& m) {
    torch::NoGradGuard ng;
    return m->encode_prompt(o_.prompt).size(2);
  }

  // The tensors' dtype for a row's dtype (int8 rows compute around the int8 products in int8_float_dtype()).
  static c10::ScalarType compute_dtype(c10::ScalarType dt) { return dt == c10::kQInt8 ? sd::int8_float_dtype() : dt; }
  torch::TensorOptions topt(c10::ScalarType dt) const {
    return torch::TensorOptions().dtype(compute_dtype(dt)).device(device_);
  }

  // SDXL's added conditioning for b rows at this size (random pooled text); empty for other models.
  sd::AddedConditioning random_added(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt,
                                     int64_t b, int64_t size) const {
    if (m->pooled_text_dim() == 0) return {};
    return sd::repeat_added_conditioning(*m, torch::randn({1, m->pooled_text_dim()}).to(topt(dt)), b, size, size);
  }

  // A CPU fast path switched off for one row, to show what it is worth.
  enum class FastOff { None, AttentionTiles, UpsamplePhases };
  static std::string off_id(FastOff off) {
    return off == FastOff::AttentionTiles ? "/no-attention-tiles" : off == FastOff::UpsamplePhases ? "/no-upsample-phases" : "";
  }
  static std::string off_variant(FastOff off) {
    return off == FastOff::AttentionTiles   ? " attention tiles off"
           : off == FastOff::UpsamplePhases ? " upsample phases off"
                                            : "";
  }
  // Runs `f` with the fast path's switch for `off` off, restoring it after (exceptions included).
  template <class F>
  static void with_fast_off(FastOff off, F&& f) {
    struct Restore {
      sd::nn::FastPathOptions saved = sd::nn::fast_path();
      ~Restore() { sd::nn::fast_path() = saved; }
    } restore;
    if (off == FastOff::AttentionTiles) sd::nn::fast_path().attention_tiles_cpu = false;
    if (off == FastOff::UpsamplePhases) sd::nn::fast_path().upsample_phases = false;
    f();
  }

  const Result& unet_component(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                               int64_t b, const std::string& section, FastOff off = FastOff::None) {
    const std::string id = "unet/" + sd::dtype_name(dt) + "/" + std::to_string(size) + "/b" + std::to_string(b) +
                           off_id(off);
    if (auto r = find(id)) return *r;
    torch::NoGradGuard ng;
    const int64_t h = size / m->vae_scale_factor();
    const auto x = torch::randn({b, m->latent_channels(), h, h}).to(topt(dt));
    const auto t = torch::full({b}, 999, torch::TensorOptions().dtype(torch::kLong).device(device_));
    const auto ehs = torch::randn({b, 77, text_dim(m)}).to(topt(dt));
    const auto added = random_added(m, dt, b, size);
    Result r;
    r.section = section;
    r.name = "unet";
    r.variant = "b" + std::to_string(b) + off_variant(off);
    r.dtype = sd::dtype_name(dt);
    r.size = size;
    r.batch = b;
    with_fast_off(off, [&] { r.timing = time_runs(device_, o_.warmup, o_.iters, [&] { m->unet(x, t, ehs, added); }); });
    r.gflop = known_gflop(arch_, "unet", size) * static_cast<double>(b);
    return add(id, r);
  }

  // The fixed control image of the ControlNet rows: a synthetic edge map (white lines on black, as a canny
  // preprocessor gives) at the stream size, [3, size, size] float in [0, 1]. A ControlNet's cost does not depend on
  // what the image shows.
  static torch::Tensor control_image(int64_t size) {
    auto img = torch::zeros({3, size, size});
    for (int64_t k = 0; k < size; k += 16) {
      img.slice(1, k, k + 1).fill_(1.0);
      img.slice(2, k, k + 1).fill_(1.0);
    }
    const auto idx = torch::arange(size, torch::kLong);
    img.index_put_({torch::indexing::Slice(), idx, idx}, 1.0);  // a diagonal
    return img;
  }

  // One line per ControlNet: its residuals for one latent row (batch 1) at this size, as the stream computes them.
  void controlnet_components(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size) {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < cn_units_.size(); ++i) {
      const auto& u = cn_units_[i];
      const std::string id = "controlnet/" + std::to_string(i) + "/" + sd::dtype_name(dt) + "/" + std::to_string(size) +
                             "/b1";
      if (find(id)) continue;
      const int64_t h = size / m->vae_scale_factor();
      const auto x = torch::randn({1, m->latent_channels(), h, h}).to(topt(dt));
      const auto t = torch::full({1}, 999, torch::TensorOptions().dtype(torch::kLong).device(device_));
      const auto ehs = torch::randn({1, 77, text_dim(m)}).to(topt(dt));
      const auto added = random_added(m, dt, 1, size);
      const auto img = control_image(size).unsqueeze(0).to(topt(dt));
      Result r;
      r.section = "components";
      r.name = "controlnet";
      r.variant = u.net->name() + " b1";
      r.dtype = sd::dtype_name(dt);
      r.size = size;
      r.timing = time_runs(device_, o_.warmup, o_.iters, [&] { u.net->residuals(x, t, ehs, added, img, u.scale); });
      r.extra = {{"controlnet", u.net->path()}, {"scale", u.scale}};
      add(id, r);
    }
  }

  // The ControlNets of the stream rows (not the ablation's, whose naive path has none).
  bool with_controlnets(const std::string& section) const { return !cn_units_.empty() && section != "ablation"; }
  void attach_controlnets(sd::StreamDiffusion& stream, int64_t size) const {
    stream.set_controlnets(cn_units_);
    const auto img = control_image(size);
    for (size_t i = 0; i < cn_units_.size(); ++i) stream.set_control_image(i, img);
    stream.set_controlnet_every(o_.controlnet_every);
  }
  // Untimed calls before the timed frames of a ControlNet row with --controlnet-every N: a multiple of N, so the timed
  // frames start on a call that computes the residuals; and timed frames rounded up to a multiple of N, so each
  // compute / reuse phase is measured as often as it occurs.
  int round_to_every(int n, bool cn, int deep = 1) const {
    const int e = std::max(cn ? o_.controlnet_every : 1, deep);
    return (n + e - 1) / e * e;
  }

  void autoencoder_components(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                              const std::string& ae, const std::string& section) {
    torch::NoGradGuard ng;
    const int64_t h = size / m->vae_scale_factor();
    // The full VAE is slow (the issue measured 7.3 s per 256 px decode in fp32): fewer runs, like the naive path.
    const int iters = ae == "vae" ? std::min(o_.iters, o_.naive_iters) : o_.iters;
    // TAESD also with its fused convolution + ReLU off (ids ".../unfused"), right after the same calls with it on;
    // on the CPU the decoders also with the upsample phases off (".../no-upsample-phases"), and TAESD and the
    // AutoencoderKL's decode in the activation layout the CPU does not pick for this dtype (".../other-layout",
    // models/conv_layout.h; the full VAE's encode is left out: slow, and the same convolutions).
    const bool unfused = ae == "taesd" && unfused_rows();
    const bool cl = sd::nn::cpu_channels_last(m->autoencoder_dtype());
    enum class Row { Plain, Unfused, NoPhases, OtherLayout };
    for (const std::string op : {"encode", "decode"}) {
      for (const Row row : {Row::Plain, Row::Unfused, Row::NoPhases, Row::OtherLayout}) {
        if (row == Row::Unfused && !unfused) continue;
        if (row == Row::NoPhases && (op != "decode" || !device_.is_cpu())) continue;
        if (row == Row::OtherLayout && (!device_.is_cpu() || (ae == "vae" && op != "decode"))) continue;
        const std::string name = ae + "_" + op;
        const std::string id = name + "/" + sd::dtype_name(dt) + "/" + std::to_string(size) +
                               (row == Row::Unfused       ? "/unfused"
                                : row == Row::NoPhases    ? off_id(FastOff::UpsamplePhases)
                                : row == Row::OtherLayout ? "/other-layout"
                                                          : "");
        if (find(id)) continue;
        Result r;
        r.section = section;
        r.name = name;
        r.variant = std::string(ae == "vae" ? "AutoencoderKL" : row == Row::Unfused ? "TAESD unfused" : "TAESD") +
                    (row == Row::NoPhases ? off_variant(FastOff::UpsamplePhases) : "") +
                    (row == Row::OtherLayout ? (cl ? " NCHW" : " channels-last") : "");
        r.dtype = sd::dtype_name(dt);
        r.size = size;
        auto time_op = [&] {
          if (op == "encode") {
            const auto img = (torch::rand({1, 3, size, size}) * 2 - 1).to(topt(dt));
            sd::TorchRng rng(1);
            r.timing = time_runs(device_, o_.warmup, iters, [&] { m->encode_image(img, rng); });
          } else {
            const auto z = torch::randn({1, m->latent_channels(), h, h}).to(topt(dt));
            r.timing = time_runs(device_, o_.warmup, iters, [&] { m->decode_latent(z); });
          }
        };
        if (row == Row::Plain) time_op();
        else if (row == Row::Unfused) with_fused_conv_off(time_op);
        else if (row == Row::NoPhases) with_fast_off(FastOff::UpsamplePhases, time_op);
        else {
          sd::nn::ScopedCpuChannelsLast other(cl ? 0 : 1);
          time_op();
        }
        r.gflop = known_gflop(arch_, name, size);
        add(id, r);
      }
    }
  }

  sd::StreamConfig stream_config(int64_t size, sd::CfgType cfg, const std::vector<int64_t>& t, bool batch) const {
    sd::StreamConfig c;
    c.width = c.height = size;
    c.t_index_list = t;
    c.num_inference_steps = o_.num_inference_steps;
    c.cfg_type = cfg;
    c.guidance_scale = o_.guidance;
    c.use_denoising_batch = batch;
    c.cuda_graphs = graphs_;
    return c;
  }

  // GFLOP of one stream frame from its per-frame UNet rows and autoencoder calls (0 when any part is unknown).
  double frame_gflop(const std::string& mode, const std::string& ae, int64_t size, double unet_rows) const {
    const double u = known_gflop(arch_, "unet", size), d = known_gflop(arch_, ae + "_decode", size);
    const double e = mode == "img2img" ? known_gflop(arch_, ae + "_encode", size) : 0;
    if (u <= 0 || d <= 0 || (mode == "img2img" && e <= 0)) return 0;
    return unet_rows * u + d + e;
  }

  // One stream configuration through sd::StreamDiffusion: `frames` timed frames after warm-up (+ the n−1 frames of
  // latency of the stream batch). Per-frame stage times come from StreamStats.
  const Result& stream_row(const std::shared_ptr<const sd::DiffusionModels>& m, const std::string& section,
                           const std::string& mode, c10::ScalarType dt, int64_t size, const std::string& ae,
                           sd::CfgType cfg, const std::vector<int64_t>& t, bool batch, int deep = 1,
                           bool frame_on_device = false) {
    const bool cn = with_controlnets(section);
    const std::string variant = stream_variant(ae, cfg, t, batch, cn, deep) + (frame_on_device ? " frame=device" : "");
    const std::string id = "stream/" + mode + "/" + variant + "/" + sd::dtype_name(dt) + "/" + std::to_string(size);
    if (auto r = find(id)) return *r;
    sd::StreamConfig config = stream_config(size, cfg, t, batch);
    config.deep_cache_every = deep;
    sd::StreamDiffusion stream(m, config);
    stream.prepare(o_.prompt, o_.negative_prompt);
    if (cn) attach_controlnets(stream, size);
    // The frame: a float32 host tensor, uploaded by each call as the original's bench feeds it; or (frame=device) on
    // the device in the stream's dtype before the first call and complete, as the runtime's pre-process thread hands
    // frames over (uploaded on a side stream, off the model thread).
    torch::Tensor frame = torch::rand({3, size, size}, torch::TensorOptions().dtype(torch::kFloat)) * 2 - 1;
    sd::InputReady ready = sd::InputReady::queued;
    if (frame_on_device) {
      frame = frame.to(device_, dt);
      sync(device_);
      ready = sd::InputReady::complete;
    }
    auto step = [&] { mode == "img2img" ? stream.img2img(frame, ready) : stream.txt2img(); };
    const int warm = round_to_every(o_.warmup + (batch ? static_cast<int>(t.size()) - 1 : 0), cn, deep);
    for (int i = 0; i < warm; ++i) step();
    const sd::StreamStats s0 = stream.stats();
    const int64_t compiled0 = m->compiled_unet_stats().calls;
    Result r;
    r.section = section;
    r.name = mode;
    r.variant = variant;
    r.dtype = sd::dtype_name(dt);
    r.size = size;
    r.steps = static_cast<int64_t>(t.size());
    r.batch = stream.unet_batch_size();
    r.timing = time_runs(device_, 0, round_to_every(o_.frames, cn, deep), step);
    const sd::StreamStats s1 = stream.stats();  // the timed frames' (the pipelined frames come after)
    const double n = static_cast<double>(std::max<int64_t>(1, s1.processed - s0.processed));
    const double per_enc = (s1.image_encode_s - s0.image_encode_s) / n, per_unet = (s1.unet_s - s0.unet_s) / n,
                 per_dec = (s1.decode_s - s0.decode_s) / n, per_total = (s1.total_s - s0.total_s) / n,
                 per_cn = (s1.controlnet_s - s0.controlnet_s) / n;
    const double rows = static_cast<double>(s1.unet_rows - s0.unet_rows) / n;
    r.extra = {{"autoencoder", ae},
               {"cfg", sd::cfg_type_name(cfg)},
               {"guidance_scale", stream.guidance_scale()},
               {"t_index_list", t},
               {"denoising_batch", batch},
               {"per_frame_s",
                {{"image_encode", per_enc},
                 {"unet", per_unet},
                 {"controlnet", per_cn},
                 {"decode", per_dec},
                 {"other", std::max(0.0, per_total - per_enc - per_unet - per_cn - per_dec)}}},
               {"unet_calls_per_frame", static_cast<double>(s1.unet_calls - s0.unet_calls) / n},
               {"cuda_graphs", config.cuda_graphs && device_.is_cuda()},
               // Whether TAESD's convolutions ran fused (it turns itself off if cuDNN refuses or disagrees).
               {"cuda_fused_conv", device_.is_cuda() && sd::nn::cuda_fused_conv()},
               {"graph_replays_per_frame", static_cast<double>(s1.graph_replays - s0.graph_replays) / n},
               {"graph_failures", s1.graph_failures},  // warm-up included: captures happen there
               {"unet_rows_per_frame", rows},
               {"controlnets", cn ? cn_units_.size() : 0},
               {"models", "sd::load_pipeline + sd::StreamDiffusion"}};
    if (cn) {
      // Calls and reuses over the timed frames; the amortised time per frame is the mean (with --controlnet-every
      // N > 1 the frames alternate between computing and reusing the residuals, so the median is not the cost).
      r.extra["controlnet_every"] = o_.controlnet_every;
      r.extra["controlnet_calls"] = s1.controlnet_calls - s0.controlnet_calls;
      r.extra["controlnet_reused"] = s1.controlnet_reused - s0.controlnet_reused;
      r.extra["controlnet_calls_per_frame"] = static_cast<double>(s1.controlnet_calls - s0.controlnet_calls) / n;
      r.extra["controlnet_scales"] = nlohmann::json::array();
      for (const auto& u : cn_units_) r.extra["controlnet_scales"].push_back(u.scale);
      r.extra["amortized_s_per_frame"] = r.timing.mean;
    }
    if (deep > 1) {
      // Frames alternate between one full UNet call and K - 1 shallow ones: the mean is the cost per frame.
      r.extra["deep_cache_every"] = deep;
      r.extra["unet_shallow_calls"] = s1.unet_shallow_calls - s0.unet_shallow_calls;
      r.extra["amortized_s_per_frame"] = r.timing.mean;
    }
    if (const auto c = m->compiled_unet_stats(); !c.path.empty() && compiled_) {
      // The compiled UNet ran the timed frames' calls (else their shape did not fit it: the model's own UNet did).
      const int64_t calls = c.calls - compiled0;
      r.extra["compiled_unet"] = {{"file", c.path}, {"calls_per_frame", static_cast<double>(calls) / n},
                                  {"fallback", calls > 0 ? "" : c.last_fallback}};
      if (calls == 0)
        std::cout << "           " << mode << " " << variant << ": the compiled UNet ran no call (" << c.last_fallback
                  << ")\n";
    }
    if (s1.graph_failures > 0)
      std::cout << "           " << mode << " " << variant << ": " << s1.graph_failures
                << " CUDA graph capture(s) failed; those calls ran eagerly (the log names them)\n";
    r.gflop = deep > 1 ? 0.0 : frame_gflop(mode, ae, size, rows);
    if (section == "e2e" && !cn && deep == 1) {
      const int n = o_.pipelined_frames >= 0 ? o_.pipelined_frames : (device_.is_cpu() ? 0 : o_.frames);
      if (n > 0) pipelined(r, step, n);
    }
    return add(id, r);
  }

  // Runs `rows` with the compiled UNet on (their variants " unet=compiled"); off again afterwards, also on a throw.
  void with_compiled_unet(const std::shared_ptr<const sd::DiffusionModels>& m, const std::function<void()>& rows) {
    struct Off {
      const sd::DiffusionModels& m;
      bool& flag;
      ~Off() {
        flag = false;
        m.set_compiled_unet_enabled(false);
      }
    } off{*m, compiled_};
    m->set_compiled_unet_enabled(true);
    compiled_ = true;
    rows();
  }

  // TAESD's rows with cuDNN's fused convolution + ReLU (sd::nn::conv_add_relu) off: on CUDA while it is on at the
  // start, elsewhere with --unfused-rows (both ways eager there).
  bool unfused_rows() const { return (device_.is_cuda() && fused_at_start_) || o_.unfused_rows; }
  // Runs `rows` with the fusion off (their variants " fused-conv=off"); as it was again afterwards, also on a throw.
  void with_fused_conv_off(const std::function<void()>& rows) {
    struct Restore {
      bool& flag;
      bool was;
      ~Restore() {
        flag = true;
        sd::nn::set_cuda_fused_conv(was);
      }
    } restore{fused_, sd::nn::cuda_fused_conv()};
    sd::nn::set_cuda_fused_conv(false);
    fused_ = false;
    rows();
  }

  // --compiled-unet: the e2e rows again with the compiled UNet on (variant " unet=compiled"), beside the rows above
  // that ran the model's own UNet, and one UNet call of the package's shape both ways: how far apart they are.
  void compiled_rows(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                     const std::string& ae) {
    with_compiled_unet(m, [&] {
      stream_row(m, "e2e", "txt2img", dt, size, ae, sd::CfgType::None, t_txt_, true);
      stream_row(m, "e2e", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true);
      if (device_.is_cuda() || o_.frame_on_device)
        stream_row(m, "e2e", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true, 1, /*frame_on_device=*/true);
    });
    const auto* cfg = m->unet_config();
    const std::string id = "compiled_check/" + sd::dtype_name(dt) + "/" + std::to_string(size);
    if (!cfg || checks_.count(id)) return;
    checks_.insert(id);
    torch::NoGradGuard ng;
    const int64_t h = size / m->vae_scale_factor();
    torch::manual_seed(11);
    const auto x = torch::randn({1, cfg->in_channels, h, h}).to(device_, dt);
    const auto t = torch::tensor({500}, torch::kLong).to(device_);
    const auto e = torch::randn({1, 77, cfg->cross_attention_dim.front()}).to(device_, dt);
    const auto own = m->unet(x, t, e).to(torch::kFloat);
    const int64_t before = m->compiled_unet_stats().calls;
    m->set_compiled_unet_enabled(true);
    const auto compiled = m->unet(x, t, e).to(torch::kFloat);
    m->set_compiled_unet_enabled(false);
    if (m->compiled_unet_stats().calls == before) return;  // another shape: the rows above said so
    const double diff = (compiled - own).abs().max().item<double>(), ref = own.abs().max().item<double>();
    std::cout << "           compiled UNet vs the model's own, one call " << sd::dtype_name(dt) << " " << size
              << " px: max |diff| " << std::setprecision(3) << std::scientific << diff << " of max |own| " << ref
              << std::fixed << "\n";
    accuracy_checks_.push_back({{"what", "compiled UNet vs the model's own UNet, one call, " + sd::dtype_name(dt) +
                                             " " + std::to_string(size) + " px"},
                                {"max_abs_diff", diff},
                                {"max_abs_own", ref},
                                {"relative", ref > 0 ? diff / ref : diff}});
  }

  // The timed frames each end with a device synchronisation (a frame's latency). A runtime's model thread queues the
  // next frame while the GPU still runs the last one (the output waits on another thread): `n` frames back to back
  // and one synchronisation give that throughput, and the host's own time to queue them (host-bound where it nears
  // the total). By default on a GPU only: on the CPU every call is synchronous and the two agree.
  void pipelined(Result& r, const std::function<void()>& step, int n) {
    sync(device_);
    const auto t0 = Clock::now();
    for (int i = 0; i < n; ++i) step();
    const double host = std::chrono::duration<double>(Clock::now() - t0).count();
    sync(device_);
    const double total = std::chrono::duration<double>(Clock::now() - t0).count();
    const double fps = total > 0 ? n / total : 0.0;
    r.extra["pipelined"] = {{"frames", n}, {"fps", fps}, {"total_s", total}, {"host_s_per_frame", host / n}};
    std::cout << "           " << r.name << " " << r.variant << " " << r.dtype << " " << r.size << " px: " << n
              << " frames back to back " << std::fixed << std::setprecision(2) << fps << " fps (pipelined), host "
              << std::setprecision(3) << 1e3 * host / n << " ms per frame\n";
  }

  void batch_rows(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                  const std::string& ae) {
    stream_row(m, "batch", "img2img", dt, size, ae, sd::CfgType::None, t_multi_, true);
    stream_row(m, "batch", "img2img", dt, size, ae, sd::CfgType::None, t_multi_, false);
    // The same comparison on the bare UNet: one call on n rows vs n calls on one row.
    const int64_t n = static_cast<int64_t>(t_multi_.size());
    unet_component(m, dt, size, n, "batch");
    const std::string id = "unet_seq/" + sd::dtype_name(dt) + "/" + std::to_string(size) + "/x" + std::to_string(n);
    if (find(id)) return;
    torch::NoGradGuard ng;
    const int64_t h = size / m->vae_scale_factor();
    const auto x = torch::randn({1, m->latent_channels(), h, h}).to(topt(dt));
    const auto t = torch::full({1}, 999, torch::TensorOptions().dtype(torch::kLong).device(device_));
    const auto ehs = torch::randn({1, 77, text_dim(m)}).to(topt(dt));
    const auto added = random_added(m, dt, 1, size);
    Result r;
    r.section = "batch";
    r.name = "unet";
    r.variant = std::to_string(n) + "x b1";
    r.dtype = sd::dtype_name(dt);
    r.size = size;
    r.batch = 1;
    r.steps = n;
    r.timing = time_runs(device_, o_.warmup, o_.iters, [&] {
      for (int64_t i = 0; i < n; ++i) m->unet(x, t, ehs, added);
    });
    r.gflop = known_gflop(arch_, "unet", size) * static_cast<double>(n);
    add(id, r);
  }

  // Where an img2img frame's time goes, operator by operator (the e2e row's stream: cfg none, --img2img-t-index):
  // libtorch's profiler over --frames frames after the warm-up, each operator's SELF time (its children's removed),
  // per frame, and its longest call (a descheduled host thread lands on whichever operator ran: look there before
  // trusting a surprising row). On CUDA the time is the GPU's between CUDA events around each operator (so the stream
  // runs without CUDA graphs, whose kernels the profiler cannot see, and the event pairs slow the host: read the
  // shares, not the frame rate); on the CPU it is the host's. The top operators are printed; the JSON has all.
  // --profile-streams K adds the same over rounds of K batched streams (the multistream section's batched row).
  void profile_rows(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                    const std::string& ae) {
    torch::NoGradGuard ng;
    sd::StreamConfig config = stream_config(size, sd::CfgType::None, t_img_, true);
    config.cuda_graphs = false;  // the profiler sees no kernel inside a replayed graph
    sd::StreamDiffusion stream(m, config);
    stream.prepare(o_.prompt, o_.negative_prompt);
    const torch::Tensor frame = torch::rand({1, 3, size, size}) * 2 - 1;
    for (int w = 0; w < std::max(1, o_.warmup + static_cast<int>(t_img_.size()) - 1); ++w) stream.img2img(frame);
    sync(device_);
    report_profile(profile_ops(
                       device_.is_cuda(),
                       [&] {
                         for (int f = 0; f < o_.frames; ++f) stream.img2img(frame);
                         sync(device_);
                       },
                       o_.profile_shapes),
                   {{"mode", "img2img"}, {"dtype", sd::dtype_name(dt)}, {"size", size}, {"autoencoder", ae},
                    {"t_index_list", t_img_}, {"frames", o_.frames}},
                   "img2img " + sd::dtype_name(dt) + " " + std::to_string(size) + " px, ae " + ae + ", " +
                       std::to_string(o_.frames) + " frames",
                   "frame");
    if (o_.profile_streams < 2) return;

    // K streams as in multistream_rows, batched without the shared graphs (eager, for the profiler).
    const int64_t k = o_.profile_streams;
    const sd::CfgType cfg = sd::CfgType::Self;
    const StreamSet set = make_stream_set(m, size, k, cfg, /*with_one_by_one=*/false, /*cuda_graphs=*/false);
    const std::vector<sd::StreamCall>& calls = set.calls;
    const sd::MultiStreamOptions mo;
    for (int w = 0; w < std::max(1, o_.warmup + static_cast<int>(t_multi_.size()) - 1); ++w)
      sd::run_streams_batched(calls, mo);
    sync(device_);
    report_profile(profile_ops(
                       device_.is_cuda(),
                       [&] {
                         for (int f = 0; f < o_.frames; ++f) sd::run_streams_batched(calls, mo);
                         sync(device_);
                       },
                       o_.profile_shapes),
                   {{"mode", "img2img-batched-streams"}, {"streams", k}, {"cfg", sd::cfg_type_name(cfg)},
                    {"dtype", sd::dtype_name(dt)}, {"size", size}, {"autoencoder", ae}, {"t_index_list", t_multi_},
                    {"rounds", o_.frames}},
                   std::to_string(k) + " batched img2img streams (cfg self, t " + join(t_multi_) + ") " +
                       sd::dtype_name(dt) + " " + std::to_string(size) + " px, ae " + ae + ", " +
                       std::to_string(o_.frames) + " rounds",
                   "round");
  }

  // K img2img streams as the multistream section runs them: `cfg`, --multi-t-index, stream i with seed 1000 + i, the
  // prompt "<--prompt>, variation i" and its own random frame. `many` serves batched rounds (`calls`: many[i] with
  // frames[i]); with `with_one_by_one` a twin `one` serves rounds of K separate calls.
  struct StreamSet {
    std::vector<std::unique_ptr<sd::StreamDiffusion>> one, many;
    std::vector<torch::Tensor> frames;
    std::vector<sd::StreamCall> calls;
  };
  StreamSet make_stream_set(const std::shared_ptr<const sd::DiffusionModels>& m, int64_t size, int64_t k,
                            sd::CfgType cfg, bool with_one_by_one, bool cuda_graphs = true) {
    StreamSet set;
    for (int64_t i = 0; i < k; ++i) {
      sd::StreamConfig c = stream_config(size, cfg, t_multi_, true);
      c.cuda_graphs = cuda_graphs;
      c.seed = 1000 + static_cast<uint64_t>(i);
      const std::string prompt = o_.prompt + ", variation " + std::to_string(i);
      for (auto* v : {&set.one, &set.many}) {
        if (v == &set.one && !with_one_by_one) continue;
        v->push_back(std::make_unique<sd::StreamDiffusion>(m, c));
        v->back()->prepare(prompt, o_.negative_prompt);
      }
      set.frames.push_back(torch::rand({3, size, size}) * 2 - 1);
    }
    for (int64_t i = 0; i < k; ++i) set.calls.push_back({set.many[i].get(), set.frames[i]});
    return set;
  }

  // The GPU's own account of graphed frames (--profile-kernels; CUDA builds): Kineto's trace (CUPTI) of up to 3
  // img2img frames (after --frames timed without the profiler) as the e2e frame=device row runs them (CUDA graphs on, the frame on the device), and with
  // --profile-streams K of rounds of K streams one by one and batched through the shared graphs (the multistream
  // section's rounds). Per frame or round: the unprofiled wall time, how much of it the GPU was busy, and in how many
  // kernels of which lengths - whether arithmetic or the count of small kernels sets the frame rate.
  void kernel_rows(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                   const std::string& ae) {
    if (!device_.is_cuda() || !sd::bench::device_events_available()) {
      std::cout << "profile    kernels: skipped (Kineto's kernel trace needs a CUDA device and a CUDA build)\n";
      return;
    }
    torch::NoGradGuard ng;
    const std::string ds = sd::dtype_name(dt) + " " + std::to_string(size) + " px, ae " + ae;
    sd::StreamDiffusion stream(m, stream_config(size, sd::CfgType::None, t_img_, true));
    stream.prepare(o_.prompt, o_.negative_prompt);
    const torch::Tensor frame = (torch::rand({3, size, size}) * 2 - 1).to(device_, dt);
    sync(device_);
    const auto one_frame = [&] { stream.img2img(frame, sd::InputReady::complete); };
    for (int w = 0; w < std::max(3, o_.warmup + static_cast<int>(t_img_.size()) - 1); ++w) one_frame();
    sync(device_);
    kernel_profile("img2img", one_frame,
                   {{"mode", "img2img"}, {"dtype", sd::dtype_name(dt)}, {"size", size}, {"autoencoder", ae},
                    {"t_index_list", t_img_}, {"cuda_graphs", true}},
                   "img2img " + ds + ", graphs on, frame on the device", "frame");
    if (o_.profile_streams < 2) return;

    const int64_t k = o_.profile_streams;
    const sd::CfgType cfg = sd::CfgType::Self;
    const StreamSet set = make_stream_set(m, size, k, cfg, /*with_one_by_one=*/true);
    sd::SharedGraphs graphs;
    sd::MultiStreamOptions mo;
    mo.graphs = &graphs;
    const auto round_one = [&] {
      for (int64_t i = 0; i < k; ++i) set.one[i]->img2img(set.frames[i]);
    };
    const auto round_many = [&] { sd::run_streams_batched(set.calls, mo); };
    for (int w = 0; w < std::max(3, o_.warmup + static_cast<int>(t_multi_.size()) - 1); ++w) {
      round_one();
      round_many();
    }
    sync(device_);
    const std::string what = std::to_string(k) + " img2img streams (cfg self, t " + join(t_multi_) + ") " + ds;
    const nlohmann::json base = {{"streams", k},          {"cfg", sd::cfg_type_name(cfg)}, {"dtype", sd::dtype_name(dt)},
                                 {"size", size},          {"autoencoder", ae},              {"t_index_list", t_multi_},
                                 {"cuda_graphs", true}};
    nlohmann::json e1 = base, e2 = base;
    e1["mode"] = "img2img-streams-one-by-one";
    e2["mode"] = "img2img-batched-streams";
    kernel_profile("streams-one-by-one-" + std::to_string(k), round_one, e1, what + ", one by one", "round");
    kernel_profile("streams-batched-" + std::to_string(k), round_many, e2, what + ", batched", "round");
  }

  // Times --frames `unit`s of `fn` unprofiled, then traces up to 3 more (a trace of thousands of kernels per unit
  // grows fast), and prints what the GPU did per unit.
  void kernel_profile(const std::string& slug, const std::function<void()>& fn, nlohmann::json entry,
                      const std::string& label, const std::string& unit) {
    const int timed = std::max(1, o_.frames), n = std::min(timed, 3);
    const auto t0 = Clock::now();
    for (int f = 0; f < timed; ++f) fn();
    sync(device_);
    const double wall_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / timed;
    const std::string trace = o_.profile_trace.empty() ? "" : o_.profile_trace + "/kernels-" + slug + ".json";
    const auto events = sd::bench::profile_device_events(
        [&] {
          for (int f = 0; f < n; ++f) fn();
          sync(device_);
        },
        trace);
    const sd::bench::DeviceSummary d = sd::bench::summarize_device_events(events);
    const double per = 1.0 / n;
    std::cout << std::fixed << std::setprecision(3) << "profile    kernels " << label << ", " << n << " " << unit
              << "s traced: " << wall_us * 1e-3 << " ms per " << unit << " (" << timed << " unprofiled), GPU busy " << d.busy_us * 1e-3 * per
              << " ms (" << std::setprecision(1) << (wall_us > 0 ? 100.0 * d.busy_us * per / wall_us : 0.0)
              << " % of the unprofiled time) in " << static_cast<double>(d.events) * per << " kernels, copies and memsets\n";
    std::cout << "profile      by length:";
    const char* names[] = {"< 5 us", "5-20 us", "20-100 us", ">= 100 us"};
    nlohmann::json buckets = nlohmann::json::array();
    for (size_t b = 0; b < d.bucket_events.size(); ++b) {
      std::cout << (b ? "," : "") << " " << names[b] << " " << std::setprecision(1)
                << static_cast<double>(d.bucket_events[b]) * per << " (" << std::setprecision(3)
                << d.bucket_us[b] * 1e-3 * per << " ms)";
      buckets.push_back({{"length", names[b]},
                         {"events_per_" + unit, static_cast<double>(d.bucket_events[b]) * per},
                         {"ms_per_" + unit, d.bucket_us[b] * 1e-3 * per}});
    }
    std::cout << "\n";
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < d.by_name.size(); ++i) {
      const auto& k = d.by_name[i];
      const double share = d.sum_us > 0 ? k.self_cuda_us / d.sum_us : 0;
      if (i < 40)
        rows.push_back({{"kernel", k.name},
                        {"calls_per_" + unit, static_cast<double>(k.calls) * per},
                        {"ms_per_" + unit, k.self_cuda_us * 1e-3 * per},
                        {"mean_us", k.self_cuda_us / static_cast<double>(k.calls)},
                        {"max_us", k.max_self_us},
                        {"share", share}});
      if (i < 15) {
        std::string name = k.name.rfind("void ", 0) == 0 ? k.name.substr(5) : k.name;
        if (name.size() > 72) name = name.substr(0, 69) + "...";
        std::cout << "profile      " << std::left << std::setw(72) << name << std::right << std::setw(8)
                  << std::setprecision(1) << static_cast<double>(k.calls) * per << " calls " << std::setw(9)
                  << std::setprecision(3) << k.self_cuda_us * 1e-3 * per << " ms " << std::setw(6)
                  << std::setprecision(1) << 100.0 * share << " % " << std::setw(8)
                  << k.self_cuda_us / static_cast<double>(k.calls) << " us mean\n";
      }
    }
    entry["clock"] = "gpu-kineto";
    entry["units"] = n;              // traced
    entry["units_timed"] = timed;    // the wall time's, unprofiled
    entry["wall_ms_per_" + unit] = wall_us * 1e-3;
    entry["busy_ms_per_" + unit] = d.busy_us * 1e-3 * per;
    entry["kernel_ms_per_" + unit] = d.sum_us * 1e-3 * per;
    entry["events_per_" + unit] = static_cast<double>(d.events) * per;
    entry["by_length"] = buckets;
    entry["kernels"] = rows;
    if (!trace.empty()) entry["trace"] = trace;
    profile_json_.push_back(std::move(entry));
  }

  // Prints the top operators of a profile (time per `unit`: --frames of them were profiled) and keeps the table.
  void report_profile(const std::vector<OpTime>& ops, nlohmann::json entry, const std::string& label,
                      const std::string& unit) {
    const bool cuda = device_.is_cuda();
    double total = 0;
    for (const auto& op : ops) total += cuda ? op.self_cuda_us : op.self_cpu_us;
    const double per_unit = 1.0 / o_.frames;
    std::cout << "profile    " << label << ": " << std::fixed << std::setprecision(3) << total * 1e-3 * per_unit
              << " ms of " << (cuda ? "GPU" : "CPU") << " time per " << unit << " in " << ops.size()
              << " operators\n";
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < ops.size(); ++i) {
      const OpTime& op = ops[i];
      const double self = cuda ? op.self_cuda_us : op.self_cpu_us;
      const double share = total > 0 ? self / total : 0;
      rows.push_back({{"operator", op.name},
                      {"calls_per_" + unit, static_cast<double>(op.calls) * per_unit},
                      {"self_ms_per_" + unit, self * 1e-3 * per_unit},
                      {"self_cpu_ms_per_" + unit, op.self_cpu_us * 1e-3 * per_unit},
                      {"max_call_ms", op.max_self_us * 1e-3},
                      {"share", share}});
      if (i < 20)
        std::cout << "profile      " << std::left << std::setw(o_.profile_shapes ? 72 : 44) << op.name << std::right
                  << std::setw(8) << std::setprecision(1) << static_cast<double>(op.calls) * per_unit << " calls "
                  << std::setw(9) << std::setprecision(3) << self * 1e-3 * per_unit << " ms " << std::setw(6)
                  << std::setprecision(1) << 100.0 * share << " %\n";
    }
    entry["clock"] = cuda ? "gpu" : "cpu";
    entry["ms_per_" + unit] = total * 1e-3 * per_unit;
    entry["operators"] = rows;
    profile_json_.push_back(std::move(entry));
  }

  // Many streams, one UNet call (pipeline/multi_stream.h): K img2img streams (cfg self, --multi-t-index, each its own
  // prompt, seed and frame) run one by one (K img2img calls per round) and batched (one sd::run_stream_calls per
  // round: one UNet call over all their rows, one decode), in the same run, rounds interleaved (alternating which
  // goes first). Rows: the median seconds per round; fps_total = K / median.
  void multistream_rows(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                        const std::string& ae) {
    torch::NoGradGuard ng;
    const std::string ds = sd::dtype_name(dt) + "/" + std::to_string(size);
    const sd::CfgType cfg = sd::CfgType::Self;
    nlohmann::json table = nlohmann::json::array();
    for (int64_t k : streams_) {
      const std::string variant = "k=" + std::to_string(k) + " ae=" + ae + " cfg=" + sd::cfg_type_name(cfg) +
                                  " t=" + join(t_multi_) + (compiled_ ? " unet=compiled" : "");
      const std::string id_one = "multistream/one-by-one/" + variant + "/" + ds;
      const std::string id_many = "multistream/batched/" + variant + "/" + ds;
      if (find(id_one) && find(id_many)) continue;
      const StreamSet set = make_stream_set(m, size, k, cfg, /*with_one_by_one=*/true);
      const auto& one = set.one;
      const auto& frames = set.frames;
      const auto& calls = set.calls;
      sd::MultiStreamStats ms;
      sd::SharedGraphs graphs;  // the batched calls' CUDA graphs, as serve's model worker keeps them
      sd::MultiStreamOptions mo;
      mo.graphs = &graphs;
      auto round_one = [&] {
        for (int64_t i = 0; i < k; ++i) one[i]->img2img(frames[i]);
      };
      auto round_many = [&] { sd::run_streams_batched(calls, mo, &ms); };
      const int warm = o_.warmup + static_cast<int>(t_multi_.size()) - 1;
      for (int w = 0; w < std::max(1, warm); ++w) {
        round_one();
        round_many();
      }
      const sd::MultiStreamStats ms0 = ms;
      std::vector<double> a, b;
      int64_t compiled_one = 0, compiled_many = 0;  // UNet calls the compiled package ran (--compiled-unet)
      auto compiled_calls = [&] { return m->compiled_unet_stats().calls; };
      auto timed = [&](const std::function<void()>& fn, std::vector<double>& out) {
        const auto t0 = Clock::now();
        fn();
        sync(device_);
        out.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      };
      auto timed_one = [&] {
        const int64_t c0 = compiled_calls();
        timed(round_one, a);
        compiled_one += compiled_calls() - c0;
      };
      auto timed_many = [&] {
        const int64_t c0 = compiled_calls();
        timed(round_many, b);
        compiled_many += compiled_calls() - c0;
      };
      for (int f = 0; f < o_.frames; ++f) {
        if (f % 2 == 0) {
          timed_one();
          timed_many();
        } else {
          timed_many();
          timed_one();
        }
      }
      Result r1, r2;
      for (Result* r : {&r1, &r2}) {
        r->section = "multistream";
        r->dtype = sd::dtype_name(dt);
        r->size = size;
        r->batch = k;
        r->steps = static_cast<int64_t>(t_multi_.size());
      }
      r1.name = "one-by-one";
      r2.name = "batched";
      r1.variant = r2.variant = variant;
      r1.timing = summarize(a);
      r2.timing = summarize(b);
      const double fps1 = r1.timing.median > 0 ? static_cast<double>(k) / r1.timing.median : 0;
      const double fps2 = r2.timing.median > 0 ? static_cast<double>(k) / r2.timing.median : 0;
      const double ratio = fps1 > 0 ? fps2 / fps1 : 0;
      const int64_t rows = k * one[0]->unet_batch_size();
      // CUDA graph captures that failed (warm-up included): the streams' own, and for batched rounds the shared calls'.
      int64_t failed_one = 0, failed_many = ms.graph_failures;
      for (const auto& s : one) failed_one += s->stats().graph_failures;
      for (const auto& c : calls) failed_many += c.stream->stats().graph_failures;
      r1.extra = {{"streams", k}, {"fps_total", fps1}, {"unet_calls_per_round", k}, {"unet_rows_per_call",
                   one[0]->unet_batch_size()}, {"cfg", sd::cfg_type_name(cfg)}, {"t_index_list", t_multi_},
                  {"graph_failures", failed_one}};
      r2.extra = {{"streams", k},
                  {"fps_total", fps2},
                  {"speedup_vs_one_by_one", ratio},
                  {"unet_calls_per_round", 1},
                  {"unet_rows_per_call", rows},
                  {"shared_unet_calls", ms.shared_unet_calls - ms0.shared_unet_calls},
                  {"graph_replays_per_round", static_cast<double>(ms.graph_replays - ms0.graph_replays) /
                                                  std::max(1, o_.frames)},
                  {"graph_failures", failed_many},
                  {"cfg", sd::cfg_type_name(cfg)},
                  {"t_index_list", t_multi_}};
      if (compiled_) {
        // Calls per round the package ran (one by one: k per round; batched: 1); 0 = it fits neither (the reason).
        const double rounds = std::max(1, o_.frames);
        r1.extra["compiled_unet"] = {{"calls_per_round", compiled_one / rounds}};
        r2.extra["compiled_unet"] = {{"calls_per_round", compiled_many / rounds}};
        if (compiled_one == 0 || compiled_many == 0) {
          const char* which = compiled_one == 0 && compiled_many == 0 ? "one-by-one or batched"
                              : compiled_one == 0                     ? "one-by-one"
                                                                      : "batched";
          std::cout << "           " << k << " streams: the compiled UNet ran no " << which << " call ("
                    << m->compiled_unet_stats().last_fallback << ")\n";
        }
      }
      add(id_one, r1);
      add(id_many, r2);
      if (failed_one + failed_many > 0)
        std::cout << "           " << k << " streams: " << failed_one << " (one by one) and " << failed_many
                  << " (batched) CUDA graph capture(s) failed; those calls ran eagerly (the log names them)\n";
      std::cout << "           " << k << " streams" << (compiled_ ? " (compiled UNet)" : "") << ": one by one "
                << std::fixed << std::setprecision(2) << fps1 << " fps total, batched " << fps2 << " fps total, x"
                << ratio << "\n";
      compare("multistream", std::to_string(k) + " streams batched vs one by one (a round of " + std::to_string(k) +
                                 " frames), " + sd::dtype_name(dt) + " " + std::to_string(size) + " px" +
                                 (compiled_ ? ", compiled UNet" : ""),
              id_one, id_many);
      if (compiled_) {  // against the model's own UNet's rows of this run (the table before)
        const std::string own = " unet=compiled";
        auto own_id = [&](std::string id) { return id.replace(id.find(own), own.size(), ""); };
        for (const auto& [what, id] : {std::pair<std::string, std::string>{"batched", id_many}, {"one by one", id_one}})
          if (find(own_id(id)))
            compare("multistream", std::to_string(k) + " streams " + what + ", compiled UNet vs the model's own, " +
                                       sd::dtype_name(dt) + " " + std::to_string(size) + " px",
                    own_id(id), id);
      }
      table.push_back({{"streams", k}, {"one_by_one_fps", fps1}, {"batched_fps", fps2}, {"ratio", ratio},
                       {"one_by_one_s_per_round", r1.timing.median}, {"batched_s_per_round", r2.timing.median}});
    }
    if (!table.empty())
      multistream_json_.push_back({{"dtype", sd::dtype_name(dt)}, {"size", size}, {"autoencoder", ae},
                                   {"cfg", sd::cfg_type_name(cfg)}, {"t_index_list", t_multi_}, {"rounds", o_.frames},
                                   {"unet", compiled_ ? "compiled" : "own"}, {"rows", table}});
  }

  void filter_row(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                  const std::string& ae) {
    const Result& base = stream_row(m, "filter", "img2img", dt, size, ae, sd::CfgType::None, t_img_, true);
    std::ostringstream v;
    v << "static thr=" << o_.filter_threshold << " skip<=" << o_.max_skip_frame << " noise=" << o_.filter_noise
      << cn_suffix(with_controlnets("filter"));
    const std::string id = "filter/" + v.str() + "/" + sd::dtype_name(dt) + "/" + std::to_string(size);
    if (find(id)) return;
    sd::StreamDiffusion stream(m, stream_config(size, sd::CfgType::None, t_img_, true));
    stream.prepare(o_.prompt, o_.negative_prompt);
    if (with_controlnets("filter")) attach_controlnets(stream, size);
    torch::manual_seed(7);
    // A static scene: one image plus a little independent per-frame noise (a camera's sensor noise).
    const auto scene = torch::rand({3, size, size}) * 2 - 1;
    auto next_frame = [&] { return o_.filter_noise > 0 ? scene + o_.filter_noise * torch::randn_like(scene) : scene; };
    for (int i = 0; i < o_.warmup + static_cast<int>(t_img_.size()) - 1; ++i) stream.img2img(next_frame());
    sd::SimilarityFilterOptions fo;
    fo.enabled = true;
    fo.threshold = o_.filter_threshold;
    fo.max_skip_frame = o_.max_skip_frame;
    fo.sleep_on_skip = false;  // measure compute, not the original's output pacing
    stream.set_similarity_filter(fo);
    const sd::StreamStats s0 = stream.stats();
    std::vector<torch::Tensor> frames;
    for (int i = 0; i < o_.filter_frames; ++i) frames.push_back(next_frame());
    int i = 0;
    Result r;
    r.section = "filter";
    r.name = "img2img_filter";
    r.variant = v.str();
    r.dtype = sd::dtype_name(dt);
    r.size = size;
    r.steps = static_cast<int64_t>(t_img_.size());
    r.timing = time_runs(device_, 0, o_.filter_frames, [&] { stream.img2img(frames[static_cast<size_t>(i++)]); });
    const sd::StreamStats& s1 = stream.stats();
    double total = 0;
    for (double s : r.timing.samples) total += s;
    const int64_t processed = s1.processed - s0.processed, skipped = s1.skipped - s0.skipped;
    const double eff_fps = total > 0 ? static_cast<double>(o_.filter_frames) / total : 0;
    r.extra = {{"frames", o_.filter_frames},
               {"processed", processed},
               {"skipped", skipped},
               {"forced", s1.forced - s0.forced},
               {"compute_saved_pct", 100.0 * static_cast<double>(skipped) / o_.filter_frames},
               {"effective_fps", eff_fps},
               {"unfiltered_fps", base.timing.fps()},
               {"speedup", base.timing.fps() > 0 ? eff_fps / base.timing.fps() : 0}};
    add(id, r);
  }

  // Latent feedback against flicker: the same noisy frames of one static scene through a stream without and one with
  // --latent-feedback A; flicker = mean |out_k - out_(k-1)| of the decoded outputs in 0..255 levels, over
  // --flicker-frames outputs after the stream latency and 4 settling frames. The input's own frame-to-frame
  // difference (the sensor noise) is reported beside it.
  void flicker_rows(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                    const std::string& ae) {
    const int settle = static_cast<int>(t_img_.size()) - 1 + 4;
    const int total = settle + o_.flicker_frames + 1;
    // A smooth static scene (bilinear 8x8 colour field) plus independent per-frame noise, the same for both rows.
    auto gen = at::detail::createCPUGenerator(11);
    const auto field = torch::rand({1, 3, 8, 8}, gen) * 2 - 1;
    namespace F = torch::nn::functional;
    const torch::Tensor scene =
        F::interpolate(field, F::InterpolateFuncOptions()
                                  .size(std::vector<int64_t>{size, size})
                                  .mode(torch::kBilinear)
                                  .align_corners(false))[0];
    std::vector<torch::Tensor> frames;
    for (int i = 0; i < total; ++i)
      frames.push_back((scene + o_.flicker_noise * torch::randn(scene.sizes(), gen)).clamp(-1, 1));
    const auto levels = [](const torch::Tensor& a, const torch::Tensor& b) {
      return (a.clamp(-1, 1) - b.clamp(-1, 1)).abs().mean().item<double>() * 127.5;
    };
    double input_flicker = 0;
    for (int i = settle + 1; i < total; ++i) input_flicker += levels(frames[i], frames[i - 1]);
    input_flicker /= o_.flicker_frames;
    double without = 0;
    for (double A : {0.0, o_.latent_feedback}) {
      std::ostringstream v;
      v << "static A=" << A << " noise=" << o_.flicker_noise << " t=" << join(t_img_) << cn_suffix(with_controlnets("flicker"));
      const std::string id = "flicker/" + v.str() + "/" + sd::dtype_name(dt) + "/" + std::to_string(size);
      if (find(id)) continue;
      sd::StreamConfig c = stream_config(size, sd::CfgType::None, t_img_, true);
      c.latent_feedback = A;
      sd::StreamDiffusion stream(m, c);
      stream.prepare(o_.prompt, o_.negative_prompt);
      if (with_controlnets("flicker")) attach_controlnets(stream, size);
      torch::Tensor prev;
      double sum = 0;
      int i = 0;
      auto step = [&] {
        const torch::Tensor out = stream.img2img(frames[static_cast<size_t>(i)].to(m->device(), m->dtype()))
                                      .to(torch::kCPU, torch::kFloat32)
                                      .clone();
        if (i > settle) sum += levels(out, prev);
        prev = out;
        ++i;
      };
      while (i <= settle) step();
      Result r;
      r.timing = time_runs(device_, 0, o_.flicker_frames, step);  // per frame, for the record (not the figure)
      const double flicker = sum / o_.flicker_frames;
      if (A == 0.0) without = flicker;
      r.section = "flicker";
      r.name = "feedback";
      r.variant = v.str();
      r.dtype = sd::dtype_name(dt);
      r.size = size;
      r.steps = static_cast<int64_t>(t_img_.size());
      r.extra = {{"latent_feedback", A},
                 {"frames", o_.flicker_frames},
                 {"noise", o_.flicker_noise},
                 {"flicker_levels", flicker},
                 {"input_flicker_levels", input_flicker}};
      if (A > 0 && without > 0) {
        r.extra["flicker_without_levels"] = without;
        r.extra["reduction_pct"] = 100.0 * (1.0 - flicker / without);
      }
      add(id, r);
    }
  }

  const Result& naive_row(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                          const std::string& ae, bool per_call_prompt) {
    std::ostringstream v;
    v << "ae=" << ae << " cfg=full(" << o_.naive_guidance << ") t=" << join(t_abl_)
      << (per_call_prompt ? " text per call" : " cached text");
    const std::string id = "naive/" + v.str() + "/" + sd::dtype_name(dt) + "/" + std::to_string(size);
    if (auto r = find(id)) return *r;
    NaiveOptions no;
    no.prompt = o_.prompt;
    no.negative_prompt = o_.negative_prompt;
    no.t_index_list = t_abl_;
    no.num_inference_steps = o_.num_inference_steps;
    no.guidance_scale = o_.naive_guidance;
    no.encode_prompt_per_call = per_call_prompt;
    no.width = no.height = size;
    NaiveTxt2Img naive(m, no);
    NaiveBreakdown sum;
    int timed = 0;
    Result r;
    r.section = "ablation";
    r.name = "naive_txt2img";
    r.variant = v.str();
    r.dtype = sd::dtype_name(dt);
    r.size = size;
    r.steps = static_cast<int64_t>(t_abl_.size());
    r.batch = naive.guidance() ? 2 : 1;
    for (int i = 0; i < o_.warmup; ++i) naive();
    r.timing = time_runs(device_, 0, o_.naive_iters, [&] {
      naive();
      sum.text_encode_s += naive.last().text_encode_s;
      sum.unet_s += naive.last().unet_s;
      sum.decode_s += naive.last().decode_s;
      sum.unet_rows = naive.last().unet_rows;
      ++timed;
    });
    r.extra = {{"per_frame_s",
                {{"text_encode", sum.text_encode_s / timed},
                 {"unet", sum.unet_s / timed},
                 {"decode", sum.decode_s / timed}}},
               {"unet_rows_per_frame", sum.unet_rows},
               {"text_encodes_per_frame", per_call_prompt ? (naive.guidance() ? 2 : 1) : 0},
               {"models", "sd::load_pipeline + bench naive loop (diffusers StableDiffusionPipeline semantics)"}};
    const double u = known_gflop(arch_, "unet", size), d = known_gflop(arch_, ae + "_decode", size);
    const double te = known_gflop(arch_, "text_encode", size);
    if (u > 0 && d > 0 && (!per_call_prompt || te > 0))
      r.gflop = static_cast<double>(sum.unet_rows) * u + d + (per_call_prompt ? (naive.guidance() ? 2 : 1) * te : 0);
    return add(id, r);
  }

  // Ablation steps in order; each is measured in the phase whose model set it needs and assembled at the end.
  void ablation_rows(const std::shared_ptr<const sd::DiffusionModels>& m, c10::ScalarType dt, int64_t size,
                     const std::string& ae, bool primary) {
    auto& rows = ablation_[size];
    auto put = [&](size_t k, const std::string& label, const Result& r) {
      if (rows.size() <= k) rows.resize(k + 1);
      rows[k] = {label, key_of(r)};
    };
    const bool multi = t_abl_.size() > 1;
    const std::string red = sd::dtype_name(reduced_);
    if (dt == c10::kFloat && ae == "vae") {
      put(0, "naive: fp32, text per call, full VAE, CFG batch 2", naive_row(m, dt, size, ae, true));
      put(1, "+ cached prompt embeddings", naive_row(m, dt, size, ae, false));
    }
    if (dt == c10::kFloat && ae == "taesd") put(2, "+ TAESD", naive_row(m, dt, size, ae, false));
    if (dt == c10::kFloat && primary) {
      put(3, "+ stream pipeline, RCFG self (UNet batch 1)",
          stream_row(m, "ablation", "txt2img", dt, size, ae, sd::CfgType::Self, t_abl_, false));
      put(4, "+ no guidance (cfg none)",
          stream_row(m, "ablation", "txt2img", dt, size, ae, sd::CfgType::None, t_abl_, false));
    }
    if (dt == reduced_ && primary) {
      put(5, "+ " + red, stream_row(m, "ablation", "txt2img", dt, size, ae, sd::CfgType::None, t_abl_, false));
      if (multi)
        put(6, "+ stream batch (" + std::to_string(t_abl_.size()) + " steps, 1 UNet call)",
            stream_row(m, "ablation", "txt2img", dt, size, ae, sd::CfgType::None, t_abl_, true));
    }
  }

  std::string key_of(const Result& r) const {
    for (const auto& [k, v] : results_)
      if (&v == &r) return k;
    return "";
  }

  // ---- output -------------------------------------------------------------------------------------------------
  void print_header() const {
    std::cout << std::left << std::setw(11) << "section" << std::setw(15) << "name" << std::setw(44) << "variant"
              << std::setw(6) << "dtype" << std::right << std::setw(5) << "size" << std::setw(4) << "B"
              << std::setw(10) << "median s" << std::setw(10) << "min s" << std::setw(9) << "fps" << std::setw(9)
              << "GFLOP/s" << std::setw(7) << "%ceil" << std::setw(7) << "%meas" << std::setw(8) << "RSS MiB" << "\n";
  }

  void print(const Result& r) const {
    if (r.section == "flicker") {  // not a timing
      std::cout << std::left << std::setw(11) << r.section << std::setw(15) << r.name << std::setw(44)
                << r.variant.substr(0, 43) << std::setw(6) << r.dtype << std::right << std::setw(5) << r.size
                << "    flicker " << std::fixed << std::setprecision(3) << r.extra["flicker_levels"].get<double>()
                << " levels/frame (input " << r.extra["input_flicker_levels"].get<double>() << ")";
      if (r.extra.contains("reduction_pct"))
        std::cout << ", " << std::setprecision(1) << r.extra["reduction_pct"].get<double>() << "% less than without";
      std::cout << "\n" << std::flush;
      return;
    }
    std::cout << std::left << std::setw(11) << r.section + " " << std::setw(15) << r.name << std::setw(44)
              << r.variant.substr(0, 43) << std::setw(6) << r.dtype << std::right << std::setw(5) << r.size
              << std::setw(4) << r.batch << std::fixed << std::setprecision(4) << std::setw(10) << r.timing.median
              << std::setw(10) << r.timing.min << std::setprecision(2) << std::setw(9) << r.timing.fps();
    if (r.gflops > 0)
      std::cout << std::setprecision(0) << std::setw(9) << r.gflops;
    else
      std::cout << std::setw(9) << "-";
    for (double pct : {r.pct_ceiling, r.pct_measured}) {
      if (pct > 0)
        std::cout << std::setprecision(0) << std::setw(6) << pct << "%";
      else
        std::cout << std::setw(7) << "-";
    }
    std::cout << std::setprecision(0) << std::setw(8) << r.rss_mib << "\n";
    if (r.extra.contains("per_frame_s")) {
      std::cout << "           per frame:";
      for (const auto& [k, v] : r.extra["per_frame_s"].items())
        std::cout << " " << k << " " << std::setprecision(4) << v.get<double>() << " s";
      if (r.extra.contains("controlnet_calls"))
        std::cout << " | ControlNet calls " << r.extra["controlnet_calls"] << ", reused " << r.extra["controlnet_reused"]
                  << ", amortised " << std::setprecision(4) << r.extra["amortized_s_per_frame"].get<double>()
                  << " s/frame";
      std::cout << "\n";
    }
    if (r.section == "filter" && r.extra.contains("effective_fps"))
      std::cout << "           processed " << r.extra["processed"] << " / " << r.extra["frames"] << ", skipped "
                << r.extra["skipped"] << " (" << std::setprecision(0) << r.extra["compute_saved_pct"].get<double>()
                << "% compute saved), effective " << std::setprecision(2) << r.extra["effective_fps"].get<double>()
                << " fps vs " << r.extra["unfiltered_fps"].get<double>() << " fps unfiltered\n";
    std::cout << std::flush;
  }

  // baseline median / candidate median: how many times faster the candidate is.
  void compare(const std::string& section, const std::string& what, const std::string& base_id,
               const std::string& cand_id, const std::string& note = "") {
    const Result *b = find(base_id), *c = find(cand_id);
    if (!b || !c || c->timing.median <= 0) return;
    comparisons_.push_back({{"section", section},
                            {"what", what},
                            {"baseline", base_id},
                            {"candidate", cand_id},
                            {"baseline_s", b->timing.median},
                            {"candidate_s", c->timing.median},
                            {"speedup", b->timing.median / c->timing.median},
                            {"note", note}});
  }

  // " cn=N" (+ " every=K", + " steps=S..E") on the variants of rows with ControlNets, so they never share an id with
  // rows without (or with another range).
  std::string cn_suffix(bool cn) const {
    if (!cn) return "";
    std::string s = " cn=" + std::to_string(cn_units_.size());
    if (o_.controlnet_every > 1) s += " every=" + std::to_string(o_.controlnet_every);
    if (partial_range())
      s += " steps=" + nlohmann::json(o_.control_guidance_start).dump() + ".." +
           nlohmann::json(o_.control_guidance_end).dump();
    return s;
  }
  bool partial_range() const { return o_.control_guidance_start > 0.0 || o_.control_guidance_end < 1.0; }
  std::string stream_variant(const std::string& ae, sd::CfgType cfg, const std::vector<int64_t>& t, bool batch,
                             bool cn, int deep = 1) const {
    std::string variant = "ae=" + ae + " cfg=" + sd::cfg_type_name(cfg) + " t=" + join(t);
    if (t.size() > 1) variant += batch ? " batch" : " sequential";
    return variant + cn_suffix(cn) + (deep > 1 ? " deep=" + std::to_string(deep) : "") +
           (graphs_ ? "" : " graphs=off") + (compiled_ ? " unet=compiled" : "") + (fused_ ? "" : " fused-conv=off");
  }
  // The id of a stream row outside the ablation (the comparisons' rows).
  std::string stream_id(const std::string& mode, c10::ScalarType dt, int64_t size, const std::string& ae,
                        sd::CfgType cfg, const std::vector<int64_t>& t, bool batch, int deep = 1,
                        bool frame_on_device = false) const {
    return "stream/" + mode + "/" + stream_variant(ae, cfg, t, batch, !cn_units_.empty(), deep) +
           (frame_on_device ? " frame=device" : "") + "/" + sd::dtype_name(dt) + "/" + std::to_string(size);
  }

  void summarize_all() {
    const std::string pae = has_taesd_ ? "taesd" : "vae";
    for (auto dt : requested_) {
      const std::string d = sd::dtype_name(dt);
      for (int64_t size : sizes_) {
        const std::string ds = d + "/" + std::to_string(size), tag = d + " " + std::to_string(size) + " px";
        const int64_t n = static_cast<int64_t>(t_multi_.size());
        if (o_.deep_cache_every > 1) {
          for (const std::string mode : {"img2img", "txt2img"}) {
            const auto& t = mode == "img2img" ? t_img_ : t_txt_;
            const std::string exact = stream_id(mode, dt, size, pae, sd::CfgType::None, t, true);
            const std::string deep = stream_id(mode, dt, size, pae, sd::CfgType::None, t, true, o_.deep_cache_every);
            const Result *b = find(exact), *c = find(deep);
            if (b && c && c->timing.mean > 0)
              comparisons_.push_back({{"section", "e2e"},
                                      {"what", "deep cache every " + std::to_string(o_.deep_cache_every) +
                                                   " vs exact (amortised mean per frame), " + mode + ", " + tag},
                                      {"baseline", exact},
                                      {"candidate", deep},
                                      {"baseline_s", b->timing.mean},
                                      {"candidate_s", c->timing.mean},
                                      {"speedup", b->timing.mean / c->timing.mean},
                                      {"note", "means of both rows"}});
          }
        }
        if (device_.is_cuda()) {
          for (const std::string mode : {"img2img", "txt2img"}) {
            const auto& t = mode == "img2img" ? t_img_ : t_txt_;
            graphs_ = false;
            const std::string off = stream_id(mode, dt, size, pae, sd::CfgType::None, t, true);
            graphs_ = true;
            compare("e2e", "CUDA graphs on vs off, " + mode + ", " + tag, off,
                    stream_id(mode, dt, size, pae, sd::CfgType::None, t, true));
          }
        }
        if (has_taesd_ && unfused_rows()) {  // cuDNN's fused convolution + ReLU in TAESD
          for (const std::string op : {"encode", "decode"})
            compare("components", "TAESD " + op + " fused convolution + ReLU vs unfused, " + tag,
                    "taesd_" + op + "/" + ds + "/unfused", "taesd_" + op + "/" + ds);
          for (const std::string mode : {"txt2img", "img2img"}) {
            const auto& t = mode == "img2img" ? t_img_ : t_txt_;
            const bool on_device = mode == "img2img" && (device_.is_cuda() || o_.frame_on_device);
            fused_ = false;
            const std::string off = stream_id(mode, dt, size, "taesd", sd::CfgType::None, t, true, 1, on_device);
            fused_ = true;
            compare("e2e", "TAESD fused convolution + ReLU vs unfused, " + mode + (on_device ? " frame=device" : "") +
                               ", " + tag,
                    off, stream_id(mode, dt, size, "taesd", sd::CfgType::None, t, true, 1, on_device));
          }
        }
        for (const std::string mode : {"img2img", "txt2img"}) {  // --compiled-unet
          const auto& t = mode == "img2img" ? t_img_ : t_txt_;
          compiled_ = true;
          const std::string with = stream_id(mode, dt, size, pae, sd::CfgType::None, t, true);
          compiled_ = false;
          compare("e2e", "compiled UNet vs the model's own, " + mode + ", " + tag,
                  stream_id(mode, dt, size, pae, sd::CfgType::None, t, true), with);
        }
        compare("components", "UNet with vs without the tiled CPU attention, " + tag, "unet/" + ds + "/b1/no-attention-tiles",
                "unet/" + ds + "/b1");
        for (const std::string ae : {"taesd", "vae"})
          compare("components", std::string(ae == "vae" ? "AutoencoderKL" : "TAESD") +
                                    " decode with vs without the upsample phases, " + tag,
                  ae + "_decode/" + ds + off_id(FastOff::UpsamplePhases), ae + "_decode/" + ds);
        for (const std::string name : {"taesd_encode", "taesd_decode", "vae_decode"}) {
          const Result* other = find(name + "/" + ds + "/other-layout");
          if (!other) continue;
          const std::string& v = other->variant;
          const bool other_nchw = v.size() >= 5 && v.compare(v.size() - 5, 5, " NCHW") == 0;
          compare("components",
                  std::string(name == "vae_decode" ? "AutoencoderKL decode" : name == "taesd_encode" ? "TAESD encode"
                                                                                                     : "TAESD decode") +
                      (other_nchw ? " channels-last vs NCHW, " : " NCHW vs channels-last, ") + tag,
                  name + "/" + ds + "/other-layout", name + "/" + ds);
        }
        compare("batch", "stream batch vs sequential, img2img " + std::to_string(n) + " steps, " + tag,
                stream_id("img2img", dt, size, pae, sd::CfgType::None, t_multi_, false),
                stream_id("img2img", dt, size, pae, sd::CfgType::None, t_multi_, true));
        compare("batch", "UNet: 1 call on " + std::to_string(n) + " rows vs " + std::to_string(n) + " calls, " + tag,
                "unet_seq/" + ds + "/x" + std::to_string(n), "unet/" + ds + "/b" + std::to_string(n));
        for (auto c : {sd::CfgType::Self, sd::CfgType::Initialize, sd::CfgType::None})
          compare("cfg", "full CFG vs " + sd::cfg_type_name(c) + ", img2img " + std::to_string(n) + " steps, " + tag,
                  stream_id("img2img", dt, size, pae, sd::CfgType::Full, t_multi_, true),
                  stream_id("img2img", dt, size, pae, c, t_multi_, true),
                  c == sd::CfgType::Self ? "the paper reports 2.05x for RCFG self-negative vs CFG" : "");
        if (has_taesd_) {
          for (const std::string op : {"encode", "decode"})
            compare("vae", "TAESD vs AutoencoderKL " + op + ", " + tag, "vae_" + op + "/" + ds,
                    "taesd_" + op + "/" + ds);
          for (const std::string mode : {"img2img", "txt2img"}) {
            const auto& t = mode == "img2img" ? t_img_ : t_txt_;
            compare("vae", "TAESD vs AutoencoderKL, " + mode + " frame, " + tag,
                    stream_id(mode, dt, size, "vae", sd::CfgType::None, t, true),
                    stream_id(mode, dt, size, "taesd", sd::CfgType::None, t, true));
          }
        }
      }
    }
    if (!comparisons_.empty()) {
      std::cout << "\ncomparisons (speed-up = baseline time / candidate time)\n";
      for (const auto& c : comparisons_)
        std::cout << "  " << std::left << std::setw(8) << c["section"].get<std::string>() + " " << std::setw(62)
                  << c["what"].get<std::string>() << std::right << std::fixed << std::setprecision(4)
                  << std::setw(9) << c["baseline_s"].get<double>() << " s -> " << std::setw(9)
                  << c["candidate_s"].get<double>() << " s  x" << std::setprecision(2)
                  << c["speedup"].get<double>() << (c["note"].get<std::string>().empty() ? "" : "  (") 
                  << c["note"].get<std::string>() << (c["note"].get<std::string>().empty() ? "" : ")") << "\n";
    }
    for (const auto& [size, rows] : ablation_) {
      nlohmann::json a = {{"size", size}, {"steps", t_abl_.size()}, {"t_index_list", t_abl_}, {"rows", nlohmann::json::array()}};
      std::cout << "\nablation: txt2img " << size << " px, " << t_abl_.size() << " step(s), t_index " << join(t_abl_)
                << " (naive CFG " << o_.naive_guidance << ", RCFG guidance " << o_.guidance << ")\n";
      double naive = 0, prev = 0;
      for (const auto& row : rows) {
        const Result* r = row.id.empty() ? nullptr : find(row.id);
        if (!r) continue;
        const double s = r->timing.median;
        if (naive == 0) naive = s;
        const double vs_naive = s > 0 ? naive / s : 0, vs_prev = prev > 0 && s > 0 ? prev / s : 1;
        std::cout << "  " << std::left << std::setw(52) << row.label << std::right << std::fixed
                  << std::setprecision(4) << std::setw(10) << s << " s" << std::setprecision(2) << std::setw(8)
                  << r->timing.fps() << " fps   x" << std::setw(6) << vs_naive << " vs naive   x" << std::setw(5)
                  << vs_prev << " vs previous   [" << r->dtype << "]\n";
        a["rows"].push_back({{"label", row.label},
                             {"result", row.id},
                             {"dtype", r->dtype},
                             {"median_s", s},
                             {"fps", r->timing.fps()},
                             {"speedup_vs_naive", vs_naive},
                             {"speedup_vs_previous", vs_prev}});
        prev = s;
      }
      if (t_abl_.size() == 1)
        std::cout << "  (stream batch needs > 1 step: see the batch section, or --ablation-t-index 0,16,32,45)\n";
      ablation_json_.push_back(a);
    }
    std::cout << "\npeak RSS " << std::setprecision(0) << peak_rss_mib() << " MiB";
    if (const double dev = device_allocated_mib(device_, /*peak=*/true); dev >= 0)
      std::cout << ", peak device memory allocated " << dev << " MiB";
    std::cout << "\n";
  }

  void write_outputs() {
    if (o_.json_path.empty() && o_.chart_path.empty()) return;
    nlohmann::json j;
    j["schema"] = "streamdiffusion-bench/1";
    j["model"] = o_.model;
    j["architecture"] = {{"name", arch_.name},
                         {"unet_parameters", arch_.unet_params},
                         {"text_encoder_parameters", arch_.text_params},
                         {"vae_parameters", arch_.vae_params},
                         {"taesd", has_taesd_}};
    std::ostringstream dev;
    dev << device_;
    j["device"] = dev.str();
    if (device_.is_cuda())
      j["cuda"] = {{"cudnn_benchmark", at::globalContext().benchmarkCuDNN()},
                   {"channels_last", sd::nn::cuda_channels_last()}};
    if (device_.is_cpu())  // the autoencoders' activation layout per dtype (models/conv_layout.h)
      for (auto d : requested_) j["cpu_channels_last"][sd::dtype_name(d)] = sd::nn::cpu_channels_last(compute_dtype(d));
    j["threads"] = threads_;
    j["libtorch"] = TORCH_VERSION;
    j["sections"] = sections_;
    j["sizes"] = sizes_;
    std::vector<std::string> dts;
    for (auto d : requested_) dts.push_back(sd::dtype_name(d));
    j["dtypes"] = dts;
    j["options"] = {{"iters", o_.iters},
                    {"warmup", o_.warmup},
                    {"frames", o_.frames},
                    {"naive_iters", o_.naive_iters},
                    {"filter_frames", o_.filter_frames},
                    {"latent_feedback", o_.latent_feedback},
                    {"flicker_frames", o_.flicker_frames},
                    {"flicker_noise", o_.flicker_noise},
                    {"prompt", o_.prompt},
                    {"txt2img_t_index", t_txt_},
                    {"img2img_t_index", t_img_},
                    {"multi_t_index", t_multi_},
                    {"ablation_t_index", t_abl_},
                    {"num_inference_steps", o_.num_inference_steps},
                    {"guidance", o_.guidance},
                    {"naive_guidance", o_.naive_guidance}};
    j["ceilings_gflops"] = {{"fp32", ceiling_gflops(c10::kFloat, device_)},
                            {"bf16", ceiling_gflops(c10::kBFloat16, device_)},
                            {"note", "this kind of 2-core CPU: bf16 ~750-800, fp32 ~370-400 GFLOP/s (upper bound used)"}};
    for (const auto& [d, g] : measured_ceiling_) j["ceilings_gflops"]["measured_" + sd::dtype_name(d)] = g;
    j["cpu_simd"] = sd::cpu_simd_level();
    j["cpu_native_bf16"] = sd::cpu_has_native_bf16();
    j["onednn_amx"] = sd::onednn_amx_active();
    j["loads"] = loads_;
    j["controlnets"] = nlohmann::json::array();
    for (const auto& [path, scale] : cn_specs_) j["controlnets"].push_back({{"path", path}, {"scale", scale}});
    j["controlnet_every"] = o_.controlnet_every;
    j["control_guidance"] = {o_.control_guidance_start, o_.control_guidance_end};
    j["results"] = nlohmann::json::array();
    for (const auto& id : order_) {
      auto r = to_json(results_.at(id));
      r["id"] = id;
      j["results"].push_back(r);
    }
    j["comparisons"] = comparisons_.empty() ? nlohmann::json::array() : nlohmann::json(comparisons_);
    if (!accuracy_checks_.empty()) j["checks"] = accuracy_checks_;  // --compiled-unet: compiled_rows
    j["ablation"] = ablation_json_;
    if (!multistream_json_.empty()) j["multistream"] = multistream_json_;
    if (!profile_json_.empty()) j["profile"] = profile_json_;
    j["peak_rss_mib"] = peak_rss_mib();
    if (const double dev = device_allocated_mib(device_, /*peak=*/true); dev >= 0) j["peak_device_mib"] = dev;
    if (!o_.json_path.empty()) {
      std::ofstream out(o_.json_path);
      if (!out) throw sd::InvalidArgument("--json: cannot write '" + o_.json_path + "'");
      out << j.dump(2) << "\n";
      std::cout << "wrote " << o_.json_path << "\n";
    }
    if (!o_.chart_path.empty()) {
      write_chart(j, o_.chart_path);
      std::cout << "wrote " << o_.chart_path << "\n";
    }
  }

  BenchOptions o_;
  c10::Device device_;
  int threads_ = 0;
  ArchInfo arch_;
  bool has_taesd_ = false;
  const bool fused_at_start_ = sd::nn::cuda_fused_conv();
  bool graphs_ = true;  // StreamConfig::cuda_graphs of the stream rows being run (CUDA: also timed off)
  bool compiled_ = false;  // the stream rows being run have the compiled UNet on (compiled_rows)
  bool fused_ = true;      // sd::nn::cuda_fused_conv() is on for the TAESD rows being run (with_fused_conv_off)
  std::set<std::string> checks_;  // compiled_rows' one-call checks done
  std::vector<nlohmann::json> accuracy_checks_;  // their results (JSON "checks")
  bool has_vae_ = true;  // vae/ has weights (false for a TAESD-only model such as models/emoji-tiny)
  c10::ScalarType reduced_ = c10::kBFloat16;
  std::vector<std::string> sections_;
  std::vector<int64_t> sizes_;
  std::vector<c10::ScalarType> requested_;
  std::map<c10::ScalarType, double> measured_ceiling_;  // GFLOP/s of a plain GEMM per requested dtype, this run
  std::vector<int64_t> t_txt_, t_img_, t_multi_, t_abl_;
  std::map<std::string, Result> results_;
  std::vector<std::string> order_;
  std::vector<nlohmann::json> loads_;
  std::vector<sd::LoraSpec> loras_;
  std::vector<std::pair<std::string, double>> cn_specs_;  // --controlnet: path, scale
  std::vector<sd::ControlNetUnit> cn_units_;              // loaded for the current model set
  std::vector<nlohmann::json> comparisons_;
  std::map<int64_t, std::vector<AblationRow>> ablation_;
  nlohmann::json ablation_json_ = nlohmann::json::array();
  std::vector<int64_t> streams_;                              // --streams (multistream section)
  nlohmann::json multistream_json_ = nlohmann::json::array();  // one table per dtype and size
  nlohmann::json profile_json_ = nlohmann::json::array();      // one operator table per dtype and size
};

sd::cli::Runner setup_bench(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  app.add_option("--model", o->model,
                 "diffusers model folder (e.g. from make-random-model) or single-file .safetensors checkpoint")
      ->required();
  app.add_option("--config", o->config,
                 "single-file checkpoints: a diffusers folder of config files used instead of inference");
  sd::cli::add_variant_option(app, o->variant, o->model);
  app.add_option("--sizes", o->sizes, "square image sizes, comma-separated (e.g. 256,512; default: the model's native size)");
  app.add_option("--dtypes", o->dtypes,
                 "fp32,bf16 (CPU) or fp32,fp16 (CUDA), or auto (what the other commands run in here: bf16 on a CPU "
                 "with AVX512-BF16/AMX, fp16 on CUDA, else fp32); the ablation adds what it needs")
      ->capture_default_str();
  app.add_option("--device", o->device, "cpu | cuda | cuda:N")->capture_default_str();
  app.add_option("--sections", o->sections,
                 "all, or any of components,e2e,ablation,batch,cfg,vae,filter,flicker; not in all: multistream "
                 "times --streams img2img streams one by one vs batched into one UNet call per round, profile lists "
                 "the operators taking an img2img frame's time (libtorch's profiler; CUDA: kernel time, graphs off)")
      ->capture_default_str();
  app.add_option("--streams", o->streams, "multistream section: stream counts, comma-separated")
      ->capture_default_str();
  app.add_flag("--profile-shapes", o->profile_shapes,
               "profile section: one row per operator and input shapes (which convolution or copy it is)");
  app.add_option("--pipelined-frames", o->pipelined_frames,
                 "e2e rows: also time N frames queued back to back with one device synchronisation (a runtime's "
                 "throughput; default --frames on a GPU, none on the CPU, where calls are synchronous)")
      ->check(CLI::Range(-1, 1000000));
  app.add_flag("--frame-on-device", o->frame_on_device,
               "e2e section: also an img2img row whose frame is on the device in the stream's dtype before the first "
               "call (variant '... frame=device', the runtime's case); always added on CUDA");
  app.add_flag("--unfused-rows", o->unfused_rows,
               "components and e2e sections: also time TAESD with cuDNN's fused convolution + ReLU off (variants "
               "'TAESD unfused', '... fused-conv=off'); always added on CUDA while it is on (SD_CUDA_FUSED_CONV); "
               "elsewhere both ways run the eager path");
  app.add_option("--profile-streams", o->profile_streams,
                 "profile section: also profile rounds of K img2img streams batched into one UNet call (as the "
                 "multistream section's batched row, --multi-t-index, without CUDA graphs); 0 = not")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_flag("--profile-kernels", o->profile_kernels,
               "profile section: also trace the GPU's kernels (Kineto) over graphed img2img frames, and with "
               "--profile-streams K over rounds of K streams one by one and batched: busy share, kernel count and "
               "lengths, top kernels (CUDA builds on a GPU; elsewhere a skip line)");
  app.add_option("--profile-trace", o->profile_trace,
                 "with --profile-kernels: a folder for the Chrome traces (kernels-*.json; chrome://tracing, Perfetto)");
  app.add_option("--threads", o->threads, "intra-op threads (0 = all cores)")
      ->check(CLI::Range(0, 1024))  // more is a typo that would hang the command making threads
      ->capture_default_str();
  app.add_option("--iters", o->iters, "timed runs per component measurement (median)")->capture_default_str();
  app.add_option("--warmup", o->warmup, "untimed warm-up runs before each measurement")->capture_default_str();
  app.add_option("--frames", o->frames, "timed frames per stream measurement (median)")->capture_default_str();
  app.add_option("--naive-iters", o->naive_iters, "timed runs of the naive path and of the full VAE")
      ->capture_default_str();
  app.add_option("--filter-frames", o->filter_frames, "frames of the static scene (filter section)")
      ->capture_default_str();
  app.add_option("--prompt", o->prompt, "prompt")->capture_default_str();
  app.add_option("--negative-prompt", o->negative_prompt, "negative prompt (full CFG, the naive path)");
  app.add_option("--txt2img-t-index", o->txt2img_t, "t_index_list of the txt2img stream rows")->capture_default_str();
  app.add_option("--img2img-t-index", o->img2img_t, "t_index_list of the img2img stream rows")->capture_default_str();
  app.add_option("--multi-t-index", o->multi_t, "t_index_list of the batch and cfg sections")->capture_default_str();
  app.add_option("--ablation-t-index", o->ablation_t, "t_index_list of the ablation (txt2img)")
      ->capture_default_str();
  app.add_option("--num-inference-steps", o->num_inference_steps, "LCM schedule length")->capture_default_str();
  app.add_option("--guidance", o->guidance, "guidance scale of the RCFG / CFG stream rows (> 1)")
      ->capture_default_str();
  app.add_option("--naive-guidance", o->naive_guidance, "CFG scale of the naive path (diffusers' default 7.5)")
      ->capture_default_str();
  app.add_option("--filter-threshold", o->filter_threshold, "similarity filter threshold")->capture_default_str();
  app.add_option("--max-skip-frame", o->max_skip_frame, "similarity filter max_skip_frame")->capture_default_str();
  app.add_option("--filter-noise", o->filter_noise, "per-frame noise std of the static scene ([-1, 1] scale)")
      ->capture_default_str();
  app.add_option("--latent-feedback", o->latent_feedback,
                 "flicker section: latent feedback A of the 'with' stream (the 'without' stream has A = 0)")
      ->capture_default_str();
  app.add_option("--flicker-frames", o->flicker_frames, "flicker section: measured output frames")
      ->capture_default_str();
  app.add_option("--flicker-noise", o->flicker_noise,
                 "flicker section: per-frame sensor noise std of the static scene ([-1, 1] scale)")
      ->capture_default_str();
  app.add_option("--json", o->json_path, "write the results as JSON");
  app.add_option("--chart", o->chart_path, "write a PNG chart of the ablation and the components (needs OpenCV)");
  sd::cli::add_lora_options(app, o->loras, o->lcm_lora, o->strict_lora);
  app.add_option("--compiled-unet", o->compiled_unet,
                 "UNet compiled by scripts/compile-unet.py (AOTInductor; libtorch >= 2.11 builds) for the model, device, "
                 "dtype and UNet call shape of the rows to time: the e2e rows and the multistream table again with "
                 "it on (variant 'unet=compiled'; a package of a row range, compile-unet.py --rows 1-32, fits every "
                 "stream count), beside the model's own UNet's");
  app.add_option("--controlnet", o->controlnets,
                 "ControlNet DIR|FILE or DIR|FILE:SCALE (default scale 1; repeatable, residuals summed), e.g. from "
                 "make-random-model --arch controlnet-sd21: every stream row except the ablation's runs with it on a "
                 "fixed synthetic edge-map control image, and components gains a controlnet line per ControlNet");
  app.add_option("--deep-cache-every", o->deep_cache_every,
                 "also time the e2e streams with the UNet's deep features reused for K - 1 of every K frames "
                 "(StreamConfig::deep_cache_every), compared with the exact rows by their mean time per frame");
  app.add_option("--control-guidance-start", o->control_guidance_start,
                 "control_guidance_start of every --controlnet: step i of the n of a stream's t_index_list is "
                 "conditioned unless i/n < START or (i+1)/n > END (rows out of range: no ControlNet)")
      ->capture_default_str();
  app.add_option("--control-guidance-end", o->control_guidance_end, "control_guidance_end of every --controlnet")
      ->capture_default_str();
  app.add_option("--controlnet-every", o->controlnet_every,
                 "recompute the ControlNet residuals every N stream calls and reuse them in between; timed frames "
                 "are rounded up to a multiple of N (see amortized_s_per_frame)")
      ->capture_default_str();
  return [o] { return Bench(*o).run(); };
}

REGISTER_COMMAND("bench", "measure components, whole frames and each StreamDiffusion technique (ablation)", 80,
                 setup_bench);

}  // namespace
