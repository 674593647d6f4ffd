#pragma once
// Weights into module trees by name. A model's registered names are exactly the checkpoint keys (diffusers /
// transformers), so loading is a strict set comparison plus a copy per tensor; nothing is renamed here (other
// checkpoint layouts are converted once, in io/checkpoint_convert).
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "core/shape_str.h"
#include "io/safetensors.h"

namespace sd {

struct LoadWeightsOptions {
  // Keys that may be present in the file without a matching parameter (exact names or "*suffix" patterns),
  // e.g. "text_model.embeddings.position_ids".
  std::vector<std::string> allow_unexpected;
  // Target for every floating-point parameter/buffer; nullopt = keep the module's current dtype.
  std::optional<torch::ScalarType> dtype;
  std::optional<torch::Device> device;
};

struct LoadReport {
  size_t loaded = 0;
  size_t ignored = 0;  // allowed extras
  int64_t parameters = 0;
};

// Copies every tensor of `tensors` into the parameter/buffer of the same name. Reports *all* missing keys,
// unexpected keys and shape mismatches in one FormatError naming `source`. Tensors already in the target dtype and
// device are adopted without copying (they alias the mapped file, copy-on-write).
LoadReport load_weights(torch::nn::Module& module, const std::map<std::string, torch::Tensor>& tensors,
                        const std::string& source, const LoadWeightsOptions& opts = {});
LoadReport load_weights(torch::nn::Module& module, const SafeTensorsFile& file, const LoadWeightsOptions& opts = {});

// A module built from its config with `tensors` loaded strictly (load_weights), in eval mode: what every model
// loader does before its own CPU layout choice (prepacking, channels-last).
template <class Module, class Config>
Module load_module(const Config& config, const std::map<std::string, torch::Tensor>& tensors,
                   const std::string& source, torch::ScalarType dtype, torch::Device device) {
  Module model(config);
  LoadWeightsOptions opts;
  opts.dtype = dtype;
  opts.device = device;
  load_weights(*model, tensors, source, opts);
  model->eval();
  return model;
}

// Every parameter and buffer by its full dotted name (what a checkpoint of this module holds).
std::map<std::string, torch::Tensor> state_dict(const torch::nn::Module& module);
int64_t count_parameters(const torch::nn::Module& module);

}  // namespace sd
