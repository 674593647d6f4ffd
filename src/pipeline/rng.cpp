#include "pipeline/rng.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "core/error.h"
#include "core/shape_str.h"

namespace sd {

TorchRng::TorchRng(uint64_t seed) : gen_(at::detail::createCPUGenerator(seed)) {}

void TorchRng::manual_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(gen_.mutex());
  gen_.set_current_seed(seed);
}

torch::Tensor TorchRng::randn(at::IntArrayRef shape, const std::string& site) {
  return torch::randn(shape, gen_, torch::TensorOptions().dtype(torch::kFloat32));
}

ReplayRng::ReplayRng(std::vector<torch::Tensor> draws, std::string source)
    : draws_(std::move(draws)), source_(std::move(source)) {}

torch::Tensor ReplayRng::randn(at::IntArrayRef shape, const std::string& site) {
  if (next_ >= draws_.size())
    throw InvalidArgument(source_ + ": random draw #" + std::to_string(next_) + " (" + site + ", shape " +
                          shape_str(shape) + ") requested but only " + std::to_string(draws_.size()) +
                          " draws were recorded");
  const torch::Tensor& t = draws_[next_];
  if (!t.sizes().equals(shape))
    throw InvalidArgument(source_ + ": random draw #" + std::to_string(next_) + " (" + site + ") has shape " +
                          shape_str(shape) + " but the recorded draw has shape " + shape_str(t.sizes()));
  ++next_;
  return t.to(torch::kFloat32).clone();
}

double ReplayUniformSource::uniform() {
  if (next_ >= values_.size())
    throw InvalidArgument("uniform draw #" + std::to_string(next_) + " requested but only " +
                          std::to_string(values_.size()) + " were recorded");
  return values_[next_++];
}

}  // namespace sd
