#include "models/clip_text_model.h"

#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "io/state_dict.h"
#include "models/config_limits.h"

namespace sd {

CLIPTextConfig CLIPTextConfig::from_json(const nlohmann::json& j, const std::string& file) {
  ConfigReader r(j, file);
  CLIPTextConfig c;
  // CLIPTextModel's own config.json, or a full CLIPConfig with a "text_config" section.
  if (r.has("text_config") && j.at("text_config").is_object()) return from_json(j.at("text_config"), file);
  c.vocab_size = r.get_int64("vocab_size", c.vocab_size);
  c.hidden_size = r.get_int64("hidden_size", c.hidden_size);
  c.intermediate_size = r.get_int64("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = r.get_int64("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = r.get_int64("num_attention_heads", c.num_attention_heads);
  c.max_position_embeddings = r.get_int64("max_position_embeddings", c.max_position_embeddings);
  c.hidden_act = r.get_string("hidden_act", c.hidden_act);
  c.layer_norm_eps = r.get_double("layer_norm_eps", c.layer_norm_eps);
  c.bos_token_id = r.get_int64("bos_token_id", c.bos_token_id);
  c.eos_token_id = r.get_int64("eos_token_id", c.eos_token_id);
  c.pad_token_id = r.get_int64("pad_token_id", c.pad_token_id);
  c.projection_dim = r.get_int64("projection_dim", 0);
  if (r.has("architectures") && j.at("architectures").is_array())
    for (const auto& a : j.at("architectures"))
      if (a.is_string() && a.get<std::string>() == "CLIPTextModelWithProjection") c.with_projection = true;
  for (const char* k : {"architectures", "attention_dropout", "dropout", "initializer_factor", "initializer_range",
                        "model_type", "torch_dtype", "transformers_version"})
    r.ignore(k);
  r.log_unknown();
  if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu")
    r.fail("hidden_act", "\"quick_gelu\" or \"gelu\"");
  using namespace config_limits;
  r.check_positive("vocab_size", c.vocab_size, kMaxEmbeddingDim);
  r.check_positive("hidden_size", c.hidden_size, kMaxChannels);
  r.check_positive("intermediate_size", c.intermediate_size, kMaxEmbeddingDim);
  r.check_positive("num_hidden_layers", c.num_hidden_layers, kMaxLayers);
  r.check_positive("num_attention_heads", c.num_attention_heads, kMaxChannels);
  r.check_positive("max_position_embeddings", c.max_position_embeddings, kMaxChannels);
  if (c.with_projection && (c.projection_dim <= 0 || c.projection_dim > kMaxChannels))
    r.fail("projection_dim", "a positive integer up to " + std::to_string(kMaxChannels) +
                                 " (CLIPTextModelWithProjection)");
  if (c.hidden_size % c.num_attention_heads != 0)
    r.fail("num_attention_heads", "a divisor of hidden_size " + std::to_string(c.hidden_size));
  return c;
}

CLIPAttentionImpl::CLIPAttentionImpl(int64_t dim, int64_t h) : heads(h), head_dim(dim / h) {
  k_proj = register_module("k_proj", nn::Linear(dim, dim));
  v_proj = register_module("v_proj", nn::Linear(dim, dim));
  q_proj = register_module("q_proj", nn::Linear(dim, dim));
  out_proj = register_module("out_proj", nn::Linear(dim, dim));
}

torch::Tensor CLIPAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& mask) {
  const int64_t B = x.size(0), L = x.size(1);
  auto split = [&](const torch::Tensor& t) { return t.view({B, L, heads, head_dim}).transpose(1, 2); };  // [B,h,L,dh]
  auto q = split(q_proj(x) * (1.0 / std::sqrt(static_cast<double>(head_dim))));
  auto k = split(k_proj(x));
  auto v = split(v_proj(x));
  auto scores = torch::matmul(q, k.transpose(-1, -2));  // [B, h, L, L]
  if (mask.defined()) scores = scores + mask;
  // Softmax statistics in fp32 for reduced-precision activations.
  auto probs = torch::softmax(scores, -1, torch::kFloat).to(v.scalar_type());
  auto out = torch::matmul(probs, v).transpose(1, 2).reshape({B, L, heads * head_dim});
  return out_proj(out);
}

CLIPMLPImpl::CLIPMLPImpl(int64_t dim, int64_t inner, std::string a) : act(std::move(a)) {
  fc1 = register_module("fc1", nn::Linear(dim, inner));
  fc2 = register_module("fc2", nn::Linear(inner, dim));
}

torch::Tensor CLIPMLPImpl::forward(const torch::Tensor& x) {
  auto h = fc1(x);
  if (act == "quick_gelu")
    h = h * torch::sigmoid(h * 1.702);
  else
    h = torch::gelu(h);  // exact (erf) GELU
  return fc2(h);
}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const CLIPTextConfig& c)
    : CLIPEncoderLayerImpl(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                           c.layer_norm_eps) {}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(int64_t hidden, int64_t heads, int64_t inner, const std::string& act,
                                           double eps) {
  self_attn = register_module("self_attn", CLIPAttention(hidden, heads));
  layer_norm1 = register_module("layer_norm1", nn::LayerNorm(hidden, eps));
  mlp = register_module("mlp", CLIPMLP(hidden, inner, act));
  layer_norm2 = register_module("layer_norm2", nn::LayerNorm(hidden, eps));
}

torch::Tensor CLIPEncoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& mask) {
  auto h = x + self_attn(layer_norm1(x), mask);
  return h + mlp(layer_norm2(h));
}

