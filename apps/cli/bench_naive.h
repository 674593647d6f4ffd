#pragma once
// The bench's naive baseline: what diffusers' text-to-image pipeline (StableDiffusionPipeline.__call__, which its
// AutoPipeline runs for sd-turbo) does per image, written against the same DiffusionModels as the stream so the
// ablation isolates StreamDiffusion's techniques rather than kernel differences:
//   * the prompt AND the negative prompt are tokenised and encoded on every call (two text-encoder passes);
//   * classifier-free guidance as a UNet batch of 2 (uncond, cond) at every step, ε = ε_u + g·(ε_c − ε_u);
//   * the latents are fresh standard-normal draws; every step allocates new tensors (no buffers, no caches);
//   * the scheduler step is LCMScheduler.step (x0 = (x − β·ε)/α, denoised = c_skip·x + c_out·x0, re-noised to the
//     next timestep); its cost is negligible next to the UNet, so diffusers' Euler step for sd-turbo costs the same;
//   * the decode is whatever autoencoder `models` holds (the full AutoencoderKL in diffusers; TAESD for "+TAESD").
// The image post-processing to PIL is left out, as the stream's output (a tensor) is not post-processed either.
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

#include "pipeline/diffusion_models.h"
#include "pipeline/lcm_scheduler.h"

namespace sd::bench {

struct NaiveOptions {
  std::string prompt;
  std::string negative_prompt;            // diffusers' default negative prompt is "" (still encoded)
  std::vector<int64_t> t_index_list{0};   // indices into the num_inference_steps LCM timesteps
  int64_t num_inference_steps = 50;
  double guidance_scale = 7.5;            // diffusers' default; > 1 = CFG with a batch of 2
  bool encode_prompt_per_call = true;     // false = "+cached prompt": embeddings computed once
  int64_t width = 512, height = 512;
  uint64_t seed = 0;
};

// Seconds spent per stage by the last call (device-synchronised).
struct NaiveBreakdown {
  double text_encode_s = 0, unet_s = 0, decode_s = 0;
  int64_t unet_rows = 0;
};

class NaiveTxt2Img {
 public:
  NaiveTxt2Img(std::shared_ptr<const DiffusionModels> models, NaiveOptions options);
  // One image [1, 3, H, W] (≈[-1, 1], not clamped).
  torch::Tensor operator()();
  const NaiveBreakdown& last() const { return last_; }
  bool guidance() const { return options_.guidance_scale > 1.0; }

 private:
  std::shared_ptr<const DiffusionModels> models_;
  NaiveOptions options_;
  LCMScheduler scheduler_;
  std::vector<int64_t> timesteps_;
  sd::TextEmbeddings cond_, uncond_;  // only with encode_prompt_per_call = false
  at::Generator gen_;
  NaiveBreakdown last_;
};

}  // namespace sd::bench
