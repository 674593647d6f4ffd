#include "models/unet_2d_condition.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/text.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/config_limits.h"
#include "models/conv_layout.h"
#include "models/layers.h"

namespace sd {

namespace {

bool is_cross_down(const std::string& t) { return t == "CrossAttnDownBlock2D"; }
bool is_cross_up(const std::string& t) { return t == "CrossAttnUpBlock2D"; }

[[noreturn]] void unsupported(const std::string& file, const std::string& key, const nlohmann::json& value,
                              const std::string& supported) {
  std::string v = value.dump();
  if (v.size() > 80) v = v.substr(0, 77) + "...";
  throw FormatError(file, "field '" + key + "' = " + v + " is not supported (supported: " + supported + ")");
}

// A string field that must have one of the accepted values.
std::string require_string(ConfigReader& r, const nlohmann::json& j, const std::string& key, const std::string& def,
                           const std::vector<std::string>& accepted) {
  const std::string v = r.get_string(key, def);
  if (std::find(accepted.begin(), accepted.end(), v) == accepted.end()) {
    std::string list;
    for (const auto& a : accepted) list += (list.empty() ? "\"" : ", \"") + a + "\"";
    unsupported(r.file(), key, j.at(key), list);
  }
  return v;
}

std::vector<int64_t> to64(const std::vector<int>& v) { return {v.begin(), v.end()}; }

using config_limits::kMaxChannels;
using config_limits::kMaxEmbeddingDim;
using config_limits::kMaxLayers;

}  // namespace

UNet2DConditionConfig UNet2DConditionConfig::from_json(const nlohmann::json& j, const std::string& file) {
  ConfigReader r(j, file);
  UNet2DConditionConfig c;

  // Features of UNet2DConditionModel this implementation does not have: present and non-null -> error.
  for (const char* key : {"class_embed_type", "num_class_embeds", "encoder_hid_dim",
                          "encoder_hid_dim_type", "time_embedding_act_fn", "timestep_post_act",
                          "reverse_transformer_layers_per_block"})
    r.require_unsupported_absent(key);
  // Only used by block types / embeddings rejected above or below (Simple* blocks, text_time / projection class
  // embeddings; mid_block_only_cross_attention only reaches UNetMidBlock2DSimpleCrossAttn), so they have no effect
  // on a supported model; dropout is an inference no-op.
  for (const char* key : {"addition_embed_type_num_heads", "class_embeddings_concat",
                          "mid_block_only_cross_attention", "cross_attention_norm", "resnet_skip_time_act",
                          "resnet_out_scale_factor", "dropout"})
    r.ignore(key);

  require_string(r, j, "act_fn", "silu", {"silu", "swish"});
  require_string(r, j, "resnet_time_scale_shift", "default", {"default"});
  require_string(r, j, "time_embedding_type", "positional", {"positional"});
  require_string(r, j, "attention_type", "default", {"default"});
  if (r.get_bool("dual_cross_attention", false)) unsupported(file, "dual_cross_attention", j.at("dual_cross_attention"), "false");

  c.in_channels = r.get_int64("in_channels", c.in_channels);
  c.out_channels = r.get_int64("out_channels", c.out_channels);
  c.sample_size = r.get_int64("sample_size", 0);
  c.center_input_sample = r.get_bool("center_input_sample", c.center_input_sample);
  c.flip_sin_to_cos = r.get_bool("flip_sin_to_cos", c.flip_sin_to_cos);
  c.freq_shift = r.get_double("freq_shift", c.freq_shift);
  c.down_block_types = r.get_string_list("down_block_types", c.down_block_types);
  c.up_block_types = r.get_string_list("up_block_types", c.up_block_types);
  for (const auto& t : c.down_block_types)
    if (t != "CrossAttnDownBlock2D" && t != "DownBlock2D")
      unsupported(file, "down_block_types", j.at("down_block_types"),
                  "lists of \"CrossAttnDownBlock2D\", \"DownBlock2D\"");
  for (const auto& t : c.up_block_types)
    if (t != "CrossAttnUpBlock2D" && t != "UpBlock2D")
      unsupported(file, "up_block_types", j.at("up_block_types"), "lists of \"UpBlock2D\", \"CrossAttnUpBlock2D\"");
  // mid_block_type null means no mid block (diffusers allows it).
  if (j.contains("mid_block_type") && j.at("mid_block_type").is_null()) {
    r.ignore("mid_block_type");
    c.mid_block_type.clear();
  } else {
    c.mid_block_type = require_string(r, j, "mid_block_type", c.mid_block_type, {"UNetMidBlock2DCrossAttn"});
  }
  c.block_out_channels = to64(r.get_int_list("block_out_channels", {320, 640, 1280, 1280}));
  c.downsample_padding = r.get_int64("downsample_padding", c.downsample_padding);
  c.mid_block_scale_factor = r.get_double("mid_block_scale_factor", c.mid_block_scale_factor);
  if (!r.has("norm_num_groups") && j.contains("norm_num_groups"))
    unsupported(file, "norm_num_groups", nullptr, "an integer (no-normalisation UNets are not supported)");
  c.norm_num_groups = r.get_int64("norm_num_groups", c.norm_num_groups);
  c.norm_eps = r.get_double("norm_eps", c.norm_eps);
  c.use_linear_projection = r.get_bool("use_linear_projection", c.use_linear_projection);
  c.upcast_attention = r.get_bool("upcast_attention", c.upcast_attention);
  c.time_embedding_dim = r.get_int64("time_embedding_dim", 0);
  c.time_cond_proj_dim = r.get_int64("time_cond_proj_dim", 0);
  // The guidance embedding (get_guidance_scale_embedding) needs at least 4 dimensions (half - 1 > 0).
  if (r.has("time_cond_proj_dim") && c.time_cond_proj_dim < 4)
    r.fail("time_cond_proj_dim", "an integer >= 4 or null");
  if (r.has("addition_embed_type")) {
    c.addition_embed_type = require_string(r, j, "addition_embed_type", "", {"text_time"});
    c.addition_time_embed_dim = r.get_int64("addition_time_embed_dim", 0);
    c.projection_class_embeddings_input_dim = r.get_int64("projection_class_embeddings_input_dim", 0);
    // Bounded (SDXL: 256 and 2816) so that 6 x addition_time_embed_dim below cannot overflow.
    if (c.addition_time_embed_dim <= 0 || c.addition_time_embed_dim > kMaxEmbeddingDim)
      r.fail("addition_time_embed_dim",
             "a positive integer up to " + std::to_string(kMaxEmbeddingDim) + " (text_time UNet)");
    if (c.projection_class_embeddings_input_dim > kMaxEmbeddingDim)
      r.fail("projection_class_embeddings_input_dim", "an integer up to " + std::to_string(kMaxEmbeddingDim));
    if (c.projection_class_embeddings_input_dim <= 6 * c.addition_time_embed_dim)
      r.fail("projection_class_embeddings_input_dim",
             "an integer above 6 x addition_time_embed_dim = " + std::to_string(6 * c.addition_time_embed_dim) +
                 " (pooled text width + 6 embedded time ids)");
  } else {
    r.ignore("addition_embed_type");
    r.ignore("addition_time_embed_dim");
    r.ignore("projection_class_embeddings_input_dim");
  }
  c.conv_in_kernel = r.get_int64("conv_in_kernel", c.conv_in_kernel);
  c.conv_out_kernel = r.get_int64("conv_out_kernel", c.conv_out_kernel);

  const size_t n = c.down_block_types.size();
  if (n == 0) r.fail("down_block_types", "a non-empty list");
  c.cross_attention_dim = to64(r.get_int_or_list("cross_attention_dim", 1280, n));
  // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (the legacy name is the head count).
  const auto head_dim_field = to64(r.get_int_or_list("attention_head_dim", 8, n));
  if (r.has("num_attention_heads"))
    c.num_attention_heads = to64(r.get_int_or_list("num_attention_heads", 8, n));
  else
    c.num_attention_heads = head_dim_field;
  // Per-block lists (an int is broadcast). Nested transformer_layers_per_block lists (one count per layer) are only
  // valid with reverse_transformer_layers_per_block in diffusers, which is rejected above.
  c.layers_per_block = to64(r.get_int_or_list("layers_per_block", 2, n));
  c.transformer_layers_per_block = to64(r.get_int_or_list("transformer_layers_per_block", 1, n));
  // only_cross_attention: a bool (broadcast) or one bool per down block.
  c.only_cross_attention.assign(n, false);
  if (r.has("only_cross_attention")) {
    const auto& v = j.at("only_cross_attention");
    const std::string expected = "a boolean or a list of " + std::to_string(n) + " booleans";
    r.ignore("only_cross_attention");
    if (v.is_boolean()) {
      c.only_cross_attention.assign(n, v.get<bool>());
    } else if (v.is_array()) {
      if (v.size() != n) r.fail("only_cross_attention", expected);
      for (size_t i = 0; i < n; ++i) {
        if (!v[i].is_boolean()) r.fail("only_cross_attention", expected);
        c.only_cross_attention[i] = v[i].get<bool>();
      }
    } else {
      r.fail("only_cross_attention", expected);
    }
  } else {
    r.ignore("only_cross_attention");
  }

  r.log_unknown();
  c.validate(file);
  return c;
}

void UNet2DConditionConfig::validate(const std::string& file) const {
  auto bad = [&file](const std::string& what) { throw FormatError(file, what); };
  const size_t n = down_block_types.size();
  if (n == 0) bad("down_block_types is empty");
  // Bounds far above every published UNet (4 levels, 1280 channels, 10 transformer layers) that keep the shapes'
  // arithmetic in range: the upsampling factor is 2^(levels - 1), and a module of absurd width would only fail later
  // in an allocation that names no file.
  if (n > 16) bad("down_block_types has " + std::to_string(n) + " entries, at most 16 are supported");
  const auto too_large = [&](const char* field, int64_t v, int64_t max) {
    if (v > max) bad("field '" + std::string(field) + "' is " + std::to_string(v) + ", at most " + std::to_string(max));
  };
  too_large("in_channels", in_channels, kMaxChannels);
  too_large("out_channels", out_channels, kMaxChannels);
  too_large("sample_size", sample_size, kMaxChannels);
  too_large("norm_num_groups", norm_num_groups, kMaxChannels);
  too_large("conv_in_kernel", conv_in_kernel, 31);
  too_large("conv_out_kernel", conv_out_kernel, 31);
  too_large("downsample_padding", downsample_padding, 31);
  too_large("time_cond_proj_dim", time_cond_proj_dim, kMaxEmbeddingDim);
  too_large("time_embedding_dim", time_embedding_dim, kMaxEmbeddingDim);
  for (int64_t v : block_out_channels) too_large("block_out_channels", v, kMaxChannels);
  for (int64_t v : layers_per_block) too_large("layers_per_block", v, kMaxLayers);
  for (int64_t v : transformer_layers_per_block) too_large("transformer_layers_per_block", v, kMaxLayers);
  for (int64_t v : cross_attention_dim) too_large("cross_attention_dim", v, kMaxEmbeddingDim);
  if (up_block_types.size() != n)
    bad("up_block_types has " + std::to_string(up_block_types.size()) + " entries, down_block_types " +
        std::to_string(n));
  if (block_out_channels.size() != n)
    bad("block_out_channels has " + std::to_string(block_out_channels.size()) + " entries, down_block_types " +
        std::to_string(n));
  if (cross_attention_dim.size() != n || num_attention_heads.size() != n || layers_per_block.size() != n ||
      transformer_layers_per_block.size() != n || only_cross_attention.size() != n)
    bad("cross_attention_dim, attention heads, layers_per_block, transformer_layers_per_block and "
        "only_cross_attention must have one entry per down block (" + std::to_string(n) + ")");
  if (in_channels <= 0 || out_channels <= 0) bad("in_channels and out_channels must be positive");
  for (size_t i = 0; i < n; ++i) {
    if (layers_per_block[i] <= 0)
      bad("field 'layers_per_block' must be positive (block " + std::to_string(i) + ": " +
          std::to_string(layers_per_block[i]) + ")");
    if (transformer_layers_per_block[i] <= 0)
      bad("field 'transformer_layers_per_block' must be positive (block " + std::to_string(i) + ": " +
          std::to_string(transformer_layers_per_block[i]) + ")");
  }
  if (time_cond_proj_dim < 0) bad("field 'time_cond_proj_dim' must be positive");
  if (norm_num_groups <= 0) bad("field 'norm_num_groups' must be positive");
  if (conv_in_kernel <= 0 || conv_in_kernel % 2 == 0) bad("field 'conv_in_kernel' must be a positive odd number");
  if (conv_out_kernel <= 0 || conv_out_kernel % 2 == 0) bad("field 'conv_out_kernel' must be a positive odd number");
  if (downsample_padding < 0) bad("field 'downsample_padding' must be >= 0");
  for (size_t i = 0; i < n; ++i) {
    const int64_t ch = block_out_channels[i];
    if (ch <= 0 || ch % norm_num_groups != 0)
      bad("block_out_channels[" + std::to_string(i) + "] = " + std::to_string(ch) +
          " is not a positive multiple of norm_num_groups " + std::to_string(norm_num_groups));
    if (cross_attention_dim[i] <= 0) bad("field 'cross_attention_dim' must be positive");
    if (num_attention_heads[i] <= 0 || ch % num_attention_heads[i] != 0)
      bad("block " + std::to_string(i) + ": " + std::to_string(ch) + " channels are not divisible by " +
          std::to_string(num_attention_heads[i]) + " attention heads (attention_head_dim / num_attention_heads)");
  }
  if (time_embedding_dim < 0) bad("field 'time_embedding_dim' must be positive");
  if (!addition_embed_type.empty() && addition_embed_type != "text_time")
    bad("field 'addition_embed_type' must be \"text_time\" or null");
  if (text_time() && (addition_time_embed_dim <= 0 || pooled_text_dim() <= 0))
    bad("text_time UNet: projection_class_embeddings_input_dim must exceed 6 x addition_time_embed_dim");
}

namespace {
UNetBlockOptions unet_block_options(const UNet2DConditionConfig& c) {
  UNetBlockOptions o;
  o.temb_channels = c.time_embed_dim();
  o.resnet_groups = c.norm_num_groups;
  o.resnet_eps = c.norm_eps;
  o.use_linear_projection = c.use_linear_projection;
  o.upcast_attention = c.upcast_attention;
  return o;
}
}  // namespace

UNetBlockOptions unet_down_block_options(const UNet2DConditionConfig& c, int64_t i) {
  UNetBlockOptions o = unet_block_options(c);
  o.cross_attention = is_cross_down(c.down_block_types[i]);
  o.heads = c.num_attention_heads[i];
  o.cross_attention_dim = c.cross_attention_dim[i];
  o.transformer_layers = c.transformer_layers_per_block[i];
  o.only_cross_attention = c.only_cross_attention[i];
  return o;
}

UNetBlockOptions unet_mid_block_options(const UNet2DConditionConfig& c) {
  UNetBlockOptions o = unet_block_options(c);
  o.cross_attention = true;
  o.heads = c.num_attention_heads.back();
  o.cross_attention_dim = c.cross_attention_dim.back();
  o.transformer_layers = c.transformer_layers_per_block.back();
  o.output_scale_factor = c.mid_block_scale_factor;
  return o;
}

UNet2DConditionModelImpl::UNet2DConditionModelImpl(const UNet2DConditionConfig& c) : config_(c) {
  c.validate("UNet2DConditionConfig");
  const auto& ch = c.block_out_channels;
  const int64_t n = static_cast<int64_t>(ch.size());
  const int64_t temb = c.time_embed_dim();

  conv_in = register_module("conv_in",
                            sd::nn::Conv2d(c.in_channels, ch[0], c.conv_in_kernel, 1, (c.conv_in_kernel - 1) / 2));
  time_embedding = register_module("time_embedding", TimestepEmbedding(ch[0], temb, c.time_cond_proj_dim));
  if (c.text_time())
    add_embedding =
        register_module("add_embedding", TimestepEmbedding(c.projection_class_embeddings_input_dim, temb));

  auto down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t out_ch = ch[0];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t in_ch = out_ch;
    out_ch = ch[i];
    down_list.emplace_back(in_ch, out_ch, c.layers_per_block[i], /*add_downsample=*/i < n - 1, c.downsample_padding,
                           unet_down_block_options(c, i));
    down_blocks->push_back(down_list.back());
  }

