#pragma once
// IP-Adapter (h94/IP-Adapter, as diffusers 0.24's load_ip_adapter / IPAdapterAttnProcessor): an image prompt
// conditions the UNet through a decoupled cross-attention. The image encoder (CLIPVisionModelWithProjection, its
// `image_encoder/` folder) maps the image to image_embeds [B, P]; the adapter's ImageProjection turns them into T = 4
// image tokens, ip_tokens = LayerNorm(Linear(image_embeds).reshape(B, T, C)), which are appended to the text context
// ([B, 77 + T, C]); every cross-attention (attn2) of the UNet splits them off again and adds
// scale * attention(q, to_k_ip(ip_tokens), to_v_ip(ip_tokens)) to its text attention, before to_out
// (models/attention.h, IPAttentionBranch).
//
// The module tree's registered names are exactly the standard file's keys: image_proj.proj.{weight,bias} [T*C, P],
// image_proj.norm.{weight,bias} [C], ip_adapter.{k}.to_k_ip.weight / to_v_ip.weight [inner, C] with k = 2j + 1 for
// the j-th attn2 in diffusers' attn_processors order (down_blocks..., up_blocks..., mid_block: module registration
// order, not down-mid-up; the even ids are the attn1 processors, which have no weights).
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "models/attention.h"
#include "models/clip_vision_model.h"
#include "models/layers.h"

namespace sd {

// diffusers' ImageProjection (file keys image_proj.proj / image_proj.norm).
class ImageProjectionImpl : public torch::nn::Module {
 public:
  ImageProjectionImpl(int64_t image_embed_dim, int64_t cross_attention_dim, int64_t num_tokens);
  // image_embeds [B, P] -> ip_tokens [B, T, C]
  torch::Tensor forward(const torch::Tensor& image_embeds);
  sd::nn::Linear proj{nullptr};
  sd::nn::LayerNorm norm{nullptr};
  int64_t image_embed_dim, cross_attention_dim, num_tokens;
};
TORCH_MODULE(ImageProjection);

// One cross-attention of a UNet as diffusers orders them for IP-Adapter.
struct CrossAttentionSlot {
  std::string name;  // "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
  int64_t key_id;    // 2j + 1
  Attention attention{nullptr};
};
// The attn2 modules of `unet` (a UNet2DConditionModel) in attn_processors order: down_blocks, up_blocks, mid_block,
// registration order within each.
std::vector<CrossAttentionSlot> ip_adapter_cross_attentions(torch::nn::Module& unet);

class IPAdapterImpl : public torch::nn::Module {
 public:
  // One decoupled branch per slot: ip_adapter.{key_id}.to_k_ip / to_v_ip [inner, C], inner = the slot's heads x
  // dim_head.
  IPAdapterImpl(int64_t image_embed_dim, int64_t cross_attention_dim, int64_t num_tokens,
                const std::vector<CrossAttentionSlot>& slots);

  // image_embeds [B, P] -> ip_tokens [B, T, C] (in the weights' dtype and device).
  torch::Tensor project(const torch::Tensor& image_embeds);
  // Sets the IP branch of every slot's attn2 (the slots this adapter was built for). Until detach(), the UNet's
  // context must end with num_tokens() image tokens.
  void attach();
  void detach();
  bool attached() const { return attached_; }
  // The scale of every branch (diffusers' set_ip_adapter_scale; 1.0 after load). 0 = the plain UNet, exactly.
  // Safe to change between UNet calls; InvalidArgument when not finite.
  void set_scale(double scale);
  double scale() const { return scale_->load(); }
  int64_t num_tokens() const { return image_proj->num_tokens; }
  int64_t image_embed_dim() const { return image_proj->image_embed_dim; }
  int64_t cross_attention_dim() const { return image_proj->cross_attention_dim; }
  const std::vector<CrossAttentionSlot>& slots() const { return slots_; }

  ImageProjection image_proj{nullptr};
  std::shared_ptr<torch::nn::Module> ip_adapter;  // children "1", "3", ... each with to_k_ip, to_v_ip

 private:
  std::vector<CrossAttentionSlot> slots_;
  std::vector<std::shared_ptr<IPAttentionBranch>> branches_;  // one per slot
  std::shared_ptr<std::atomic<double>> scale_;
  bool attached_ = false;
};
TORCH_MODULE(IPAdapter);

// Reads an IP-Adapter weights file (.safetensors; pickles are refused) for `unet`: checks every key and shape against
// the UNet (cross_attention_dim, the number and widths of its attn2) and returns the adapter, not attached. Errors
// (FormatError) name the file, the key and the expected shape. `image_embed_dim` > 0 also checks
// image_proj.proj.weight against the image encoder's projection_dim.
IPAdapter load_ip_adapter_weights(const std::string& file, torch::nn::Module& unet, int64_t image_embed_dim = 0,
                                  torch::ScalarType dtype = torch::kFloat32, torch::Device device = torch::kCPU);

// Where an IP-Adapter's files are: `path` is the weights file (its image encoder in image_encoder/ next to it) or a
// folder holding exactly one ip-adapter*.safetensors and image_encoder/. FormatError / InvalidArgument otherwise.
struct IPAdapterPaths {
  std::string weights;
  std::string image_encoder_dir;
};
IPAdapterPaths find_ip_adapter(const std::string& path);

// The adapter with its image encoder, attached to a UNet.
struct IPAdapterModels {
  IPAdapter adapter{nullptr};
  CLIPVisionModel image_encoder{nullptr};
  IPAdapterPaths paths;

  // uint8 RGB [H, W, 3] or [B, H, W, 3] -> image_embeds [B, P] through CLIPImageProcessor + the encoder.
  // Undefined input: diffusers' unconditional image (zeros [1, P]).
  torch::Tensor image_embeds(const torch::Tensor& rgb_u8_hwc) const;
  // image_embeds -> ip_tokens [B, T, C] (what is appended to the text context).
  torch::Tensor image_tokens(const torch::Tensor& image_embeds) const;
};

// find_ip_adapter + load_clip_vision_model + load_ip_adapter_weights + attach. The adapter's scale starts at 1.
std::shared_ptr<IPAdapterModels> load_ip_adapter(const std::string& path, torch::nn::Module& unet,
                                                 torch::ScalarType dtype = torch::kFloat32,
                                                 torch::Device device = torch::kCPU);

}  // namespace sd
