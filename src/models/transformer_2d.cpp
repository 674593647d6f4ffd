#include "models/transformer_2d.h"

#include "core/error.h"
#include "models/conv_layout.h"

namespace sd {

namespace {

// Whether proj_in's input, a [B, HW, C] view of NCHW memory (C the fastest-moving dimension only logically), should be
// packed before the product. For B > 1 matmul runs such a view as a batched product over the weight expanded to
// [B, C, C_out] and copied; packing copies B·HW·C values instead, less where HW <= C. Measured on the CPU in bf16
// (random sd-turbo, 128 px, 2 threads, 16 streams of 2 rows batched: 3.37-3.42 -> 3.56 frames/s, one by one 2.63-2.66
// -> 2.77-2.79); fp32 on the CPU (MKL) measured no better and stays as it was, and one row needs no weight copy.
bool pack_tokens_first(const torch::Tensor& t) {
  if (t.is_contiguous() || t.size(0) < 2 || t.size(1) > t.size(2)) return false;
  return !t.device().is_cpu() || t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kHalf;
}

}  // namespace

GEGLUImpl::GEGLUImpl(int64_t dim_in, int64_t dim_out) {
  proj = register_module("proj", sd::nn::Linear(dim_in, dim_out * 2));
}

torch::Tensor GEGLUImpl::forward(const torch::Tensor& x) {
  auto h = proj(x);
  auto parts = h.chunk(2, -1);  // each [.., dim_out], rows strided by 2*dim_out
  // Exact (erf) GELU, as diffusers' F.gelu. On the strided half the bf16 CPU kernel is ~9x slower than on a packed
  // copy (3.7 ms vs 0.4 ms at [1024, 1280]), so there the gate is packed first (a GPU kernel reads strided rows at
  // full speed); the product is taken in place.
  auto gate = torch::gelu(x.device().is_cpu() ? parts[1].contiguous() : parts[1]);
  if (torch::GradMode::is_enabled() && (gate.requires_grad() || parts[0].requires_grad())) return parts[0] * gate;
  return gate.mul_(parts[0]);
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t mult) {
  const int64_t inner = dim * mult;
  geglu = GEGLU(dim, inner);
  out = sd::nn::Linear(inner, dim);
  net = register_module("net", torch::nn::ModuleList());
  net->push_back(geglu);
  net->push_back(torch::nn::Identity());  // diffusers' Dropout slot (net.1), inference no-op
  net->push_back(out);
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x) { return out(geglu(x)); }

BasicTransformerBlockImpl::BasicTransformerBlockImpl(int64_t dim, int64_t heads, int64_t dim_head,
                                                     int64_t cross_attention_dim, bool upcast_attention,
                                                     bool only_cross_attention_)
    : only_cross_attention(only_cross_attention_) {
  AttentionOptions self_opts;
  self_opts.query_dim = dim;
  self_opts.heads = heads;
  self_opts.dim_head = dim_head;
  self_opts.bias = false;  // attention_bias=False in the UNet
  self_opts.upcast_attention = upcast_attention;
  AttentionOptions cross_opts = self_opts;
  cross_opts.cross_attention_dim = cross_attention_dim;

  norm1 = register_module("norm1", sd::nn::LayerNorm(dim, 1e-5));
  attn1 = register_module("attn1", Attention(only_cross_attention ? cross_opts : self_opts));
  norm2 = register_module("norm2", sd::nn::LayerNorm(dim, 1e-5));
  attn2 = register_module("attn2", Attention(cross_opts));
  norm3 = register_module("norm3", sd::nn::LayerNorm(dim, 1e-5));
  ff = register_module("ff", FeedForward(dim));
}

torch::Tensor BasicTransformerBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  auto h = attn1(norm1(x), only_cross_attention ? context : torch::Tensor()) + x;
  h = attn2(norm2(h), context) + h;
  return ff(norm3(h)) + h;
}

Transformer2DModelImpl::Transformer2DModelImpl(const Transformer2DOptions& o) : options(o) {
  if (o.in_channels <= 0 || o.heads <= 0 || o.dim_head <= 0)
    throw InvalidArgument("Transformer2DModel: in_channels, heads and dim_head must be positive");
  const int64_t inner = o.heads * o.dim_head;
  norm = register_module("norm", sd::nn::GroupNorm(o.norm_num_groups, o.in_channels, 1e-6));
  if (o.use_linear_projection)
    proj_in_linear = register_module("proj_in", sd::nn::Linear(o.in_channels, inner));
  else
    proj_in_conv = register_module("proj_in", sd::nn::Conv2d(o.in_channels, inner, 1));
  transformer_blocks = register_module("transformer_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.num_layers; ++i) {
    blocks.emplace_back(inner, o.heads, o.dim_head, o.cross_attention_dim, o.upcast_attention,
                        o.only_cross_attention);
    transformer_blocks->push_back(blocks.back());
  }
  if (o.use_linear_projection)
    proj_out_linear = register_module("proj_out", sd::nn::Linear(inner, o.in_channels));
  else
    proj_out_conv = register_module("proj_out", sd::nn::Conv2d(inner, o.in_channels, 1));
}

torch::Tensor Transformer2DModelImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  const int64_t b = x.size(0), h = x.size(2), w = x.size(3);
  auto hs = norm(x);
  torch::Tensor tokens;  // [B, HW, inner]
  if (proj_in_conv) {
    hs = proj_in_conv(hs);
    tokens = hs.permute({0, 2, 3, 1}).reshape({b, h * w, hs.size(1)});
  } else {
    tokens = hs.permute({0, 2, 3, 1}).reshape({b, h * w, hs.size(1)});
    tokens = proj_in_linear(pack_tokens_first(tokens) ? tokens.contiguous() : tokens);
  }
  for (auto& blk : blocks) tokens = blk(tokens, context);
  torch::Tensor out;
  // [B, H, W, C] tokens permuted to NCHW are channels-last already: kept so where the convolutions run channels-last
  // (CUDA, models/conv_layout.h), instead of a copy to NCHW that the next convolution would copy back.
  const auto fmt = x.is_cuda() && sd::nn::cuda_channels_last() ? torch::MemoryFormat::ChannelsLast
                                                                : torch::MemoryFormat::Contiguous;
  if (proj_out_conv) {
    out = proj_out_conv(tokens.reshape({b, h, w, tokens.size(2)}).permute({0, 3, 1, 2}).contiguous(fmt));
  } else {
    out = proj_out_linear(tokens).reshape({b, h, w, options.in_channels}).permute({0, 3, 1, 2}).contiguous(fmt);
  }
  return out + x;
}

}  // namespace sd