  if (!c.mid_block_type.empty())
    mid_block = register_module("mid_block", UNetMidBlock2DCrossAttn(ch.back(), 1, unet_mid_block_options(c)));

  auto up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  out_ch = ch[n - 1];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t rev = n - 1 - i;  // reversed lists: channels, heads, cross_attention_dim, layers, only_cross
    const int64_t prev_out = out_ch;
    out_ch = ch[rev];
    const int64_t in_ch = ch[std::max<int64_t>(rev - 1, 0)];
    const bool add_upsample = i < n - 1;
    if (add_upsample) ++num_upsamplers_;
    UNetBlockOptions o = unet_block_options(c);
    o.cross_attention = is_cross_up(c.up_block_types[i]);
    o.heads = c.num_attention_heads[rev];
    o.cross_attention_dim = c.cross_attention_dim[rev];
    o.transformer_layers = c.transformer_layers_per_block[rev];
    o.only_cross_attention = c.only_cross_attention[rev];
    up_list.emplace_back(in_ch, prev_out, out_ch, c.layers_per_block[rev] + 1, add_upsample, o);
    up_blocks->push_back(up_list.back());
  }

  conv_norm_out = register_module("conv_norm_out", sd::nn::GroupNorm(c.norm_num_groups, ch[0], c.norm_eps));
  conv_out = register_module(
      "conv_out", sd::nn::Conv2d(ch[0], c.out_channels, c.conv_out_kernel, 1, (c.conv_out_kernel - 1) / 2));
}

