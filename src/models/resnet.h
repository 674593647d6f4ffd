#pragma once
// ResNet building blocks shared by the UNet and the AutoencoderKL, with diffusers' parameter names.
#include <optional>

#include "models/layers.h"

namespace sd {

// diffusers ResnetBlock2D with time_embedding_norm="default" (temb added after conv1) and SiLU activations:
//   h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))[:, :, None, None]]
//   h = conv2(silu(norm2(h)))
//   out = (shortcut(x) + h) / output_scale_factor, shortcut = conv_shortcut (1x1) when in != out, else identity.
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  // temb_channels == 0: no time embedding (VAE). Both GroupNorms use `groups` and `eps`.
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups, double eps,
                    double output_scale_factor = 1.0);
  // x [B, in, H, W], temb [B, temb_channels] (required iff temb_channels > 0) -> [B, out, H, W]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb = {});

  int64_t in_channels, out_channels, temb_channels;
  double output_scale_factor;
  sd::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  sd::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  sd::nn::Linear time_emb_proj{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

// diffusers Downsample2D with use_conv=True: a 3x3 stride-2 convolution named `conv`.
// padding 1 (UNet, downsample_padding=1) or padding 0 preceded by an asymmetric zero pad (right 1, bottom 1), which
// is what the AutoencoderKL encoder uses.
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t out_channels, int64_t padding = 1);
  torch::Tensor forward(const torch::Tensor& x);  // [B, C, H, W] -> [B, out, ceil(H/2), ceil(W/2)]

  int64_t padding;
  sd::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Downsample2D);

// diffusers Upsample2D with use_conv=True: nearest-neighbour x2 (or to an explicit size) then a 3x3 conv `conv`.
class Upsample2DImpl : public torch::nn::Module {
 public:
  // phases: on the CPU, exactly 2x runs as Conv2dImpl::forward_upsampled2x (four 2x2 convolutions on the input; see
  // there). The autoencoders ask for it (AutoencoderKL decode 256 px fp32 6.20 -> 5.58 s on a 2-core Zen 2); the UNet
  // does not: its three upsamplers are ~2% of a call, less than the kernels' memory (16/9 of their weights, +236 MB
  // for an fp32 SD 2.1 UNet) is worth.
  Upsample2DImpl(int64_t channels, int64_t out_channels, bool phases = false);
  // output_size: the (H, W) to upsample to instead of 2x (the UNet passes the skip's size when the input size is
  // not a multiple of its total down factor).
  torch::Tensor forward(const torch::Tensor& x, std::optional<std::pair<int64_t, int64_t>> output_size = {});

  sd::nn::Conv2d conv{nullptr};
  bool phases = false;
};
TORCH_MODULE(Upsample2D);

}  // namespace sd
