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

torch::Tensor get_guidance_scale_embedding(const torch::Tensor& w, int64_t dim) {
  if (w.dim() != 1)
    throw InvalidArgument("get_guidance_scale_embedding: w must be 1-d [B], got " + std::to_string(w.dim()) + "-d");
  if (dim < 4) throw InvalidArgument("get_guidance_scale_embedding: dim must be >= 4, got " + std::to_string(dim));
  const int64_t half = dim / 2;
  const auto opts = torch::TensorOptions().dtype(torch::kFloat).device(w.device());
  // torch.log(torch.tensor(10000.0)) / (half_dim - 1): a float32 log, then a float32 division.
  const auto step = torch::log(torch::tensor(10000.0f, opts)) / static_cast<double>(half - 1);
  const auto freqs = torch::exp(torch::arange(half, opts) * -step);                 // [half]
  const auto args = (w.to(torch::kFloat) * 1000.0).unsqueeze(1) * freqs.unsqueeze(0);  // [B, half]
  auto emb = torch::cat({torch::sin(args), torch::cos(args)}, 1);
  if (dim % 2 == 1) emb = torch::constant_pad_nd(emb, {0, 1, 0, 0}, 0);
  return emb;
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim, int64_t cond_proj_dim) {
  linear_1 = register_module("linear_1", sd::nn::Linear(in_channels, time_embed_dim));
  linear_2 = register_module("linear_2", sd::nn::Linear(time_embed_dim, time_embed_dim));
  if (cond_proj_dim > 0) cond_proj = register_module("cond_proj", sd::nn::Linear(cond_proj_dim, in_channels, false));
}

torch::Tensor TimestepEmbeddingImpl::forward(const torch::Tensor& x, const torch::Tensor& condition) {
  if (!condition.defined()) return linear_2(torch::silu(linear_1(x)));
  if (!cond_proj)
    throw InvalidArgument("TimestepEmbedding: a condition (timestep_cond) was given but the model has no cond_proj "
                          "(time_cond_proj_dim is not set in its config)");
  const int64_t d = cond_proj->weight.size(1);
  if (condition.dim() != 2 || condition.size(1) != d || (condition.size(0) != x.size(0) && condition.size(0) != 1))
    throw InvalidArgument("TimestepEmbedding: timestep_cond must be [" + std::to_string(x.size(0)) + " or 1, " +
                          std::to_string(d) + "]");
  return linear_2(torch::silu(linear_1(x + cond_proj(condition.to(x.device(), x.scalar_type())))));
}

}  // namespace sd
