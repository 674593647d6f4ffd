#pragma once
// What the stream needs from a Stable Diffusion checkpoint, behind an interface so the stream logic can be tested
// with stub models (spec §15) and one loaded model set can serve several streams.
//
// Contract (spec §1, §7.2):
//  * encode_prompt(text)          -> [1, 77, D] last hidden state of the text encoder (tokenised with the model's
//                                    own tokenizer), in dtype() on device().
//  * encode_text(prompt[, p2])     -> the same embeddings plus, for SDXL, the pooled projection [1, P] of
//                                    text_encoder_2 (prompt_2 goes to the second tokenizer/encoder; default prompt).
//  * unet(sample, t, ehs[, added]) -> ε̂ [B, C, h, w]; sample [B, C, h, w], t [B] int64, ehs [B, 77, D]. An
//                                    LCM-distilled UNet (time_cond_proj_dim) also gets the guidance embedding of
//                                    LoadOptions::lcm_guidance on every call (the model set holds it). SDXL UNets
//                                    need `added` (one row per UNet row); others refuse it. `control`: the summed
//                                    residuals of the stream's ControlNets for this call (pipeline/controlnet.h).
//  * encode_image(x, rng)         -> latent [B, C, h, w] already multiplied by the VAE scaling factor; x is an image
//                                    batch in [-1, 1]. AutoencoderKL samples its posterior with ONE rng.randn draw of
//                                    the latent's shape per call; TAESD is deterministic and draws nothing.
//  * decode_latent(z)             -> image [B, 3, H, W] ≈ [-1, 1] (not clamped); divides by the scaling factor.
// All methods are const and may be called from several streams (not concurrently on one CUDA stream).
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/types.h>

#include "io/lora_file.h"
#include "models/control_residuals.h"
#include "models/unet_feature_cache.h"
#include "pipeline/lcm_scheduler.h"
#include "pipeline/prompt_weights.h"
#include "pipeline/rng.h"

namespace sd {

// A prompt's conditioning: the UNet's encoder_hidden_states row and, for SDXL, the pooled text embedding.
struct TextEmbeddings {
  torch::Tensor embeds;  // [1, 77, D]
  torch::Tensor pooled;  // [1, P] (SDXL: text_encoder_2's text_embeds); undefined for SD 1.x / 2.x
};

// SDXL's added conditioning (diffusers' added_cond_kwargs), one row per UNet row, batched exactly like the prompt
// embeddings. Empty (undefined tensors) for models without it.
struct AddedConditioning {
  torch::Tensor text_embeds;  // [B, P]
  torch::Tensor time_ids;     // [B, 6] float32: original (h, w), crop top-left (top, left), target (h, w)
  bool defined() const { return text_embeds.defined(); }
};

// diffusers' StableDiffusionXLPipeline._get_add_time_ids: [1, 6] float32 = original_size + crops_coords_top_left +
// target_size, each (height, width) / (top, left).
torch::Tensor sdxl_add_time_ids(int64_t original_height, int64_t original_width, int64_t crop_top, int64_t crop_left,
                                int64_t target_height, int64_t target_width);

class DiffusionModels;
struct UNet2DConditionConfig;
struct IPAdapterModels;  // models/ip_adapter.h

// `rows` copies of a prompt's added conditioning for an image of height x width (original = target size, no crop,
// as the stream and diffusers' defaults), on the models' device; empty when `pooled` is undefined (not SDXL).
// pooled [1, P] -> {text_embeds [rows, P], time_ids [rows, 6]}.
AddedConditioning repeat_added_conditioning(const DiffusionModels& models, const torch::Tensor& pooled, int64_t rows,
                                            int64_t height, int64_t width);

class DiffusionModels {
 public:
  virtual ~DiffusionModels() = default;