CLIPTextTransformerImpl::CLIPTextTransformerImpl(const CLIPTextConfig& c) : config(c) {
  // Plain container modules so the registered names are embeddings.*, encoder.layers.N.*
  embeddings = register_module("embeddings", std::make_shared<torch::nn::Module>());
  token_embedding = embeddings->register_module("token_embedding", nn::Embedding(c.vocab_size, c.hidden_size));
  position_embedding =
      embeddings->register_module("position_embedding", nn::Embedding(c.max_position_embeddings, c.hidden_size));
  encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
  layers = encoder->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(CLIPEncoderLayer(c));
  final_layer_norm = register_module("final_layer_norm", nn::LayerNorm(c.hidden_size, c.layer_norm_eps));
}

CLIPTextOutput CLIPTextTransformerImpl::forward(const torch::Tensor& input_ids, bool output_hidden_states) {
  if (input_ids.dim() != 2)
    throw InvalidArgument("CLIPTextModel: input_ids must be [batch, length], got " + std::to_string(input_ids.dim()) +
                          " dims");
  const int64_t L = input_ids.size(1);
  if (L > config.max_position_embeddings)
    throw InvalidArgument("CLIPTextModel: sequence length " + std::to_string(L) + " exceeds max_position_embeddings " +
                          std::to_string(config.max_position_embeddings));
  auto ids = input_ids.to(token_embedding->weight.device(), torch::kLong);
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    if (lo < 0 || hi >= config.vocab_size)
      throw InvalidArgument("CLIPTextModel: token id out of range [0, " + std::to_string(config.vocab_size) +
                            "): found " + std::to_string(lo < 0 ? lo : hi));
  }
  auto positions = torch::arange(L, ids.options());
  auto h = token_embedding(ids) + position_embedding(positions);  // [B, L, D]
  // Causal mask: a token attends to itself and earlier tokens only.
  auto mask = torch::full({L, L}, -std::numeric_limits<float>::infinity(), h.options()).triu(1);
  CLIPTextOutput out;
  if (output_hidden_states) out.hidden_states.push_back(h);
  for (const auto& layer : *layers) {
    h = layer->as<CLIPEncoderLayer>()->forward(h, mask);
    if (output_hidden_states) out.hidden_states.push_back(h);
  }
  out.last_hidden_state = final_layer_norm(h);
  // transformers: with the legacy eos_token_id == 2 the pooled row is argmax(ids) (the EOS id is the largest).
  torch::Tensor eos_pos;
  if (config.eos_token_id == 2)
    eos_pos = ids.argmax(-1);
  else
    eos_pos = (ids == config.eos_token_id).to(torch::kInt).argmax(-1);
  out.pooler_output = out.last_hidden_state.index({torch::arange(ids.size(0), ids.options()), eos_pos});
  return out;
}

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& c) {
  text_model = register_module("text_model", CLIPTextTransformer(c));
  if (c.with_projection)
    text_projection = register_module("text_projection", nn::Linear(c.hidden_size, c.projection_dim, /*bias=*/false));
}

torch::Tensor CLIPTextModelImpl::forward(const torch::Tensor& input_ids) {
  return text_model->forward(input_ids, false).last_hidden_state;
}

CLIPTextOutput CLIPTextModelImpl::forward_all(const torch::Tensor& input_ids, bool output_hidden_states) {
  CLIPTextOutput out = text_model->forward(input_ids, output_hidden_states);
  if (text_projection) out.text_embeds = text_projection(out.pooler_output);
  return out;
}

CLIPTextModelImpl::XLOutput CLIPTextModelImpl::forward_sdxl(const torch::Tensor& input_ids, int clip_skip) {
  if (clip_skip < 0 || clip_skip + 1 >= config().num_hidden_layers + 1)
    throw InvalidArgument("clip_skip " + std::to_string(clip_skip) + " must be in [0, " +
                          std::to_string(config().num_hidden_layers - 1) + "] for a text encoder of " +
                          std::to_string(config().num_hidden_layers) + " layers");
  const CLIPTextOutput out = forward_all(input_ids, true);
  const auto& hs = out.hidden_states;
  return {hs[hs.size() - 2 - static_cast<size_t>(clip_skip)], out.text_embeds};
}

torch::Tensor CLIPTextModelImpl::forward_clip_skip(const torch::Tensor& input_ids, int clip_skip) {
  if (clip_skip <= 0) return forward(input_ids);
  if (clip_skip >= config().num_hidden_layers)
    throw InvalidArgument("clip_skip " + std::to_string(clip_skip) + " must be below the number of layers " +
                          std::to_string(config().num_hidden_layers));
  auto out = text_model->forward(input_ids, true);
  const auto& hs = out.hidden_states;
  return text_model->final_layer_norm(hs[hs.size() - 1 - static_cast<size_t>(clip_skip)]);
}

CLIPTextModel load_clip_text_model(const std::string& dir, torch::ScalarType dtype, torch::Device device,
                                   const std::string& variant) {
  const std::string config_file = dir + "/config.json";
  auto cfg = CLIPTextConfig::from_json(read_json_file(config_file), config_file);
  const std::string weights = find_weights(dir, variant);
  auto file = SafeTensorsFile::open(weights);
  return load_clip_text_model(cfg, file.load_all(), file.path(), dtype, device);
}

CLIPTextModel load_clip_text_model(const CLIPTextConfig& cfg, const std::map<std::string, torch::Tensor>& weights,
                                   const std::string& source, torch::ScalarType dtype, torch::Device device) {
  CLIPTextModel model(cfg);
  LoadWeightsOptions opts;
  opts.allow_unexpected = {"text_model.embeddings.position_ids"};
  opts.dtype = dtype;
  opts.device = device;
  load_weights(*model, weights, source, opts);
  model->eval();
  return model;
}

}  // namespace sd