void check_unet_inputs(const UNet2DConditionConfig& c, const torch::Tensor& sample,
                       const torch::Tensor& encoder_hidden_states, const char* who) {
  const std::string w = who;
  if (sample.dim() != 4 || sample.size(1) != c.in_channels)
    throw InvalidArgument(w + ": sample must be [B, " + std::to_string(c.in_channels) + ", h, w], got " +
                          std::to_string(sample.dim()) + "-d with " +
                          (sample.dim() > 1 ? std::to_string(sample.size(1)) : std::string("?")) + " channels");
  const int64_t b = sample.size(0);
  if (!encoder_hidden_states.defined() || encoder_hidden_states.dim() != 3 || encoder_hidden_states.size(0) != b)
    throw InvalidArgument(w + ": encoder_hidden_states must be [" + std::to_string(b) + ", L, D]");
  for (int64_t d : c.cross_attention_dim)
    if (encoder_hidden_states.size(2) != d)
      throw InvalidArgument(w + ": encoder_hidden_states width " + std::to_string(encoder_hidden_states.size(2)) +
                            " != cross_attention_dim " + std::to_string(d));
}

torch::Tensor unet_conditioning_embedding(const UNet2DConditionConfig& c, TimestepEmbedding& time_embedding,
                                          TimestepEmbedding& add_embedding, const torch::Tensor& sample,
                                          const torch::Tensor& timesteps, const torch::Tensor& timestep_cond,
                                          const torch::Tensor& text_embeds, const torch::Tensor& time_ids,
                                          const char* who) {
  const std::string w = who;
  const int64_t b = sample.size(0);
  // Timesteps: [B], or one value ([1] / 0-d) broadcast over the batch (diffusers' timesteps.expand(B)).
  torch::Tensor t = timesteps.dim() == 0 ? timesteps.reshape({1}) : timesteps;
  if (t.dim() != 1 || (t.size(0) != b && t.size(0) != 1))
    throw InvalidArgument(w + ": timesteps must be [" + std::to_string(b) + "], [1] or a scalar");
  t = t.to(sample.device()).expand({b});

  // Sinusoidal embedding in fp32, then the model dtype (as diffusers casts t_emb to sample.dtype).
  auto t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(sample.scalar_type());
  if (timestep_cond.defined() && c.time_cond_proj_dim == 0)
    throw InvalidArgument(w + ": timestep_cond was given but this model has no time_cond_proj_dim (it is not an "
                          "LCM-distilled UNet with a guidance embedding)");
  auto emb = time_embedding(t_emb, timestep_cond);  // [B, temb]
  if (c.text_time()) {
    const int64_t p = c.pooled_text_dim();
    if (!text_embeds.defined() || !time_ids.defined())
      throw InvalidArgument(w + ": this model has addition_embed_type \"text_time\" (SDXL) and needs text_embeds [" +
                            std::to_string(b) + ", " + std::to_string(p) + "] and time_ids [" + std::to_string(b) +
                            ", 6] (added_cond_kwargs)");
    if (text_embeds.dim() != 2 || text_embeds.size(0) != b || text_embeds.size(1) != p)
      throw InvalidArgument(w + ": text_embeds must be [" + std::to_string(b) + ", " + std::to_string(p) +
                            "] (the pooled projection of text_encoder_2)");
    if (time_ids.dim() != 2 || time_ids.size(0) != b || time_ids.size(1) != 6)
      throw InvalidArgument(w + ": time_ids must be [" + std::to_string(b) +
                            ", 6] (original size, crop top-left, target size)");
    // diffusers: add_time_proj(time_ids.flatten()) -> [6B, addition_time_embed_dim] -> [B, 6 * dim]; concat with
    // the pooled text; add_embedding; added to the timestep embedding.
    const auto time_embeds =
        timestep_embedding(time_ids.flatten().to(sample.device()), c.addition_time_embed_dim, c.flip_sin_to_cos,
                           c.freq_shift)
            .reshape({b, -1});
    const auto add_embeds = torch::cat({text_embeds.to(sample.device(), torch::kFloat32), time_embeds}, -1)
                                .to(emb.scalar_type());  // [B, P + 6 * dim]
    emb = emb + add_embedding(add_embeds);
  } else if (text_embeds.defined() || time_ids.defined()) {
    throw InvalidArgument(w + ": text_embeds / time_ids were given but this model has no addition_embed_type "
                          "\"text_time\" (only SDXL UNets take added conditioning)");
  }
  return emb;
}

