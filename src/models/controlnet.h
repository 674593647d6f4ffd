#pragma once
// diffusers ControlNetModel (0.24): a trainable copy of the UNet's encoder (conv_in, time embedding, down blocks, mid
// block) whose input is the latent plus the embedded control image, and whose outputs - every skip tensor and the
// mid-block output, each through its own 1x1 "zero conv" - are added to the UNet's (ControlResiduals). Registered names
// are exactly diffusers' state-dict keys: controlnet_cond_embedding.{conv_in, blocks.N, conv_out}, conv_in,
// time_embedding, [add_embedding], down_blocks..., mid_block..., controlnet_down_blocks.K, controlnet_mid_block.
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "models/unet_2d_condition.h"

namespace sd {

struct ControlNetConfig {
  // The encoder's settings, read like a UNet config.json (up_block_types / out_channels do not apply).
  UNet2DConditionConfig unet;
  int64_t conditioning_channels = 3;
  std::vector<int64_t> conditioning_embedding_out_channels = {16, 32, 96, 256};
  bool bgr = false;                     // controlnet_conditioning_channel_order "bgr": the image's channels flipped
  bool global_pool_conditions = false;  // residuals averaged over space (shuffle-type ControlNets)
  // Down factor of the conditioning embedding: the control image is this many times the latent size.
  int64_t cond_downscale() const { return int64_t{1} << (conditioning_embedding_out_channels.size() - 1); }
  // diffusers' defaults, adjusted to a config.json; unsupported settings -> FormatError naming the field.
  static ControlNetConfig from_json(const nlohmann::json& j, const std::string& file);
};

// ControlNetConditioningEmbedding: conv_in(cond -> c0) SiLU, per stage [conv(c_i -> c_i) SiLU,
// conv(c_i -> c_{i+1}, stride 2) SiLU], conv_out(c_last -> block_out_channels[0]).
class ControlNetConditioningEmbeddingImpl : public torch::nn::Module {
 public:
  ControlNetConditioningEmbeddingImpl(int64_t embedding_channels, int64_t conditioning_channels,
                                      const std::vector<int64_t>& block_out_channels);
  torch::Tensor forward(const torch::Tensor& cond);  // [B, 3, H, W] -> [B, c0, H / 2^(n-1), W / 2^(n-1)]

  sd::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  std::vector<sd::nn::Conv2d> block_list;
};
TORCH_MODULE(ControlNetConditioningEmbedding);

class ControlNetModelImpl : public torch::nn::Module {
 public:
  explicit ControlNetModelImpl(const ControlNetConfig& config);
  // sample [B, in, h, w], timesteps [B] / [1] / 0-d, encoder_hidden_states [B, L, cross_attention_dim],
  // controlnet_cond [B, conditioning_channels, h·s, w·s] in [0, 1] (s = cond_downscale(); diffusers' control image,
  // not normalised to [-1, 1]); text_embeds / time_ids for text_time (SDXL) ControlNets. guess_mode false: every
  // residual is multiplied by conditioning_scale. Returns the residuals in the model dtype.
  ControlResiduals forward(const torch::Tensor& sample, const torch::Tensor& timesteps,
                           const torch::Tensor& encoder_hidden_states, const torch::Tensor& controlnet_cond,
                           double conditioning_scale, const torch::Tensor& text_embeds = {},
                           const torch::Tensor& time_ids = {});
  const ControlNetConfig& config() const { return config_; }

  sd::nn::Conv2d conv_in{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  TimestepEmbedding add_embedding{nullptr};  // text_time only
  ControlNetConditioningEmbedding controlnet_cond_embedding{nullptr};
  std::vector<UNetDownBlock> down_list;
  UNetMidBlock2DCrossAttn mid_block{nullptr};
  std::vector<sd::nn::Conv2d> controlnet_down_list;
  sd::nn::Conv2d controlnet_mid_block{nullptr};

 private:
  ControlNetConfig config_;
};
TORCH_MODULE(ControlNetModel);

// A ControlNet from a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or a single .safetensors
// file in the original layout (control_model.* or bare: input_hint_block, zero_convs, middle_block_out; converted
// at load by io/ldm_checkpoint, config inferred from the weights) or in diffusers names with a config.json beside
// it. Pickled files are refused with the conversion command. Loaded strictly; eval mode; weights cast to `dtype`.
// `variant` (e.g. "fp16"): find_weights' for a folder.
ControlNetModel load_controlnet_model(const std::string& path, torch::Dtype dtype = torch::kFloat,
                                      torch::Device device = torch::kCPU, const std::string& variant = "");
ControlNetModel load_controlnet_model(const ControlNetConfig& config,
                                      const std::map<std::string, torch::Tensor>& weights, const std::string& source,
                                      torch::Dtype dtype = torch::kFloat, torch::Device device = torch::kCPU);

}  // namespace sd
