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

// diffusers TimestepEmbedding(act_fn="silu", no cond projection, no post activation): linear_2(silu(linear_1(x))).
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  torch::Tensor forward(const torch::Tensor& x);  // [B, in] -> [B, time_embed_dim]

  sd::nn::Linear linear_1{nullptr}, linear_2{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

}  // namespace sd
