#pragma once
// diffusers UNet2DConditionModel (0.24) for SD 1.x / 2.x / sd-turbo / SDXL configs and the distilled / small variants
// built from the same blocks (BK-SDM, SDXS, LCM-distilled): positional timestep embedding (+ the optional
// guidance-embedding projection cond_proj), conv_in, CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn or
// no mid block, UpBlock2D / CrossAttnUpBlock2D with skip connections, conv_norm_out + SiLU, conv_out. Per-block
// lists (layers, transformer layers, heads, only_cross_attention) follow diffusers: the up path uses them reversed,
// the mid block the last entry. Registered names are exactly diffusers' state-dict keys.
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "models/control_residuals.h"
#include "models/embeddings.h"
#include "models/unet_2d_blocks.h"
#include "models/unet_feature_cache.h"

namespace sd {

struct UNet2DConditionConfig {
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  int64_t sample_size = 0;  // informational (0 when null)
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  std::vector<std::string> down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D", "DownBlock2D"};
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";  // "" = no mid block (config null)
  std::vector<std::string> up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D"};
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};
  // Resnets per down block (up block i has reversed(layers_per_block)[i] + 1).
  std::vector<int64_t> layers_per_block = {2, 2, 2, 2};
  // Transformer blocks per Transformer2DModel of each down block (up path reversed, mid block the last entry).
  std::vector<int64_t> transformer_layers_per_block = {1, 1, 1, 1};
  // Per down block (up path reversed): attn1 attends to the text too (no self-attention). Not in the mid block.
  std::vector<bool> only_cross_attention = {false, false, false, false};
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  // Per down block (the up blocks use them reversed, the mid block the last entry).
  std::vector<int64_t> cross_attention_dim = {1280, 1280, 1280, 1280};
  // Number of heads per down block: num_attention_heads when given, else attention_head_dim (diffusers' legacy
  // naming: for these UNets attention_head_dim IS the head count; head dim = channels / heads).
  std::vector<int64_t> num_attention_heads = {8, 8, 8, 8};
  bool use_linear_projection = false;
  bool upcast_attention = false;
  int64_t time_embedding_dim = 0;  // 0: 4 * block_out_channels[0]
  int64_t time_cond_proj_dim = 0;  // > 0: time_embedding.cond_proj for the guidance embedding (LCM-distilled UNets)
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;
  // SDXL's added conditioning (addition_embed_type "text_time"; "" = none): add_embedding (a TimestepEmbedding over
  // projection_class_embeddings_input_dim = pooled text dim + 6 x addition_time_embed_dim) of
  // [text_embeds, sinusoidal(time_ids)] is added to the timestep embedding.
  std::string addition_embed_type;
  int64_t addition_time_embed_dim = 0;
  int64_t projection_class_embeddings_input_dim = 0;

  int64_t time_embed_dim() const { return time_embedding_dim > 0 ? time_embedding_dim : 4 * block_out_channels[0]; }
  bool text_time() const { return addition_embed_type == "text_time"; }
  // Width of the pooled text embedding a text_time UNet expects (input dim - 6 x addition_time_embed_dim).
  int64_t pooled_text_dim() const {
    return text_time() ? projection_class_embeddings_input_dim - 6 * addition_time_embed_dim : 0;
  }
  // diffusers' defaults, adjusted to a config.json; unsupported settings -> FormatError naming the field.
  static UNet2DConditionConfig from_json(const nlohmann::json& j, const std::string& file);
  // Checks the cross-field consistency (block counts, channel divisibility); FormatError naming `file`.
  void validate(const std::string& file) const;
};

// Shared by the UNet and the ControlNet (which copies the UNet's encoder): input checks naming `who`, and the
// conditioning embedding time_embedding(sinusoid(t), timestep_cond) [+ add_embedding(text_embeds, time_ids) for
// text_time models] -> [B, temb] in sample's dtype. timesteps [B], [1] or 0-d.
void check_unet_inputs(const UNet2DConditionConfig& c, const torch::Tensor& sample,
                       const torch::Tensor& encoder_hidden_states, const char* who);
