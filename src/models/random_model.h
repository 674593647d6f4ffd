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
  std::string arch = "sd-turbo";  // "sd-turbo" | "sd15" | "bk-sdm-tiny" | "sdxs-512" | "sdxl-turbo" | "sdxl"
  std::string out_dir;
  std::string tokenizer_dir;  // a CLIP tokenizer folder to copy (vocab.json, merges.txt, *config.json)
  uint64_t seed = 0;
  torch::ScalarType dtype = torch::kFloat32;  // dtype of the written weights
  bool with_taesd = true;                     // also write <out>/taesd (AutoencoderTiny, default config)
};

struct RandomModelReport {
  int64_t unet_parameters = 0, vae_parameters = 0, text_encoder_parameters = 0, taesd_parameters = 0;
  int64_t text_encoder_2_parameters = 0;  // SDXL only
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

// Fills every parameter with weights of realistic scale: matrices/convs ~ N(0, 1/fan_in), norm weights ~ 1, biases
// and norm biases small, embeddings ~ N(0, 0.02) (token/position tables). Deterministic for a seed.
void randomize_parameters(torch::nn::Module& module, uint64_t seed);

// Writes a complete diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, taesd/;
// SDXL: also text_encoder_2/, tokenizer_2/, and taesdxl/ instead of taesd/).
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