torch::Tensor UNet2DConditionModelImpl::forward(const torch::Tensor& sample, const torch::Tensor& timesteps,
                                                const torch::Tensor& encoder_hidden_states,
                                                const torch::Tensor& timestep_cond,
                                                const torch::Tensor& text_embeds, const torch::Tensor& time_ids,
                                                const ControlResiduals& control, UNetFeatureCache* cache) {
  const auto& c = config_;
  check_unet_inputs(c, sample, encoder_hidden_states, "UNet");
  // Sizes that are not a multiple of the total down factor need explicit upsample sizes (diffusers'
  // forward_upsample_size).
  const int64_t factor = int64_t{1} << num_upsamplers_;
  const bool forward_upsample_size = sample.size(2) % factor != 0 || sample.size(3) % factor != 0;

  auto x = c.center_input_sample ? sample * 2.0 - 1.0 : sample;
  const auto emb = unet_conditioning_embedding(c, time_embedding, add_embedding, x, timesteps, timestep_cond,
                                               text_embeds, time_ids, "UNet");

  x = conv_in(x);
  std::vector<torch::Tensor> skips{x};
  if (cache && cache->reuse) {
    // The shallow path: the first level's skips, then the last up block on the stored deep features.
    if (!supports_feature_cache())
      throw InvalidArgument("UNet: this layout has no shallow path for the deep-feature cache");
    if (!cache->deep.defined() || cache->deep.size(0) != x.size(0) || cache->deep.size(2) != x.size(2) ||
        cache->deep.size(3) != x.size(3))
      throw InvalidArgument("UNet: the deep-feature cache holds " +
                            (cache->deep.defined() ? shape_str(cache->deep.sizes()) : std::string("nothing")) +
                            ", which does not fit a sample of shape " + shape_str(sample.sizes()));
    down_list.front()(x, emb, encoder_hidden_states, skips, /*downsample=*/false);
    if (control.defined())
      for (size_t k = 0; k < skips.size(); ++k) skips[k] = skips[k] + control.down[k].to(skips[k].scalar_type());
    x = up_list.back()(cache->deep, emb, encoder_hidden_states, skips, std::nullopt);
    return conv_out(torch::silu(conv_norm_out(x)));
  }
  for (auto& blk : down_list) x = blk(x, emb, encoder_hidden_states, skips);
  if (control.defined()) {
    // ControlNet: residual k is added to the k-th skip tensor before the up blocks consume it, the mid residual to
    // the mid-block output (diffusers' down_block_additional_residuals / mid_block_additional_residual).
    if (control.down.size() != skips.size())
      throw InvalidArgument("UNet: " + std::to_string(control.down.size()) +
                            " ControlNet down residuals for a UNet with " + std::to_string(skips.size()) +
                            " skip tensors (the ControlNet was built for another UNet)");
    for (size_t k = 0; k < skips.size(); ++k) {
      if (control.down[k].sizes() != skips[k].sizes())
        throw InvalidArgument("UNet: ControlNet down residual " + std::to_string(k) + " has shape " +
                              shape_str(control.down[k].sizes()) + ", the UNet's skip tensor " +
                              shape_str(skips[k].sizes()));
      skips[k] = skips[k] + control.down[k].to(skips[k].scalar_type());
    }
  }
  if (mid_block) x = mid_block(x, emb, encoder_hidden_states);
  if (control.mid.defined()) {
    if (control.mid.sizes() != x.sizes())
      throw InvalidArgument("UNet: ControlNet mid residual has shape " + shape_str(control.mid.sizes()) +
                            ", the UNet's mid-block output " + shape_str(x.sizes()));
    x = x + control.mid.to(x.scalar_type());
  }
  for (size_t i = 0; i < up_list.size(); ++i) {
    auto& blk = up_list[i];
    std::optional<std::pair<int64_t, int64_t>> size;
    const size_t used = static_cast<size_t>(blk->num_layers());
    if (i + 1 < up_list.size() && forward_upsample_size && skips.size() > used) {
      const auto& next = skips[skips.size() - used - 1];
      size = std::make_pair(next.size(2), next.size(3));
    }
    if (cache && i + 1 == up_list.size()) cache->deep = x;
    x = blk(x, emb, encoder_hidden_states, skips, size);
  }
  x = conv_out(torch::silu(conv_norm_out(x)));
  return x;
}

