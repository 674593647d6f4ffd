#include "pipeline/diffusion_models.h"

#include <cmath>
#include <sstream>

#include <torch/torch.h>

#include "core/device.h"
#include "core/error.h"
#include "core/log.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/lora.h"
#include "models/unet_2d_condition.h"
#include "tokenizer/clip_tokenizer.h"

namespace sd {

namespace {

// A diffusers StableDiffusionPipeline folder's models. With TAESD, the AutoencoderKL weights are not loaded (TAESD
// replaces it, as in StreamDiffusionWrapper); only its config is read for the VAE scale factor.
class StableDiffusionModels : public DiffusionModels {
 public:
  StableDiffusionModels(const std::string& model_dir, const LoadOptions& opt)
      : dtype_(opt.dtype), device_(parse_device(opt.device)) {
    const ModelFolder folder = ModelFolder::open(model_dir);
    dir_ = folder.dir();

    sched_ = LCMSchedulerConfig::from_file(folder.config_path("scheduler"));
    tokenizer_ = std::make_unique<ClipTokenizer>(ClipTokenizer::from_folder(folder.component_dir("tokenizer")));
    text_encoder_ = load_clip_text_model(folder.component_dir("text_encoder"), dtype_, device_);
    unet_ = load_unet(folder.component_dir("unet"), dtype_, device_);

    const std::string vae_dir = folder.component_dir("vae");
    const std::string vae_config_path = folder.config_path("vae");
    vae_config_ = AutoencoderKLConfig::from_json(read_json_file(vae_config_path), vae_config_path);
    vae_scale_factor_ = int64_t{1} << (vae_config_.block_out_channels.size() - 1);

    std::string taesd = opt.taesd;
    if (taesd.empty()) taesd = folder.taesd_dir().value_or("none");
    if (taesd != "none") {
      taesd_ = load_taesd(taesd, dtype_, device_);
      taesd_path_ = taesd;
      scaling_factor_ = taesd_->config().scaling_factor;
      latent_channels_ = taesd_->config().latent_channels;
    } else {
      vae_ = load_vae(vae_dir, dtype_, device_);
      scaling_factor_ = vae_config_.scaling_factor;
      latent_channels_ = vae_config_.latent_channels;
    }
    if (latent_channels_ != unet_->config().in_channels)
      throw FormatError(dir_, "the autoencoder has " + std::to_string(latent_channels_) +
                                  " latent channels but the UNet takes " +
                                  std::to_string(unet_->config().in_channels));
    if (!(scaling_factor_ > 0) || !std::isfinite(scaling_factor_))
      throw FormatError(dir_, "autoencoder scaling_factor must be positive, got " + std::to_string(scaling_factor_));
    text_hidden_ = text_encoder_->config().hidden_size;
    if (!opt.loras.empty()) load_loras(opt);
  }

  void load_loras(const LoadOptions& opt) {
    std::vector<LoraSpec> specs = opt.loras;
    name_loras(specs);
    lora_ = std::make_unique<LoraSet>(
        LoraComponents{{"unet", unet_.ptr().get()}, {"text_encoder", text_encoder_.ptr().get()}}, opt.lora_live);
    for (const auto& spec : specs) {
      const LoraReport& r = lora_->add(spec, opt.strict_lora);
      lora_names_.push_back(r.name);
      log::info("LoRA {} ({}): {}", r.name, r.path, r.summary());
    }
    lora_->fuse();
    log::info("fused {} LoRA{} in {:.3f} s", specs.size(), specs.size() == 1 ? "" : "s", lora_->fuse_seconds());
  }

  std::vector<LoraReport> loras() const override { return lora_ ? lora_->reports() : std::vector<LoraReport>{}; }
  void set_lora_scale(const std::string& name, double scale) const override {
    if (!lora_) return DiffusionModels::set_lora_scale(name, scale);
    lora_->set_scale(name, scale);
    log::info("LoRA {} re-fused at scale {} in {:.3f} s", name, scale, lora_->fuse_seconds());
  }
  uint64_t text_encoder_version() const override { return lora_ ? lora_->text_encoder_version() : 0; }

  torch::Tensor encode_prompt(const std::string& text) const override {
    torch::NoGradGuard no_grad;
    const torch::Tensor ids = tokenizer_->encode_batch({text}).to(device_);  // [1, 77]
    return text_encoder_.ptr()->forward(ids);                               // [1, 77, D]
  }

