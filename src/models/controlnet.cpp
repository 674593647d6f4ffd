#include "models/controlnet.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/layers.h"

namespace sd {

ControlNetConfig ControlNetConfig::from_json(const nlohmann::json& j, const std::string& file) {
  if (!j.is_object()) throw FormatError(file, "expected a JSON object");
  ControlNetConfig c;
  nlohmann::json rest = j;
  {
    // The ControlNet-only fields, read here and removed before the UNet reader sees the rest.
    const nlohmann::json own = nlohmann::json::object(
        {{"conditioning_channels", j.value("conditioning_channels", nlohmann::json())},
         {"conditioning_embedding_out_channels", j.value("conditioning_embedding_out_channels", nlohmann::json())},
         {"controlnet_conditioning_channel_order", j.value("controlnet_conditioning_channel_order", nlohmann::json())},
         {"global_pool_conditions", j.value("global_pool_conditions", nlohmann::json())}});
    ConfigReader r(own, file);
    c.conditioning_channels = r.get_int64("conditioning_channels", c.conditioning_channels);
    const auto outs = r.get_int_list("conditioning_embedding_out_channels", {16, 32, 96, 256});
    c.conditioning_embedding_out_channels.assign(outs.begin(), outs.end());
    const std::string order = r.get_string("controlnet_conditioning_channel_order", "rgb");
    if (order != "rgb" && order != "bgr") r.fail("controlnet_conditioning_channel_order", "\"rgb\" or \"bgr\"");
    c.bgr = order == "bgr";
    c.global_pool_conditions = r.get_bool("global_pool_conditions", false);
    for (const char* k : {"conditioning_channels", "conditioning_embedding_out_channels",
                          "controlnet_conditioning_channel_order", "global_pool_conditions"})
      rest.erase(k);
  }
  if (c.conditioning_channels <= 0) throw FormatError(file, "field 'conditioning_channels' must be positive");
  if (c.conditioning_embedding_out_channels.empty())
    throw FormatError(file, "field 'conditioning_embedding_out_channels' must be a non-empty list");
  for (int64_t ch : c.conditioning_embedding_out_channels)
    if (ch <= 0) throw FormatError(file, "field 'conditioning_embedding_out_channels' must hold positive integers");
  // A ControlNet has no decoder: give the UNet reader an up path that mirrors the down path so its checks hold.
  if (rest.contains("down_block_types") && rest["down_block_types"].is_array()) {
    nlohmann::json up = nlohmann::json::array();
    const auto& down = rest["down_block_types"];
    for (auto it = down.rbegin(); it != down.rend(); ++it)
      up.push_back(it->is_string() && it->get<std::string>() == "CrossAttnDownBlock2D" ? "CrossAttnUpBlock2D"
                                                                                        : "UpBlock2D");
    rest["up_block_types"] = up;
  }
  c.unet = UNet2DConditionConfig::from_json(rest, file);
  if (c.unet.mid_block_type.empty()) throw FormatError(file, "a ControlNet needs a mid block (mid_block_type null)");
  return c;
}

ControlNetConditioningEmbeddingImpl::ControlNetConditioningEmbeddingImpl(int64_t embedding_channels,
                                                                         int64_t conditioning_channels,
                                                                         const std::vector<int64_t>& ch) {
  conv_in = register_module("conv_in", sd::nn::Conv2d(conditioning_channels, ch[0], 3, 1, 1));
  auto blocks = register_module("blocks", torch::nn::ModuleList());
  for (size_t i = 0; i + 1 < ch.size(); ++i) {
    block_list.push_back(sd::nn::Conv2d(ch[i], ch[i], 3, 1, 1));
    blocks->push_back(block_list.back());
    block_list.push_back(sd::nn::Conv2d(ch[i], ch[i + 1], 3, 2, 1));
    blocks->push_back(block_list.back());
  }
  conv_out = register_module("conv_out", sd::nn::Conv2d(ch.back(), embedding_channels, 3, 1, 1));
}

torch::Tensor ControlNetConditioningEmbeddingImpl::forward(const torch::Tensor& cond) {
  auto x = torch::silu(conv_in(cond));
  for (auto& b : block_list) x = torch::silu(b(x));
  return conv_out(x);
}

ControlNetModelImpl::ControlNetModelImpl(const ControlNetConfig& config) : config_(config) {
  const auto& c = config_.unet;
  c.validate("ControlNetConfig");
  const auto& ch = c.block_out_channels;
  const int64_t n = static_cast<int64_t>(ch.size());
  const int64_t temb = c.time_embed_dim();

  conv_in = register_module("conv_in",
                            sd::nn::Conv2d(c.in_channels, ch[0], c.conv_in_kernel, 1, (c.conv_in_kernel - 1) / 2));
  time_embedding = register_module("time_embedding", TimestepEmbedding(ch[0], temb, c.time_cond_proj_dim));
  if (c.text_time())
    add_embedding = register_module("add_embedding", TimestepEmbedding(c.projection_class_embeddings_input_dim, temb));
  controlnet_cond_embedding = register_module(
      "controlnet_cond_embedding",
      ControlNetConditioningEmbedding(ch[0], config_.conditioning_channels, config_.conditioning_embedding_out_channels));

  // The zero convs, one per UNet skip tensor, in the order the skips are produced.
  auto zero_convs = register_module("controlnet_down_blocks", torch::nn::ModuleList());
  auto add_zero_conv = [&](int64_t channels) {
    controlnet_down_list.push_back(sd::nn::Conv2d(channels, channels, 1));
    zero_convs->push_back(controlnet_down_list.back());
  };
  add_zero_conv(ch[0]);  // conv_in output

  auto down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t out_ch = ch[0];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t in_ch = out_ch;
    out_ch = ch[i];
    const bool last = i == n - 1;
    down_list.emplace_back(in_ch, out_ch, c.layers_per_block[i], /*add_downsample=*/!last, c.downsample_padding,
                           unet_down_block_options(c, i));
    down_blocks->push_back(down_list.back());
    for (int64_t l = 0; l < c.layers_per_block[i]; ++l) add_zero_conv(out_ch);
    if (!last) add_zero_conv(out_ch);
  }

