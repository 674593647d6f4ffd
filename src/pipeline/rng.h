#pragma once
// The pipeline's only sources of randomness, injectable so a run can be reproduced or replayed.
//
// Rng: every normal draw of a stream (init_noise in prepare, the txt2img latent, the AutoencoderKL posterior sample,
// the fresh noise of sequential mode) comes from one Rng in call order. The default TorchRng reproduces
// torch.manual_seed(seed) + torch.randn(shape) draws exactly (libtorch's CPU generator and kernel, spec §3.1);
// ReplayRng hands out recorded tensors (golden tests).
//
// UniformSource: the similarity filter's uniform [0,1) draws (Python's random.uniform in the original).
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <ATen/core/Generator.h>
#include <torch/types.h>

namespace sd {

class Rng {
 public:
  virtual ~Rng() = default;
  // Restarts the sequence from `seed` (prepare() and set_seed() call this).
  virtual void manual_seed(uint64_t seed) = 0;
  // A float32 CPU tensor of standard normal draws of `shape`. `site` names the caller for error messages.
  virtual torch::Tensor randn(at::IntArrayRef shape, const std::string& site) = 0;
};

// torch.Generator semantics: a CPU MT19937 generator seeded with `seed`; randn(shape) == torch::randn(shape, gen).
class TorchRng : public Rng {
 public:
  explicit TorchRng(uint64_t seed = 2);
  void manual_seed(uint64_t seed) override;
  torch::Tensor randn(at::IntArrayRef shape, const std::string& site) override;

 private:
  at::Generator gen_;
};

// Hands out the given tensors in order. A draw whose shape differs from the next recorded tensor, or a draw after
// the last one, throws InvalidArgument naming the draw index, the caller and both shapes. manual_seed() is a no-op
// (the recording already fixes the sequence).
class ReplayRng : public Rng {
 public:
  explicit ReplayRng(std::vector<torch::Tensor> draws, std::string source = "replay");
  void manual_seed(uint64_t seed) override {}
  torch::Tensor randn(at::IntArrayRef shape, const std::string& site) override;
  size_t consumed() const { return next_; }
  size_t remaining() const { return draws_.size() - next_; }

 private:
  std::vector<torch::Tensor> draws_;
  std::string source_;
  size_t next_ = 0;
};

class UniformSource {
 public:
  virtual ~UniformSource() = default;
  virtual double uniform() = 0;  // in [0, 1)
};

class Mt19937UniformSource : public UniformSource {
 public:
  explicit Mt19937UniformSource(uint64_t seed = 0) : eng_(seed) {}
  double uniform() override { return dist_(eng_); }

 private:
  std::mt19937_64 eng_;
  std::uniform_real_distribution<double> dist_{0.0, 1.0};
};

// Replays recorded values in order; running out throws InvalidArgument.
class ReplayUniformSource : public UniformSource {
 public:
  explicit ReplayUniformSource(std::vector<double> values) : values_(std::move(values)) {}
  double uniform() override;
  size_t consumed() const { return next_; }

 private:
  std::vector<double> values_;
  size_t next_ = 0;
};

}  // namespace sd
