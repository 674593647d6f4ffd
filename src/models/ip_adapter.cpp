#include "models/ip_adapter.h"

#include <algorithm>
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

torch::Tensor IPAdapterImpl::project(const torch::Tensor& image_embeds) { return image_proj(image_embeds); }

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

IPAdapter load_ip_adapter_weights(const std::string& path, torch::nn::Module& unet, int64_t image_embed_dim,
                                  torch::ScalarType dtype, torch::Device device) {
  refuse_pickle(path);
  const auto file = SafeTensorsFile::open(path);
  const auto slots = ip_adapter_cross_attentions(unet);
  if (slots.empty()) throw FormatError(path, "the UNet has no cross-attention (attn2) to attach an IP-Adapter to");
  // The UNet's context width: every attn2 takes the same cross_attention_dim (diffusers uses the config's).
  const int64_t c = slots.front().attention->options.cross_attention_dim;
  auto need = [&](const std::string& key, const std::string& expected) -> const safetensors::TensorInfo& {
    if (!file.contains(key))
      throw FormatError(path, "missing key " + key + " (expected shape " + expected + "; the IP-Adapter layout is "
                              "image_proj.proj, image_proj.norm and ip_adapter.{1,3,...}.to_k_ip / to_v_ip)");
    return file.info(key);
  };
  auto shape_of = [](const safetensors::TensorInfo& i) { return std::vector<int64_t>(i.shape.begin(), i.shape.end()); };
  const auto norm_shape = shape_of(need("image_proj.norm.weight", "[" + std::to_string(c) + "]"));
  if (norm_shape.size() != 1 || norm_shape[0] != c)
    throw FormatError(path, "image_proj.norm.weight has shape " + shape_str(norm_shape) + ", expected [" +
                                std::to_string(c) + "]: the adapter's cross_attention_dim does not match the UNet's " +
                                std::to_string(c) + " (an IP-Adapter for another base model?)");
  const auto proj_shape = shape_of(need("image_proj.proj.weight", "[T x " + std::to_string(c) + ", P]"));
  if (proj_shape.size() != 2 || proj_shape[0] % c != 0 || proj_shape[0] == 0)
    throw FormatError(path, "image_proj.proj.weight has shape " + shape_str(proj_shape) + ", expected [T x " +
                                std::to_string(c) + ", P] (T image tokens of the UNet's cross_attention_dim " +
                                std::to_string(c) + ")");
  const int64_t tokens = proj_shape[0] / c, p = proj_shape[1];
  if (image_embed_dim > 0 && p != image_embed_dim)
    throw FormatError(path, "image_proj.proj.weight has shape " + shape_str(proj_shape) + ", expected [" +
                                std::to_string(proj_shape[0]) + ", " + std::to_string(image_embed_dim) +
                                "]: the image encoder's projection_dim is " + std::to_string(image_embed_dim));
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
                                "); this IP-Adapter was made for a UNet with " + std::to_string((max_id + 1) / 2));
  for (const auto& s : slots) {
    const int64_t inner = s.attention->options.heads * s.attention->options.dim_head;
    std::string expected = "[";  // appended piece by piece: `"[" + std::to_string(...)` is a GCC 12 false warning
    expected += std::to_string(inner) + ", " + std::to_string(c) + "]";
    for (const char* w : {"to_k_ip", "to_v_ip"}) {
      const std::string key = "ip_adapter." + std::to_string(s.key_id) + "." + w + ".weight";
      const auto sh = shape_of(need(key, expected + " for " + s.name));
      if (sh != std::vector<int64_t>{inner, c})
        throw FormatError(path, key + " has shape " + shape_str(sh) + ", expected " + expected + " for " + s.name);
    }
  }
  IPAdapter adapter(p, c, tokens, slots);
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
  m->adapter = load_ip_adapter_weights(m->paths.weights, unet, m->image_encoder->config().projection_dim, dtype, device);
  m->adapter->attach();
  log::info("IP-Adapter {}: {} image tokens into {} cross-attentions, image encoder {} ({} px, projection {})",
            m->paths.weights, m->adapter->num_tokens(), m->adapter->slots().size(), m->paths.image_encoder_dir,
            m->image_encoder->config().image_size, m->image_encoder->config().projection_dim);
  return m;
}

}  // namespace sd
