#include "pipeline/diffusion_models.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <set>
#include <sstream>

#include <torch/torch.h>

#include "core/device.h"
#include "core/error.h"
#include "core/log.h"
#include "io/json_config.h"
#include "io/ldm_checkpoint.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/compiled_unet.h"
#include "models/embeddings.h"
#include "models/ip_adapter.h"
#include "models/lora.h"
#include "models/unet_2d_condition.h"
#include "tokenizer/clip_tokenizer.h"

namespace sd {

namespace {

// diffusers' LatentConsistencyModelPipeline.__call__ default guidance_scale.
constexpr double kLcmPipelineDefaultGuidance = 8.5;

// A diffusers StableDiffusionPipeline folder's models. With TAESD, the AutoencoderKL weights are not loaded (TAESD
// replaces it, as in StreamDiffusionWrapper); only its config is read for the VAE scale factor.
class StableDiffusionModels : public DiffusionModels {
 public:
  StableDiffusionModels(const std::string& model_path, const LoadOptions& opt)
      : dtype_(opt.dtype), device_(parse_device(opt.device)) {
    dir_ = model_path;
    std::string taesd = opt.taesd;
    variant_ = opt.variant;
    if (!variant_.empty()) check_variant_name(variant_);
    if (is_directory(model_path)) {
      if (!opt.config.empty())
        throw InvalidArgument("--config " + opt.config + " is for single-file checkpoints; " + model_path +
                              " is a diffusers folder with its own configs");
      const ModelFolder folder = ModelFolder::open(model_path);
      if (!variant_.empty()) folder.check_variant(variant_);
      dir_ = folder.dir();
      nlohmann::json sched = read_json_file(folder.config_path("scheduler"));
      if (!opt.prediction_type.empty())
        override_prediction_type(sched, opt.prediction_type, folder.config_path("scheduler"));
      sched_ = LCMSchedulerConfig::from_json(sched, folder.config_path("scheduler"));
      tokenizer_ = std::make_unique<ClipTokenizer>(ClipTokenizer::from_folder(
          opt.tokenizer.empty() ? folder.component_dir("tokenizer") : opt.tokenizer));
      text_encoder_ = load_clip_text_model(folder.component_dir("text_encoder"), dtype_, device_, variant_);
      if (folder.is_sdxl()) load_sdxl_text_encoder_2(folder);
      unet_ = load_unet(folder.component_dir("unet"), dtype_, device_, variant_);
      unet_config_src_ = folder.config_path("unet");
      const std::string vae_config_path = folder.config_path("vae");
      vae_config_ = AutoencoderKLConfig::from_json(read_json_file(vae_config_path), vae_config_path);
      set_vae_dtype();
      if (taesd.empty()) taesd = opt.vae.empty() ? folder.taesd_dir().value_or("none") : "none";
      if (taesd == "none") {
        if (!opt.vae.empty())
          load_vae_override(opt.vae);
        else
          vae_ = load_vae(folder.component_dir("vae"), vae_dtype_, device_, variant_);
      }
    } else {
      if (!variant_.empty() && is_file(model_path))
        throw InvalidArgument("variant '" + variant_ + "' is for diffusers model folders (it picks <stem>." +
                              variant_ + ".safetensors in each component folder); " + model_path +
                              " is a single-file checkpoint: load it without a variant");
      load_single_file(model_path, opt, taesd);
    }
    if (const int64_t d = unet_->config().time_cond_proj_dim; d > 0) {
      lcm_guidance_ = opt.lcm_guidance.value_or(kLcmPipelineDefaultGuidance);
      if (!std::isfinite(lcm_guidance_)) throw InvalidArgument("LCM guidance scale must be finite");
      // diffusers: w = torch.tensor(guidance_scale - 1) (float32), embedded in float32, cast to the latents' dtype.
      timestep_cond_ = get_guidance_scale_embedding(torch::tensor({static_cast<float>(lcm_guidance_ - 1.0)}), d)
                           .to(device_, dtype_);
    } else if (opt.lcm_guidance) {
      throw InvalidArgument("LCM guidance (--lcm-guidance) was given but the UNet of " + dir_ +
                            " has no time_cond_proj_dim: only LCM-distilled UNets take a guidance embedding");
    }
    if (taesd != "none" && !opt.vae.empty())
      log::warn("--vae {} is not used: the TAESD {} encodes and decodes (give --taesd none to use the VAE)", opt.vae,
                taesd);

    if (taesd != "none") {
      taesd_ = load_taesd(taesd, dtype_, device_, variant_);
      taesd_path_ = taesd;
      scaling_factor_ = taesd_->config().scaling_factor;
      latent_channels_ = taesd_->config().latent_channels;
    } else {
      if (!vae_) throw Error("internal: no autoencoder loaded");
      vae_config_ = vae_->config();  // --vae: the loaded one's
      scaling_factor_ = vae_config_.scaling_factor;
      latent_channels_ = vae_config_.latent_channels;
    }
    vae_scale_factor_ = int64_t{1} << (vae_config_.block_out_channels.size() - 1);
    if (latent_channels_ != unet_->config().in_channels)
      throw FormatError(dir_, "the autoencoder has " + std::to_string(latent_channels_) +
                                  " latent channels but the UNet takes " +
                                  std::to_string(unet_->config().in_channels));
    if (!(scaling_factor_ > 0) || !std::isfinite(scaling_factor_))
      throw FormatError(dir_, "autoencoder scaling_factor must be positive, got " + std::to_string(scaling_factor_));
    text_hidden_ = text_encoder_->config().hidden_size;
    check_sdxl_consistency();
    clip_skip_ = opt.clip_skip;
    if (clip_skip_ < 0 || clip_skip_ >= text_encoder_->config().num_hidden_layers)
      throw InvalidArgument("--clip-skip " + std::to_string(clip_skip_) + ": the text encoder of " + dir_ + " has " +
                            std::to_string(text_encoder_->config().num_hidden_layers) +
                            " layers; clip skip must be in [0, " +
                            std::to_string(text_encoder_->config().num_hidden_layers - 1) + "]");
    if (!opt.loras.empty()) load_loras(opt);
    if (!opt.ip_adapter.empty()) {
      ip_adapter_ = load_ip_adapter(opt.ip_adapter, *unet_, dtype_, device_);
      set_ip_adapter_scale(opt.ip_adapter_scale);
    }
    if (opt.int8) quantize_unet();
    if (!opt.compiled_unet.empty()) load_compiled_unet(opt);
  }

