#include "models/embeddings.h"

#include <cmath>

#include "core/error.h"

namespace sd {

torch::Tensor timestep_embedding(const torch::Tensor& timesteps, int64_t dim, bool flip_sin_to_cos,
                                 double freq_shift, double scale, double max_period) {
  if (timesteps.dim() != 1)
    throw InvalidArgument("timestep_embedding: timesteps must be 1-d [B], got " + std::to_string(timesteps.dim()) +
                          "-d");
  if (dim < 2) throw InvalidArgument("timestep_embedding: dim must be >= 2");
  const int64_t half = dim / 2;
  // Same float32 op sequence as diffusers so the embedding matches to the last bit.
  const auto opts = torch::TensorOptions().dtype(torch::kFloat).device(timesteps.device());
  auto exponent = torch::arange(0, half, opts) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half) - freq_shift);
  auto freqs = torch::exp(exponent);                                        // [half]
  auto args = timesteps.unsqueeze(1).to(torch::kFloat) * freqs.unsqueeze(0);  // [B, half]
  if (scale != 1.0) args = args * scale;
  auto emb = flip_sin_to_cos ? torch::cat({torch::cos(args), torch::sin(args)}, -1)
                             : torch::cat({torch::sin(args), torch::cos(args)}, -1);
  if (dim % 2 == 1) emb = torch::constant_pad_nd(emb, {0, 1, 0, 0}, 0);
  return emb;
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim) {
  linear_1 = register_module("linear_1", sd::nn::Linear(in_channels, time_embed_dim));
  linear_2 = register_module("linear_2", sd::nn::Linear(time_embed_dim, time_embed_dim));
}

torch::Tensor TimestepEmbeddingImpl::forward(const torch::Tensor& x) { return linear_2(torch::silu(linear_1(x))); }

}  // namespace sd