  virtual torch::Tensor encode_prompt(const std::string& text) const = 0;
  // SDXL: embeds = cat(text_encoder hidden_states[-2], text_encoder_2 hidden_states[-2]) (clip skip moves both back)
  // and pooled = text_encoder_2's text_embeds, as StableDiffusionXLPipeline.encode_prompt; prompt_2 (nullopt =
  // `prompt`) feeds the second tokenizer/encoder. Other models: {encode_prompt(prompt), undefined}.
  virtual TextEmbeddings encode_text(const std::string& prompt,
                                     const std::optional<std::string>& prompt_2 = std::nullopt) const {
    return {encode_prompt(prompt), torch::Tensor()};
  }
  // Prompt weights (pipeline/prompt_weights.h): the chunks tokenised one by one with the model's tokenizer(s), cut to
  // the 77-token window, encoded, each token row times its weight, rescaled to the unweighted mean (A1111). SDXL:
  // per encoder, pooled unweighted. Models without a CLIP tokenizer (test stubs) refuse weights (InvalidArgument).
  virtual TextEmbeddings encode_weighted_text(const std::vector<PromptChunk>& chunks) const;
  // Width P of the pooled text embedding the UNet's added conditioning takes; 0 = no added conditioning.
  virtual int64_t pooled_text_dim() const { return 0; }
  // StableDiffusionXLPipeline's force_zeros_for_empty_prompt (model_index.json): with guidance and NO negative prompt
  // diffusers uses zeros for the negative rows. The stream always encodes its negative prompt ("" by default), as
  // the original does; this is for callers reproducing diffusers' own pipeline.
  virtual bool force_zeros_for_empty_prompt() const { return false; }
  virtual torch::Tensor unet(const torch::Tensor& sample, const torch::Tensor& timesteps,
                             const torch::Tensor& encoder_hidden_states,
                             const AddedConditioning& added = {},
                             const ControlResiduals& control = {}) const = 0;
  // unet() with the deep-feature cache (models/unet_feature_cache.h): a full call stores its deep features in
  // `cache`, a call with cache.reuse runs only the first level on them. Models without the split (the default) run
  // the plain unet() and leave `cache` empty; supports_feature_cache() says which.
  virtual torch::Tensor unet_cached(const torch::Tensor& sample, const torch::Tensor& timesteps,
                                    const torch::Tensor& encoder_hidden_states, const AddedConditioning& added,
                                    const ControlResiduals& control, UNetFeatureCache& cache) const {
    cache = UNetFeatureCache{};
    return unet(sample, timesteps, encoder_hidden_states, added, control);
  }
  virtual bool supports_feature_cache() const { return false; }
  virtual torch::Tensor encode_image(const torch::Tensor& image, Rng& rng) const = 0;
  virtual torch::Tensor decode_latent(const torch::Tensor& latent) const = 0;

  virtual int64_t latent_channels() const = 0;
  // Pixel size of one latent cell: 2^(len(vae block_out_channels) - 1) of the AutoencoderKL config, also when TAESD
  // does the encoding (the original swaps the VAE after building its image processor).
  virtual int64_t vae_scale_factor() const = 0;
  virtual c10::ScalarType dtype() const = 0;
  // The dtype encode_image/decode_latent compute in: dtype(), but float32 for an AutoencoderKL under SDXL's
  // force_upcast.
  virtual c10::ScalarType autoencoder_dtype() const { return dtype(); }
  virtual c10::Device device() const = 0;
  virtual const LCMSchedulerConfig& scheduler_config() const = 0;
  // The loaded UNet's configuration (ControlNets are checked against it); nullptr for stub models.
  virtual const UNet2DConditionConfig* unet_config() const { return nullptr; }
  // "sd" (SD 1.x / 2.x family: one text encoder) or "sdxl" (two text encoders, added conditioning).
  virtual std::string family() const { return pooled_text_dim() > 0 ? "sdxl" : "sd"; }
  // One line for logs: model folder, which autoencoder, dtype, device.
  virtual std::string describe() const = 0;
  // How many of the UNet's layers compute in int8 (LoadOptions::int8); 0 = none.
  virtual int64_t int8_layers() const { return 0; }
  // The compiled UNet (LoadOptions::compiled_unet, models/compiled_unet.h): its package ("" = none), how many UNet
  // calls it ran, how many calls of other shapes (or with ControlNet residuals) the model's own UNet ran instead, and
  // the last such call's reason.
  struct CompiledUNetStats {
    std::string path;
    int64_t calls = 0, fallbacks = 0;
    std::string last_fallback;
  };
  virtual CompiledUNetStats compiled_unet_stats() const { return {}; }
  // Turns the compiled UNet off (the model's own UNet runs every call) and on again, for side-by-side measurements
  // and checks; on after load. A no-op without one. Call it between calls, like set_lora_scale.
  virtual void set_compiled_unet_enabled(bool on) const {}
  // LoadOptions::variant of this set ("" = the plain weights); ControlNet folders loaded for it use it too.
  virtual std::string variant() const { return ""; }

