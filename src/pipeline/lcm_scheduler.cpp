#include "pipeline/lcm_scheduler.h"

#include <cmath>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "core/log.h"
#include "io/json_config.h"

namespace sd {

namespace {
// The largest num_train_timesteps a config may give (diffusers' Stable Diffusion schedulers use 1000).
constexpr int64_t kMaxTrainTimesteps = 100000;
}  // namespace

LCMSchedulerConfig LCMSchedulerConfig::from_json(const nlohmann::json& j, const std::string& file) {
  ConfigReader r(j, file);
  LCMSchedulerConfig c;
  c.num_train_timesteps = r.get_int64("num_train_timesteps", c.num_train_timesteps);
  c.beta_start = r.get_double("beta_start", c.beta_start);
  c.beta_end = r.get_double("beta_end", c.beta_end);
  c.beta_schedule = r.get_string("beta_schedule", c.beta_schedule);
  c.original_inference_steps = r.get_int64("original_inference_steps", c.original_inference_steps);
  c.timestep_scaling = r.get_double("timestep_scaling", c.timestep_scaling);

  // The schedule tensors have num_train_timesteps entries (diffusers' models use 1000): a bound keeps a crafted
  // config from allocating terabytes.
  if (c.num_train_timesteps < 2 || c.num_train_timesteps > kMaxTrainTimesteps)
    r.fail("num_train_timesteps", "an integer in [2, " + std::to_string(kMaxTrainTimesteps) + "]");
  if (c.original_inference_steps < 1 || c.original_inference_steps > c.num_train_timesteps)
    r.fail("original_inference_steps",
           "an integer in [1, num_train_timesteps = " + std::to_string(c.num_train_timesteps) + "]");
  if (c.beta_schedule != "scaled_linear" && c.beta_schedule != "linear")
    r.fail("beta_schedule", "\"scaled_linear\" or \"linear\" (the only schedules implemented)");
  if (!(c.beta_start > 0 && c.beta_end > 0 && c.beta_start < 1 && c.beta_end < 1))
    r.fail("beta_start", "beta_start and beta_end in (0, 1)");

  // Fields that would change the noise schedule or the model parameterisation.
  r.ignore("trained_betas");
  if (r.has("trained_betas")) r.fail("trained_betas", "null (explicit beta tables are not supported)");
  if (r.get_bool("rescale_betas_zero_snr", false))
    r.fail("rescale_betas_zero_snr", "false (zero-terminal-SNR schedules are not supported)");
  c.prediction_type = r.get_string("prediction_type", "epsilon");
  if (c.prediction_type != "epsilon" && c.prediction_type != "v_prediction")
    r.fail("prediction_type", "\"epsilon\" or \"v_prediction\" (\"sample\" is not supported)");

  // Read by LCMScheduler but irrelevant to what StreamDiffusion uses (set_timesteps / scalings / alphas_cumprod).
  for (const char* k : {"_class_name", "_diffusers_version", "clip_sample", "clip_sample_range",
                        "dynamic_thresholding_ratio", "sample_max_value", "set_alpha_to_one", "steps_offset",
                        "thresholding", "timestep_spacing", "skip_prk_steps"})
    r.ignore(k);
  r.log_unknown();
  return c;
}

LCMSchedulerConfig LCMSchedulerConfig::from_file(const std::string& path) {
  return from_json(read_json_file(path), path);
}

LCMScheduler::LCMScheduler(LCMSchedulerConfig config) : config_(std::move(config)) {
  torch::NoGradGuard no_grad;
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  // Spec §2.1, with libtorch's own CPU linspace/pow/cumprod so the float32 rounding is the reference's.
  if (config_.beta_schedule == "scaled_linear") {
    betas_ = torch::linspace(std::sqrt(config_.beta_start), std::sqrt(config_.beta_end), config_.num_train_timesteps,
                             f32)
                 .pow(2);
  } else if (config_.beta_schedule == "linear") {
    betas_ = torch::linspace(config_.beta_start, config_.beta_end, config_.num_train_timesteps, f32);
  } else {
    throw InvalidArgument("LCMScheduler: unsupported beta_schedule '" + config_.beta_schedule +
                          "' (expected scaled_linear or linear)");
  }
  const torch::Tensor alphas = 1.0 - betas_;
  alphas_cumprod_ = torch::cumprod(alphas, 0);
}

std::vector<int64_t> LCMScheduler::timesteps(int64_t num_inference_steps) const {
  const int64_t T = config_.num_train_timesteps;
  const int64_t orig = config_.original_inference_steps;
  if (num_inference_steps < 1)
    throw InvalidArgument("num_inference_steps must be >= 1, got " + std::to_string(num_inference_steps));
  if (num_inference_steps > T)
    throw InvalidArgument("num_inference_steps (" + std::to_string(num_inference_steps) +
                          ") cannot exceed the scheduler's num_train_timesteps (" + std::to_string(T) + ")");
  if (orig > T)
    throw InvalidArgument("original_inference_steps (" + std::to_string(orig) +
                          ") cannot exceed num_train_timesteps (" + std::to_string(T) + ")");
  if (num_inference_steps > orig)
    throw InvalidArgument("num_inference_steps (" + std::to_string(num_inference_steps) +
                          ") cannot exceed the scheduler's original_inference_steps (" + std::to_string(orig) +
                          "): LCM samples its timesteps from that schedule");
  // LCM training schedule: k-1, 2k-1, ..., orig*k-1 with k = T // orig, used in descending order.
  const int64_t k = T / orig;
  std::vector<int64_t> origin(orig);
  for (int64_t j = 0; j < orig; ++j) origin[orig - 1 - j] = (j + 1) * k - 1;
  // Evenly spaced indices: floor(np.linspace(0, orig, num_inference_steps, endpoint=False)) = floor(i * (orig/N)).
  const double step = static_cast<double>(orig) / static_cast<double>(num_inference_steps);
  std::vector<int64_t> out(num_inference_steps);
  for (int64_t i = 0; i < num_inference_steps; ++i)
    out[i] = origin[static_cast<int64_t>(std::floor(static_cast<double>(i) * step))];
  return out;
}

LCMCoefficients LCMScheduler::coefficients(int64_t timestep) const {
  if (timestep < 0 || timestep >= config_.num_train_timesteps)
    throw InvalidArgument("timestep " + std::to_string(timestep) + " outside [0, " +
                          std::to_string(config_.num_train_timesteps) + ")");
  torch::NoGradGuard no_grad;
  LCMCoefficients c;
  c.timestep = timestep;
  const torch::Tensor acp = alphas_cumprod_[timestep];  // 0-d float32
  c.alphas_cumprod = acp.item<float>();
  c.alpha_prod_t_sqrt = acp.sqrt().item<float>();
  c.beta_prod_t_sqrt = (1.0 - acp).sqrt().item<float>();
  // get_scalings_for_boundary_condition_discrete on a 0-d int64 tensor: int64 * float -> float32 tensor math.
  // `sigma² / x` in Python is x.reciprocal() * sigma² (Tensor.__rtruediv__), reproduced literally.
  const double sigma_sq = 0.5 * 0.5;
  const torch::Tensor t = torch::tensor(timestep, torch::kInt64);
  const torch::Tensor s = t * config_.timestep_scaling;  // float32
  const torch::Tensor denom = s.pow(2) + sigma_sq;
  c.c_skip = (denom.reciprocal() * sigma_sq).item<float>();
  c.c_out = (s / denom.pow(0.5)).item<float>();
  return c;
}

}  // namespace sd