  torch::Tensor unet(const torch::Tensor& sample, const torch::Tensor& timesteps,
                     const torch::Tensor& encoder_hidden_states) const override {
    torch::NoGradGuard no_grad;
    return unet_.ptr()->forward(sample, timesteps, encoder_hidden_states);
  }

  torch::Tensor encode_image(const torch::Tensor& image, Rng& rng) const override {
    torch::NoGradGuard no_grad;
    const torch::Tensor x = image.to(device_, dtype_);
    if (taesd_) return taesd_.ptr()->encode(x) * scaling_factor_;
    // AutoencoderKL: a posterior sample mean + std·ε with ε drawn from the stream's generator (CPU, float32).
    const DiagonalGaussian post = vae_.ptr()->encode(x);
    const torch::Tensor noise = rng.randn(post.mean.sizes(), "AutoencoderKL posterior sample").to(post.mean.options());
    return post.sample(noise) * scaling_factor_;
  }

  torch::Tensor decode_latent(const torch::Tensor& latent) const override {
    torch::NoGradGuard no_grad;
    const torch::Tensor z = latent / scaling_factor_;
    return taesd_ ? taesd_.ptr()->decode(z) : vae_.ptr()->decode(z);
  }

  int64_t latent_channels() const override { return latent_channels_; }
  int64_t vae_scale_factor() const override { return vae_scale_factor_; }
  c10::ScalarType dtype() const override { return dtype_; }
  c10::Device device() const override { return device_; }
  const LCMSchedulerConfig& scheduler_config() const override { return sched_; }
  std::string describe() const override {
    std::ostringstream o;
    o << dir_ << " (text " << text_hidden_ << "-d, autoencoder "
      << (taesd_ ? "TAESD " + taesd_path_ : std::string("AutoencoderKL"));
    // Names joined without commas: readers (the browser app) take the last two items as dtype and device.
    if (lora_) {
      o << ", LoRA";
      for (size_t i = 0; i < lora_names_.size(); ++i) o << (i ? " + " : " ") << lora_names_[i];
    }
    o << ", " << dtype_name(dtype_) << ", " << device_ << ")";
    return o.str();
  }

 private:
  c10::ScalarType dtype_;
  c10::Device device_;
  std::string dir_, taesd_path_;
  LCMSchedulerConfig sched_;
  std::unique_ptr<ClipTokenizer> tokenizer_;
  CLIPTextModel text_encoder_{nullptr};
  UNet2DConditionModel unet_{nullptr};
  AutoencoderKLConfig vae_config_;
  AutoencoderKL vae_{nullptr};
  AutoencoderTiny taesd_{nullptr};
  std::unique_ptr<LoraSet> lora_;  // mutated only by set_lora_scale (see DiffusionModels)
  std::vector<std::string> lora_names_;  // fixed at load (describe() may be called from any thread)
  double scaling_factor_ = 1.0;
  int64_t latent_channels_ = 4, vae_scale_factor_ = 8, text_hidden_ = 0;
};

}  // namespace

void DiffusionModels::set_lora_scale(const std::string& name, double /*scale*/) const {
  throw InvalidArgument("no LoRA named '" + name + "' (none loaded; give --lora FILE[:SCALE])");
}

std::shared_ptr<const DiffusionModels> load_pipeline(const std::string& model_dir, const LoadOptions& options) {
  if (options.dtype == c10::kHalf && parse_device(options.device).is_cpu())
    throw InvalidArgument("fp16 is not supported on the CPU (libtorch has no CPU half-precision matmul kernels); "
                          "use bf16 or fp32 on the CPU, or fp16 with a CUDA device");
  if (options.threads >= 0) set_threads(options.threads);
  if (options.dtype == c10::kBFloat16 && parse_device(options.device).is_cpu() && !cpu_has_native_bf16())
    log::warn("bf16 on this CPU ({}, no AVX512-BF16/AMX) is emulated and slower than fp32; --dtype fp32 is faster here",
              cpu_simd_level());
  auto models = std::make_shared<StableDiffusionModels>(model_dir, options);
  log::info("loaded {}", models->describe());
  return models;
}

}  // namespace sd