  // LoRAs fused into the weights at load (LoadOptions::loras), in load order, with their current scales.
  virtual std::vector<LoraReport> loras() const { return {}; }
  // Re-fuses LoRA `name` at `scale` from its kept low-rank factors, without reloading (models/lora.h). The weights
  // are shared: every stream on these models sees the change; a stream re-encodes its prompts on its next call when
  // the text encoder changed (text_encoder_version()). The one mutation of a loaded model set: call it from the
  // thread that runs the models, between calls. InvalidArgument for an unknown name or a non-finite scale, or when
  // the models were loaded with LoadOptions::lora_live false.
  virtual void set_lora_scale(const std::string& name, double scale) const;
  // Changes whenever the text encoder's weights change after load; prompt caches compare it.
  virtual uint64_t text_encoder_version() const { return 0; }
  // Changes whenever any weight tensor is replaced after load (a LoRA re-fused) or a value the UNet reads on the host
  // changes (the IP-Adapter scale): CUDA graphs, which read the weights at their recorded addresses and keep the
  // values they were recorded with, are dropped when it moves.
  virtual uint64_t weights_version() const { return 0; }
  // Whether encode_image is a pure function of the image (TAESD); the AutoencoderKL draws its posterior sample from
  // the stream's generator on the host, so it is not recorded in a CUDA graph.
  virtual bool deterministic_encode() const { return false; }