bool UNet2DConditionModelImpl::supports_feature_cache() const {
  // The last up block must consume exactly conv_in's output and the first down block's layer outputs.
  return !down_list.empty() && !up_list.empty() &&
         up_list.back()->num_layers() == static_cast<int64_t>(down_list.front()->resnet_list.size()) + 1;
}

int64_t UNet2DConditionModelImpl::quantize_int8() {
  const auto keep_float = [](const std::string& name, const torch::nn::Module& layer) {
    const auto ends = [&](const std::string& tail) { return ends_with(name, tail); };
    // Convolutions stay float: oneDNN's int8 convolution (libtorch 2.15) measured slower than the prepacked bf16 one
    // on a 2-core AMX Xeon (sd-turbo 256 px: 250 vs 147 ms per UNet call), while its int8 linear layers halve theirs
    // (46 vs 104 ms).
    if (dynamic_cast<const sd::nn::Conv2dImpl*>(&layer)) return true;
    return name == "conv_in" || name == "conv_out" || name.rfind("time_embedding", 0) == 0 ||
           name.rfind("add_embedding", 0) == 0 || ends("time_emb_proj") || ends("attn2.to_k") || ends("attn2.to_v") ||
           name.find("_ip") != std::string::npos;  // IP-Adapter projections (to_k_ip / to_v_ip)
  };
  return sd::nn::quantize_int8(*this, keep_float);
}

