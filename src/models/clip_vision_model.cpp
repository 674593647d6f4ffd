#include "models/clip_vision_model.h"

#include "core/error.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/config_limits.h"

namespace sd {

CLIPVisionConfig CLIPVisionConfig::from_json(const nlohmann::json& j, const std::string& file) {
  // CLIPVisionModelWithProjection's own config.json, or a full CLIPConfig with a "vision_config" section.
  if (j.is_object() && j.contains("vision_config") && j.at("vision_config").is_object()) {
    CLIPVisionConfig c = from_json(j.at("vision_config"), file);
    if (j.contains("projection_dim") && j.at("projection_dim").is_number_integer())
      c.projection_dim = j.at("projection_dim").get<int64_t>();
    return c;
  }
  ConfigReader r(j, file);
  CLIPVisionConfig c;
  c.hidden_size = r.get_int64("hidden_size", c.hidden_size);
  c.intermediate_size = r.get_int64("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = r.get_int64("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = r.get_int64("num_attention_heads", c.num_attention_heads);
  c.num_channels = r.get_int64("num_channels", c.num_channels);
  c.image_size = r.get_int64("image_size", c.image_size);
  c.patch_size = r.get_int64("patch_size", c.patch_size);
  c.hidden_act = r.get_string("hidden_act", c.hidden_act);
  c.layer_norm_eps = r.get_double("layer_norm_eps", c.layer_norm_eps);
  c.projection_dim = r.get_int64("projection_dim", c.projection_dim);
  for (const char* k : {"architectures", "attention_dropout", "dropout", "initializer_factor", "initializer_range",
                        "model_type", "torch_dtype", "transformers_version"})
    r.ignore(k);
  r.log_unknown();
  if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu") r.fail("hidden_act", "\"quick_gelu\" or \"gelu\"");
  using namespace config_limits;
  r.check_positive("hidden_size", c.hidden_size, kMaxChannels);
  r.check_positive("intermediate_size", c.intermediate_size, kMaxEmbeddingDim);
  r.check_positive("num_hidden_layers", c.num_hidden_layers, kMaxLayers);
  r.check_positive("num_attention_heads", c.num_attention_heads, kMaxChannels);
  r.check_positive("num_channels", c.num_channels, kMaxChannels);
  r.check_positive("image_size", c.image_size, kMaxChannels);
  r.check_positive("patch_size", c.patch_size, kMaxChannels);
  r.check_positive("projection_dim", c.projection_dim, kMaxChannels);
  if (c.hidden_size % c.num_attention_heads != 0)
    r.fail("num_attention_heads", "a divisor of hidden_size " + std::to_string(c.hidden_size));
  if (c.image_size % c.patch_size != 0)
    r.fail("patch_size", "a divisor of image_size " + std::to_string(c.image_size));
  if (!(c.layer_norm_eps > 0)) r.fail("layer_norm_eps", "a positive number");
  return c;
}

CLIPVisionTransformerImpl::CLIPVisionTransformerImpl(const CLIPVisionConfig& c) : config(c) {
  embeddings = register_module("embeddings", std::make_shared<torch::nn::Module>());
  class_embedding = embeddings->register_parameter("class_embedding", torch::empty({c.hidden_size}), false);
  patch_embedding = embeddings->register_module(
      "patch_embedding", nn::Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, 0, /*bias=*/false));
  position_embedding =
      embeddings->register_module("position_embedding", nn::Embedding(c.num_patches() + 1, c.hidden_size));
  pre_layrnorm = register_module("pre_layrnorm", nn::LayerNorm(c.hidden_size, c.layer_norm_eps));
  encoder = register_module("encoder", std::make_shared<torch::nn::Module>());
  layers = encoder->register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    layers->push_back(
        CLIPEncoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps));
  post_layernorm = register_module("post_layernorm", nn::LayerNorm(c.hidden_size, c.layer_norm_eps));
}

torch::Tensor CLIPVisionTransformerImpl::embed(const torch::Tensor& pixel_values) {
  const auto& c = config;
  if (pixel_values.dim() != 4 || pixel_values.size(1) != c.num_channels || pixel_values.size(2) != c.image_size ||
      pixel_values.size(3) != c.image_size)
    throw InvalidArgument("CLIPVisionModel: pixel_values must be [B, " + std::to_string(c.num_channels) + ", " +
                          std::to_string(c.image_size) + ", " + std::to_string(c.image_size) + "], got " +
                          shape_str(pixel_values.sizes()));
  const int64_t b = pixel_values.size(0);
  const auto& w = patch_embedding->weight;
  auto patches = patch_embedding(pixel_values.to(w.device(), w.scalar_type()));  // [B, D, g, g]
  patches = patches.flatten(2).transpose(1, 2);                                 // [B, g*g, D]
  auto cls = class_embedding.view({1, 1, c.hidden_size}).expand({b, 1, c.hidden_size});
  auto positions = torch::arange(c.num_patches() + 1, torch::TensorOptions().dtype(torch::kLong).device(w.device()));
  return pre_layrnorm(torch::cat({cls, patches}, 1) + position_embedding(positions));
}

