#pragma once
// Full-size models with random weights in the real architectures (sd-turbo / SD 1.5 / BK-SDM-Tiny / SDXS-512-0.9 /
// SDXL-Turbo / SDXL base): no real weights can be
// downloaded here, and speed depends only on the architecture, so benchmarks and size tests run on these.
#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>
#include <torch/types.h>

namespace torch::nn {
class Module;
}

namespace sd {

struct RandomModelOptions {
  // "sd-turbo" | "sd15" | "bk-sdm-tiny" | "sdxs-512" | "sdxl-turbo" | "sdxl", or a ControlNet (a diffusers
  // ControlNetModel folder: config.json + diffusion_pytorch_model.safetensors): "controlnet-sd15" (lllyasviel
  // control_v11p_sd15_* architecture), "controlnet-sd21" (thibaud/controlnet-sd21-*: SD 2.1, fits sd-turbo) or
  // "controlnet" (the encoder of the UNet of `for_model`, for small test models).
  std::string arch = "sd-turbo";
  std::string out_dir;
  std::string for_model;      // arch "controlnet": a diffusers model folder (its unet/config.json)
  std::string tokenizer_dir;  // a CLIP tokenizer folder to copy (vocab.json, merges.txt, *config.json)
  uint64_t seed = 0;
  torch::ScalarType dtype = torch::kFloat32;  // dtype of the written weights
  bool with_taesd = true;                     // also write <out>/taesd (AutoencoderTiny, default config)
};

struct RandomModelReport {
  int64_t unet_parameters = 0, vae_parameters = 0, text_encoder_parameters = 0, taesd_parameters = 0;
  int64_t text_encoder_2_parameters = 0;  // SDXL only
  int64_t controlnet_parameters = 0;      // ControlNet architectures only (then the only figure)
  uint64_t bytes_written = 0;
};

// The component configs of a real architecture, as diffusers / transformers write them. The distilled UNets
// (bk-sdm-tiny, sdxs-512) come with their base model's text encoder and VAE (SD 1.x / SD 2.1 base).
nlohmann::json real_unet_config(const std::string& arch);
nlohmann::json real_vae_config(const std::string& arch);
nlohmann::json real_text_encoder_config(const std::string& arch);
nlohmann::json real_text_encoder_2_config();  // SDXL's CLIPTextModelWithProjection (OpenCLIP bigG)
nlohmann::json lcm_scheduler_config();
// model_index.json of a diffusers StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) folder with an LCM
// scheduler.
nlohmann::json pipeline_model_index(const std::string& arch = "sd-turbo");
nlohmann::json default_taesd_config();
// streamdiffusion.json (pipeline/model_defaults.h) of an architecture: its native size and the settings it is used
// with (sd-turbo: one step, no guidance; sd15: the LCM-LoRA recipe).
nlohmann::json recommended_settings(const std::string& arch);

// ControlNet architectures (make-random-model --arch controlnet-*).
bool is_controlnet_arch(const std::string& arch);
// The UNet family a ControlNet architecture is for: controlnet-sd15 -> "sd15", controlnet-sd21 -> "sd-turbo" (SD 2.1).
std::string controlnet_base_arch(const std::string& arch);
// diffusers' ControlNetModel.from_unet as a config: the encoder settings of a UNet config.json (every key
// ControlNetModel takes; up path, out_channels, sample_size, conv kernels and LCM's time_cond_proj_dim dropped) plus
// the conditioning embedding of every published ControlNet (3 channels, 16,32,96,256, rgb). InvalidArgument
// (naming `source`) for a UNet without a mid block or with added conditioning other than SDXL's text_time.
nlohmann::json controlnet_config_from_unet(const nlohmann::json& unet_config, const std::string& source = "unet config");
// The published configs: controlnet-sd15 = lllyasviel/control_v11p_sd15_canny (361,279,120 parameters, a 1.45 GB
// fp32 file), controlnet-sd21 = thibaud/controlnet-sd21-canny-diffusers (SD 2.1: 1024-d text, heads 5,10,20,20,
// linear projections; 364,228,240 parameters).
nlohmann::json real_controlnet_config(const std::string& arch);

// Fills every parameter with weights of realistic scale: matrices/convs ~ N(0, 1/fan_in), norm weights ~ 1, biases
// and norm biases small, embeddings ~ N(0, 0.02) (token/position tables). Deterministic for a seed.
void randomize_parameters(torch::nn::Module& module, uint64_t seed);

// ControlNet architectures: a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors)
// with random weights of the UNet's scale; the zero convs (controlnet_down_blocks, controlnet_mid_block) are random
// too (a trained ControlNet's are not zero), so the residuals are of a trained one's order and outputs stay finite.
RandomModelReport write_random_controlnet(const RandomModelOptions& opts);

// Writes a complete diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, taesd/;
// SDXL: also text_encoder_2/, tokenizer_2/, and taesdxl/ instead of taesd/). ControlNet architectures:
// write_random_controlnet.
RandomModelReport write_random_model(const RandomModelOptions& opts);

// The diffusers folder `dir` as one original-layout (LDM) .safetensors file, through the inverse of the load-time
// tables (io/ldm_checkpoint: scatter_ldm): UNet, VAE and the text encoder(s), plus what published files carry and
// the models do not use (the 12 DDPM buffers; SD 1.x / SDXL: position_ids; SD 2.x: one more OpenCLIP resblock,
// text_projection, logit_scale; SDXL: logit_scale). SDXL folders (text_encoder_2/) are written in Stability's layout
// (conditioner.embedders.0.transformer.* CLIP ViT-L, conditioner.embedders.1.model.* OpenCLIP bigG with its
// text_projection); otherwise `open_clip` selects SD 2.x's cond_stage_model.model.* layout over SD 1.x's
// cond_stage_model.transformer.*. `seed` draws the unused extras. Returns the bytes written.
uint64_t write_ldm_single_file(const std::string& dir, const std::string& path, bool open_clip, uint64_t seed = 0);

}  // namespace sd
