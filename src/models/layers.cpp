#include "models/layers.h"

namespace sd::nn {

namespace {
bool reduced(const torch::Tensor& x) {
  return x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf;
}
}  // namespace

LinearImpl::LinearImpl(int64_t in, int64_t out, bool has_bias) : in_features(in), out_features(out) {
  weight = register_parameter("weight", torch::empty({out, in}));
  if (has_bias) bias = register_parameter("bias", torch::empty({out}));
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) { return torch::nn::functional::linear(x, weight, bias); }

Conv2dImpl::Conv2dImpl(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p, bool has_bias)
    : in_channels(in), out_channels(out), kernel_size(k), stride(s), padding(p) {
  weight = register_parameter("weight", torch::empty({out, in, k, k}));
  if (has_bias) bias = register_parameter("bias", torch::empty({out}));
}

torch::Tensor Conv2dImpl::forward(const torch::Tensor& x) {
  return at::conv2d(x, weight, bias, {stride, stride}, {padding, padding});
}

GroupNormImpl::GroupNormImpl(int64_t groups, int64_t channels, double e, bool affine)
    : num_groups(groups), num_channels(channels), eps(e) {
  if (affine) {
    weight = register_parameter("weight", torch::empty({channels}));
    bias = register_parameter("bias", torch::empty({channels}));
  }
}

torch::Tensor GroupNormImpl::forward(const torch::Tensor& x) {
  if (reduced(x)) {
    auto w = weight.defined() ? weight.to(torch::kFloat) : weight;
    auto b = bias.defined() ? bias.to(torch::kFloat) : bias;
    return at::group_norm(x.to(torch::kFloat), num_groups, w, b, eps).to(x.scalar_type());
  }
  return at::group_norm(x, num_groups, weight, bias, eps);
}

LayerNormImpl::LayerNormImpl(int64_t d, double e, bool affine) : dim(d), eps(e) {
  if (affine) {
    weight = register_parameter("weight", torch::empty({d}));
    bias = register_parameter("bias", torch::empty({d}));
  }
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor& x) {
  if (reduced(x)) {
    auto w = weight.defined() ? weight.to(torch::kFloat) : weight;
    auto b = bias.defined() ? bias.to(torch::kFloat) : bias;
    return at::layer_norm(x.to(torch::kFloat), {dim}, w, b, eps).to(x.scalar_type());
  }
  return at::layer_norm(x, {dim}, weight, bias, eps);
}

EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t d) : num_embeddings(num), embedding_dim(d) {
  weight = register_parameter("weight", torch::empty({num, d}));
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& ids) { return at::embedding(weight, ids); }

}  // namespace sd::nn
