#pragma once
// The three things StreamDiffusion takes from diffusers' LCMScheduler (spec §2): the ᾱ table (alphas_cumprod),
// set_timesteps() and the per-timestep coefficients sqrt(ᾱ), sqrt(1−ᾱ), c_skip, c_out. LCMScheduler.step() is never
// used by the pipeline, so it is not here.
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>
#include <torch/types.h>

namespace sd {

struct LCMSchedulerConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.00085;
  double beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";  // "scaled_linear" | "linear"
  int64_t original_inference_steps = 50;        // LCM default; SD model configs usually lack it
  double timestep_scaling = 10.0;               // LCM default
  // What the UNet predicts: "epsilon" (noise) or "v_prediction" (v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0, SD 2.x 768-v). The
  // stream converts v to ε per row (ε = sqrt(ᾱ)·v + sqrt(1−ᾱ)·x_t) before guidance, so its formulas stay ε-based.
  std::string prediction_type = "epsilon";

  // scheduler/scheduler_config.json. Keys that only LCMScheduler.step() reads (clip_sample, thresholding, ...) are
  // accepted and ignored; keys that would change the schedule in a way this port does not implement
  // (trained_betas, rescale_betas_zero_snr, a prediction_type other than "epsilon" / "v_prediction") are a
  // FormatError; unknown keys
  // are only logged (the original warns too, issue #130).
  static LCMSchedulerConfig from_json(const nlohmann::json& j, const std::string& file);
  static LCMSchedulerConfig from_file(const std::string& path);
};

// sqrt(ᾱ_t), sqrt(1 − ᾱ_t), c_skip(t), c_out(t) for one timestep, float32 as the reference computes them.
struct LCMCoefficients {
  int64_t timestep = 0;
  float alphas_cumprod = 0;
  float alpha_prod_t_sqrt = 0;
  float beta_prod_t_sqrt = 0;
  float c_skip = 0;
  float c_out = 0;
};

class LCMScheduler {
 public:
  explicit LCMScheduler(LCMSchedulerConfig config = {});

  const LCMSchedulerConfig& config() const { return config_; }
  // [num_train_timesteps] float32 (spec §2.1).
  const torch::Tensor& alphas_cumprod() const { return alphas_cumprod_; }
  const torch::Tensor& betas() const { return betas_; }

  // The LCM inference timesteps for `num_inference_steps` (spec §2.2), descending (999 first). Throws
  // InvalidArgument when num_inference_steps < 1, > original_inference_steps or > num_train_timesteps.
  std::vector<int64_t> timesteps(int64_t num_inference_steps) const;

  // Coefficients of one timestep (spec §2.3; float32 tensor math as the reference does it).
  LCMCoefficients coefficients(int64_t timestep) const;

 private:
  LCMSchedulerConfig config_;
  torch::Tensor betas_, alphas_cumprod_;
};

}  // namespace sd
