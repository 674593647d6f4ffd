#include "models/autoencoder_tiny.h"

#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/text.h"
#include "io/checkpoint_convert.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/config_limits.h"
#include "models/conv_layout.h"

namespace sd {

namespace fs = std::filesystem;

namespace {

std::string list_str(const std::vector<int>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

bool is_pickle_name(const std::string& path) {
  for (const char* ext : {".pth", ".pt", ".bin", ".ckpt", ".pkl"})
    if (ends_with(path, ext)) return true;
  return false;
}

[[noreturn]] void refuse_pickle(const std::string& path) {
  const std::string name = fs::path(path).filename().string();
  const std::string stem = fs::path(path).stem().string();
  throw FormatError(path, "PyTorch pickle checkpoints (.pth/.pt/.bin/.ckpt) are never loaded (unpickling can run "
                          "arbitrary code); convert it to safetensors once, e.g. python -c \"import torch; from "
                          "safetensors.torch import save_file; save_file(torch.load('" + name +
                              "', map_location='cpu'), '" + stem + ".safetensors')\", and pass the .safetensors file");
}

AutoencoderTiny build_and_load(const AutoencoderTinyConfig& config, const std::map<std::string, torch::Tensor>& state,
                               const std::string& source, torch::ScalarType dtype, torch::Device device) {
  auto model = load_module<AutoencoderTiny>(config, state, source, dtype, device);
  // CUDA: cuDNN's NHWC kernels; the CPU picks by dtype at each call (models/conv_layout.h).
  if (device.is_cuda() && sd::nn::cuda_channels_last()) model->set_channels_last(true);
  return model;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Config

AutoencoderTinyConfig AutoencoderTinyConfig::from_json(const nlohmann::json& j, const std::string& file) {
  ConfigReader r(j, file);
  // A config of another class (e.g. the AutoencoderKL's, when vae/ is passed for taesd/) would otherwise load
  // as TAESD defaults and fail later with a long list of mismatched weights.
  if (auto cls = r.get_optional_string("_class_name"); cls && *cls != "AutoencoderTiny")
    throw FormatError(file, "field '_class_name' is \"" + *cls + "\": expected an AutoencoderTiny (TAESD) config");
  AutoencoderTinyConfig c;
  c.in_channels = r.get_int64("in_channels", c.in_channels);
  c.out_channels = r.get_int64("out_channels", c.out_channels);
  c.encoder_block_out_channels = r.get_int_list("encoder_block_out_channels", c.encoder_block_out_channels);
  c.decoder_block_out_channels = r.get_int_list("decoder_block_out_channels", c.decoder_block_out_channels);
  c.num_encoder_blocks = r.get_int_list("num_encoder_blocks", c.num_encoder_blocks);
  c.num_decoder_blocks = r.get_int_list("num_decoder_blocks", c.num_decoder_blocks);
  c.latent_channels = r.get_int64("latent_channels", c.latent_channels);
  c.upsampling_scaling_factor = r.get_int64("upsampling_scaling_factor", c.upsampling_scaling_factor);
  c.act_fn = r.get_string("act_fn", c.act_fn);
  c.latent_magnitude = r.get_double("latent_magnitude", c.latent_magnitude);
  c.latent_shift = r.get_double("latent_shift", c.latent_shift);
  c.force_upcast = r.get_bool("force_upcast", c.force_upcast);
  c.scaling_factor = r.get_double("scaling_factor", c.scaling_factor);
  // diffusers registers block_out_channels = decoder_block_out_channels into the saved config; it is not read back.
  r.get_int_list("block_out_channels", {});
  if (c.act_fn != "relu")
    throw FormatError(file, "field 'act_fn' = \"" + c.act_fn + "\" is not supported (TAESD uses \"relu\")");
  r.log_unknown();
  c.validate(file);
  return c;
}

void AutoencoderTinyConfig::validate(const std::string& source) const {
  auto fail = [&](const std::string& what) { throw FormatError(source, "AutoencoderTiny config: " + what); };
  using namespace config_limits;
  if (in_channels <= 0 || out_channels <= 0 || latent_channels <= 0 || in_channels > kMaxChannels ||
      out_channels > kMaxChannels || latent_channels > kMaxChannels)
    fail("in_channels, out_channels and latent_channels must be positive, at most " + std::to_string(kMaxChannels));
  if (upsampling_scaling_factor < 1) fail("upsampling_scaling_factor must be >= 1");
  if (act_fn != "relu") fail("act_fn '" + act_fn + "' is not supported (TAESD uses relu)");
  auto check = [&](const char* chans_name, const std::vector<int>& chans, const char* blocks_name,
                   const std::vector<int>& blocks) {
    if (chans.empty()) fail(std::string(chans_name) + " is empty");
    if (chans.size() != blocks.size())
      fail(std::string(chans_name) + " " + list_str(chans) + " and " + blocks_name + " " + list_str(blocks) +
           " must have the same length");
    for (int ch : chans)
      if (ch <= 0 || ch > kMaxChannels)
        fail(std::string(chans_name) + " " + list_str(chans) + " must be positive, at most " +
             std::to_string(kMaxChannels));
    for (int b : blocks)
      if (b < 0 || b > kMaxLayers)
        fail(std::string(blocks_name) + " " + list_str(blocks) + " must be in [0, " + std::to_string(kMaxLayers) +
             "]");
    // diffusers builds each stride-2 / post-upsample conv as conv(c_i, c_i), so differing widths give a network
    // that cannot run; reject it here instead of failing inside a convolution.
    for (int ch : chans)
      if (ch != chans[0])
        fail(std::string(chans_name) + " " + list_str(chans) +
             ": all entries must be equal (diffusers' AutoencoderTiny cannot run with differing widths)");
  };
  check("encoder_block_out_channels", encoder_block_out_channels, "num_encoder_blocks", num_encoder_blocks);
  check("decoder_block_out_channels", decoder_block_out_channels, "num_decoder_blocks", num_decoder_blocks);
  // Each level but the last halves the size: spatial_factor() = 2^(levels - 1) must stay a sane int64.
  if (num_encoder_blocks.size() > 16)
    fail("num_encoder_blocks has " + std::to_string(num_encoder_blocks.size()) + " entries, at most 16 are supported");
  if (num_encoder_blocks.size() != num_decoder_blocks.size())
    fail("num_encoder_blocks " + list_str(num_encoder_blocks) + " and num_decoder_blocks " +
         list_str(num_decoder_blocks) + " must have the same length (the decoder must undo the encoder's scale)");
  if (upsampling_scaling_factor != 2)
    fail("upsampling_scaling_factor " + std::to_string(upsampling_scaling_factor) +
         " does not undo the encoder's stride-2 convolutions (expected 2)");
}

int64_t AutoencoderTinyConfig::spatial_factor() const {
  return int64_t{1} << (static_cast<int64_t>(num_encoder_blocks.size()) - 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Layers

TinyBlockImpl::TinyBlockImpl(int64_t in, int64_t out) {
  conv = register_module("conv", std::make_shared<torch::nn::Module>());
  conv0 = conv->register_module("0", sd::nn::Conv2d(in, out, 3, 1, 1));
  conv2 = conv->register_module("2", sd::nn::Conv2d(out, out, 3, 1, 1));
  conv4 = conv->register_module("4", sd::nn::Conv2d(out, out, 3, 1, 1));
  if (in != out) skip = register_module("skip", sd::nn::Conv2d(in, out, 1, 1, 0, /*bias=*/false));
}

torch::Tensor TinyBlockImpl::forward(const torch::Tensor& x) {
  // Three convolutions that end in a ReLU, the last after the residual add: on CUDA three fused cuDNN calls
  // (sd::nn::conv_add_relu) instead of ten kernels; elsewhere the add and the ReLUs run in place.
  auto h = sd::nn::conv_add_relu(*conv0, x);
  h = sd::nn::conv_add_relu(*conv2, h);
  return sd::nn::conv_add_relu(*conv4, h, skip ? skip(x) : x);
}

void TinyLayersImpl::add_conv(int64_t in, int64_t out, int64_t stride, bool bias) {
  Op op{Kind::Conv};
  op.conv = register_module(std::to_string(ops_.size()), sd::nn::Conv2d(in, out, 3, stride, 1, bias));
  ops_.push_back(op);
}

void TinyLayersImpl::add_block(int64_t in, int64_t out) {
  Op op{Kind::Block};
  op.block = register_module(std::to_string(ops_.size()), TinyBlock(in, out));
  ops_.push_back(op);
}

void TinyLayersImpl::add_relu() { ops_.push_back(Op{Kind::ReLU}); }

void TinyLayersImpl::add_upsample(int64_t factor) {
  Op op{Kind::Upsample};
  op.factor = factor;
  ops_.push_back(op);
}

torch::Tensor TinyLayersImpl::forward(torch::Tensor x) {
  for (size_t i = 0; i < ops_.size(); ++i) {
    auto& op = ops_[i];
    switch (op.kind) {
      case Kind::Conv:
        if (i + 1 < ops_.size() && ops_[i + 1].kind == Kind::ReLU) {  // the decoder's first convolution
          x = sd::nn::conv_add_relu(*op.conv, x);
          ++i;
        } else {
          x = op.conv(x);
        }
        break;
      case Kind::Block: x = op.block(x); break;
      case Kind::ReLU: x = torch::relu(x); break;
      case Kind::Upsample:
        // The decoder's upsampling is followed by a 3x3 convolution: on the CPU the two run as one
        // (Conv2dImpl::forward_upsampled2x, four 2x2 convolutions on the small input).
        if (op.factor == 2 && x.device().is_cpu() && i + 1 < ops_.size() && ops_[i + 1].kind == Kind::Conv) {
          x = ops_[i + 1].conv->forward_upsampled2x(x);
          ++i;
        } else {
          x = sd::nn::upsample_nearest(x, {x.size(2) * op.factor, x.size(3) * op.factor});
        }
        break;
    }
  }
  return x;
}

TinyEncoderImpl::TinyEncoderImpl(const AutoencoderTinyConfig& c) {
  layers = register_module("layers", TinyLayers());
  const auto& ch = c.encoder_block_out_channels;
  for (size_t i = 0; i < c.num_encoder_blocks.size(); ++i) {
    if (i == 0)
      layers->add_conv(c.in_channels, ch[0], 1, true);  // [B, c, H, W]
    else
      layers->add_conv(ch[i], ch[i], 2, false);  // halves H, W (ceil)
    for (int b = 0; b < c.num_encoder_blocks[i]; ++b) layers->add_block(ch[i], ch[i]);
  }
  layers->add_conv(ch.back(), c.latent_channels, 1, true);  // [B, latent, H/8, W/8]
}

torch::Tensor TinyEncoderImpl::forward(const torch::Tensor& x01) { return layers(x01); }

TinyDecoderImpl::TinyDecoderImpl(const AutoencoderTinyConfig& c) {
  layers = register_module("layers", TinyLayers());
  const auto& ch = c.decoder_block_out_channels;
  layers->add_conv(c.latent_channels, ch[0], 1, true);
  layers->add_relu();
  const size_t n = c.num_decoder_blocks.size();
  for (size_t i = 0; i < n; ++i) {
    const bool last = i + 1 == n;
    for (int b = 0; b < c.num_decoder_blocks[i]; ++b) layers->add_block(ch[i], ch[i]);
    if (!last) layers->add_upsample(c.upsampling_scaling_factor);
    // Inner convs are bias-free; only the output conv has a bias.
    layers->add_conv(ch[i], last ? c.out_channels : ch[i], 1, /*bias=*/last);
  }
}

torch::Tensor TinyDecoderImpl::forward(const torch::Tensor& z) { return layers(z); }

// ---------------------------------------------------------------------------------------------------------------
// AutoencoderTiny

AutoencoderTinyImpl::AutoencoderTinyImpl(AutoencoderTinyConfig c) : config_(std::move(c)) {
  config_.validate("AutoencoderTiny");
  encoder = register_module("encoder", TinyEncoder(config_));
  decoder = register_module("decoder", TinyDecoder(config_));
}

torch::ScalarType AutoencoderTinyImpl::dtype() const { return encoder->parameters().front().scalar_type(); }
torch::Device AutoencoderTinyImpl::device() const { return encoder->parameters().front().device(); }

void AutoencoderTinyImpl::check_input(const torch::Tensor& t, int64_t channels, const char* what) const {
  if (!t.defined()) throw InvalidArgument(std::string("AutoencoderTiny::") + what + ": undefined tensor");
  if (t.dim() != 4 || t.size(1) != channels || t.size(2) == 0 || t.size(3) == 0) {
    std::ostringstream o;
    o << "AutoencoderTiny::" << what << ": expected a [B, " << channels << ", H, W] tensor, got " << t.sizes();
    throw InvalidArgument(o.str());
  }
  if (t.scalar_type() != dtype() || t.device() != device()) {
    std::ostringstream o;
    o << "AutoencoderTiny::" << what << ": input is " << t.scalar_type() << " on " << t.device()
      << " but the model is " << dtype() << " on " << device();
    throw InvalidArgument(o.str());
  }
}

void AutoencoderTinyImpl::set_channels_last(bool on) {
  torch::NoGradGuard ng;
  const auto fmt = on ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  for (auto& p : parameters())
    if (p.dim() == 4) p.set_data(p.contiguous(fmt));
  channels_last_ = on;
}

bool AutoencoderTinyImpl::channels_last() const {
  return sd::nn::autoencoder_channels_last(channels_last_, dtype(), device().is_cpu());
}

torch::Tensor AutoencoderTinyImpl::to_layout(const torch::Tensor& t) const {
  // t has the model's dtype and device (check_input), so this is channels_last()'s answer
  const bool cl = sd::nn::autoencoder_channels_last(channels_last_, t.scalar_type(), t.is_cpu());
  return t.contiguous(cl ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous);
}

torch::Tensor AutoencoderTinyImpl::encode(const torch::Tensor& x) {
  check_input(x, config_.in_channels, "encode");
  // TAESD works on [0, 1] images; diffusers' wrapper maps the [-1, 1] convention first.
  return encoder(to_layout(x).add(1).div(2)).contiguous();
}

torch::Tensor AutoencoderTinyImpl::decode(const torch::Tensor& z) {
  check_input(z, config_.latent_channels, "decode");
  // Soft clamp to (-3, 3) (madebyollin's Clamp layer), then back from [0, 1] to [-1, 1]; the output is not clamped.
  auto x = decoder(torch::tanh(to_layout(z) / 3) * 3);
  return x.mul_(2).sub_(1).contiguous();
}

torch::Tensor AutoencoderTinyImpl::scale_latents(const torch::Tensor& z) const {
  return z.div(2 * config_.latent_magnitude).add(config_.latent_shift).clamp(0, 1);
}

torch::Tensor AutoencoderTinyImpl::unscale_latents(const torch::Tensor& v) const {
  return v.sub(config_.latent_shift).mul(2 * config_.latent_magnitude);
}

// ---------------------------------------------------------------------------------------------------------------
// Loading

AutoencoderTinyConfig infer_autoencoder_tiny_config(const std::map<std::string, torch::Tensor>& state,
                                                    const std::string& source) {
  // Per half: the layers that hold parameters, in Sequential order, as (is_block, tensor that gives the widths).
  struct Layer {
    bool block;
    torch::Tensor weight;  // conv weight [out, in, k, k] (a Block's conv.0 weight)
  };
  auto collect = [&](const std::string& prefix) {
    std::map<long, Layer> layers;
    for (const auto& [key, t] : state) {
      if (key.rfind(prefix, 0) != 0) continue;
      const std::string rest = key.substr(prefix.size());
      const size_t dot = rest.find('.');
      long idx = -1;
      try {
        idx = std::stol(rest.substr(0, dot));
      } catch (const std::exception&) {
        throw FormatError(source, "key '" + key + "' has no layer index after '" + prefix + "'");
      }
      const std::string param = dot == std::string::npos ? "" : rest.substr(dot + 1);
      if (param == "weight") {
        layers[idx] = Layer{false, t};
      } else if (param == "conv.0.weight") {
        layers[idx] = Layer{true, t};
      }
    }
    std::vector<Layer> out;
    for (auto& kv : layers) {
      if (kv.second.weight.dim() != 4)
        throw FormatError(source, prefix + std::to_string(kv.first) + ": expected a 4-D convolution weight");
      out.push_back(kv.second);
    }
    return out;
  };
  const auto enc = collect("encoder.layers.");
  const auto dec = collect("decoder.layers.");
  if (enc.empty() || dec.empty())
    throw FormatError(source, "not a TAESD checkpoint: no 'encoder.layers.*' or no 'decoder.layers.*' weights");

  // Both halves are conv, (Blocks..., conv)+ ; the blocks between consecutive convs form one resolution level.
  auto levels = [&](const std::vector<Layer>& ls, const char* half, std::vector<int>& blocks,
                    std::vector<int>& widths) {
    if (ls.front().block || ls.back().block)
      throw FormatError(source, std::string("TAESD ") + half + " must start and end with a plain convolution");
    int count = 0;
    for (size_t i = 1; i < ls.size(); ++i) {
      if (ls[i].block) {
        ++count;
        continue;
      }
      blocks.push_back(count);
      count = 0;
      // The width of a level is the input width of the conv that closes it.
      widths.push_back(static_cast<int>(ls[i].weight.size(1)));
    }
  };
  AutoencoderTinyConfig c;
  c.encoder_block_out_channels.clear();
  c.decoder_block_out_channels.clear();
  c.num_encoder_blocks.clear();
  c.num_decoder_blocks.clear();
  levels(enc, "encoder", c.num_encoder_blocks, c.encoder_block_out_channels);
  levels(dec, "decoder", c.num_decoder_blocks, c.decoder_block_out_channels);
  c.in_channels = enc.front().weight.size(1);
  c.latent_channels = enc.back().weight.size(0);
  c.out_channels = dec.back().weight.size(0);
  const int64_t dec_latent = dec.front().weight.size(1);
  if (dec_latent != c.latent_channels)
    throw FormatError(source, "TAESD encoder produces " + std::to_string(c.latent_channels) +
                                  " latent channels but the decoder expects " + std::to_string(dec_latent));
  c.validate(source);
  return c;
}

AutoencoderTiny load_taesd_original(const std::string& encoder_file, const std::string& decoder_file,
                                    torch::ScalarType dtype, torch::Device device) {
  for (const auto& f : {encoder_file, decoder_file}) {
    if (is_pickle_name(f)) refuse_pickle(f);
    if (!is_file(f)) throw FormatError(f, "TAESD weight file not found");
  }
  const auto enc = SafeTensorsFile::open(encoder_file);
  const auto dec = SafeTensorsFile::open(decoder_file);
  const auto state =
      convert::taesd_original_to_diffusers(enc.load_all(), encoder_file, dec.load_all(), decoder_file);
  const std::string source = encoder_file + " + " + decoder_file;
  return build_and_load(infer_autoencoder_tiny_config(state, source), state, source, dtype, device);
}

AutoencoderTiny load_taesd(const std::string& path, torch::ScalarType dtype, torch::Device device,
                           const std::string& variant) {
  if (is_directory(path)) {
    const std::string config = (fs::path(path) / "config.json").string();
    if (is_file(config)) {
      const auto cfg = AutoencoderTinyConfig::from_json(read_json_file(config), config);
      const std::string weights = find_weights(path, variant);  // refuses pickles with a conversion hint
      const auto file = SafeTensorsFile::open(weights);
      return build_and_load(cfg, file.load_all(), weights, dtype, device);
    }
    // madebyollin's layout: taesd_encoder.* + taesd_decoder.* (also taesdxl_*, taesd3_*, ...).
    std::string enc, dec, pickle;
    for (const auto& e : fs::directory_iterator(path)) {
      const std::string name = e.path().filename().string();
      if (!e.is_regular_file()) continue;
      if (ends_with(name, "_encoder.safetensors")) {
        if (!enc.empty()) throw FormatError(path, "several *_encoder.safetensors files; pass one explicitly");
        enc = e.path().string();
      } else if (ends_with(name, "_decoder.safetensors")) {
        if (!dec.empty()) throw FormatError(path, "several *_decoder.safetensors files; pass one explicitly");
        dec = e.path().string();
      } else if (is_pickle_name(name) &&
                 (name.find("_encoder.") != std::string::npos || name.find("_decoder.") != std::string::npos)) {
        pickle = e.path().string();
      }
    }
    if (!enc.empty() && !dec.empty()) return load_taesd_original(enc, dec, dtype, device);
    if (!pickle.empty()) refuse_pickle(pickle);
    throw FormatError(path, "not a TAESD folder: expected config.json + diffusion_pytorch_model.safetensors "
                            "(diffusers AutoencoderTiny) or taesd_encoder.safetensors + taesd_decoder.safetensors "
                            "(madebyollin/taesd)" +
                                std::string(enc.empty() != dec.empty()
                                                ? (enc.empty() ? "; the encoder file is missing"
                                                               : "; the decoder file is missing")
                                                : ""));
  }
  if (is_pickle_name(path)) refuse_pickle(path);
  if (!is_file(path)) throw FormatError(path, "no such file or folder (expected a TAESD folder or weight file)");
  // One file of the original pair: find the other half beside it by name.
  const fs::path p(path);
  const std::string name = p.filename().string();
  const size_t e = name.rfind("encoder"), d = name.rfind("decoder");
  if (!ends_with(name, ".safetensors") || (e == std::string::npos && d == std::string::npos))
    throw FormatError(path, "expected a TAESD folder, or one of madebyollin's taesd_encoder.safetensors / "
                            "taesd_decoder.safetensors (the other is looked up beside it)");
  const bool is_enc = e != std::string::npos && (d == std::string::npos || e > d);
  std::string other = name;
  other.replace(is_enc ? e : d, 7, is_enc ? "decoder" : "encoder");
  const std::string other_path = (p.parent_path() / other).string();
  if (!is_file(other_path))
    throw FormatError(path, std::string("the matching ") + (is_enc ? "decoder" : "encoder") + " file '" +
                                other_path + "' was not found");
  return is_enc ? load_taesd_original(path, other_path, dtype, device)
                : load_taesd_original(other_path, path, dtype, device);
}

}  // namespace sd
