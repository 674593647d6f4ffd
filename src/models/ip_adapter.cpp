#include "models/ip_adapter.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "core/log.h"
#include "io/model_folder.h"
#include "io/pickle_guard.h"
#include "io/safetensors.h"
#include "io/state_dict.h"

namespace sd {

namespace fs = std::filesystem;

ImageProjectionImpl::ImageProjectionImpl(int64_t p, int64_t c, int64_t t)
    : image_embed_dim(p), cross_attention_dim(c), num_tokens(t) {
  proj = register_module("proj", sd::nn::Linear(p, t * c));
  norm = register_module("norm", sd::nn::LayerNorm(c, 1e-5));
}

torch::Tensor ImageProjectionImpl::forward(const torch::Tensor& image_embeds) {
  if (image_embeds.dim() != 2 || image_embeds.size(1) != image_embed_dim)
    throw InvalidArgument("IP-Adapter image_proj: image_embeds must be [B, " + std::to_string(image_embed_dim) +
                          "], got " + shape_str(image_embeds.sizes()));
  const auto x = image_embeds.to(proj->weight.device(), proj->weight.scalar_type());
  return norm(proj(x).reshape({x.size(0), num_tokens, cross_attention_dim}));
}

PerceiverAttentionImpl::PerceiverAttentionImpl(int64_t dim, int64_t h, int64_t dim_head) : heads(h) {
  const int64_t inner = h * dim_head;
  norm1 = register_module("norm1", sd::nn::LayerNorm(dim, 1e-5));
  norm2 = register_module("norm2", sd::nn::LayerNorm(dim, 1e-5));
  to_q = register_module("to_q", sd::nn::Linear(dim, inner, false));
  to_kv = register_module("to_kv", sd::nn::Linear(dim, 2 * inner, false));
  to_out = register_module("to_out", sd::nn::Linear(inner, dim, false));
}

torch::Tensor PerceiverAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& latents) {
  const torch::Tensor l = norm2(latents);                              // [B, Q, D]
  const auto kv = to_kv(torch::cat({norm1(x), l}, 1)).chunk(2, -1);   // keys / values over [B, N + Q, inner]
  // The original scales q and k by dh^-1/4 each; attention() scales q k^T by dh^-1/2: the same soft-max argument.
  return to_out(attention(to_q(l), kv[0], kv[1], heads, /*upcast=*/true));
}

namespace {
// A Resampler block: "0" the attention, "1" the feed-forward (nn.Sequential: "0" LayerNorm, "1" Linear, "2" GELU,
// "3" Linear).
struct ResamplerBlockImpl : torch::nn::Module {
  ResamplerBlockImpl(const ResamplerConfig& c) {
    attn = register_module("0", PerceiverAttention(c.hidden_dim, c.heads, c.dim_head));
    auto ff = register_module("1", std::make_shared<torch::nn::Module>());
    ff_norm = ff->register_module("0", sd::nn::LayerNorm(c.hidden_dim, 1e-5));
    ff_up = ff->register_module("1", sd::nn::Linear(c.hidden_dim, c.ff_dim, false));
    ff_down = ff->register_module("3", sd::nn::Linear(c.ff_dim, c.hidden_dim, false));
  }
  torch::Tensor forward(const torch::Tensor& x, torch::Tensor latents) {
    latents = attn(x, latents) + latents;
    return ff_down(torch::gelu(ff_up(ff_norm(latents)))) + latents;
  }
  PerceiverAttention attn{nullptr};
  sd::nn::LayerNorm ff_norm{nullptr};
  sd::nn::Linear ff_up{nullptr}, ff_down{nullptr};
};
TORCH_MODULE(ResamplerBlock);
}  // namespace

ResamplerImpl::ResamplerImpl(const ResamplerConfig& c) : config(c) {
  latents = register_parameter("latents", torch::empty({1, c.num_queries, c.hidden_dim}));
  proj_in = register_module("proj_in", sd::nn::Linear(c.embed_dim, c.hidden_dim));
  proj_out = register_module("proj_out", sd::nn::Linear(c.hidden_dim, c.output_dim));
  norm_out = register_module("norm_out", sd::nn::LayerNorm(c.output_dim, 1e-5));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.depth; ++i) layers->push_back(ResamplerBlock(c));
}

