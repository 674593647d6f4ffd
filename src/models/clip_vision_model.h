#pragma once
// CLIPVisionModelWithProjection with Hugging Face transformers 4.35 semantics (IP-Adapter's image encoder): a patch
// convolution without bias, a learned CLS embedding and position embeddings, pre_layrnorm, the pre-LN encoder layers
// of clip_text_model.h without a mask, post_layernorm on the CLS state (pooler_output) and visual_projection without
// bias (image_embeds). Registered names are the transformers keys: vision_model.embeddings.class_embedding, ...,
// visual_projection.weight. Plus CLIPImageProcessor's preprocessing (uint8 RGB -> normalised pixel_values).
#include <map>
#include <string>

#include <nlohmann/json_fwd.hpp>
#include <torch/torch.h>

#include "models/clip_text_model.h"
#include "models/layers.h"

namespace sd {

struct CLIPVisionConfig {
  int64_t hidden_size = 768;
  int64_t intermediate_size = 3072;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t num_channels = 3;
  int64_t image_size = 224;
  int64_t patch_size = 32;
  std::string hidden_act = "quick_gelu";  // "quick_gelu" | "gelu"
  double layer_norm_eps = 1e-5;
  int64_t projection_dim = 512;

  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
  // CLIPVisionModelWithProjection's config.json, or a full CLIPConfig with a "vision_config" section. Errors name
  // `file` and the field.
  static CLIPVisionConfig from_json(const nlohmann::json& j, const std::string& file);
};

struct CLIPVisionOutput {
  torch::Tensor last_hidden_state;  // [B, 1 + patches, D] encoder output (no post_layernorm)
  // [B, 1 + patches, D] hidden_states[-2]: the last layer's input (IP-Adapter Plus reads it); with one layer, the
  // embeddings after pre_layrnorm
  torch::Tensor penultimate_hidden_state;
  torch::Tensor pooler_output;      // [B, D] post_layernorm(CLS state)
  torch::Tensor image_embeds;       // [B, projection_dim] visual_projection(pooler_output)
};

// The `vision_model` subtree.
class CLIPVisionTransformerImpl : public torch::nn::Module {
 public:
  explicit CLIPVisionTransformerImpl(const CLIPVisionConfig& c);
  // pixel_values [B, C, S, S] -> last_hidden_state, pooler_output
  CLIPVisionOutput forward(const torch::Tensor& pixel_values);
  // hidden_states[-2] alone [B, 1 + patches, D]: forward()'s penultimate_hidden_state without the last layer and
  // post_layernorm (IP-Adapter Plus and full-face read nothing else).
  torch::Tensor penultimate_hidden_state(const torch::Tensor& pixel_values);

  std::shared_ptr<torch::nn::Module> embeddings;  // class_embedding, patch_embedding, position_embedding
  torch::Tensor class_embedding;                  // [D]
  nn::Conv2d patch_embedding{nullptr};            // [D, C, p, p], no bias
  nn::Embedding position_embedding{nullptr};      // [1 + patches, D]
  nn::LayerNorm pre_layrnorm{nullptr};            // (sic: transformers' name)
  std::shared_ptr<torch::nn::Module> encoder;     // layers
  torch::nn::ModuleList layers{nullptr};
  nn::LayerNorm post_layernorm{nullptr};
  CLIPVisionConfig config;

 private:
  // The checked pixel values through the embeddings and pre_layrnorm -> [B, 1 + patches, D].
  torch::Tensor embed(const torch::Tensor& pixel_values);
};
TORCH_MODULE(CLIPVisionTransformer);

class CLIPVisionModelImpl : public torch::nn::Module {
 public:
  explicit CLIPVisionModelImpl(const CLIPVisionConfig& c);
  // pixel_values [B, num_channels, image_size, image_size] (any float dtype; cast to the weights') -> all outputs.
  CLIPVisionOutput forward(const torch::Tensor& pixel_values);
  // vision_model's penultimate_hidden_state(pixel_values), the last layer and visual_projection not run.
  torch::Tensor penultimate_hidden_state(const torch::Tensor& pixel_values) {
    return vision_model->penultimate_hidden_state(pixel_values);
  }
  const CLIPVisionConfig& config() const { return vision_model->config; }
  CLIPVisionTransformer vision_model{nullptr};
  nn::Linear visual_projection{nullptr};  // [projection_dim, D], no bias
};
TORCH_MODULE(CLIPVisionModel);

// Reads <dir>/config.json and <dir>'s weights (model.safetensors; strict, the legacy position_ids buffer ignored).
CLIPVisionModel load_clip_vision_model(const std::string& dir, torch::ScalarType dtype = torch::kFloat32,
                                       torch::Device device = torch::kCPU);

// CLIPImageProcessor (transformers 4.35 defaults, size = crop = `image_size`): uint8 RGB [H, W, 3] or [B, H, W, 3]
// -> float32 [B, 3, S, S]: the shortest side resized to S (bicubic with antialiasing, rounded back to uint8 as PIL
// does; the longer side int(S * long / short)), a centre crop of S x S (top = (h - S) / 2, left = (w - S) / 2),
// then (u8 / 255 - mean) / std with OpenAI CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954,
// 0.26130258, 0.27577711). No resize when the shortest side is already S. InvalidArgument for a wrong dtype/shape.
torch::Tensor clip_image_preprocess(const torch::Tensor& rgb_u8_hwc, int64_t image_size);

}  // namespace sd