  // IP-Adapter (LoadOptions::ip_adapter): its image encoder and projection, attached to every cross-attention of the
  // UNet; null without one. While attached, every unet() context must end with its num_tokens() image tokens
  // ([B, 77 + T, D]; StreamDiffusion appends them, see set_image_prompt).
  virtual const IPAdapterModels* ip_adapter() const { return nullptr; }
  // diffusers' set_ip_adapter_scale (the weight of the image attention; 0 = the plain UNet, exactly). Shared by
  // every stream on these models; takes effect from the next UNet call. InvalidArgument without an IP-Adapter or
  // for a non-finite scale.
  virtual void set_ip_adapter_scale(double scale) const;
};

struct LoadOptions {
  c10::ScalarType dtype = c10::kFloat;
  std::string device = "cpu";
  int threads = 0;  // 0 = all cores; < 0 = leave libtorch's setting alone
  // TAESD folder; "none" = use the AutoencoderKL; empty = <model>/taesd (SDXL: <model>/taesdxl) when present, else
  // the AutoencoderKL (also "none" when `vae` is given).
  std::string taesd;
  // Guidance scale W of LCM-distilled UNets (config time_cond_proj_dim, e.g. LCM-Dreamshaper): every UNet call gets
  // timestep_cond = get_guidance_scale_embedding(W - 1), as diffusers' LatentConsistencyModelPipeline does. Unset:
  // that pipeline's default 8.5. Given for a UNet without time_cond_proj_dim: InvalidArgument.
  std::optional<double> lcm_guidance;
  // AutoencoderKL from elsewhere: a diffusers folder (AutoencoderKL or pipeline) or a .safetensors file in diffusers,
  // original (encoder.down.*) or full-checkpoint (first_stage_model.*) layout. Empty = the model's own.
  std::string vae;
  // Single-file checkpoints only: a diffusers folder of config files (model_index.json, unet/config.json,
  // vae/config.json, text_encoder/config.json, scheduler/scheduler_config.json, optionally tokenizer/) that
  // replaces what is inferred from the weights and the family defaults.
  std::string config;
  // CLIP tokenizer folder (vocab.json + merges.txt). Empty = the model folder's, else --config's tokenizer/, else
  // the shipped models/clip-tokenizer (find_clip_tokenizer_dir()).
  std::string tokenizer;
  // "" = the scheduler config's (single files: the family default, epsilon), else "epsilon" | "v_prediction".
  std::string prediction_type;
  // LoRAs fused into the UNet and text encoder at load, in this order (StreamDiffusionWrapper: the LCM-LoRA first,
  // then lora_dict). Names default to the file stems (name_loras).
  std::vector<LoraSpec> loras;
  bool strict_lora = false;  // LoRA keys that patch nothing are an error (default: a warning)
  // Keep the unfused weights so set_lora_scale() works (free for float32 weights, which alias their file; a second
  // copy of the patched weights in bf16 / fp16). One-shot commands turn it off.
  bool lora_live = true;
  // diffusers' clip_skip: the prompt embeddings are the final-layer-normed hidden states of the layer clip_skip
  // layers before the last (0 = the last layer, as StreamDiffusion does). Must be below the encoder's layer count.
  int clip_skip = 0;
  // IP-Adapter: a weights file (its image encoder in image_encoder/ beside it) or a folder with one
  // ip-adapter*.safetensors and image_encoder/ (models/ip_adapter.h). Empty = none.
  std::string ip_adapter;
  double ip_adapter_scale = 1.0;  // diffusers' load_ip_adapter leaves it at 1.0
  // The UNet's linear layers in int8 (models/int8.h, UNet2DConditionModelImpl::quantize_int8; `--dtype int8`), after
  // LoRAs are fused; the rest stays in `dtype`. CPU only; InvalidArgument where int8 is unavailable
  // (sd::int8::unavailable_reason()).
  bool int8 = false;
  // A UNet compiled by scripts/compile-unet.py (AOTInductor, libtorch >= 2.11; models/compiled_unet.h): it runs the
  // UNet calls of the shape it was compiled for (its rows fixed or a range: serve's batched streams), with this model
  // set's weights; the model's own UNet runs the others and those with ControlNet residuals. Not with int8, an
  // IP-Adapter, SDXL, an LCM guidance embedding (InvalidArgument); another UNet, device, dtype, torch: FormatError.
  std::string compiled_unet;
  // diffusers' from_pretrained(variant=): "<stem>.<variant>.safetensors" (e.g. "fp16") is loaded instead of the
  // plain weights in each component folder that has it (text encoders, UNet, VAE, TAESD, ControlNet folders loaded
  // for this set); the others load their plain weights. Weights are cast to `dtype` whatever the file's. "" = the
  // plain files. InvalidArgument for a single-file checkpoint, a name that is not plain, or a folder where no
  // component has the variant (as diffusers).
  std::string variant;
};

// Loads tokenizer, text encoder, UNet, AutoencoderKL (+ TAESD) and the scheduler config once, from a diffusers
// StableDiffusionPipeline folder or an original-layout (LDM) single .safetensors file (converted at load by
// io/ldm_checkpoint). Pickled .ckpt / .bin / .pt files are refused (unpickling runs arbitrary code) with the command
// that converts them. The result is immutable and can be shared by several streams.
std::shared_ptr<const DiffusionModels> load_pipeline(const std::string& model_path, const LoadOptions& options = {});

// A folder shipped in the repository's models/ (models/<name>): $<env_var> when set, else the first models/<name>
// holding every `markers` file in a folder above the executable, in the source tree the engine was built from, or
// in the working directory; "" when none is found.
std::string find_shipped_folder(const std::string& name, const std::vector<std::string>& markers,
                                const char* env_var);
// The shipped CLIP BPE vocabulary (models/clip-tokenizer): $SD_CLIP_TOKENIZER, else models/clip-tokenizer in a folder
// above the executable, in the source tree, or in the working directory; "" when none is found.
std::string find_clip_tokenizer_dir();

// FormatError for pickled checkpoints (.ckpt, .bin, .pt, .pth, .pkl): why they are refused and the one-line
// conversion. No-op for other names.
void refuse_pickle(const std::string& path);

}  // namespace sd
