#pragma once
// Timestep embeddings of the UNet (diffusers' Timesteps + TimestepEmbedding).
#include "models/layers.h"

namespace sd {

// diffusers get_timestep_embedding, always computed in fp32 (the result is cast by the caller):
//   freqs = exp(-ln(max_period) * arange(half) / (half - freq_shift)), args = t[:, None] * freqs[None]
//   emb = cat(sin(args), cos(args)); flip_sin_to_cos swaps the halves to cat(cos, sin); odd dims get a zero column.
// timesteps: [B] (int or float) -> [B, dim] fp32 on the timesteps' device.
torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                 double freq_shift, double scale = 1.0, double max_period = 10000.0);

// diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding, in float32 with the same op sequence:
//   w *= 1000; half = dim / 2; f = exp(arange(half) * -(log(10000) / (half - 1)))  (log of a float32 10000)
//   e = w[:, None] * f[None]; emb = cat(sin(e), cos(e)) (sin first), a zero column when dim is odd.
// w: [B] guidance values (the pipeline passes guidance_scale - 1) -> [B, dim] fp32 on w's device. dim >= 4.
torch::Tensor get_guidance_scale_embedding(const torch::Tensor& w, int64_t dim);

// diffusers TimestepEmbedding(act_fn="silu", no post activation): linear_2(silu(linear_1(x [+ cond_proj(cond)]))).
// cond_proj_dim > 0 adds `cond_proj` (Linear cond_proj_dim -> in_channels, no bias; LCM-distilled UNets'
// time_cond_proj_dim), applied to the guidance embedding when one is given.
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim, int64_t cond_proj_dim = 0);
  // x [B, in], condition [B, cond_proj_dim] (or [1, ...], broadcast) or undefined -> [B, time_embed_dim].
  // A condition without cond_proj is an InvalidArgument.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& condition = {});

  sd::nn::Linear linear_1{nullptr}, linear_2{nullptr}, cond_proj{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

}  // namespace sd