  void load_compiled_unet(const LoadOptions& opt) {
    const std::string& path = opt.compiled_unet;
    if (opt.int8)
      throw InvalidArgument("--compiled-unet " + path + " cannot be combined with --dtype int8: the package computes "
                            "with the float weights");
    if (ip_adapter_)
      throw InvalidArgument("--compiled-unet " + path + " cannot be combined with an IP-Adapter: its image attention "
                            "is not in the package");
    if (unet_->config().text_time() || timestep_cond_.defined())
      throw InvalidArgument("--compiled-unet " + path + ": SDXL (added conditioning) and LCM guidance-embedding "
                            "UNets are not supported by compiled packages yet");
    const auto t0 = std::chrono::steady_clock::now();
    compiled_ = CompiledUNet::load(path, *unet_, device_, dtype_);
    const auto& i = compiled_->info();
    log::info("compiled UNet {}: sample {} ({} rows), context {}, {} weights handed over in {:.2f} s", path,
              shape_str(at::IntArrayRef(i.sample)),
              i.rows_min == i.rows_max ? std::to_string(i.rows_min)
                                       : std::to_string(i.rows_min) + "-" + std::to_string(i.rows_max),
              shape_str(at::IntArrayRef(i.context)), i.weights.size(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }

  void set_compiled_unet_enabled(bool on) const override { compiled_on_ = on; }
  CompiledUNetStats compiled_unet_stats() const override {
    if (!compiled_) return {};
    std::lock_guard<std::mutex> lock(compiled_mu_);
    return {compiled_->path(), compiled_calls_.load(), compiled_fallbacks_.load(), compiled_last_fallback_};
  }

  int64_t int8_layers() const override { return int8_layers_; }

  const IPAdapterModels* ip_adapter() const override { return ip_adapter_.get(); }
  void set_ip_adapter_scale(double scale) const override {
    if (!ip_adapter_) return DiffusionModels::set_ip_adapter_scale(scale);
    const double before = ip_adapter_->adapter->scale();
    ip_adapter_->adapter->set_scale(scale);
    // The attention reads the scale on the host (a factor, and whether the image branch runs at all): a recorded CUDA
    // graph holds the old one.
    if (ip_adapter_->adapter->scale() != before) ++weights_version_;
  }

  void quantize_unet() {
    if (!device_.is_cpu()) throw InvalidArgument("--dtype int8 runs on the CPU only (device " + device_.str() + ")");
    const auto t0 = std::chrono::steady_clock::now();
    int8_layers_ = unet_->quantize_int8();
    log::info("int8: {} UNet layers quantized in {:.2f} s", int8_layers_,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }

  void load_loras(const LoadOptions& opt) {
    std::vector<LoraSpec> specs = opt.loras;
    name_loras(specs);
    LoraComponents components{{"unet", unet_.ptr().get()}, {"text_encoder", text_encoder_.ptr().get()}};
    if (text_encoder_2_) components.emplace_back("text_encoder_2", text_encoder_2_.ptr().get());
    lora_ = std::make_unique<LoraSet>(components, opt.lora_live);
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
    const uint64_t changes = lora_->weight_changes();
    try {
      lora_->set_scale(name, scale);
    } catch (...) {
      // A refused scale can still have replaced tensors (fused back to the old values): new storage all the same.
      // The refusal is what the caller hears, not a failure to reload the compiled UNet's weights after it.
      if (lora_->weight_changes() != changes) {
        try {
          weights_changed();
        } catch (const std::exception& e) {
          log::error("LoRA {}: after the refused scale, reloading the weights failed: {}", name, e.what());
        }
      }
      throw;
    }
    weights_changed();
    log::info("LoRA {} re-fused at scale {} in {:.3f} s", name, scale, lora_->fuse_seconds());
  }
  void weights_changed() const {
    ++weights_version_;
    if (compiled_) compiled_->load_weights();  // the re-fused tensors (and a re-packed convolution's plain weight)
  }
  uint64_t text_encoder_version() const override { return lora_ ? lora_->text_encoder_version() : 0; }
  uint64_t weights_version() const override { return weights_version_.load(); }
  bool deterministic_encode() const override { return static_cast<bool>(taesd_); }

  torch::Tensor encode_prompt(const std::string& text) const override {
    if (text_encoder_2_) return encode_text(text, std::nullopt).embeds;
    torch::NoGradGuard no_grad;
    const torch::Tensor ids = tokenizer_->encode_batch({text}).to(device_);  // [1, 77]
    return text_encoder_.ptr()->forward_clip_skip(ids, clip_skip_);         // [1, 77, D]
  }

  TextEmbeddings encode_text(const std::string& prompt, const std::optional<std::string>& prompt_2) const override {
    if (!text_encoder_2_) return {encode_prompt(prompt), torch::Tensor()};
    // StableDiffusionXLPipeline.encode_prompt: each encoder's hidden_states[-(clip_skip + 2)] (no final layer
    // norm), concatenated on the feature axis; the pooled output is the last encoder's text_embeds.
    torch::NoGradGuard no_grad;
    const torch::Tensor ids1 = tokenizer_->encode_batch({prompt}).to(device_);                         // [1, 77]
    const torch::Tensor ids2 = tokenizer_2_->encode_batch({prompt_2.value_or(prompt)}).to(device_);  // [1, 77]
    const auto h1 = text_encoder_.ptr()->forward_sdxl(ids1, clip_skip_);
    const auto h2 = text_encoder_2_.ptr()->forward_sdxl(ids2, clip_skip_);
    return {torch::cat({h1.hidden, h2.hidden}, -1), h2.text_embeds};  // [1, 77, D1 + D2], [1, P]
  }

  TextEmbeddings encode_weighted_text(const std::vector<PromptChunk>& chunks) const override {
    torch::NoGradGuard no_grad;
    const WeightedTokens t1 = weighted_tokens(*tokenizer_, chunks);
    if (t1.dropped > 0)
      log::warn("weighted prompt: {} token(s) past the {}-token window dropped", t1.dropped,
                tokenizer_->max_length());
    if (!text_encoder_2_) {
      const torch::Tensor z = text_encoder_.ptr()->forward_clip_skip(t1.ids.to(device_), clip_skip_);  // [1, 77, D]
      return {apply_token_weights(z, t1.weights), torch::Tensor()};
    }
    // SDXL: each encoder's rows weighted and mean-restored on their own (A1111), the pooled embedding unweighted.
    const WeightedTokens t2 = weighted_tokens(*tokenizer_2_, chunks);
    const auto h1 = text_encoder_.ptr()->forward_sdxl(t1.ids.to(device_), clip_skip_);
    const auto h2 = text_encoder_2_.ptr()->forward_sdxl(t2.ids.to(device_), clip_skip_);
    return {torch::cat({apply_token_weights(h1.hidden, t1.weights), apply_token_weights(h2.hidden, t2.weights)}, -1),
            h2.text_embeds};
  }

  int64_t pooled_text_dim() const override { return unet_->config().pooled_text_dim(); }
  bool force_zeros_for_empty_prompt() const override { return force_zeros_; }

  torch::Tensor unet(const torch::Tensor& sample, const torch::Tensor& timesteps,
                     const torch::Tensor& encoder_hidden_states, const AddedConditioning& added,
                     const ControlResiduals& control) const override {
    torch::NoGradGuard no_grad;
    if (compiled_ && compiled_on_) {
      std::string why = control.defined() ? "ControlNet residuals" : compiled_->mismatch(sample, timesteps,
                                                                                         encoder_hidden_states);
      if (why.empty()) {
        ++compiled_calls_;
        return compiled_->run(sample, timesteps, encoder_hidden_states);
      }
      note_compiled_fallback(why);
    }
    return unet_.ptr()->forward(sample, timesteps, encoder_hidden_states, timestep_cond_, added.text_embeds,
                                added.time_ids, control);
  }
  // Logged once per reason: a stream whose shape the package does not fit runs the model's own UNet on every call.
  void note_compiled_fallback(const std::string& why) const {
    ++compiled_fallbacks_;
    std::lock_guard<std::mutex> lock(compiled_mu_);
    if (compiled_fallback_reasons_.insert(why).second)
      log::warn("compiled UNet {} not used for a call ({}): the model's own UNet runs it", compiled_->path(), why);
    compiled_last_fallback_ = why;
  }
  torch::Tensor unet_cached(const torch::Tensor& sample, const torch::Tensor& timesteps,
                            const torch::Tensor& encoder_hidden_states, const AddedConditioning& added,
                            const ControlResiduals& control, UNetFeatureCache& cache) const override {
    torch::NoGradGuard no_grad;
    return unet_.ptr()->forward(sample, timesteps, encoder_hidden_states, timestep_cond_, added.text_embeds,
                                added.time_ids, control, &cache);
  }
  bool supports_feature_cache() const override { return unet_->supports_feature_cache(); }
  const UNet2DConditionConfig* unet_config() const override { return &unet_->config(); }

  torch::Tensor encode_image(const torch::Tensor& image, Rng& rng) const override {
    torch::NoGradGuard no_grad;
    if (taesd_) return taesd_.ptr()->encode(image.to(device_, dtype_)) * scaling_factor_;
    // AutoencoderKL: a posterior sample mean + std·ε with ε drawn from the stream's generator (CPU, float32).
    // force_upcast (SDXL): the VAE runs in float32 and the latent returns in the model dtype.
    const DiagonalGaussian post = vae_.ptr()->encode(image.to(device_, vae_dtype_));
    const torch::Tensor noise = rng.randn(post.mean.sizes(), "AutoencoderKL posterior sample").to(post.mean.options());
    return (post.sample(noise) * scaling_factor_).to(dtype_);
  }

  torch::Tensor decode_latent(const torch::Tensor& latent) const override {
    torch::NoGradGuard no_grad;
    const torch::Tensor z = latent / scaling_factor_;
    return taesd_ ? taesd_.ptr()->decode(z) : vae_.ptr()->decode(z.to(vae_dtype_)).to(dtype_);
  }

  int64_t latent_channels() const override { return latent_channels_; }
  int64_t vae_scale_factor() const override { return vae_scale_factor_; }
  c10::ScalarType dtype() const override { return dtype_; }
  c10::ScalarType autoencoder_dtype() const override { return taesd_ ? dtype_ : vae_dtype_; }
  c10::Device device() const override { return device_; }
  const LCMSchedulerConfig& scheduler_config() const override { return sched_; }
  std::string describe() const override {
    std::ostringstream o;
    o << dir_ << " (" << (single_file_note_.empty() ? "" : single_file_note_ + ", ");
    if (text_encoder_2_)
      o << "SDXL, text " << text_hidden_ << "+" << text_encoder_2_->config().hidden_size << "-d, pooled "
        << pooled_text_dim();
    else
      o << "text " << text_hidden_ << "-d";
    o << ", autoencoder "
      << (taesd_ ? (text_encoder_2_ ? "TAESDXL " : "TAESD ") + taesd_path_ : std::string("AutoencoderKL"));
    if (!taesd_ && vae_dtype_ != dtype_) o << " in float32 (force_upcast)";
    if (clip_skip_ > 0) o << ", clip skip " << clip_skip_;
    if (!variant_.empty()) o << ", variant " << variant_;
    if (timestep_cond_.defined()) o << ", LCM guidance " << lcm_guidance_;
    // Names joined without commas: readers (the browser app) take the last two items as dtype and device.
    if (lora_) {
      o << ", LoRA";
      for (size_t i = 0; i < lora_names_.size(); ++i) o << (i ? " + " : " ") << lora_names_[i];
    }
    if (ip_adapter_) o << ", IP-Adapter " << std::filesystem::path(ip_adapter_->paths.weights).filename().string();
    if (compiled_) o << ", compiled UNet " << std::filesystem::path(compiled_->path()).filename().string();
    o << ", " << (int8_layers_ > 0 ? "int8/" : "") << dtype_name(dtype_) << ", " << device_ << ")";
    return o.str();
  }

  std::string variant() const override { return variant_; }

 private:
  // SDXL's second text encoder (CLIPTextModelWithProjection) and tokenizer (pads with "!"); both must be there.
  void load_sdxl_text_encoder_2(const ModelFolder& folder) {
    for (const char* c : {"text_encoder_2", "tokenizer_2"})
      if (!folder.has_component(c) || !is_directory(dir_ + "/" + c))
        throw FormatError(dir_, std::string("an SDXL pipeline (") +
                                    (folder.pipeline_class().empty() ? "text_encoder_2 listed" : folder.pipeline_class()) +
                                    ") needs the component folder '" + c + "/' (CLIPTextModelWithProjection and its "
                                    "tokenizer), which is missing");
    tokenizer_2_ = std::make_unique<ClipTokenizer>(ClipTokenizer::from_folder(folder.component_dir("tokenizer_2")));
    text_encoder_2_ = load_clip_text_model(folder.component_dir("text_encoder_2"), dtype_, device_, variant_);
    check_sdxl_text_encoders({dir_ + "/tokenizer/vocab.json", dir_ + "/tokenizer_2/vocab.json",
                              "text_encoder/config.json", folder.config_path("text_encoder_2")});
    force_zeros_ = read_force_zeros(dir_ + "/model_index.json");
  }

  // Where the SDXL text pieces came from, for the messages of check_sdxl_text_encoders.
  struct SdxlTextSources {
    std::string tokenizer_vocab, tokenizer_2_vocab, text_encoder_config, text_encoder_2_config;
  };
  // Both SDXL load paths (folder, single file): text_encoder_2 must project its pooled output, and each tokenizer's
  // ids must be covered by its encoder's embedding table (else the first prompt fails deep inside the encoder).
  void check_sdxl_text_encoders(const SdxlTextSources& src) const {
    if (!text_encoder_2_->config().with_projection)
      throw FormatError(src.text_encoder_2_config,
                        "text_encoder_2 must be a CLIPTextModelWithProjection (\"architectures\": "
                        "[\"CLIPTextModelWithProjection\"] with a projection_dim): SDXL pools its text_embeds");
    const auto check_vocab = [&](const ClipTokenizer& tok, const CLIPTextModel& enc, const std::string& tsrc,
                                 const std::string& esrc) {
      if (static_cast<int64_t>(tok.vocab_size()) != enc->config().vocab_size)
        throw FormatError(tsrc, "vocabulary of " + std::to_string(tok.vocab_size()) + " tokens, but " + esrc +
                                    " has vocab_size " + std::to_string(enc->config().vocab_size) +
                                    ": the tokenizer does not belong to this text encoder");
    };
    check_vocab(*tokenizer_, text_encoder_, src.tokenizer_vocab, src.text_encoder_config);
    check_vocab(*tokenizer_2_, text_encoder_2_, src.tokenizer_2_vocab, src.text_encoder_2_config);
  }

  // The shapes the SDXL pieces must agree on (a mixed-up component otherwise fails deep inside the first UNet call).
  void check_sdxl_consistency() const {
    const auto& u = unet_->config();
    if (!text_encoder_2_) {
      if (u.text_time())
        throw FormatError(dir_, "the UNet has addition_embed_type \"text_time\" (an SDXL UNet) but the model has no "
                                "text_encoder_2 / tokenizer_2 (StableDiffusionXLPipeline layout, or an SDXL single "
                                "file with conditioner.embedders.1.model.*, expected)");
      return;
    }
    if (!u.text_time())
      throw FormatError(unet_config_src_, "an SDXL pipeline's UNet needs addition_embed_type \"text_time\"");
    const int64_t d = text_hidden_ + text_encoder_2_->config().hidden_size;
    for (int64_t c : u.cross_attention_dim)
      if (c != d)
        throw FormatError(unet_config_src_,
                          "cross_attention_dim " + std::to_string(c) + " != text_encoder hidden " +
                              std::to_string(text_hidden_) + " + text_encoder_2 hidden " +
                              std::to_string(text_encoder_2_->config().hidden_size));
    if (u.pooled_text_dim() != text_encoder_2_->config().projection_dim)
      throw FormatError(unet_config_src_,
                        "projection_class_embeddings_input_dim " + std::to_string(u.projection_class_embeddings_input_dim) +
                            " != text_encoder_2 projection_dim " + std::to_string(text_encoder_2_->config().projection_dim) +
                            " + 6 x addition_time_embed_dim " + std::to_string(u.addition_time_embed_dim));
  }

  // diffusers' SDXL pipelines run a force_upcast VAE in float32 when the rest is reduced precision (its decoder
  // overflows in fp16). SD 1.x / 2.x pipelines ignore the flag, as diffusers does.
  void set_vae_dtype() {
    vae_dtype_ = dtype_;
    if (text_encoder_2_ && vae_config_.force_upcast && dtype_ != c10::kFloat) vae_dtype_ = c10::kFloat;
  }

  // --vae: a diffusers folder or a .safetensors file (diffusers, original or first_stage_model. keys). A file's
  // architecture is read from its shapes; GroupNorm groups and the scaling factor (not in the weights) are kept
  // from the model's own VAE config (vae_config_, set before this is called).
  void load_vae_override(const std::string& path) {
    refuse_pickle(path);
    if (is_directory(path)) {
      vae_ = load_vae(path, vae_dtype_, device_, variant_);
      vae_path_ = path;
      return;
    }
    const auto file = SafeTensorsFile::open(path);
    const auto vinfo = convert::inspect_vae_file(file);
    nlohmann::json cfg_json = vinfo.config;
    cfg_json["norm_num_groups"] = vae_config_.norm_num_groups;
    cfg_json["scaling_factor"] = vae_config_.scaling_factor;
    const auto cfg = AutoencoderKLConfig::from_json(cfg_json, path + " (inferred AutoencoderKL config)");
    std::map<std::string, torch::Tensor> weights;
    if (vinfo.layout == convert::VaeFileLayout::Diffusers) {
      weights = file.load_all();
    } else {
      const auto table = convert::vae_ldm_table(module_keys(AutoencoderKL(cfg)), vinfo.prefix);
      weights = convert::gather_ldm(file, table, "VAE");
      // A full checkpoint's other components are not this load's business; its VAE's (or a bare VAE file's) are.
      convert::check_unread_ldm_keys(file, {&table}, {vinfo.prefix}, "the config inferred from its weights");
    }
    vae_ = load_vae(cfg, weights, path, vae_dtype_, device_);
    vae_path_ = path;
  }

  // model_index.json's force_zeros_for_empty_prompt (StableDiffusionXLPipeline's default: true); a FormatError naming
  // the file for a value that is not a bool or a file that is not an object.
  static bool read_force_zeros(const std::string& index) {
    const nlohmann::json j = read_json_file(index);
    return ConfigReader(j, index).get_bool("force_zeros_for_empty_prompt", true);
  }
  // --prediction-type over a scheduler config read from `src`.
  static void override_prediction_type(nlohmann::json& sched, const std::string& type, const std::string& src) {
    if (!sched.is_object()) throw FormatError(src, "expected a JSON object at top level");
    sched["prediction_type"] = type;
  }

  template <typename M>
  static std::vector<std::string> module_keys(const M& m) {
    std::vector<std::string> keys;
    for (const auto& kv : state_dict(*m)) keys.push_back(kv.first);
    return keys;
  }
  // A module's parameter shapes (diffusers keys): the conversion table's keys and what gather_ldm checks.
  template <typename M>
  static convert::ShapeMap module_shapes(const M& m) {
    convert::ShapeMap shapes;
    for (const auto& kv : state_dict(*m)) shapes[kv.first] = kv.second.sizes().vec();
    return shapes;
  }
  static std::vector<std::string> keys_of(const convert::ShapeMap& shapes) {
    std::vector<std::string> keys;
    for (const auto& kv : shapes) keys.push_back(kv.first);
    return keys;
  }

  // A component's config: <config>/<sub>/<file> when --config has it, else the inferred one.
  static nlohmann::json config_or(const std::string& config_dir, const std::string& sub, const std::string& file,
                                  const nlohmann::json& inferred, std::string& source, const std::string& path) {
    if (!config_dir.empty()) {
      const std::string p = (std::filesystem::path(config_dir) / sub / file).string();
      if (is_file(p)) {
        source = p;
        return read_json_file(p);
      }
    }
    source = path + " (" + sub + " config inferred from the weights and family defaults)";
    return inferred;
  }

  void load_single_file(const std::string& path, const LoadOptions& opt, std::string& taesd) {
    refuse_pickle(path);
    if (!is_file(path)) throw FormatError(path, "no such file or folder (expected a diffusers model folder or a "
                                                "single-file .safetensors checkpoint)");
    if (!opt.config.empty() && !is_directory(opt.config))
      throw FormatError(opt.config, "--config: not a directory (expected a diffusers folder of config files)");
    const auto file = SafeTensorsFile::open(path);  // the header; each component maps the file on its own:
    const auto info = convert::inspect_ldm_checkpoint(file, opt.prediction_type);
    // When the weights are cast (bf16 / fp16 runs, fp16 files) nothing aliases a component's mapping after its load,
    // so it is unmapped and its pages leave the RSS before the next component is read (one mapping for all would
    // keep every touched page until the end: sd-turbo in bf16 peaked at 9.40 GB that way, 7.59 GB like this, as the
    // folder's 7.56 GB).
    const auto own_mapping = [&] { return SafeTensorsFile::open(path); };
    const bool sdxl = info.family == convert::LdmFamily::SDXL;
    if (!info.has_text_encoder)
      throw FormatError(path, sdxl ? std::string("an SDXL checkpoint without its text_encoder: no ") +
                                         convert::kSdxlClipPrefix + "* tensors (CLIP ViT-L)"
                                   : "no text encoder (cond_stage_model.transformer.* for SD 1.x or "
                                     "cond_stage_model.model.* for SD 2.x): a single file must hold UNet, text encoder "
                                     "and (unless --taesd / --vae) the VAE");
    if (sdxl && !info.has_text_encoder_2)
      throw FormatError(path, std::string("an SDXL checkpoint without its text_encoder_2: no ") +
                                  convert::kSdxlOpenClipPrefix +
                                  "* tensors (OpenCLIP bigG: transformer.resblocks.N, text_projection, ...); an SDXL "
                                  "single file must hold both text encoders");
    std::string src;
    // Scheduler: --prediction-type wins over the config's.
    nlohmann::json sched = config_or(opt.config, "scheduler", "scheduler_config.json", info.scheduler_config, src, path);
    std::string pred_note = info.prediction_type_note;
    if (!opt.prediction_type.empty()) {
      override_prediction_type(sched, opt.prediction_type, src);
      pred_note = "given";
    } else if (src.find("inferred") == std::string::npos) {
      pred_note = "from " + src;
    }
    sched_ = LCMSchedulerConfig::from_json(sched, src);

    // Tokenizers: --tokenizer (the first), --config's tokenizer/ (tokenizer_2/), the shipped CLIP vocabulary (SD 2.x
    // and SDXL's tokenizer_2 pad with "!", as their published tokenizers do).
    const auto shipped = [&] {
      const std::string d = find_clip_tokenizer_dir();
      if (d.empty())
        throw FormatError(path, "a single file has no tokenizer and the shipped models/clip-tokenizer was not found; "
                                "give --tokenizer DIR (a CLIP tokenizer folder with vocab.json and merges.txt) or set "
                                "SD_CLIP_TOKENIZER");
      return d;
    };
    const auto from_config = [&](const char* sub) {
      return !opt.config.empty() && is_file(opt.config + "/" + sub + "/vocab.json") ? opt.config + "/" + sub
                                                                                    : std::string();
    };
    std::string tok = opt.tokenizer, pad;
    if (tok.empty()) tok = from_config("tokenizer");
    if (tok.empty()) {
      tok = shipped();
      if (info.family == convert::LdmFamily::SD2) pad = "!";
    }
    tokenizer_ = std::make_unique<ClipTokenizer>(ClipTokenizer::from_folder(tok, pad));

    // The tables of the components read from the file, and their key prefixes: what check_unread_ldm_keys compares.
    std::vector<convert::LdmTable> read;
    std::vector<std::string> read_prefixes;
    std::string te_src, te2_src;
    const auto te_cfg = CLIPTextConfig::from_json(
        config_or(opt.config, "text_encoder", "config.json", info.text_encoder_config, te_src, path), te_src);
    {
      const auto shapes = module_shapes(CLIPTextModel(te_cfg));
      const auto table = convert::text_encoder_ldm_table(keys_of(shapes), info.text_layout, info.text_prefix);
      text_encoder_ = load_clip_text_model(te_cfg, convert::gather_ldm(own_mapping(), table, "text encoder", shapes),
                                           path, dtype_, device_);
      read.push_back(table);
      read_prefixes.push_back(info.text_prefix);
    }
    if (sdxl) {
      std::string tok2 = from_config("tokenizer_2"), pad2;
      if (tok2.empty()) {
        tok2 = opt.tokenizer.empty() ? shipped() : opt.tokenizer;
        pad2 = "!";  // stabilityai SDXL tokenizer_2: pad_token "!"
      }
      tokenizer_2_ = std::make_unique<ClipTokenizer>(ClipTokenizer::from_folder(tok2, pad2));
      const auto te2_cfg = CLIPTextConfig::from_json(
          config_or(opt.config, "text_encoder_2", "config.json", info.text_encoder_2_config, te2_src, path), te2_src);
      const auto shapes = module_shapes(CLIPTextModel(te2_cfg));
      const auto table = convert::text_encoder_ldm_table(keys_of(shapes), convert::TextEncoderLayout::OpenClip,
                                                         info.text_encoder_2_prefix);
      text_encoder_2_ = load_clip_text_model(
          te2_cfg, convert::gather_ldm(own_mapping(), table, "text_encoder_2", shapes), path, dtype_, device_);
      read.push_back(table);
      read_prefixes.push_back(info.text_encoder_2_prefix);
      check_sdxl_text_encoders({tok + "/vocab.json", tok2 + "/vocab.json", te_src, te2_src});
      const std::string index = opt.config.empty() ? "" : opt.config + "/model_index.json";
      force_zeros_ = !index.empty() && is_file(index)
                         ? read_force_zeros(index)
                         : true;  // StableDiffusionXLPipeline's default
      if (!info.sample_size_note.empty() && opt.config.empty()) log::info("{}: {}", path, info.sample_size_note);
    }
    const auto unet_cfg = UNet2DConditionConfig::from_json(
        config_or(opt.config, "unet", "config.json", info.unet_config, src, path), src);
    unet_config_src_ = src;
    {
      const auto shapes = module_shapes(UNet2DConditionModel(unet_cfg));
      const auto table = convert::unet_ldm_table(keys_of(shapes));
      unet_ = load_unet(unet_cfg, convert::gather_ldm(own_mapping(), table, "UNet", shapes), path, dtype_, device_);
      read.push_back(table);
      read_prefixes.push_back(convert::kUNetPrefix);
    }
    // The VAE config (its scale factor is used even with TAESD); the family's SD VAE when the file has none.
    nlohmann::json vae_inferred = info.vae_config;
    if (vae_inferred.is_null())
      vae_inferred = {{"block_out_channels", {128, 256, 512, 512}}, {"layers_per_block", 2},
                      {"down_block_types", std::vector<std::string>(4, "DownEncoderBlock2D")},
                      {"up_block_types", std::vector<std::string>(4, "UpDecoderBlock2D")}, {"latent_channels", 4},
                      {"scaling_factor", sdxl ? 0.13025 : 0.18215}, {"force_upcast", sdxl}};
    vae_config_ = AutoencoderKLConfig::from_json(config_or(opt.config, "vae", "config.json", vae_inferred, src, path), src);
    set_vae_dtype();
    if (taesd.empty()) taesd = "none";
    if (taesd == "none") {
      if (!opt.vae.empty()) {
        load_vae_override(opt.vae);
      } else {
        if (!info.has_vae)
          throw FormatError(path, "no VAE in this single file (no first_stage_model.* tensors): give --vae FILE|DIR "
                                  "(an AutoencoderKL) or --taesd DIR");
        const auto shapes = module_shapes(AutoencoderKL(vae_config_));
        const auto table = convert::vae_ldm_table(keys_of(shapes));
        vae_ = load_vae(vae_config_, convert::gather_ldm(own_mapping(), table, "VAE", shapes), path, vae_dtype_,
                        device_);
        read.push_back(table);
        read_prefixes.push_back(convert::kVaePrefix);
      }
    }
    // A table reads only the keys of the layers the config built: any other weight of those components would be
    // dropped without a word (the folder path refuses unexpected keys the same way, in load_weights).
    std::vector<const convert::LdmTable*> tables;
    for (const auto& t : read) tables.push_back(&t);
    const std::vector<std::string> others = convert::check_unread_ldm_keys(
        file, tables, read_prefixes,
        opt.config.empty() ? std::string("the config inferred from its weights") : "--config " + opt.config);
    if (!others.empty())
      log::warn("{}: {} tensor{} outside the components loaded, not used (first: {})", path, others.size(),
                others.size() == 1 ? "" : "s", others.front());
    single_file_note_ = std::string("single file, ") + convert::family_name(info.family) + ", prediction " +
                        sched_.prediction_type + " " + pred_note;
  }

  c10::ScalarType dtype_;
  c10::Device device_;
  std::string dir_, taesd_path_, vae_path_, single_file_note_, variant_;
  std::string unet_config_src_;  // the UNet config's file (folder) or source (single file), for messages
  LCMSchedulerConfig sched_;
  std::unique_ptr<ClipTokenizer> tokenizer_, tokenizer_2_;  // tokenizer_2_: SDXL only
  CLIPTextModel text_encoder_{nullptr};
  CLIPTextModel text_encoder_2_{nullptr};  // SDXL's CLIPTextModelWithProjection, else null
  bool force_zeros_ = false;
  c10::ScalarType vae_dtype_ = c10::kFloat;  // the AutoencoderKL's dtype (float32 under SDXL's force_upcast)
  UNet2DConditionModel unet_{nullptr};
  double lcm_guidance_ = 0;
  torch::Tensor timestep_cond_;  // [1, time_cond_proj_dim] for LCM-distilled UNets, else undefined
  AutoencoderKLConfig vae_config_;
  AutoencoderKL vae_{nullptr};
  AutoencoderTiny taesd_{nullptr};
  std::unique_ptr<LoraSet> lora_;  // mutated only by set_lora_scale (see DiffusionModels)
  mutable std::atomic<uint64_t> weights_version_{0};  // set_lora_scale calls, IP-Adapter scale changes
  std::vector<std::string> lora_names_;  // fixed at load (describe() may be called from any thread)
  std::shared_ptr<IPAdapterModels> ip_adapter_;  // LoadOptions::ip_adapter, attached to unet_
  double scaling_factor_ = 1.0;
  int64_t latent_channels_ = 4, vae_scale_factor_ = 8, text_hidden_ = 0;
  int clip_skip_ = 0;
  int64_t int8_layers_ = 0;
  std::unique_ptr<CompiledUNet> compiled_;  // LoadOptions::compiled_unet
  mutable std::atomic<bool> compiled_on_{true};
  mutable std::atomic<int64_t> compiled_calls_{0}, compiled_fallbacks_{0};
  mutable std::mutex compiled_mu_;  // the fallback reasons
  mutable std::set<std::string> compiled_fallback_reasons_;
  mutable std::string compiled_last_fallback_;
};

}  // namespace

std::string find_shipped_folder(const std::string& name, const std::vector<std::string>& markers,
                                const char* env_var) {
  namespace fs = std::filesystem;
  if (const char* env = env_var ? std::getenv(env_var) : nullptr; env && *env) return env;
  const fs::path rel = fs::path("models") / name;
  auto ok = [&](const fs::path& p) {
    for (const auto& m : markers)
      if (!is_file((p / m).string())) return false;
    return true;
  };
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec)
    for (fs::path d = exe.parent_path(); !d.empty() && d != d.root_path(); d = d.parent_path())
      if (ok(d / rel)) return (d / rel).string();
#ifdef SD_SOURCE_DIR
  if (ok(fs::path(SD_SOURCE_DIR) / rel)) return (fs::path(SD_SOURCE_DIR) / rel).string();
#endif
  if (ok(rel)) return rel.string();
  return "";
}

std::string find_clip_tokenizer_dir() {
  return find_shipped_folder("clip-tokenizer", {"vocab.json", "merges.txt"}, "SD_CLIP_TOKENIZER");
}

torch::Tensor sdxl_add_time_ids(int64_t original_height, int64_t original_width, int64_t crop_top, int64_t crop_left,
                                int64_t target_height, int64_t target_width) {
  const std::vector<float> v{static_cast<float>(original_height), static_cast<float>(original_width),
                             static_cast<float>(crop_top),        static_cast<float>(crop_left),
                             static_cast<float>(target_height),   static_cast<float>(target_width)};
  return torch::tensor(v, torch::kFloat32).view({1, 6});
}

AddedConditioning repeat_added_conditioning(const DiffusionModels& models, const torch::Tensor& pooled, int64_t rows,
                                            int64_t height, int64_t width) {
  if (!pooled.defined()) return {};
  return {pooled.repeat({rows, 1}),
          sdxl_add_time_ids(height, width, 0, 0, height, width).to(models.device()).repeat({rows, 1})};
}

void DiffusionModels::set_ip_adapter_scale(double /*scale*/) const {
  throw InvalidArgument("no IP-Adapter loaded (give --ip-adapter FILE|DIR)");
}

TextEmbeddings DiffusionModels::encode_weighted_text(const std::vector<PromptChunk>& /*chunks*/) const {
  throw InvalidArgument("prompt weights need the model's CLIP tokenizer; these models (" + describe() +
                        ") have none: write the prompt without (word:1.3) / [word] syntax");
}

void DiffusionModels::set_lora_scale(const std::string& name, double /*scale*/) const {
  throw InvalidArgument("no LoRA named '" + name + "' (none loaded; give --lora FILE[:SCALE])");
}

std::shared_ptr<const DiffusionModels> load_pipeline(const std::string& model_dir, const LoadOptions& options) {
  if (options.dtype == c10::kHalf && parse_device(options.device).is_cpu())
    throw InvalidArgument("fp16 is not supported on the CPU (libtorch has no CPU half-precision matmul kernels); "
                          "use bf16 or fp32 on the CPU, or fp16 with a CUDA device");
  if (options.threads >= 0)
    set_threads(options.threads);
  else
    pin_blas_threads();  // libtorch's thread count is left alone, but OpenBLAS's spinning workers never help
  if (options.dtype == c10::kBFloat16 && parse_device(options.device).is_cpu() && !cpu_has_native_bf16())
    log::warn("bf16 on this CPU ({}, no AVX512-BF16/AMX) is emulated and slower than fp32; --dtype fp32 (or auto, "
              "the default) is faster here",
              cpu_simd_level());
  configure_cuda_backend(parse_device(options.device));
  auto models = std::make_shared<StableDiffusionModels>(model_dir, options);
  log::info("loaded {}", models->describe());
  return models;
}

}  // namespace sd
