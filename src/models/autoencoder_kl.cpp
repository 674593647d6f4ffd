#include "models/autoencoder_kl.h"

#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
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

// diffusers builds every AutoencoderKL norm (ResNets, mid-block attention, conv_norm_out) with eps 1e-6, whatever
// the config says.
constexpr double kVaeNormEps = 1e-6;

std::string list_str(const std::vector<int>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Config

AutoencoderKLConfig AutoencoderKLConfig::from_json(const nlohmann::json& j, const std::string& file) {
  ConfigReader r(j, file);
  if (auto cls = r.get_optional_string("_class_name"); cls && *cls != "AutoencoderKL")
    throw FormatError(file, "field '_class_name' is \"" + *cls + "\": expected an AutoencoderKL config");
  AutoencoderKLConfig c;
  c.in_channels = r.get_int64("in_channels", c.in_channels);
  c.out_channels = r.get_int64("out_channels", c.out_channels);
  c.down_block_types = r.get_string_list("down_block_types", c.down_block_types);
  c.up_block_types = r.get_string_list("up_block_types", c.up_block_types);
  c.block_out_channels = r.get_int_list("block_out_channels", c.block_out_channels);
  c.layers_per_block = r.get_int64("layers_per_block", c.layers_per_block);
  c.act_fn = r.get_string("act_fn", c.act_fn);
  c.latent_channels = r.get_int64("latent_channels", c.latent_channels);
  c.norm_num_groups = r.get_int64("norm_num_groups", c.norm_num_groups);
  // sample_size is only used by diffusers' tiling; a [H, W] list is accepted (its first entry is kept).
  if (j.is_object() && j.contains("sample_size") && j["sample_size"].is_array()) {
    const auto& s = j["sample_size"];
    if (s.empty() || !s[0].is_number_integer()) r.fail("sample_size", "an integer or a list of integers");
    c.sample_size = s[0].get<int64_t>();
    r.ignore("sample_size");
  } else {
    c.sample_size = r.get_int64("sample_size", c.sample_size);
  }
  c.scaling_factor = r.get_double("scaling_factor", c.scaling_factor);
  c.force_upcast = r.get_bool("force_upcast", c.force_upcast);
  c.use_quant_conv = r.get_bool("use_quant_conv", c.use_quant_conv);
  c.use_post_quant_conv = r.get_bool("use_post_quant_conv", c.use_post_quant_conv);
  c.mid_block_add_attention = r.get_bool("mid_block_add_attention", c.mid_block_add_attention);
  // Latent normalisations of later models (SDXL statistics, SD3/Flux shift) change what callers must do with the
  // latents; only the plain scaling_factor convention is implemented.
  for (const char* k : {"shift_factor", "latents_mean", "latents_std"}) r.require_unsupported_absent(k);

  for (const auto& t : c.down_block_types)
    if (t != "DownEncoderBlock2D")
      throw FormatError(file, "field 'down_block_types': block type '" + t +
                                  "' is not supported (only DownEncoderBlock2D)");
  for (const auto& t : c.up_block_types)
    if (t != "UpDecoderBlock2D")
      throw FormatError(file, "field 'up_block_types': block type '" + t +
                                  "' is not supported (only UpDecoderBlock2D)");
  if (c.act_fn != "silu" && c.act_fn != "swish")
    throw FormatError(file, "field 'act_fn' = \"" + c.act_fn + "\" is not supported (only silu)");
  r.log_unknown();
  c.validate(file);
  return c;
}

void AutoencoderKLConfig::validate(const std::string& source) const {
  auto fail = [&](const std::string& what) { throw FormatError(source, "AutoencoderKL config: " + what); };
  using namespace config_limits;
  if (in_channels <= 0 || out_channels <= 0 || latent_channels <= 0 || in_channels > kMaxChannels ||
      out_channels > kMaxChannels || latent_channels > kMaxChannels)
    fail("in_channels, out_channels and latent_channels must be positive, at most " + std::to_string(kMaxChannels));
  if (block_out_channels.empty()) fail("block_out_channels is empty");
  // Each block but the last halves the size: spatial_factor() = 2^(blocks - 1) must stay a sane int64.
  if (block_out_channels.size() > 16)
    fail("block_out_channels has " + std::to_string(block_out_channels.size()) + " entries, at most 16 are supported");
  if (down_block_types.size() != block_out_channels.size())
    fail("down_block_types has " + std::to_string(down_block_types.size()) + " entries but block_out_channels " +
         list_str(block_out_channels) + " has " + std::to_string(block_out_channels.size()));
  if (up_block_types.size() != block_out_channels.size())
    fail("up_block_types has " + std::to_string(up_block_types.size()) + " entries but block_out_channels " +
         list_str(block_out_channels) + " has " + std::to_string(block_out_channels.size()));
  for (const auto& t : down_block_types)
    if (t != "DownEncoderBlock2D") fail("down_block_types: '" + t + "' is not supported (only DownEncoderBlock2D)");
  for (const auto& t : up_block_types)
    if (t != "UpDecoderBlock2D") fail("up_block_types: '" + t + "' is not supported (only UpDecoderBlock2D)");
  if (act_fn != "silu" && act_fn != "swish") fail("act_fn '" + act_fn + "' is not supported (only silu)");
  if (layers_per_block < 1 || layers_per_block > kMaxLayers)
    fail("layers_per_block " + std::to_string(layers_per_block) + " must be in [1, " + std::to_string(kMaxLayers) +
         "]");
  if (norm_num_groups < 1) fail("norm_num_groups must be >= 1");
  for (int ch : block_out_channels)
    if (ch <= 0 || ch % norm_num_groups != 0 || ch > kMaxChannels)
      fail("block_out_channels " + list_str(block_out_channels) + " must be positive multiples of norm_num_groups " +
           std::to_string(norm_num_groups) + ", at most " + std::to_string(kMaxChannels));
}

int64_t AutoencoderKLConfig::spatial_factor() const {
  return int64_t{1} << (static_cast<int64_t>(block_out_channels.size()) - 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks

VAEDownBlockImpl::VAEDownBlockImpl(int64_t in, int64_t out, int64_t layers, bool add_downsample, int64_t groups,
                                   double eps) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < layers; ++i) {
    resnet_list.push_back(ResnetBlock2D(i == 0 ? in : out, out, /*temb_channels=*/0, groups, eps));
    resnets->push_back(resnet_list.back());
  }
  if (add_downsample) {
    downsamplers = register_module("downsamplers", torch::nn::ModuleList());
    downsample = Downsample2D(out, out, /*padding=*/0);
    downsamplers->push_back(downsample);
  }
}

torch::Tensor VAEDownBlockImpl::forward(torch::Tensor x) {
  for (auto& r : resnet_list) x = r(x);
  if (downsample) x = downsample(x);
  return x;
}

VAEUpBlockImpl::VAEUpBlockImpl(int64_t in, int64_t out, int64_t layers, bool add_upsample, int64_t groups,
                               double eps) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < layers; ++i) {
    resnet_list.push_back(ResnetBlock2D(i == 0 ? in : out, out, /*temb_channels=*/0, groups, eps));
    resnets->push_back(resnet_list.back());
  }
  if (add_upsample) {
    upsamplers = register_module("upsamplers", torch::nn::ModuleList());
    upsample = Upsample2D(out, out, /*phases=*/true);
    upsamplers->push_back(upsample);
  }
}