torch::Tensor ResamplerImpl::forward(const torch::Tensor& features) {
  if (features.dim() != 3 || features.size(2) != config.embed_dim)
    throw InvalidArgument("IP-Adapter Plus image_proj: the image features must be [B, N, " +
                          std::to_string(config.embed_dim) + "] (the image encoder's penultimate hidden states), got " +
                          shape_str(features.sizes()));
  const torch::Tensor x = proj_in(features.to(latents.device(), latents.scalar_type()));  // [B, N, D]
  torch::Tensor l = latents.expand({features.size(0), config.num_queries, config.hidden_dim});
  for (const auto& block : *layers) l = block->as<ResamplerBlockImpl>()->forward(x, l);
  return norm_out(proj_out(l));  // [B, Q, C]
}

FullProjectionImpl::FullProjectionImpl(int64_t e, int64_t c, int64_t n)
    : embed_dim(e), cross_attention_dim(c), num_tokens(n) {
  auto proj = register_module("proj", std::make_shared<torch::nn::Module>());  // the original's nn.Sequential
  fc1 = proj->register_module("0", sd::nn::Linear(e, e));
  fc2 = proj->register_module("2", sd::nn::Linear(e, c));
  norm = proj->register_module("3", sd::nn::LayerNorm(c, 1e-5));
}

torch::Tensor FullProjectionImpl::forward(const torch::Tensor& features) {
  if (features.dim() != 3 || features.size(1) != num_tokens || features.size(2) != embed_dim)
    throw InvalidArgument("IP-Adapter full-face image_proj: the image features must be [B, " +
                          std::to_string(num_tokens) + ", " + std::to_string(embed_dim) +
                          "] (the image encoder's penultimate hidden states), got " + shape_str(features.sizes()));
  const auto& w = fc1->weight;
  return norm(fc2(torch::gelu(fc1(features.to(w.device(), w.scalar_type())))));  // [B, N, C]
}

std::vector<CrossAttentionSlot> ip_adapter_cross_attentions(torch::nn::Module& unet) {
  // diffusers' attn_processors walks named_children recursively: down_blocks, up_blocks, then mid_block (the order
  // UNet2DConditionModel.__init__ registers them), each in its own registration order.
  std::vector<std::pair<int, CrossAttentionSlot>> found;
  for (const auto& item : unet.named_modules("", false)) {
    const std::string& name = item.key();
    if (name.size() < 6 || name.compare(name.size() - 6, 6, ".attn2") != 0) continue;
    auto attn = std::dynamic_pointer_cast<AttentionImpl>(item.value());
    if (!attn) continue;
    int group = 3;
    if (name.rfind("down_blocks.", 0) == 0) group = 0;
    else if (name.rfind("up_blocks.", 0) == 0) group = 1;
    else if (name.rfind("mid_block.", 0) == 0) group = 2;
    found.push_back({group, CrossAttentionSlot{name, 0, Attention(attn)}});
  }
  std::stable_sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<CrossAttentionSlot> slots;
  for (auto& f : found) {
    f.second.key_id = 2 * static_cast<int64_t>(slots.size()) + 1;
    slots.push_back(std::move(f.second));
  }
  return slots;
}

IPAdapterImpl::IPAdapterImpl(int64_t p, int64_t c, int64_t t, const std::vector<CrossAttentionSlot>& slots)
    : slots_(slots), scale_(std::make_shared<std::atomic<double>>(1.0)) {
  image_proj = register_module("image_proj", ImageProjection(p, c, t));
  add_branches(p, c, t);
}

IPAdapterImpl::IPAdapterImpl(const ResamplerConfig& r, const std::vector<CrossAttentionSlot>& slots)
    : slots_(slots), scale_(std::make_shared<std::atomic<double>>(1.0)) {
  resampler = register_module("image_proj", Resampler(r));
  add_branches(r.embed_dim, r.output_dim, r.num_queries);
}

IPAdapterImpl::IPAdapterImpl(FullProjection full, const std::vector<CrossAttentionSlot>& slots)
    : slots_(slots), scale_(std::make_shared<std::atomic<double>>(1.0)) {
  full_proj = register_module("image_proj", std::move(full));
  add_branches(full_proj->embed_dim, full_proj->cross_attention_dim, full_proj->num_tokens);
}

