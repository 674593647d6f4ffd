#include "io/state_dict.h"

#include <sstream>

#include "core/error.h"

namespace sd {

namespace {
bool allowed(const std::string& key, const std::vector<std::string>& patterns) {
  for (const auto& p : patterns) {
    if (!p.empty() && p[0] == '*') {
      const std::string suffix = p.substr(1);
      if (key.size() >= suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0)
        return true;
    } else if (key == p) {
      return true;
    }
  }
  return false;
}


void list(std::ostringstream& msg, const char* title, const std::vector<std::string>& items) {
  if (items.empty()) return;
  msg << "\n  " << title << " (" << items.size() << "):";
  const size_t shown = std::min<size_t>(items.size(), 40);
  for (size_t i = 0; i < shown; ++i) msg << "\n    " << items[i];
  if (shown < items.size()) msg << "\n    ... and " << items.size() - shown << " more";
}
}  // namespace

std::map<std::string, torch::Tensor> state_dict(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : module.named_parameters(true)) out[p.key()] = p.value();
  for (const auto& b : module.named_buffers(true)) out[b.key()] = b.value();
  return out;
}

int64_t count_parameters(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters(true)) n += p.numel();
  return n;
}

LoadReport load_weights(torch::nn::Module& module, const std::map<std::string, torch::Tensor>& tensors,
                        const std::string& source, const LoadWeightsOptions& opts) {
  auto targets = state_dict(module);
  std::vector<std::string> missing, unexpected, mismatched;
  LoadReport report;
  for (const auto& [name, t] : tensors) {
    auto it = targets.find(name);
    if (it == targets.end()) {
      if (allowed(name, opts.allow_unexpected))
        ++report.ignored;
      else
        unexpected.push_back(name);
      continue;
    }
    if (!it->second.sizes().equals(t.sizes()))
      mismatched.push_back(name + ": file has " + shape_str(t.sizes()) + ", model expects " +
                           shape_str(it->second.sizes()));
    // An integer tensor cast into a float parameter (a quantised checkpoint's raw int8 codes, say) would load as
    // numbers of another scale, silently.
    else if (it->second.is_floating_point() && !t.is_floating_point())
      mismatched.push_back(name + ": file has " + std::string(c10::toString(t.scalar_type())) +
                           " values, model expects floating point");
  }
  for (const auto& kv : targets)
    if (!tensors.count(kv.first)) missing.push_back(kv.first);
  if (!missing.empty() || !unexpected.empty() || !mismatched.empty()) {
    std::ostringstream msg;
    msg << "weights do not match the model built from its config";
    list(msg, "missing keys", missing);
    list(msg, "unexpected keys", unexpected);
    list(msg, "shape mismatches", mismatched);
    throw FormatError(source, msg.str());
  }

  torch::NoGradGuard no_grad;
  for (auto& [name, target] : targets) {
    const auto& src = tensors.at(name);
    const auto dt = (opts.dtype && target.is_floating_point()) ? *opts.dtype : target.scalar_type();
    const auto dev = opts.device ? *opts.device : target.device();
    // set_data swaps the storage (no copy when dtype/device already match); parameters keep their identity.
    torch::Tensor value = (src.scalar_type() == dt && src.device() == dev) ? src : src.to(dev, dt);
    target.set_data(value);
    ++report.loaded;
  }
  report.parameters = count_parameters(module);
  return report;
}

LoadReport load_weights(torch::nn::Module& module, const SafeTensorsFile& file, const LoadWeightsOptions& opts) {
  return load_weights(module, file.load_all(), file.path(), opts);
}

}  // namespace sd
