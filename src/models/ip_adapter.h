#pragma once
// IP-Adapter (h94/IP-Adapter, as diffusers 0.24's load_ip_adapter / IPAdapterAttnProcessor): an image prompt
// conditions the UNet through a decoupled cross-attention. The image encoder (CLIPVisionModelWithProjection, its
// `image_encoder/` folder) maps the image to image_embeds [B, P]; the adapter's ImageProjection turns them into T = 4
// image tokens, ip_tokens = LayerNorm(Linear(image_embeds).reshape(B, T, C)), which are appended to the text context
// ([B, 77 + T, C]); every cross-attention (attn2) of the UNet splits them off again and adds
// scale * attention(q, to_k_ip(ip_tokens), to_v_ip(ip_tokens)) to its text attention, before to_out
// (models/attention.h, IPAttentionBranch).
//
// IP-Adapter Plus (ip-adapter-plus_*, ip-adapter-plus-face_*) replaces the projection by a Resampler that reads the
// encoder's penultimate hidden states (hidden_states[-2], every patch) instead of image_embeds, and gives more tokens
// (16); the UNet side is the same.
//
// The module tree's registered names are exactly the standard file's keys: image_proj.proj.{weight,bias} [T*C, P],
// image_proj.norm.{weight,bias} [C] (Plus: the Resampler's keys, below), ip_adapter.{k}.to_k_ip.weight /
// to_v_ip.weight [inner, C] with k = 2j + 1 for the j-th attn2 in diffusers' attn_processors order (down_blocks...,
// up_blocks..., mid_block: module registration order, not down-mid-up; the even ids are the attn1 processors, which
// have no weights).
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

// IP-Adapter Plus's projection: h94/IP-Adapter's Resampler (diffusers' IPAdapterPlusImageProjection, which loads the
// same file). Q learnt latents [1, Q, D] attend, block by block, to the projected image features and to themselves:
//   x = proj_in(features)                                     features [B, N, E] -> [B, N, D]
//   per block: latents += to_out(attention(to_q(norm2(l)), to_kv(cat(norm1(x), norm2(l)))))   (heads of dh = 64)
//              latents += ff(latents)          ff = Linear(F, D) . GELU . Linear(D, F) . LayerNorm, no biases
//   ip_tokens = norm_out(proj_out(latents))                   [B, Q, C]
// File keys: image_proj.latents, proj_in [D, E], proj_out [C, D], norm_out [C], and per block i
// image_proj.layers.i.0.{norm1, norm2, to_q [H*dh, D], to_kv [2*H*dh, D], to_out [D, H*dh]} and
// image_proj.layers.i.1.{0 (LayerNorm), 1 [F, D], 3 [D, F]}. LayerNorms with eps 1e-5; soft-max in fp32.
struct ResamplerConfig {
  int64_t embed_dim = 0;   // E: the image encoder's hidden_size
  int64_t hidden_dim = 0;  // D
  int64_t output_dim = 0;  // C: the UNet's cross_attention_dim
  int64_t num_queries = 0, depth = 0, heads = 0, dim_head = 64, ff_dim = 0;
};

class PerceiverAttentionImpl : public torch::nn::Module {
 public:
  PerceiverAttentionImpl(int64_t dim, int64_t heads, int64_t dim_head);
  // x [B, N, D], latents [B, Q, D] -> [B, Q, D]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& latents);
  sd::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  sd::nn::Linear to_q{nullptr}, to_kv{nullptr}, to_out{nullptr};
  int64_t heads;
};
TORCH_MODULE(PerceiverAttention);

class ResamplerImpl : public torch::nn::Module {
 public:
  explicit ResamplerImpl(const ResamplerConfig& c);
  // features [B, N, E] (the encoder's penultimate hidden states) -> ip_tokens [B, Q, C]
  torch::Tensor forward(const torch::Tensor& features);
  torch::Tensor latents;  // [1, Q, D]
  sd::nn::Linear proj_in{nullptr}, proj_out{nullptr};
  sd::nn::LayerNorm norm_out{nullptr};
  torch::nn::ModuleList layers{nullptr};  // i -> {"0": PerceiverAttention, "1": {"0": LayerNorm, "1", "3": Linear}}
  ResamplerConfig config;
};
TORCH_MODULE(Resampler);