void IPAdapterImpl::add_branches(int64_t p, int64_t c, int64_t t) {
  image_embed_dim_ = p;
  cross_attention_dim_ = c;
  num_tokens_ = t;
  ip_adapter = register_module("ip_adapter", std::make_shared<torch::nn::Module>());
  for (const auto& s : slots_) {
    const auto& o = s.attention->options;
    auto holder = ip_adapter->register_module(std::to_string(s.key_id), std::make_shared<torch::nn::Module>());
    auto b = std::make_shared<IPAttentionBranch>();
    const int64_t inner = o.heads * o.dim_head;
    b->to_k_ip = holder->register_module("to_k_ip", sd::nn::Linear(c, inner, false));
    b->to_v_ip = holder->register_module("to_v_ip", sd::nn::Linear(c, inner, false));
    b->scale = scale_;
    b->num_tokens = t;
    branches_.push_back(b);
  }
}

torch::Tensor IPAdapterImpl::project(const torch::Tensor& image_embeds) {
  return plus() ? resampler(image_embeds) : full_face() ? full_proj(image_embeds) : image_proj(image_embeds);
}

void IPAdapterImpl::attach() {
  for (size_t i = 0; i < slots_.size(); ++i) slots_[i].attention->ip = branches_[i];
  attached_ = true;
}

void IPAdapterImpl::detach() {
  for (size_t i = 0; i < slots_.size(); ++i)
    if (slots_[i].attention->ip == branches_[i]) slots_[i].attention->ip.reset();
  attached_ = false;
}

void IPAdapterImpl::set_scale(double scale) {
  if (!std::isfinite(scale)) throw InvalidArgument("IP-Adapter scale must be finite, got " + std::to_string(scale));
  scale_->store(scale);
}

namespace {

// `key`'s shape in the file, or a FormatError naming the missing key and `hint` (the shape or layout expected).
std::vector<int64_t> key_shape(const SafeTensorsFile& file, const std::string& path, const std::string& key,
                               const std::string& hint) {
  if (!file.contains(key)) throw FormatError(path, "missing key " + key + " (" + hint + ")");
  const auto& i = file.info(key);
  return std::vector<int64_t>(i.shape.begin(), i.shape.end());
}

// A Plus file's Resampler from its shapes (image_proj.latents present), each checked; dh = 64 as diffusers reads it.
ResamplerConfig resampler_config(const SafeTensorsFile& file, const std::string& path, int64_t c,
                                 int64_t image_hidden_size) {
  const auto shape = [&](const std::string& key) {
    return key_shape(file, path, key,
                     "an IP-Adapter Plus file: image_proj.latents, proj_in, proj_out, norm_out and "
                     "image_proj.layers.N.{0.norm1, 0.norm2, 0.to_q, 0.to_kv, 0.to_out, 1.0, 1.1, 1.3}");
  };
  const auto expect = [&](const std::string& key, const std::vector<int64_t>& want, const std::string& why) {
    const auto got = shape(key);
    if (got != want)
      throw FormatError(path, key + " has shape " + shape_str(got) + ", expected " + shape_str(want) + why);
  };
  ResamplerConfig r;
  const auto lat = shape("image_proj.latents");
  if (lat.size() != 3 || lat[0] != 1 || lat[1] <= 0 || lat[2] <= 0)
    throw FormatError(path, "image_proj.latents has shape " + shape_str(lat) + ", expected [1, Q, D] (Q learnt "
                            "queries of width D)");
  r.num_queries = lat[1];
  r.hidden_dim = lat[2];
  r.output_dim = c;
  const auto in = shape("image_proj.proj_in.weight");
  if (in.size() != 2 || in[0] != r.hidden_dim || in[1] <= 0)
    throw FormatError(path, "image_proj.proj_in.weight has shape " + shape_str(in) + ", expected [" +
                            std::to_string(r.hidden_dim) + ", E] (E: the image encoder's hidden_size)");
  r.embed_dim = in[1];
  if (image_hidden_size > 0 && r.embed_dim != image_hidden_size)
    throw FormatError(path, "image_proj.proj_in.weight has shape " + shape_str(in) + ", expected [" +
                            std::to_string(r.hidden_dim) + ", " + std::to_string(image_hidden_size) +
                            "]: the image encoder's hidden_size is " + std::to_string(image_hidden_size) +
                            " (a Plus file needs the image encoder it was trained with: h94's *_vit-h SDXL files use "
                            "ViT-H, hidden_size 1280, from models/image_encoder, not sdxl_models/image_encoder)");
  expect("image_proj.proj_out.weight", {c, r.hidden_dim},
         ": the adapter's cross_attention_dim must be the UNet's " + std::to_string(c) +
             " (an IP-Adapter for another base model?)");
  while (file.contains("image_proj.layers." + std::to_string(r.depth) + ".0.to_q.weight")) ++r.depth;
  if (r.depth == 0) shape("image_proj.layers.0.0.to_q.weight");  // names the missing key
  const auto q = shape("image_proj.layers.0.0.to_q.weight");
  if (q.size() != 2 || q[0] <= 0 || q[0] % r.dim_head != 0)
    throw FormatError(path, "image_proj.layers.0.0.to_q.weight has shape " + shape_str(q) + ", expected [H x 64, " +
                            std::to_string(r.hidden_dim) + "] (heads of 64 channels)");
  r.heads = q[0] / r.dim_head;
  const auto ff = shape("image_proj.layers.0.1.1.weight");
  if (ff.size() != 2 || ff[0] <= 0)
    throw FormatError(path, "image_proj.layers.0.1.1.weight has shape " + shape_str(ff) + ", expected [F, " +
                            std::to_string(r.hidden_dim) + "]");
  r.ff_dim = ff[0];
  for (int64_t i = 0; i < r.depth; ++i) {
    const std::string b = "image_proj.layers." + std::to_string(i) + ".";
    const int64_t inner = r.heads * r.dim_head, d = r.hidden_dim;
    expect(b + "0.to_q.weight", {inner, d}, "");
    expect(b + "0.to_kv.weight", {2 * inner, d}, " (keys and values)");
    expect(b + "0.to_out.weight", {d, inner}, "");
    expect(b + "1.1.weight", {r.ff_dim, d}, "");
    expect(b + "1.3.weight", {d, r.ff_dim}, "");
  }
  return r;
}

}  // namespace

