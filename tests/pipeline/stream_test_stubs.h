#pragma once
// A tiny deterministic DiffusionModels for testing the stream logic without weights (spec §15):
//   text:   e(text) [1, 77, D] = 0.01·arange + h(text), h a hash of the text in [0, 1)
//   UNet:   ε̂ = 0.1·x + 0.01·t + mean(ehs row)       (per row; records every call)
//   encode: 8×8 average pool of the image, channel 4 = the mean of channels 1..3, × scaling_factor;
//           with `posterior_noise`, + 0.1·randn from the stream's Rng (like AutoencoderKL's posterior sample)
//   decode: nearest ×8 upsampling of channels 1..3 of z / scaling_factor
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "pipeline/diffusion_models.h"

namespace sd::test {

class StubModels : public DiffusionModels {
 public:
  struct UnetCall {
    torch::Tensor sample, timesteps, ehs, out;
  };

  explicit StubModels(double scaling_factor = 1.0, bool posterior_noise = false, int64_t text_dim = 8)
      : scaling_(scaling_factor), posterior_noise_(posterior_noise), dim_(text_dim) {}

  static torch::Tensor text_embedding(const std::string& text, int64_t dim) {
    const double h = static_cast<double>(std::hash<std::string>{}(text) % 1000) / 1000.0;
    return (torch::arange(77 * dim, torch::kFloat32).view({1, 77, dim}) * 0.01 / (77.0 * dim)) + h;
  }
  // The stub UNet on any rows (used by tests to recompute expectations independently).
  static torch::Tensor stub_eps(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& ehs) {
    const auto B = x.size(0);
    return 0.1 * x + 0.01 * t.to(torch::kFloat32).view({B, 1, 1, 1}) + ehs.mean({1, 2}).view({B, 1, 1, 1});
  }

  torch::Tensor encode_prompt(const std::string& text) const override {
    std::lock_guard<std::mutex> l(mu_);
    prompts_.push_back(text);
    return text_embedding(text, dim_);
  }
  torch::Tensor unet(const torch::Tensor& sample, const torch::Tensor& t, const torch::Tensor& ehs,
                     const AddedConditioning& /*added*/, const ControlResiduals& /*control*/) const override {
    auto out = stub_eps(sample, t, ehs);
    std::lock_guard<std::mutex> l(mu_);
    calls_.push_back({sample.clone(), t.clone(), ehs.clone(), out.clone()});
    return out;
  }
  torch::Tensor encode_image(const torch::Tensor& x, Rng& rng) const override {
    auto pooled = torch::avg_pool2d(x, 8);                       // [B, 3, h, w]
    auto z = torch::cat({pooled, pooled.mean(1, true)}, 1);      // [B, 4, h, w]
    if (posterior_noise_) z = z + 0.1 * rng.randn(z.sizes(), "stub posterior").to(z.options());
    return z * scaling_;
  }
  torch::Tensor decode_latent(const torch::Tensor& z) const override {
    auto y = (z / scaling_).slice(1, 0, 3);
    return torch::upsample_nearest2d(y, {y.size(2) * 8, y.size(3) * 8});
  }
  int64_t latent_channels() const override { return 4; }
  int64_t vae_scale_factor() const override { return 8; }
  c10::ScalarType dtype() const override { return c10::kFloat; }
  c10::Device device() const override { return c10::kCPU; }
  const LCMSchedulerConfig& scheduler_config() const override { return sched_; }
  std::string describe() const override { return "stub"; }

  std::vector<UnetCall> unet_calls() const {
    std::lock_guard<std::mutex> l(mu_);
    return calls_;
  }
  std::vector<std::string> prompts() const {
    std::lock_guard<std::mutex> l(mu_);
    return prompts_;
  }
  void clear() {
    std::lock_guard<std::mutex> l(mu_);
    calls_.clear();
    prompts_.clear();
  }
  double scaling() const { return scaling_; }

 private:
  double scaling_;
  bool posterior_noise_;
  int64_t dim_;
  LCMSchedulerConfig sched_;
  mutable std::mutex mu_;
  mutable std::vector<UnetCall> calls_;
  mutable std::vector<std::string> prompts_;
};

}  // namespace sd::test