torch::Tensor VAEUpBlockImpl::forward(torch::Tensor x) {
  for (auto& r : resnet_list) x = r(x);
  if (upsample) x = upsample(x);
  return x;
}

VAEMidBlockImpl::VAEMidBlockImpl(int64_t channels, int64_t groups, double eps, bool add_attention) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  resnet0 = ResnetBlock2D(channels, channels, 0, groups, eps);
  resnet1 = ResnetBlock2D(channels, channels, 0, groups, eps);
  resnets->push_back(resnet0);
  resnets->push_back(resnet1);
  if (add_attention) {
    // diffusers: heads = channels / attention_head_dim with attention_head_dim = channels, i.e. one head.
    AttentionOptions o;
    o.query_dim = channels;
    o.heads = 1;
    o.dim_head = channels;
    o.bias = true;
    o.upcast_softmax = true;
    o.norm_num_groups = groups;
    o.norm_eps = eps;
    o.residual_connection = true;
    o.rescale_output_factor = 1.0;
    attentions = register_module("attentions", torch::nn::ModuleList());
    attention = Attention(o);
    attentions->push_back(attention);
  }
}

torch::Tensor VAEMidBlockImpl::forward(torch::Tensor x) {
  x = resnet0(x);
  if (attention) x = attention(x);
  return resnet1(x);
}