  mid_block = register_module("mid_block", UNetMidBlock2DCrossAttn(ch.back(), 1, unet_mid_block_options(c)));
  controlnet_mid_block = register_module("controlnet_mid_block", sd::nn::Conv2d(ch.back(), ch.back(), 1));
}

ControlResiduals ControlNetModelImpl::forward(const torch::Tensor& sample, const torch::Tensor& timesteps,
                                              const torch::Tensor& encoder_hidden_states,
                                              const torch::Tensor& controlnet_cond, double conditioning_scale,
                                              const torch::Tensor& text_embeds, const torch::Tensor& time_ids) {
  const auto& c = config_.unet;
  check_unet_inputs(c, sample, encoder_hidden_states, "ControlNet");
  const int64_t b = sample.size(0), s = config_.cond_downscale();
  if (!controlnet_cond.defined() || controlnet_cond.dim() != 4 || controlnet_cond.size(0) != b ||
      controlnet_cond.size(1) != config_.conditioning_channels || controlnet_cond.size(2) != sample.size(2) * s ||
      controlnet_cond.size(3) != sample.size(3) * s)
    throw InvalidArgument("ControlNet: controlnet_cond must be [" + std::to_string(b) + ", " +
                          std::to_string(config_.conditioning_channels) + ", " + std::to_string(sample.size(2) * s) +
                          ", " + std::to_string(sample.size(3) * s) + "] (the control image at the output size), got " +
                          (controlnet_cond.defined() ? shape_str(controlnet_cond.sizes()) : std::string("none")));
  auto x = c.center_input_sample ? sample * 2.0 - 1.0 : sample;
  const auto emb = unet_conditioning_embedding(c, time_embedding, add_embedding, x, timesteps, {}, text_embeds,
                                               time_ids, "ControlNet");
  torch::Tensor cond = controlnet_cond.to(x.scalar_type());
  if (config_.bgr) cond = cond.flip({1});
  x = conv_in(x) + controlnet_cond_embedding(cond);  // [B, c0, h, w]
  std::vector<torch::Tensor> skips{x};
  for (auto& blk : down_list) x = blk(x, emb, encoder_hidden_states, skips);
  x = mid_block(x, emb, encoder_hidden_states);

  ControlResiduals out;
  out.down.reserve(skips.size());
  for (size_t k = 0; k < skips.size(); ++k) out.down.push_back(controlnet_down_list[k](skips[k]) * conditioning_scale);
  out.mid = controlnet_mid_block(x) * conditioning_scale;
  if (config_.global_pool_conditions) {
    for (auto& d : out.down) d = d.mean({2, 3}, /*keepdim=*/true);
    out.mid = out.mid.mean({2, 3}, true);
  }
  return out;
}

ControlResiduals& ControlResiduals::operator+=(const ControlResiduals& other) {
  if (!other.defined()) return *this;
  if (!defined()) return *this = other;
  if (down.size() != other.down.size())
    throw InvalidArgument("ControlNet residuals: " + std::to_string(down.size()) + " vs " +
                          std::to_string(other.down.size()) + " down residuals (ControlNets of different UNets)");
  for (size_t k = 0; k < down.size(); ++k) down[k] = down[k] + other.down[k];
  mid = mid + other.mid;
  return *this;
}

ControlNetModel load_controlnet_model(const std::string& path, torch::Dtype dtype, torch::Device device,
                                      const std::string& variant) {
  const std::string config_path = path + "/config.json";
  const auto config = ControlNetConfig::from_json(read_json_file(config_path), config_path);
  auto file = SafeTensorsFile::open(find_weights(path, variant));
  return load_controlnet_model(config, file.load_all(), file.path(), dtype, device);
}

ControlNetModel load_controlnet_model(const ControlNetConfig& config,
                                      const std::map<std::string, torch::Tensor>& weights, const std::string& source,
                                      torch::Dtype dtype, torch::Device device) {
  // Prepacked like the UNet whose encoder it copies (load_unet says why).
  auto model = load_module<ControlNetModel>(config, weights, source, dtype, device);
  if (device.is_cpu()) sd::nn::prepack_convolutions(*model);
  return model;
}

}  // namespace sd