// ip-adapter-full-face's projection (the original's MLPProjModel, diffusers' IPAdapterFullImageProjection): every token
// of the encoder's penultimate hidden states [B, N, E] through LayerNorm(Linear(E -> C)(GELU(Linear(E -> E)(x)))), so
// the UNet gets N = 1 + patches image tokens (257 for ViT-H/14 at 224 px). File keys image_proj.proj.0 [E, E],
// image_proj.proj.2 [C, E] (with biases) and image_proj.proj.3 (the LayerNorm, eps 1e-5).
class FullProjectionImpl : public torch::nn::Module {
 public:
  FullProjectionImpl(int64_t embed_dim, int64_t cross_attention_dim, int64_t num_tokens);
  // features [B, N, E] -> ip_tokens [B, N, C]
  torch::Tensor forward(const torch::Tensor& features);
  sd::nn::Linear fc1{nullptr}, fc2{nullptr};
  sd::nn::LayerNorm norm{nullptr};
  int64_t embed_dim, cross_attention_dim, num_tokens;
};
TORCH_MODULE(FullProjection);

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
  // IP-Adapter Plus: the Resampler as image_proj.
  IPAdapterImpl(const ResamplerConfig& resampler, const std::vector<CrossAttentionSlot>& slots);
  // ip-adapter-full-face: the per-token MLP as image_proj.
  IPAdapterImpl(FullProjection full, const std::vector<CrossAttentionSlot>& slots);

  // image_embeds [B, P] (Plus, full-face: the encoder's penultimate hidden states [B, N, E]) -> ip_tokens [B, T, C]
  // (in the weights' dtype and device).
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
  int64_t num_tokens() const { return num_tokens_; }
  // P, the image encoder's projection_dim; Plus and full-face: E, its hidden_size.
  int64_t image_embed_dim() const { return image_embed_dim_; }
  int64_t cross_attention_dim() const { return cross_attention_dim_; }
  // IP-Adapter Plus (a Resampler over the encoder's penultimate hidden states).
  bool plus() const { return !resampler.is_empty(); }
  // ip-adapter-full-face (every penultimate hidden state a token).
  bool full_face() const { return !full_proj.is_empty(); }
  // What project() takes: the encoder's penultimate hidden states (Plus, full-face), else its image_embeds.
  bool reads_hidden_states() const { return plus() || full_face(); }
  const std::vector<CrossAttentionSlot>& slots() const { return slots_; }

  ImageProjection image_proj{nullptr};  // registered as "image_proj", one of the three
  Resampler resampler{nullptr};
  FullProjection full_proj{nullptr};
  std::shared_ptr<torch::nn::Module> ip_adapter;  // children "1", "3", ... each with to_k_ip, to_v_ip

 private:
  // The decoupled branches of every slot, and the sizes the accessors give.
  void add_branches(int64_t image_embed_dim, int64_t cross_attention_dim, int64_t num_tokens);
  int64_t image_embed_dim_ = 0, cross_attention_dim_ = 0, num_tokens_ = 0;
  std::vector<CrossAttentionSlot> slots_;
  std::vector<std::shared_ptr<IPAttentionBranch>> branches_;  // one per slot
  std::shared_ptr<std::atomic<double>> scale_;
  bool attached_ = false;
};
TORCH_MODULE(IPAdapter);

// Reads an IP-Adapter weights file (.safetensors; pickles are refused) for `unet`: checks every key and shape against
// the UNet (cross_attention_dim, the number and widths of its attn2) and returns the adapter, not attached. Errors
// (FormatError) name the file, the key and the expected shape. `image_embed_dim` > 0 also checks
// image_proj.proj.weight against the image encoder's projection_dim, `image_hidden_size` > 0 a Plus file's
// image_proj.proj_in.weight (full-face: image_proj.proj.0.weight) against its hidden_size. A Plus file is told by
// its image_proj.latents, a full-face one by image_proj.proj.3.weight; the latter's token count is the encoder's
// 1 + patches, `image_tokens` (required for it). FaceID files are refused by name.
IPAdapter load_ip_adapter_weights(const std::string& file, torch::nn::Module& unet, int64_t image_embed_dim = 0,
                                  torch::ScalarType dtype = torch::kFloat32, torch::Device device = torch::kCPU,
                                  int64_t image_hidden_size = 0, int64_t image_tokens = 0);

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

  // uint8 RGB [H, W, 3] or [B, H, W, 3] -> image_embeds [B, P] through CLIPImageProcessor + the encoder (Plus,
  // full-face: its penultimate hidden states [B, N, E]). Undefined input: diffusers' unconditional image (zeros
  // [1, P]; Plus, full-face: the encoder's hidden states of all-zero pixel values, as diffusers' encode_image with
  // output_hidden_states).
  torch::Tensor image_embeds(const torch::Tensor& rgb_u8_hwc) const;
  // image_embeds -> ip_tokens [B, T, C] (what is appended to the text context).
  torch::Tensor image_tokens(const torch::Tensor& image_embeds) const;
  // image_tokens(image_embeds(undefined)) [1, T, C]: the same for every stream, made once by load_ip_adapter (for
  // Plus and full-face a pass of the image encoder, which a stream's first frame would otherwise wait for). Shared
  // by the streams (a .to() of the same dtype and device is this tensor): never changed in place.
  torch::Tensor uncond_image_tokens;
};

// find_ip_adapter + load_clip_vision_model + load_ip_adapter_weights + attach. The adapter's scale starts at 1.
std::shared_ptr<IPAdapterModels> load_ip_adapter(const std::string& path, torch::nn::Module& unet,
                                                 torch::ScalarType dtype = torch::kFloat32,
                                                 torch::Device device = torch::kCPU);

}  // namespace sd