torch::Tensor CLIPVisionTransformerImpl::penultimate_hidden_state(const torch::Tensor& pixel_values) {
  auto h = embed(pixel_values);
  for (size_t i = 0; i + 1 < layers->size(); ++i) h = layers[i]->as<CLIPEncoderLayer>()->forward(h, torch::Tensor());
  return h;
}

CLIPVisionOutput CLIPVisionTransformerImpl::forward(const torch::Tensor& pixel_values) {
  auto h = embed(pixel_values);
  CLIPVisionOutput out;
  for (const auto& layer : *layers) {
    out.penultimate_hidden_state = h;
    h = layer->as<CLIPEncoderLayer>()->forward(h, torch::Tensor());
  }
  out.last_hidden_state = h;
  out.pooler_output = post_layernorm(h.select(1, 0));
  return out;
}

CLIPVisionModelImpl::CLIPVisionModelImpl(const CLIPVisionConfig& c) {
  vision_model = register_module("vision_model", CLIPVisionTransformer(c));
  visual_projection = register_module("visual_projection", nn::Linear(c.hidden_size, c.projection_dim, false));
}

CLIPVisionOutput CLIPVisionModelImpl::forward(const torch::Tensor& pixel_values) {
  CLIPVisionOutput out = vision_model->forward(pixel_values);
  out.image_embeds = visual_projection(out.pooler_output);
  return out;
}

CLIPVisionModel load_clip_vision_model(const std::string& dir, torch::ScalarType dtype, torch::Device device) {
  const std::string config_file = dir + "/config.json";
  const auto cfg = CLIPVisionConfig::from_json(read_json_file(config_file), config_file);
  const auto file = SafeTensorsFile::open(find_weights(dir));
  CLIPVisionModel model(cfg);
  LoadWeightsOptions opts;
  opts.allow_unexpected = {"vision_model.embeddings.position_ids"};
  opts.dtype = dtype;
  opts.device = device;
  load_weights(*model, file, opts);
  model->eval();
  return model;
}

torch::Tensor clip_image_preprocess(const torch::Tensor& rgb_u8_hwc, int64_t size) {
  if (size <= 0) throw InvalidArgument("clip_image_preprocess: image size must be positive");
  const auto& x = rgb_u8_hwc;
  if (!x.defined() || x.scalar_type() != torch::kUInt8 || (x.dim() != 3 && x.dim() != 4) || x.size(-1) != 3 ||
      x.size(-2) <= 0 || x.size(-3) <= 0)
    throw InvalidArgument("image prompt: expected a uint8 RGB image [H, W, 3] or [B, H, W, 3], got " +
                          (x.defined() ? std::string(c10::toString(x.scalar_type())) + " " + shape_str(x.sizes())
                                       : std::string("nothing")));
  torch::Tensor img = (x.dim() == 3 ? x.unsqueeze(0) : x).to(torch::kCPU).permute({0, 3, 1, 2});  // [B, 3, H, W]
  img = img.to(torch::kFloat);
  const int64_t h = img.size(2), w = img.size(3);
  const int64_t shortest = std::min(h, w), longest = std::max(h, w);
  if (shortest != size) {
    // transformers' get_resize_output_image_size(default_to_square=False): short -> size, long -> int(size*l/s).
    const int64_t other = static_cast<int64_t>(static_cast<double>(size) * static_cast<double>(longest) /
                                               static_cast<double>(shortest));
    const int64_t nh = h <= w ? size : other, nw = h <= w ? other : size;
    // PIL's BICUBIC resize filters with the scale's support when shrinking (antialias) and returns uint8.
    img = torch::nn::functional::interpolate(
        img, torch::nn::functional::InterpolateFuncOptions()
                 .size(std::vector<int64_t>{nh, nw})
                 .mode(torch::kBicubic)
                 .align_corners(false)
                 .antialias(true));
    img = img.round().clamp(0, 255);
  }
  // Centre crop (transformers' center_crop: top = (h - S) // 2, left = (w - S) // 2).
  const int64_t top = (img.size(2) - size) / 2, left = (img.size(3) - size) / 2;
  img = img.slice(2, top, top + size).slice(3, left, left + size);
  const auto mean = torch::tensor({0.48145466f, 0.4578275f, 0.40821073f}).view({1, 3, 1, 1});
  const auto std = torch::tensor({0.26862954f, 0.26130258f, 0.27577711f}).view({1, 3, 1, 1});
  return ((img / 255.0f - mean) / std).contiguous();
}

}  // namespace sd
