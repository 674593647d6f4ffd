#pragma once
// diffusers Transformer2DModel (continuous input, layer_norm blocks) as used by the SD 1.x / 2.x UNet:
// GroupNorm -> proj_in -> BasicTransformerBlock x N -> proj_out -> + residual.
#include "models/attention.h"
#include "models/layers.h"

namespace sd {

// diffusers GEGLU: proj = Linear(dim, 2*inner); out = a * gelu(gate) with (a, gate) = proj(x).chunk(2, -1).
class GEGLUImpl : public torch::nn::Module {
 public:
  GEGLUImpl(int64_t dim_in, int64_t dim_out);
  torch::Tensor forward(const torch::Tensor& x);  // [..., dim_in] -> [..., dim_out]
  sd::nn::Linear proj{nullptr};
};
TORCH_MODULE(GEGLU);

// diffusers FeedForward(activation_fn="geglu", mult=4): net.0 = GEGLU(dim, 4*dim), net.1 = Dropout (no parameters;
// an Identity placeholder keeps the numbering), net.2 = Linear(4*dim, dim).
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, int64_t mult = 4);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::ModuleList net{nullptr};
  GEGLU geglu{nullptr};
  sd::nn::Linear out{nullptr};
};
TORCH_MODULE(FeedForward);

// diffusers BasicTransformerBlock (norm_type "layer_norm", no ada-norm, no gligen):
//   x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).
// only_cross_attention: attn1 is a cross-attention too (to_k/to_v take cross_attention_dim inputs) and attends to
// the context, so the block has two cross-attentions and no self-attention (SDXS-512-0.9's highest level).
class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  BasicTransformerBlockImpl(int64_t dim, int64_t heads, int64_t dim_head, int64_t cross_attention_dim,
                            bool upcast_attention, bool only_cross_attention = false);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);  // x [B, N, dim], ctx [B, M, D]

  bool only_cross_attention = false;
  sd::nn::LayerNorm norm1{nullptr}, norm2{nullptr}, norm3{nullptr};
  Attention attn1{nullptr}, attn2{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

struct Transformer2DOptions {
  int64_t in_channels = 0;
  int64_t heads = 8;
  int64_t dim_head = 0;  // inner dim = heads * dim_head
  int64_t num_layers = 1;
  int64_t norm_num_groups = 32;
  int64_t cross_attention_dim = 0;
  bool use_linear_projection = false;
  bool upcast_attention = false;
  bool only_cross_attention = false;
};

class Transformer2DModelImpl : public torch::nn::Module {
 public:
  explicit Transformer2DModelImpl(const Transformer2DOptions& o);
  // x [B, C, H, W], context [B, M, cross_attention_dim] -> [B, C, H, W]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);

  Transformer2DOptions options;
  sd::nn::GroupNorm norm{nullptr};  // eps 1e-6 (fixed in diffusers, unlike the resnets' norm_eps)
  // proj_in / proj_out: 1x1 Conv2d on NCHW, or Linear on tokens when use_linear_projection.
  sd::nn::Conv2d proj_in_conv{nullptr}, proj_out_conv{nullptr};
  sd::nn::Linear proj_in_linear{nullptr}, proj_out_linear{nullptr};
  torch::nn::ModuleList transformer_blocks{nullptr};
  std::vector<BasicTransformerBlock> blocks;
};
TORCH_MODULE(Transformer2DModel);

}  // namespace sd
