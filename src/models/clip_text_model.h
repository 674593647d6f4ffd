#pragma once
// CLIPTextModel with Hugging Face transformers semantics (what every SD 1.x / 2.x / sd-turbo pipeline uses as its
// text encoder): token + position embeddings, pre-LN transformer layers with a causal mask, final layer norm; and
// CLIPTextModelWithProjection (SDXL's text_encoder_2, OpenCLIP-bigG-like: gelu, text_projection without bias on the
// pooled output). Registered names are the transformers keys: text_model.embeddings.token_embedding.weight, ...,
// text_projection.weight.
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>
#include <torch/torch.h>

#include "models/layers.h"

namespace sd {

struct CLIPTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;
  int64_t intermediate_size = 2048;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 8;
  int64_t max_position_embeddings = 77;
  std::string hidden_act = "quick_gelu";  // "quick_gelu" | "gelu"
  double layer_norm_eps = 1e-5;
  int64_t bos_token_id = 49406;
  int64_t eos_token_id = 49407;
  int64_t pad_token_id = 1;
  // CLIPTextModelWithProjection (SDXL's text_encoder_2): `text_projection` [projection_dim, hidden] without bias
  // maps the pooled output to `text_embeds`. Set from config.json's "architectures"; plain CLIPTextModel configs
  // carry a projection_dim too (SD 1.5's 768) but no projection weights.
  bool with_projection = false;
  int64_t projection_dim = 0;

  static CLIPTextConfig from_json(const nlohmann::json& j, const std::string& file);
};

class CLIPAttentionImpl : public torch::nn::Module {
 public:
  CLIPAttentionImpl(int64_t dim, int64_t heads);
  // x [B, L, D]; mask [L, L] additive (0 / -inf) or undefined
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask);
  nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
  int64_t heads, head_dim;
};
TORCH_MODULE(CLIPAttention);

class CLIPMLPImpl : public torch::nn::Module {
 public:
  CLIPMLPImpl(int64_t dim, int64_t inner, std::string act);
  torch::Tensor forward(const torch::Tensor& x);
  nn::Linear fc1{nullptr}, fc2{nullptr};
  std::string act;
};
TORCH_MODULE(CLIPMLP);

// One pre-LN transformer layer, shared by the text and the vision transformer (clip_vision_model.h).
class CLIPEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit CLIPEncoderLayerImpl(const CLIPTextConfig& c);
  CLIPEncoderLayerImpl(int64_t hidden_size, int64_t num_attention_heads, int64_t intermediate_size,
                       const std::string& hidden_act, double layer_norm_eps);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask);
  CLIPAttention self_attn{nullptr};
  nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  CLIPMLP mlp{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

struct CLIPTextOutput {
  torch::Tensor last_hidden_state;           // [B, L, D] after final_layer_norm (what SD conditions on)
  torch::Tensor pooler_output;               // [B, D] the EOS position's row
  std::vector<torch::Tensor> hidden_states;  // embeddings, then the output of every layer (num_layers + 1 entries)
  torch::Tensor text_embeds;                 // [B, projection_dim] pooler_output @ text_projection^T (WithProjection)
};

// The `text_model` subtree.
class CLIPTextTransformerImpl : public torch::nn::Module {
 public:
  explicit CLIPTextTransformerImpl(const CLIPTextConfig& c);
  CLIPTextOutput forward(const torch::Tensor& input_ids, bool output_hidden_states);
  std::shared_ptr<torch::nn::Module> embeddings;  // token_embedding, position_embedding
  nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
  std::shared_ptr<torch::nn::Module> encoder;  // layers
  torch::nn::ModuleList layers{nullptr};
  nn::LayerNorm final_layer_norm{nullptr};
  CLIPTextConfig config;
};
TORCH_MODULE(CLIPTextTransformer);

class CLIPTextModelImpl : public torch::nn::Module {
 public:
  explicit CLIPTextModelImpl(const CLIPTextConfig& c);
  // input_ids [B, L] int64 (L <= max_position_embeddings) -> last_hidden_state [B, L, D]
  torch::Tensor forward(const torch::Tensor& input_ids);
  CLIPTextOutput forward_all(const torch::Tensor& input_ids, bool output_hidden_states = true);
  // diffusers' clip_skip: hidden_states[-(clip_skip + 1)] passed through final_layer_norm; clip_skip 0 = forward().
  torch::Tensor forward_clip_skip(const torch::Tensor& input_ids, int clip_skip);
  // What StableDiffusionXLPipeline conditions on: hidden_states[-(clip_skip + 2)] WITHOUT the final layer norm
  // (the penultimate layer's output for clip_skip 0), and (WithProjection) text_embeds.
  struct XLOutput {
    torch::Tensor hidden;       // [B, L, D]
    torch::Tensor text_embeds;  // [B, projection_dim]; undefined without text_projection
  };
  XLOutput forward_sdxl(const torch::Tensor& input_ids, int clip_skip = 0);
  const CLIPTextConfig& config() const { return text_model->config; }
  CLIPTextTransformer text_model{nullptr};
  nn::Linear text_projection{nullptr};  // only for CLIPTextModelWithProjection
};
TORCH_MODULE(CLIPTextModel);

// Reads <dir>/config.json and the weights (strict; the int64 `position_ids` buffer of older checkpoints is ignored);
// `variant` (e.g. "fp16"): find_weights'.
CLIPTextModel load_clip_text_model(const std::string& dir, torch::ScalarType dtype = torch::kFloat32,
                                   torch::Device device = torch::kCPU, const std::string& variant = "");
// The same from a config and an in-memory state dict with transformers keys (e.g. converted from a single-file
// checkpoint by io/ldm_checkpoint); `source` names the weights in errors.
CLIPTextModel load_clip_text_model(const CLIPTextConfig& config, const std::map<std::string, torch::Tensor>& weights,
                                   const std::string& source, torch::ScalarType dtype = torch::kFloat32,
                                   torch::Device device = torch::kCPU);

}  // namespace sd