UNet2DConditionModel load_unet(const std::string& unet_dir, torch::Dtype dtype, torch::Device device,
                               const std::string& variant) {
  const std::string config_path = unet_dir + "/config.json";
  auto config = UNet2DConditionConfig::from_json(read_json_file(config_path), config_path);
  auto file = SafeTensorsFile::open(find_weights(unet_dir, variant));
  return load_unet(config, file.load_all(), file.path(), dtype, device);
}

UNet2DConditionModel load_unet(const UNet2DConditionConfig& config, const std::map<std::string, torch::Tensor>& weights,
                               const std::string& source, torch::Dtype dtype, torch::Device device) {
  // The UNet's many-channel convolutions at small spatial sizes pay most for oneDNN's per-call weight re-ordering
  // (256 px sd-turbo, bf16: 0.90 s -> 0.71 s per call). The autoencoders' few-channel, large-spatial convolutions
  // run faster eager in channels-last (TAESD decode 89 ms eager vs 138 ms prepacked), so only the UNet is packed.
  auto model = load_module<UNet2DConditionModel>(config, weights, source, dtype, device);
  if (device.is_cpu()) sd::nn::prepack_convolutions(*model);
  if (device.is_cuda() && sd::nn::cuda_channels_last()) {
    // Channels-last weights (models/conv_layout.h): the activations follow through the convolutions.
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters())
      if (p.dim() == 4) p.set_data(p.contiguous(torch::MemoryFormat::ChannelsLast));
  }
  return model;
}

}  // namespace sd
