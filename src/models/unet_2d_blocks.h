#pragma once
// The UNet's down / mid / up blocks (diffusers unet_2d_blocks): CrossAttnDownBlock2D and DownBlock2D,
// UNetMidBlock2DCrossAttn, UpBlock2D and CrossAttnUpBlock2D. The plain and cross-attention variants of a direction
// share one class; without cross attention no `attentions` list is registered, so the parameter names are exactly
// diffusers' in both cases.
#include <optional>
#include <utility>
#include <vector>

#include "models/resnet.h"
#include "models/transformer_2d.h"

namespace sd {

// Settings shared by all blocks of one UNet.
struct UNetBlockOptions {
  int64_t temb_channels = 0;
  int64_t resnet_groups = 32;
  double resnet_eps = 1e-5;
  double output_scale_factor = 1.0;  // resnets' output scale (the mid block's mid_block_scale_factor)
  // Only for the cross-attention variants:
  bool cross_attention = false;
  int64_t heads = 8;  // per-block number of heads (head dim = channels / heads)
  int64_t cross_attention_dim = 0;
  bool use_linear_projection = false;
  bool upcast_attention = false;
  int64_t transformer_layers = 1;
  bool only_cross_attention = false;  // attn1 of every transformer block attends to the context too
};

Transformer2DOptions transformer_options(const UNetBlockOptions& o, int64_t channels);

// CrossAttnDownBlock2D (cross_attention) / DownBlock2D:
//   per layer: h = resnets.i(h, temb) [; h = attentions.i(h, ctx)], each h is a skip output;
//   then downsamplers.0 (3x3 stride 2) when add_downsample, whose output is a skip output too.
class UNetDownBlockImpl : public torch::nn::Module {
 public:
  UNetDownBlockImpl(int64_t in_channels, int64_t out_channels, int64_t num_layers, bool add_downsample,
                    int64_t downsample_padding, const UNetBlockOptions& o);
  // Returns the block output and appends its skip tensors to `skips`. downsample false: stop before the downsampler
  // (the UNet's shallow path, unet_feature_cache.h).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb, const torch::Tensor& context,
                        std::vector<torch::Tensor>& skips, bool downsample = true);

  std::vector<ResnetBlock2D> resnet_list;
  std::vector<Transformer2DModel> attention_list;
  Downsample2D downsampler{nullptr};
};
TORCH_MODULE(UNetDownBlock);

// UNetMidBlock2DCrossAttn: resnets.0, then per layer attentions.i + resnets.(i+1); channels unchanged.
class UNetMidBlock2DCrossAttnImpl : public torch::nn::Module {
 public:
  UNetMidBlock2DCrossAttnImpl(int64_t channels, int64_t num_layers, const UNetBlockOptions& o);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb, const torch::Tensor& context);

  std::vector<ResnetBlock2D> resnet_list;
  std::vector<Transformer2DModel> attention_list;
};
TORCH_MODULE(UNetMidBlock2DCrossAttn);

// UpBlock2D / CrossAttnUpBlock2D: per layer h = resnets.i(cat(h, skip)) [; attentions.i(h, ctx)], consuming the
// skips from the back; then upsamplers.0 (nearest x2 + conv) when add_upsample.
class UNetUpBlockImpl : public torch::nn::Module {
 public:
  UNetUpBlockImpl(int64_t in_channels, int64_t prev_output_channels, int64_t out_channels, int64_t num_layers,
                  bool add_upsample, const UNetBlockOptions& o);
  // Pops num_layers tensors from the back of `skips`. upsample_size: explicit (H, W) for the upsampler.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb, const torch::Tensor& context,
                        std::vector<torch::Tensor>& skips,
                        std::optional<std::pair<int64_t, int64_t>> upsample_size = {});

  int64_t num_layers() const { return static_cast<int64_t>(resnet_list.size()); }

  std::vector<ResnetBlock2D> resnet_list;
  std::vector<Transformer2DModel> attention_list;
  Upsample2D upsampler{nullptr};
};
TORCH_MODULE(UNetUpBlock);

}  // namespace sd