VAEEncoderImpl::VAEEncoderImpl(const AutoencoderKLConfig& c) {
  const auto& ch = c.block_out_channels;
  const int64_t g = c.norm_num_groups;
  conv_in = register_module("conv_in", sd::nn::Conv2d(c.in_channels, ch[0], 3, 1, 1));
  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t out = ch[0];
  for (size_t i = 0; i < ch.size(); ++i) {
    const int64_t in = out;
    out = ch[i];
    down_list.push_back(VAEDownBlock(in, out, c.layers_per_block, i + 1 < ch.size(), g, kVaeNormEps));
    down_blocks->push_back(down_list.back());
  }
  mid_block = register_module("mid_block", VAEMidBlock(ch.back(), g, kVaeNormEps, c.mid_block_add_attention));
  conv_norm_out = register_module("conv_norm_out", sd::nn::GroupNorm(g, ch.back(), kVaeNormEps));
  conv_out = register_module("conv_out", sd::nn::Conv2d(ch.back(), 2 * c.latent_channels, 3, 1, 1));
}

torch::Tensor VAEEncoderImpl::forward(const torch::Tensor& x) {
  auto h = conv_in(x);  // [B, c0, H, W]
  for (auto& b : down_list) h = b(h);
  h = mid_block(h);  // [B, c_last, H/8, W/8]
  return conv_out(torch::silu(conv_norm_out(h)));
}

VAEDecoderImpl::VAEDecoderImpl(const AutoencoderKLConfig& c) {
  const auto& ch = c.block_out_channels;
  const int64_t g = c.norm_num_groups;
  conv_in = register_module("conv_in", sd::nn::Conv2d(c.latent_channels, ch.back(), 3, 1, 1));
  mid_block = register_module("mid_block", VAEMidBlock(ch.back(), g, kVaeNormEps, c.mid_block_add_attention));
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  int64_t out = ch.back();
  for (size_t i = 0; i < ch.size(); ++i) {
    const int64_t prev = out;
    out = ch[ch.size() - 1 - i];
    up_list.push_back(VAEUpBlock(prev, out, c.layers_per_block + 1, i + 1 < ch.size(), g, kVaeNormEps));
    up_blocks->push_back(up_list.back());
  }
  conv_norm_out = register_module("conv_norm_out", sd::nn::GroupNorm(g, ch[0], kVaeNormEps));
  conv_out = register_module("conv_out", sd::nn::Conv2d(ch[0], c.out_channels, 3, 1, 1));
}

torch::Tensor VAEDecoderImpl::forward(const torch::Tensor& z) {
  auto h = mid_block(conv_in(z));  // [B, c_last, h, w]
  for (auto& b : up_list) h = b(h);
  return conv_out(torch::silu(conv_norm_out(h)));  // [B, out, 8h, 8w]
}

// ---------------------------------------------------------------------------------------------------------------
// AutoencoderKL

torch::Tensor DiagonalGaussian::std() const { return torch::exp(0.5 * logvar); }

torch::Tensor DiagonalGaussian::sample(const torch::Tensor& noise) const {
  return AutoencoderKLImpl::sample(mean, logvar, noise);
}

AutoencoderKLImpl::AutoencoderKLImpl(AutoencoderKLConfig c) : config_(std::move(c)) {
  config_.validate("AutoencoderKL");
  encoder = register_module("encoder", VAEEncoder(config_));
  decoder = register_module("decoder", VAEDecoder(config_));
  const int64_t l = config_.latent_channels;
  if (config_.use_quant_conv) quant_conv = register_module("quant_conv", sd::nn::Conv2d(2 * l, 2 * l, 1));
  if (config_.use_post_quant_conv) post_quant_conv = register_module("post_quant_conv", sd::nn::Conv2d(l, l, 1));
}

torch::ScalarType AutoencoderKLImpl::dtype() const { return encoder->conv_in->weight.scalar_type(); }
torch::Device AutoencoderKLImpl::device() const { return encoder->conv_in->weight.device(); }

void AutoencoderKLImpl::check_input(const torch::Tensor& t, int64_t channels, const char* what) const {
  if (!t.defined()) throw InvalidArgument(std::string("AutoencoderKL::") + what + ": undefined tensor");
  if (t.dim() != 4 || t.size(1) != channels || t.size(2) == 0 || t.size(3) == 0) {
    std::ostringstream o;
    o << "AutoencoderKL::" << what << ": expected a [B, " << channels << ", H, W] tensor, got " << t.sizes();
    throw InvalidArgument(o.str());
  }
  if (t.scalar_type() != dtype() || t.device() != device()) {
    std::ostringstream o;
    o << "AutoencoderKL::" << what << ": input is " << t.scalar_type() << " on " << t.device()
      << " but the model is " << dtype() << " on " << device();
    throw InvalidArgument(o.str());
  }
}