IPAdapter load_ip_adapter_weights(const std::string& path, torch::nn::Module& unet, int64_t image_embed_dim,
                                  torch::ScalarType dtype, torch::Device device, int64_t image_hidden_size,
                                  int64_t image_tokens) {
  refuse_pickle(path);
  const auto file = SafeTensorsFile::open(path);
  const auto slots = ip_adapter_cross_attentions(unet);
  if (slots.empty()) throw FormatError(path, "the UNet has no cross-attention (attn2) to attach an IP-Adapter to");
  // The UNet's context width: every attn2 takes the same cross_attention_dim (diffusers uses the config's).
  const int64_t c = slots.front().attention->options.cross_attention_dim;
  const auto need = [&](const std::string& key, const std::string& expected) {
    return key_shape(file, path, key,
                     "expected shape " + expected + "; the IP-Adapter layout is image_proj.proj, image_proj.norm "
                     "and ip_adapter.{1,3,...}.to_k_ip / to_v_ip");
  };
  const bool plus = file.contains("image_proj.latents");
  // full-face's MLP ends in proj.3 (its LayerNorm), as diffusers tells it apart; FaceID's starts with proj.0 too.
  const bool full_face = !plus && file.contains("image_proj.proj.3.weight");
  if (!plus && !full_face &&
      (file.contains("image_proj.proj.0.weight") || file.contains("image_proj.perceiver_resampler.latents")))
    throw FormatError(path, "an IP-Adapter FaceID file (image_proj.proj.0 / perceiver_resampler: a projection of "
                            "InsightFace face embeddings) is not supported; plain, Plus and full-face IP-Adapters are");
  ResamplerConfig resampler;
  int64_t tokens = 0, p = 0;
  if (plus) {
    resampler = resampler_config(file, path, c, image_hidden_size);
    tokens = resampler.num_queries;
  } else if (full_face) {
    const auto fc1 = need("image_proj.proj.0.weight", "[E, E] (a full-face IP-Adapter)");
    if (fc1.size() != 2 || fc1[0] != fc1[1] || fc1[0] <= 0 || (image_hidden_size > 0 && fc1[0] != image_hidden_size))
      throw FormatError(path, "image_proj.proj.0.weight has shape " + shape_str(fc1) + ", expected [E, E] (E: the " +
                              "image encoder's hidden_size" +
                              (image_hidden_size > 0 ? ", " + std::to_string(image_hidden_size) : std::string()) +
                              "; a full-face IP-Adapter)");
    p = fc1[0];
    const std::string want2 = "[" + std::to_string(c) + ", " + std::to_string(p) + "]";
    const auto fc2 = need("image_proj.proj.2.weight", want2);
    if (fc2 != std::vector<int64_t>{c, p})
      throw FormatError(path, "image_proj.proj.2.weight has shape " + shape_str(fc2) + ", expected " + want2 +
                              ": the adapter's cross_attention_dim must be the UNet's " + std::to_string(c) +
                              " (an IP-Adapter for another base model?)");
    if (image_tokens <= 0)
      throw InvalidArgument("IP-Adapter " + path + ": a full-face adapter needs the image encoder's token count "
                            "(load it with its image encoder)");
    tokens = image_tokens;
  } else {
    const auto norm_shape = need("image_proj.norm.weight", "[" + std::to_string(c) + "]");
    if (norm_shape.size() != 1 || norm_shape[0] != c)
      throw FormatError(path, "image_proj.norm.weight has shape " + shape_str(norm_shape) + ", expected [" +
                                  std::to_string(c) + "]: the adapter's cross_attention_dim does not match the " +
                                  "UNet's " + std::to_string(c) + " (an IP-Adapter for another base model?)");
    const auto proj_shape = need("image_proj.proj.weight", "[T x " + std::to_string(c) + ", P]");
    if (proj_shape.size() != 2 || proj_shape[0] % c != 0 || proj_shape[0] == 0)
      throw FormatError(path, "image_proj.proj.weight has shape " + shape_str(proj_shape) + ", expected [T x " +
                                  std::to_string(c) + ", P] (T image tokens of the UNet's cross_attention_dim " +
                                  std::to_string(c) + ")");
    tokens = proj_shape[0] / c;
    p = proj_shape[1];
    if (image_embed_dim > 0 && p != image_embed_dim)
      throw FormatError(path, "image_proj.proj.weight has shape " + shape_str(proj_shape) + ", expected [" +
                                  std::to_string(proj_shape[0]) + ", " + std::to_string(image_embed_dim) +
                                  "]: the image encoder's projection_dim is " + std::to_string(image_embed_dim));
  }
  // The number of cross-attentions: the highest ip_adapter.{k} id must be the last attn2's.
  int64_t max_id = -1;
  for (const auto& k : file.keys()) {
    if (k.rfind("ip_adapter.", 0) != 0) continue;
    const auto dot = k.find('.', 11);
    try {
      max_id = std::max<int64_t>(max_id, std::stoll(k.substr(11, dot - 11)));
    } catch (const std::exception&) {
      throw FormatError(path, "unexpected key " + k + " (expected ip_adapter.{1,3,...}.to_k_ip.weight / to_v_ip.weight)");
    }
  }
  const int64_t expect_max = slots.back().key_id;
  if (max_id > expect_max)
    throw FormatError(path, "key ip_adapter." + std::to_string(max_id) + ".* has no cross-attention: the UNet has " +
                                std::to_string(slots.size()) + " attn2 (ids 1.." + std::to_string(expect_max) +
                                "); this IP-Adapter was made for a UNet with " +
                                std::to_string(max_id / 2 + max_id % 2));  // (max_id + 1) / 2 without overflow
  for (const auto& s : slots) {
    const int64_t inner = s.attention->options.heads * s.attention->options.dim_head;
    std::string expected = "[";  // appended piece by piece: `"[" + std::to_string(...)` is a GCC 12 false warning
    expected += std::to_string(inner) + ", " + std::to_string(c) + "]";
    for (const char* w : {"to_k_ip", "to_v_ip"}) {
      const std::string key = "ip_adapter." + std::to_string(s.key_id) + "." + w + ".weight";
      const auto sh = need(key, expected + " for " + s.name);
      if (sh != std::vector<int64_t>{inner, c})
        throw FormatError(path, key + " has shape " + shape_str(sh) + ", expected " + expected + " for " + s.name);
    }
  }
  IPAdapter adapter = plus        ? IPAdapter(resampler, slots)
                      : full_face ? IPAdapter(FullProjection(p, c, tokens), slots)
                                  : IPAdapter(p, c, tokens, slots);
  LoadWeightsOptions opts;
  opts.dtype = dtype;
  opts.device = device;
  load_weights(*adapter, file, opts);  // the remaining checks: unexpected keys, biases, norm.bias
  adapter->eval();
  return adapter;
}

