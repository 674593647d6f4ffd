#include "apps/cli/bench_naive.h"

#include <chrono>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "apps/cli/bench_util.h"
#include "core/error.h"

namespace sd::bench {

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

NaiveTxt2Img::NaiveTxt2Img(std::shared_ptr<const DiffusionModels> models, NaiveOptions options)
    : models_(std::move(models)),
      options_(std::move(options)),
      scheduler_(models_->scheduler_config()),
      gen_(at::detail::createCPUGenerator(options_.seed)) {
  if (options_.t_index_list.empty()) throw InvalidArgument("naive txt2img: the t_index_list is empty");
  const std::vector<int64_t> all = scheduler_.timesteps(options_.num_inference_steps);
  for (int64_t i : options_.t_index_list) {
    if (i < 0 || i >= static_cast<int64_t>(all.size()))
      throw InvalidArgument("naive txt2img: t_index " + std::to_string(i) + " is outside [0, " +
                            std::to_string(all.size()) + ") for num_inference_steps " +
                            std::to_string(options_.num_inference_steps));
    timesteps_.push_back(all[static_cast<size_t>(i)]);
  }
  if (!options_.encode_prompt_per_call) {
    torch::NoGradGuard ng;
    cond_ = models_->encode_text(options_.prompt);
    if (guidance()) uncond_ = models_->encode_text(options_.negative_prompt);
  }
}

torch::Tensor NaiveTxt2Img::operator()() {
  torch::NoGradGuard ng;
  const c10::Device dev = models_->device();
  const auto dtype = models_->dtype();
  last_ = {};

  auto t0 = Clock::now();
  TextEmbeddings cond = cond_, uncond = uncond_;
  if (options_.encode_prompt_per_call) {
    cond = models_->encode_text(options_.prompt);
    if (guidance()) uncond = models_->encode_text(options_.negative_prompt);
  }
  // The text rows of the CFG batch: [uncond; cond] -> [2, 77, D] (a fresh tensor every call, as diffusers does);
  // SDXL's pooled rows and time ids likewise.
  const torch::Tensor ehs = guidance() ? torch::cat({uncond.embeds, cond.embeds}) : cond.embeds;
  AddedConditioning added;
  if (cond.pooled.defined()) {
    added = repeat_added_conditioning(*models_, cond.pooled, ehs.size(0), options_.height, options_.width);
    if (guidance()) added.text_embeds = torch::cat({uncond.pooled, cond.pooled});
  }
  sync(dev);
  last_.text_encode_s = since(t0);

  const int64_t vs = models_->vae_scale_factor();
  const std::vector<int64_t> shape{1, models_->latent_channels(), options_.height / vs, options_.width / vs};
  torch::Tensor x = torch::randn(shape, gen_, torch::kFloat).to(dev, dtype);  // [1, C, h, w]
  torch::Tensor denoised;
  t0 = Clock::now();
  for (size_t k = 0; k < timesteps_.size(); ++k) {
    const int64_t t = timesteps_[k];
    const torch::Tensor sample = guidance() ? torch::cat({x, x}) : x;
    const torch::Tensor ts = torch::full({sample.size(0)}, t, torch::TensorOptions().dtype(torch::kLong).device(dev));
    torch::Tensor eps = models_->unet(sample, ts, ehs, added);
    last_.unet_rows += sample.size(0);
    if (guidance()) {
      auto parts = eps.chunk(2);
      eps = parts[0] + options_.guidance_scale * (parts[1] - parts[0]);
    }
    const LCMCoefficients c = scheduler_.coefficients(t);
    const torch::Tensor x0 = (x - c.beta_prod_t_sqrt * eps) / c.alpha_prod_t_sqrt;
    denoised = c.c_skip * x + c.c_out * x0;
    if (k + 1 < timesteps_.size()) {
      const LCMCoefficients n = scheduler_.coefficients(timesteps_[k + 1]);
      const torch::Tensor noise = torch::randn(shape, gen_, torch::kFloat).to(dev, dtype);
      x = n.alpha_prod_t_sqrt * denoised + n.beta_prod_t_sqrt * noise;
    }
  }
  sync(dev);
  last_.unet_s = since(t0);

  t0 = Clock::now();
  torch::Tensor image = models_->decode_latent(denoised);
  sync(dev);
  last_.decode_s = since(t0);
  return image;
}

}  // namespace sd::bench
