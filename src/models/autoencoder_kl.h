#pragma once
// AutoencoderKL (the Stable Diffusion VAE) with diffusers 0.24 semantics and state-dict names:
//   encoder.{conv_in, down_blocks.N.{resnets.M, downsamplers.0.conv}, mid_block.{resnets.0, attentions.0,
//   resnets.1}, conv_norm_out, conv_out}, quant_conv, post_quant_conv,
//   decoder.{conv_in, mid_block, up_blocks.N.{resnets.M, upsamplers.0.conv}, conv_norm_out, conv_out}.
// Every GroupNorm uses eps 1e-6. The scaling factor is NOT applied here: callers multiply encode's sample by it and
// divide latents by it before decode (as diffusers pipelines and StreamDiffusion do).
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>
#include <torch/torch.h>

#include "models/attention.h"
#include "models/layers.h"
#include "models/resnet.h"

namespace sd {

struct AutoencoderKLConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  std::vector<std::string> down_block_types{"DownEncoderBlock2D"};  // only DownEncoderBlock2D is supported
  std::vector<std::string> up_block_types{"UpDecoderBlock2D"};      // only UpDecoderBlock2D is supported
  std::vector<int> block_out_channels{64};
  int64_t layers_per_block = 1;
  std::string act_fn = "silu";
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;
  int64_t sample_size = 32;
  double scaling_factor = 0.18215;
  bool force_upcast = true;  // diffusers pipelines run this VAE in fp32 when the rest is fp16; informational here
  // Fields of later diffusers versions with the 0.24 behaviour as default.
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;

  // diffusers' defaults for absent fields; FormatError naming `file` and the field for a wrong type or an
  // unsupported value.
  static AutoencoderKLConfig from_json(const nlohmann::json& j, const std::string& file);
  void validate(const std::string& source) const;
  // 2^(len(block_out_channels) - 1): 8 for every SD 1.x / 2.x VAE.
  int64_t spatial_factor() const;
};

// diffusers DownEncoderBlock2D: `layers` ResnetBlock2Ds (no time embedding) then, unless last, a stride-2 conv
// preceded by a (0, 1, 0, 1) zero pad (downsample_padding = 0).
class VAEDownBlockImpl : public torch::nn::Module {
 public:
  VAEDownBlockImpl(int64_t in, int64_t out, int64_t layers, bool add_downsample, int64_t groups, double eps);
  torch::Tensor forward(torch::Tensor x);  // [B, in, H, W] -> [B, out, H/2, W/2] (or H, W when last)
  torch::nn::ModuleList resnets{nullptr}, downsamplers{nullptr};
  std::vector<ResnetBlock2D> resnet_list;
  Downsample2D downsample{nullptr};
};
TORCH_MODULE(VAEDownBlock);

// diffusers UpDecoderBlock2D: `layers` ResnetBlock2Ds then, unless last, nearest x2 + 3x3 conv.
class VAEUpBlockImpl : public torch::nn::Module {
 public:
  VAEUpBlockImpl(int64_t in, int64_t out, int64_t layers, bool add_upsample, int64_t groups, double eps);
  torch::Tensor forward(torch::Tensor x);  // [B, in, H, W] -> [B, out, 2H, 2W] (or H, W when last)
  torch::nn::ModuleList resnets{nullptr}, upsamplers{nullptr};
  std::vector<ResnetBlock2D> resnet_list;
  Upsample2D upsample{nullptr};
};
TORCH_MODULE(VAEUpBlock);

// diffusers UNetMidBlock2D as the VAE builds it: resnets.0, attentions.0 (single-head spatial self-attention with
// group_norm, biased projections, fp32 softmax, residual), resnets.1.
class VAEMidBlockImpl : public torch::nn::Module {
 public:
  VAEMidBlockImpl(int64_t channels, int64_t groups, double eps, bool add_attention);
  torch::Tensor forward(torch::Tensor x);  // [B, C, H, W] -> same
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};
  ResnetBlock2D resnet0{nullptr}, resnet1{nullptr};
  Attention attention{nullptr};
};
TORCH_MODULE(VAEMidBlock);

