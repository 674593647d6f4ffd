#pragma once
// TAESD (madebyollin's Tiny AutoEncoder for Stable Diffusion) with diffusers 0.24 AutoencoderTiny semantics and key
// names: "encoder.layers.{idx}..." / "decoder.layers.{idx}..." where {idx} is the index in diffusers' nn.Sequential
// (parameterless layers - ReLU, Upsample - keep their index, so the numbering has gaps exactly like the checkpoint).
//
//   encode(x in [-1, 1]) = Enc((x + 1) / 2)                  -> latents, already "scaled" (scaling_factor 1.0)
//   decode(z)            = 2 * Dec(3 * tanh(z / 3)) - 1       -> image in about [-1, 1], NOT clamped
//
// Weights load from a diffusers AutoencoderTiny folder or from madebyollin's original taesd_encoder/decoder files
// (converted to diffusers names at load, io/checkpoint_convert.h).
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>
#include <torch/torch.h>

#include "models/layers.h"

namespace sd {

struct AutoencoderTinyConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  std::vector<int> encoder_block_out_channels{64, 64, 64, 64};
  std::vector<int> decoder_block_out_channels{64, 64, 64, 64};
  std::vector<int> num_encoder_blocks{1, 3, 3, 3};
  std::vector<int> num_decoder_blocks{3, 3, 3, 1};
  int64_t latent_channels = 4;
  int64_t upsampling_scaling_factor = 2;
  std::string act_fn = "relu";  // the only activation TAESD checkpoints use; anything else is rejected
  double latent_magnitude = 3.0;
  double latent_shift = 0.5;
  bool force_upcast = false;
  double scaling_factor = 1.0;

  // diffusers' defaults for absent fields; FormatError naming `file` and the field for a wrong type or an
  // unsupported value.
  static AutoencoderTinyConfig from_json(const nlohmann::json& j, const std::string& file);
  // Consistency checks (list lengths, positive sizes, equal widths - see .cpp); FormatError naming `source`.
  void validate(const std::string& source) const;
  // Total down/up-sampling factor: 2^(number of blocks - 1) (8 for SD's TAESD).
  int64_t spatial_factor() const;
};

// diffusers AutoencoderTinyBlock: relu(conv.4(relu(conv.2(relu(conv.0(x))))) + skip(x)); `skip` is a bias-free 1x1
// conv when the width changes, else the identity (never present in TAESD checkpoints).
class TinyBlockImpl : public torch::nn::Module {
 public:
  TinyBlockImpl(int64_t in_channels, int64_t out_channels);
  torch::Tensor forward(const torch::Tensor& x);  // [B, in, H, W] -> [B, out, H, W]

  std::shared_ptr<torch::nn::Module> conv;  // holds "0", "2", "4" (the ReLUs at 1, 3 have no parameters)
  sd::nn::Conv2d conv0{nullptr}, conv2{nullptr}, conv4{nullptr}, skip{nullptr};
};
TORCH_MODULE(TinyBlock);

// diffusers' `layers` nn.Sequential: layers are registered under their Sequential index; ReLU and Upsample take an
// index but hold nothing.
class TinyLayersImpl : public torch::nn::Module {
 public:
  void add_conv(int64_t in, int64_t out, int64_t stride, bool bias);
  void add_block(int64_t in, int64_t out);
  void add_relu();
  void add_upsample(int64_t factor);
  torch::Tensor forward(torch::Tensor x);
  int64_t size() const { return static_cast<int64_t>(ops_.size()); }

 private:
  enum class Kind { Conv, Block, ReLU, Upsample };
  struct Op {
    Kind kind;
    sd::nn::Conv2d conv{nullptr};
    TinyBlock block{nullptr};
    int64_t factor = 1;
  };
  std::vector<Op> ops_;
};
TORCH_MODULE(TinyLayers);

// diffusers EncoderTiny (input already mapped to [0, 1]): conv(in -> c0), then per block i: [stride-2 bias-free
// conv (i > 0)], num_blocks[i] x Block; then conv(c_last -> latent_channels).
class TinyEncoderImpl : public torch::nn::Module {
 public:
  explicit TinyEncoderImpl(const AutoencoderTinyConfig& c);
  torch::Tensor forward(const torch::Tensor& x01);  // [B, 3, H, W] in [0, 1] -> [B, latent, H/8, W/8]
  TinyLayers layers{nullptr};
};
TORCH_MODULE(TinyEncoder);