IPAdapterPaths find_ip_adapter(const std::string& path) {
  refuse_pickle(path);
  IPAdapterPaths out;
  if (is_directory(path)) {
    std::vector<std::string> candidates, pickles;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(path, ec)) {
      if (!e.is_regular_file()) continue;
      const std::string name = e.path().filename().string();
      std::string lower = name;
      std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
      if (lower.rfind("ip-adapter", 0) != 0 && lower.rfind("ip_adapter", 0) != 0) continue;
      if (e.path().extension() == ".safetensors")
        candidates.push_back(e.path().string());
      else
        pickles.push_back(e.path().string());
    }
    std::sort(candidates.begin(), candidates.end());
    if (candidates.empty() && !pickles.empty()) refuse_pickle(pickles.front());
    if (candidates.size() != 1) {
      std::string list;
      for (const auto& c : candidates) {
        list += ' ';
        list += fs::path(c).filename().string();
      }
      throw FormatError(path, candidates.empty()
                                  ? "no ip-adapter*.safetensors file in this folder"
                                  : "several ip-adapter*.safetensors files (" + list.substr(1) +
                                        "): give the one to use as --ip-adapter FILE");
    }
    out.weights = candidates.front();
    out.image_encoder_dir = (fs::path(path) / "image_encoder").string();
  } else {
    if (!is_file(path)) throw InvalidArgument("IP-Adapter " + path + ": no such file or folder");
    out.weights = path;
    out.image_encoder_dir = (fs::path(path).parent_path() / "image_encoder").string();
  }
  if (!is_directory(out.image_encoder_dir))
    throw FormatError(out.weights, "the IP-Adapter's image encoder is missing: expected a CLIPVisionModelWithProjection "
                                   "folder (config.json + model.safetensors) at " + out.image_encoder_dir);
  return out;
}