class VAEEncoderImpl : public torch::nn::Module {
 public:
  explicit VAEEncoderImpl(const AutoencoderKLConfig& c);
  torch::Tensor forward(const torch::Tensor& x);  // [B, 3, H, W] -> moments [B, 2*latent, H/8, W/8]
  sd::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  std::vector<VAEDownBlock> down_list;
  VAEMidBlock mid_block{nullptr};
  sd::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VAEEncoder);

class VAEDecoderImpl : public torch::nn::Module {
 public:
  explicit VAEDecoderImpl(const AutoencoderKLConfig& c);
  torch::Tensor forward(const torch::Tensor& z);  // [B, latent, h, w] -> [B, 3, 8h, 8w]
  sd::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  VAEMidBlock mid_block{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  std::vector<VAEUpBlock> up_list;
  sd::nn::GroupNorm conv_norm_out{nullptr};
};
TORCH_MODULE(VAEDecoder);

// diffusers DiagonalGaussianDistribution (the latent_dist of AutoencoderKL.encode).
struct DiagonalGaussian {
  torch::Tensor mean;    // [B, latent, h, w]
  torch::Tensor logvar;  // same shape, clamped to [-30, 20]
  torch::Tensor std() const;                               // exp(0.5 * logvar)
  torch::Tensor sample(const torch::Tensor& noise) const;  // mean + std * noise
};

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(AutoencoderKLConfig c);

  // Inputs must already be in the model's dtype and on its device (InvalidArgument otherwise, as for a wrong shape).
  // x [B, in_channels, H, W] in [-1, 1] -> the posterior over latents (unscaled: multiply a sample by
  // config().scaling_factor to get the UNet's latent units).
  DiagonalGaussian encode(const torch::Tensor& x);
  // mean + exp(0.5 * logvar) * noise, with noise ~ N(0, 1) of the same shape (diffusers' latent_dist.sample()).
  static torch::Tensor sample(const torch::Tensor& mean, const torch::Tensor& logvar, const torch::Tensor& noise);
  // z [B, latent_channels, h, w] ALREADY divided by the scaling factor -> image [B, out_channels, 8h, 8w] in about
  // [-1, 1], not clamped (diffusers' vae.decode(z).sample).
  torch::Tensor decode(const torch::Tensor& z);

  // The activations' memory layout. Until set_channels_last() is called, CPU models keep NCHW weights and take
  // the layout sd::nn::cpu_channels_last() picks for the input's dtype at each call (models/conv_layout.h), and
  // load_vae() on CUDA sets it. set_channels_last(on) stores the convolution weights in that format (oneDNN and cuDNN
  // follow a channels-last weight too) and runs every call in it. Results equal the NCHW path up to summation order;
  // encode/decode always return NCHW-contiguous tensors.
  void set_channels_last(bool on);
  // The layout a call in this model's dtype runs in.
  bool channels_last() const;

  const AutoencoderKLConfig& config() const { return config_; }
  torch::ScalarType dtype() const;
  torch::Device device() const;

  VAEEncoder encoder{nullptr};
  VAEDecoder decoder{nullptr};
  sd::nn::Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};

 private:
  void check_input(const torch::Tensor& t, int64_t channels, const char* what) const;
  torch::Tensor to_layout(const torch::Tensor& t) const;
  AutoencoderKLConfig config_;
  std::optional<bool> channels_last_;  // unset: the device's default (on the CPU, by dtype)
};
TORCH_MODULE(AutoencoderKL);

// Loads a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors; a pipeline folder
// with a vae/ sub-folder is accepted too). Floating-point weights are cast to `dtype` and moved to `device`; the
// module is returned in eval mode, with channels-last enabled on CPU. `variant` (e.g. "fp16"): find_weights'.
AutoencoderKL load_vae(const std::string& dir, torch::ScalarType dtype = torch::kFloat,
                       torch::Device device = torch::kCPU, const std::string& variant = "");
// The same from a config and an in-memory state dict with diffusers keys (e.g. converted from a single-file
// checkpoint by io/ldm_checkpoint); `source` names the weights in errors. Both take the mid-block attention names of
// VAEs saved before diffusers ~0.14 (query / key / value / proj_attn; io/checkpoint_convert.h) as diffusers does.
AutoencoderKL load_vae(const AutoencoderKLConfig& config, const std::map<std::string, torch::Tensor>& weights,
                       const std::string& source, torch::ScalarType dtype = torch::kFloat,
                       torch::Device device = torch::kCPU);

}  // namespace sd
