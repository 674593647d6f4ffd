#pragma once
// The model-loading tests compare what a loaded model makes, not its weights one by one: the frames of a txt2img
// and an img2img stream (the UNet at every step, RCFG self, the autoencoder the load options chose), so every
// converted component runs.
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"

namespace sd::test {

// load_pipeline with the threads left as they are (the test runner's).
inline std::shared_ptr<const DiffusionModels> load_models(const std::string& path, LoadOptions opt) {
  opt.threads = -1;
  return load_pipeline(path, opt);
}

// `frames` txt2img frames of one stream, then `frames` img2img frames of another (64x64, t_index_list {0, 2} of 4).
inline std::vector<torch::Tensor> stream_outputs(const std::shared_ptr<const DiffusionModels>& m, int frames) {
  StreamConfig c;
  c.t_index_list = {0, 2};
  c.num_inference_steps = 4;
  c.width = c.height = 64;
  c.cfg_type = CfgType::Self;
  c.guidance_scale = 1.4;
  std::vector<torch::Tensor> out;
  StreamDiffusion t(m, c);
  t.prepare("a photo of a cat", "");
  for (int i = 0; i < frames; ++i) out.push_back(t.txt2img());
  StreamDiffusion s(m, c);
  s.prepare("an oil painting", "");
  const auto img = torch::linspace(-1, 1, 3 * 64 * 64).view({1, 3, 64, 64});
  for (int i = 0; i < frames; ++i) out.push_back(s.img2img(img));
  return out;
}

// The largest absolute difference between two runs' frames (the model-loading tests expect 0: bit for bit).
inline double max_diff(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) d = std::max(d, (a[i] - b[i]).abs().max().item<double>());
  return d;
}

}  // namespace sd::test