// diffusers DecoderTiny without its clamp and output mapping (those are in AutoencoderTiny::decode): conv(latent ->
// c0), ReLU, then per block i: num_blocks[i] x Block, [Upsample + bias-free conv (not last)], last: conv(-> out).
class TinyDecoderImpl : public torch::nn::Module {
 public:
  explicit TinyDecoderImpl(const AutoencoderTinyConfig& c);
  torch::Tensor forward(const torch::Tensor& z);  // clamped latents -> [B, 3, 8h, 8w] in about [0, 1]
  TinyLayers layers{nullptr};
};
TORCH_MODULE(TinyDecoder);

class AutoencoderTinyImpl : public torch::nn::Module {
 public:
  explicit AutoencoderTinyImpl(AutoencoderTinyConfig c);

  // Inputs must already be in the model's dtype and on its device (InvalidArgument otherwise, as for a wrong shape).
  // x [B, in_channels, H, W] in [-1, 1] -> latents [B, latent_channels, ceil(H/8), ceil(W/8)] (diffusers'
  // AutoencoderTiny.encode(x).latents).
  torch::Tensor encode(const torch::Tensor& x);
  // z [B, latent_channels, h, w] -> image [B, out_channels, 8h, 8w] (AutoencoderTiny.decode(z).sample).
  torch::Tensor decode(const torch::Tensor& z);

  // The 8-bit storage mapping (only AutoencoderTiny.forward uses it; the pipeline does not):
  // scale: clamp(z / (2 * latent_magnitude) + latent_shift, 0, 1); unscale: (v - latent_shift) * 2 * magnitude.
  torch::Tensor scale_latents(const torch::Tensor& z) const;
  torch::Tensor unscale_latents(const torch::Tensor& v) const;

  // The activations' memory layout. Until set_channels_last() is called, CPU models keep NCHW weights and take
  // the layout sd::nn::cpu_channels_last() picks for the input's dtype at each call (models/conv_layout.h), and
  // load_taesd() on CUDA sets it. set_channels_last(on) stores the convolution weights in that format (oneDNN and cuDNN
  // follow a channels-last weight too) and runs every call in it. Results equal the NCHW path up to summation order;
  // encode/decode always return NCHW-contiguous tensors.
  void set_channels_last(bool on);
  // The layout a call in this model's dtype runs in.
  bool channels_last() const;

  const AutoencoderTinyConfig& config() const { return config_; }
  torch::ScalarType dtype() const;
  torch::Device device() const;

  TinyEncoder encoder{nullptr};
  TinyDecoder decoder{nullptr};

 private:
  void check_input(const torch::Tensor& t, int64_t channels, const char* what) const;
  torch::Tensor to_layout(const torch::Tensor& t) const;
  AutoencoderTinyConfig config_;
  std::optional<bool> channels_last_;  // unset: the device's default (on the CPU, by dtype)
};
TORCH_MODULE(AutoencoderTiny);

// Builds the config from the structure of a diffusers-layout AutoencoderTiny state dict (used for madebyollin's
// original files, which come without a config.json): widths and latent channels from the conv shapes, block counts
// from which layer indices hold Blocks. FormatError naming `source` if the keys do not describe a TAESD.
AutoencoderTinyConfig infer_autoencoder_tiny_config(const std::map<std::string, torch::Tensor>& diffusers_state,
                                                    const std::string& source);

// Loads a TAESD from any of:
//   * a diffusers AutoencoderTiny folder: config.json + diffusion_pytorch_model.safetensors;
//   * a folder holding madebyollin's taesd_encoder.safetensors + taesd_decoder.safetensors;
//   * the path of one of those two original files (the other one is found beside it by name).
// Pickled .pth/.pt/.bin/.ckpt files are refused with a message saying how to convert them to safetensors.
// Floating-point weights are cast to `dtype` and moved to `device`; the module is returned in eval mode, with
// channels-last enabled on CPU. `variant` (e.g. "fp16"): find_weights' for a diffusers folder (madebyollin's files
// have no variants).
AutoencoderTiny load_taesd(const std::string& path, torch::ScalarType dtype = torch::kFloat,
                           torch::Device device = torch::kCPU, const std::string& variant = "");
// madebyollin's original pair, given explicitly.
AutoencoderTiny load_taesd_original(const std::string& encoder_file, const std::string& decoder_file,
                                    torch::ScalarType dtype = torch::kFloat, torch::Device device = torch::kCPU);

}  // namespace sd