torch::Tensor IPAdapterModels::image_embeds(const torch::Tensor& rgb_u8_hwc) const {
  torch::NoGradGuard no_grad;
  const auto& cfg = image_encoder->config();
  const auto& w = image_encoder->visual_projection->weight;
  if (adapter->reads_hidden_states()) {
    // diffusers' encode_image(output_hidden_states=True): hidden_states[-2] of the image, and for classifier-free
    // guidance of zeros_like(pixel_values) (zero after the normalisation, not a black image).
    const torch::Tensor pixels =
        rgb_u8_hwc.defined() ? clip_image_preprocess(rgb_u8_hwc, cfg.image_size)
                             : torch::zeros({1, cfg.num_channels, cfg.image_size, cfg.image_size});
    return image_encoder.ptr()->penultimate_hidden_state(pixels.to(w.device(), w.scalar_type()));
  }
  // diffusers' encode_image for classifier-free guidance: the unconditional image embeds are zeros.
  if (!rgb_u8_hwc.defined()) return torch::zeros({1, cfg.projection_dim}, w.options());
  const torch::Tensor pixels = clip_image_preprocess(rgb_u8_hwc, cfg.image_size);
  return image_encoder.ptr()->forward(pixels.to(w.device(), w.scalar_type())).image_embeds;
}

torch::Tensor IPAdapterModels::image_tokens(const torch::Tensor& image_embeds) const {
  torch::NoGradGuard no_grad;
  return adapter.ptr()->project(image_embeds);
}

std::shared_ptr<IPAdapterModels> load_ip_adapter(const std::string& path, torch::nn::Module& unet,
                                                 torch::ScalarType dtype, torch::Device device) {
  auto m = std::make_shared<IPAdapterModels>();
  m->paths = find_ip_adapter(path);
  m->image_encoder = load_clip_vision_model(m->paths.image_encoder_dir, dtype, device);
  const auto& ec = m->image_encoder->config();
  m->adapter = load_ip_adapter_weights(m->paths.weights, unet, ec.projection_dim, dtype, device, ec.hidden_size,
                                       ec.num_patches() + 1);
  // Before attach(): a failure here (out of memory in a ViT-H pass) leaves the caller's UNet as it was.
  const auto t0 = std::chrono::steady_clock::now();
  m->uncond_image_tokens = m->image_tokens(m->image_embeds(torch::Tensor()));
  if (device.is_cuda()) torch::cuda::synchronize();  // the time of the pass, not of its launches
  const double uncond_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  m->adapter->attach();
  const bool states = m->adapter->reads_hidden_states();
  log::info("IP-Adapter{} {}: {} image tokens into {} cross-attentions, image encoder {} ({} px, {} {}; the "
            "unconditional image's tokens in {:.1f} ms)",
            m->adapter->plus() ? " Plus" : m->adapter->full_face() ? " full-face" : "", m->paths.weights,
            m->adapter->num_tokens(), m->adapter->slots().size(), m->paths.image_encoder_dir, ec.image_size,
            states ? "penultimate hidden states" : "projection", states ? ec.hidden_size : ec.projection_dim,
            uncond_ms);
  return m;
}

}  // namespace sd
