#pragma once
// The Python Stream object: the engine stream plus the prompts it was prepared with (the runtime's processor needs
// them to change either one on its own).
#include <memory>
#include <string>

#include "pipeline/stream_diffusion.h"
#include "py_common.h"

namespace sdpy {

struct PyStream {
  std::shared_ptr<const sd::DiffusionModels> models;
  std::shared_ptr<sd::StreamDiffusion> stream;
  std::string prompt, negative_prompt;
};

inline py::object maybe_wrap(const at::Tensor& t) { return t.defined() ? wrap(t) : py::none(); }

}  // namespace sdpy