torch::Tensor unet_conditioning_embedding(const UNet2DConditionConfig& c, TimestepEmbedding& time_embedding,
                                          TimestepEmbedding& add_embedding, const torch::Tensor& sample,
                                          const torch::Tensor& timesteps, const torch::Tensor& timestep_cond,
                                          const torch::Tensor& text_embeds, const torch::Tensor& time_ids,
                                          const char* who);

// The block options of down block i and of the mid block, from the config (the ControlNet's encoder copy builds the
// same blocks with them).
UNetBlockOptions unet_down_block_options(const UNet2DConditionConfig& c, int64_t i);
UNetBlockOptions unet_mid_block_options(const UNet2DConditionConfig& c);

class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DConditionModelImpl(const UNet2DConditionConfig& config);
  // sample [B, in, h, w]; timesteps [B] or [1] or 0-d (int64 or float; broadcast to B);
  // encoder_hidden_states [B, L, cross_attention_dim] -> noise prediction [B, out, h, w] in sample's dtype.
  // timestep_cond [B or 1, time_cond_proj_dim] (get_guidance_scale_embedding of guidance_scale - 1): only for
  // UNets with time_cond_proj_dim (else InvalidArgument); undefined = the cond term is skipped, as in diffusers.
  // text_embeds [B, pooled_text_dim] and time_ids [B, 6] (diffusers' added_cond_kwargs): required by text_time
  // (SDXL) UNets, refused by the others. control: ControlNet residuals (shapes must match the skip tensors; a reused
  // call adds only those of the first level's skips). cache: see unet_feature_cache.h — a full call stores the last
  // up block's input in cache->deep; with cache->reuse the call runs only the first level on it.
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timesteps,
                        const torch::Tensor& encoder_hidden_states, const torch::Tensor& timestep_cond = {},
                        const torch::Tensor& text_embeds = {}, const torch::Tensor& time_ids = {},
                        const ControlResiduals& control = {}, UNetFeatureCache* cache = nullptr);
  // Whether the layout allows the shallow path: the last up block consumes exactly conv_in's and the first down
  // block's layer outputs (true for every SD / SDXL layout).
  bool supports_feature_cache() const;
  // Gives the linear layers an int8 copy (sd::nn::quantize_int8; `--dtype int8`) except the time / added embeddings
  // and resnets' time projections (one row per sample: nothing to gain) and the cross-attention projections of the
  // text context (77 rows; their error would reach every query). Convolutions stay float (measured slower in int8,
  // see the .cpp). Returns how many layers; InvalidArgument where int8 is unavailable.
  int64_t quantize_int8();
  const UNet2DConditionConfig& config() const { return config_; }

  sd::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  TimestepEmbedding add_embedding{nullptr};  // text_time only
  std::vector<UNetDownBlock> down_list;
  UNetMidBlock2DCrossAttn mid_block{nullptr};
  std::vector<UNetUpBlock> up_list;
  sd::nn::GroupNorm conv_norm_out{nullptr};

 private:
  UNet2DConditionConfig config_;
  int64_t num_upsamplers_ = 0;
};
TORCH_MODULE(UNet2DConditionModel);

// Builds the UNet from <unet_dir>/config.json and loads <unet_dir>/*.safetensors strictly (every key must match),
// converting floating-point weights to `dtype` on `device`. The module is returned in eval mode. `variant` (e.g.
// "fp16"): find_weights'.
UNet2DConditionModel load_unet(const std::string& unet_dir, torch::Dtype dtype = torch::kFloat,
                               torch::Device device = torch::kCPU, const std::string& variant = "");
// The same from a config and an in-memory state dict with diffusers keys (e.g. converted from a single-file
// checkpoint by io/ldm_checkpoint); `source` names the weights in errors.
UNet2DConditionModel load_unet(const UNet2DConditionConfig& config, const std::map<std::string, torch::Tensor>& weights,
                               const std::string& source, torch::Dtype dtype = torch::kFloat,
                               torch::Device device = torch::kCPU);

}  // namespace sd