void AutoencoderKLImpl::set_channels_last(bool on) {
  torch::NoGradGuard ng;
  const auto fmt = on ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  for (auto& p : parameters())
    if (p.dim() == 4) p.set_data(p.contiguous(fmt));
  channels_last_ = on;
}

bool AutoencoderKLImpl::channels_last() const {
  return sd::nn::autoencoder_channels_last(channels_last_, dtype(), device().is_cpu());
}

torch::Tensor AutoencoderKLImpl::to_layout(const torch::Tensor& t) const {
  // t has the model's dtype and device (check_input), so this is channels_last()'s answer
  const bool cl = sd::nn::autoencoder_channels_last(channels_last_, t.scalar_type(), t.is_cpu());
  return t.contiguous(cl ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous);
}

DiagonalGaussian AutoencoderKLImpl::encode(const torch::Tensor& x) {
  check_input(x, config_.in_channels, "encode");
  const int64_t f = config_.spatial_factor();
  if (x.size(2) < f || x.size(3) < f) {
    std::ostringstream o;
    o << "AutoencoderKL::encode: image " << x.size(2) << "x" << x.size(3) << " is smaller than the VAE's factor "
      << f;
    throw InvalidArgument(o.str());
  }
  auto moments = encoder(to_layout(x));  // [B, 2*latent, h, w]
  if (quant_conv) moments = quant_conv(moments);
  auto parts = moments.contiguous().chunk(2, 1);
  DiagonalGaussian d;
  d.mean = parts[0].contiguous();
  d.logvar = torch::clamp(parts[1], -30.0, 20.0);
  return d;
}

torch::Tensor AutoencoderKLImpl::sample(const torch::Tensor& mean, const torch::Tensor& logvar,
                                        const torch::Tensor& noise) {
  if (!mean.sizes().equals(logvar.sizes()) || !mean.sizes().equals(noise.sizes())) {
    std::ostringstream o;
    o << "AutoencoderKL::sample: mean " << mean.sizes() << ", logvar " << logvar.sizes() << " and noise "
      << noise.sizes() << " must have the same shape";
    throw InvalidArgument(o.str());
  }
  return mean + torch::exp(0.5 * logvar) * noise.to(mean.device(), mean.scalar_type());
}

torch::Tensor AutoencoderKLImpl::decode(const torch::Tensor& z) {
  check_input(z, config_.latent_channels, "decode");
  auto h = to_layout(z);
  if (post_quant_conv) h = post_quant_conv(h);
  return decoder(h).contiguous();
}

// ---------------------------------------------------------------------------------------------------------------
// Loading

AutoencoderKL load_vae(const std::string& dir, torch::ScalarType dtype, torch::Device device,
                       const std::string& variant) {
  if (!is_directory(dir)) throw FormatError(dir, "not a directory (expected a diffusers AutoencoderKL folder)");
  std::string folder = dir;
  if (!is_file((fs::path(dir) / "config.json").string()) && is_file((fs::path(dir) / "vae" / "config.json").string()))
    folder = (fs::path(dir) / "vae").string();  // a pipeline folder
  const std::string config = (fs::path(folder) / "config.json").string();
  if (!is_file(config)) throw FormatError(folder, "no config.json (expected a diffusers AutoencoderKL folder)");
  const auto cfg = AutoencoderKLConfig::from_json(read_json_file(config), config);
  const std::string weights = find_weights(folder, variant);  // refuses pickles with a conversion hint
  const auto file = SafeTensorsFile::open(weights);
  return load_vae(cfg, file.load_all(), file.path(), dtype, device);
}

AutoencoderKL load_vae(const AutoencoderKLConfig& cfg, const std::map<std::string, torch::Tensor>& weights,
                       const std::string& source, torch::ScalarType dtype, torch::Device device) {
  // Every AutoencoderKL load passes here (folder, --vae file, single file), so VAEs saved before diffusers ~0.14 load
  // under their old attention names wherever they come from.
  auto current = weights;
  convert::vae_deprecated_attention_to_current(current, source);
  auto vae = load_module<AutoencoderKL>(cfg, current, source, dtype, device);
  // NCHW on CUDA (measured faster there than channels-last); the CPU picks by dtype at each call
  // (models/conv_layout.h).
  return vae;
}

}  // namespace sd
