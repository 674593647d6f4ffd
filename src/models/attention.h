#pragma once
// Multi-head scaled dot-product attention and diffusers' `Attention` module (to_q/to_k/to_v/to_out.0, optional
// group_norm), shared by the UNet transformer blocks and the AutoencoderKL mid-block attention.
#include <atomic>
#include <memory>

#include "models/layers.h"

namespace sd {

// Default bound on the [B*heads, chunk, M] score matrix held at once by the chunked path (bytes).
constexpr int64_t kAttentionMaxScoreBytes = int64_t{64} << 20;
// CPU inference in bf16 whose [B*heads, N, M] scores take at least this many bytes takes the tiled path
// (attention_chunked); fp32 takes it at every size.
constexpr int64_t kAttentionTiledMinScoreBytes = int64_t{32} << 20;

// Query rows per tile of the tiled CPU path; 0 = not tiled (the scores are small enough for the bmm path).
int64_t attention_tile_rows(int64_t batch_heads, int64_t queries, int64_t keys, int64_t element_bytes);

// softmax(q k^T * dh^-0.5) v for q [B, N, heads*dh], k [B, M, heads*dh], v [B, M, heads*dv] -> [B, N, heads*dv].
// upcast: scores and softmax in fp32 (diffusers' upcast_attention / upcast_softmax); reduced-precision inputs are
// always soft-maxed in fp32 (a bf16 softmax over thousands of keys loses the small probabilities), and on CPU the
// whole product runs in fp32. Uses at::scaled_dot_product_attention on libtorch >= 2, else attention_chunked().
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t heads,
                        bool upcast);

// The libtorch-1.13 path: bmm (scale folded into q) + softmax + bmm, with the query split into chunks so that the
// [B*heads, chunk, M] score matrix never exceeds `max_score_bytes` (at least one query row per chunk). Without
// autograd the softmax is in place (one score buffer per chunk); with autograd the probabilities are a second one.
// CPU inference on fp32 / bf16 with attention_tile_rows() > 0 (and `tiles`) runs (head, query tile) tasks on the
// intra-op threads instead, each keeping its scores in cache, with models/softmax_rows.h's soft-max.
// Same contract as attention().
torch::Tensor attention_chunked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                int64_t heads, bool upcast, int64_t max_score_bytes = kAttentionMaxScoreBytes,
                                bool tiles = true);

struct AttentionOptions {
  int64_t query_dim = 0;
  int64_t cross_attention_dim = 0;  // 0: self-attention (keys/values from the query input)
  int64_t heads = 8;
  int64_t dim_head = 64;
  bool bias = false;  // to_q / to_k / to_v bias (UNet: false, VAE: true); to_out.0 always has a bias
  bool upcast_attention = false;
  bool upcast_softmax = false;
  int64_t norm_num_groups = 0;  // > 0: `group_norm` on the input (VAE mid-block attention)
  double norm_eps = 1e-5;
  bool residual_connection = false;
  double rescale_output_factor = 1.0;
};

// IP-Adapter's decoupled cross-attention (models/ip_adapter.h) attached to one attn2: the weights belong to the
// adapter's module tree (keys ip_adapter.{k}.to_k_ip / to_v_ip), the scale is shared by all of the adapter's
// branches and may change between calls.
struct IPAttentionBranch {
  sd::nn::Linear to_k_ip{nullptr}, to_v_ip{nullptr};  // [inner, cross_attention_dim], no bias
  std::shared_ptr<const std::atomic<double>> scale;
  int64_t num_tokens = 4;  // image tokens at the end of the context
};

// diffusers.models.attention_processor.Attention with the default AttnProcessor semantics:
//   input [B, C, H, W] is flattened to [B, HW, C] tokens (and restored at the end);
//   group_norm (if any) normalises the tokens over channels; q = to_q(x), k/v = to_k/to_v(context or x);
//   out = to_out.0(attention(q, k, v)); if residual_connection: out += input; out /= rescale_output_factor.
// With an IP branch attached (diffusers 0.24 IPAdapterAttnProcessor): the context is [B, M + T, C], its last T rows
// are the image tokens; k/v come from the first M rows and
//   out = to_out.0(attention(q, k, v) + scale * attention(q, to_k_ip(img), to_v_ip(img))).
// Scale 0 skips the branch (the plain result, bit for bit).
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& o);
  // x [B, N, query_dim] or [B, query_dim, H, W]; context [B, M, cross_attention_dim] or undefined (self-attention).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context = {});

  AttentionOptions options;
  std::shared_ptr<IPAttentionBranch> ip;  // null: plain attention (see IPAttentionBranch)
  sd::nn::GroupNorm group_norm{nullptr};
  sd::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr}, to_out0{nullptr};
  torch::nn::ModuleList to_out{nullptr};  // holds to_out0 as "to_out.0" (diffusers' [Linear, Dropout])
};
TORCH_MODULE(Attention);

}  // namespace sd
