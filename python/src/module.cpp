// The extension module streamdiffusion_cpp._core: one bind_* function per concern (errors, tensors, models,
// stream, runtime, settings), each in its own file.
#include "py_common.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "streamdiffusion.cpp engine bindings (use the streamdiffusion_cpp package, not this module directly)";
  m.attr("__version__") = SD_PY_VERSION;
  sdpy::bind_errors(m);
  sdpy::bind_tensor(m);
  sdpy::bind_models(m);
  sdpy::bind_stream(m);
  sdpy::bind_batch(m);
  sdpy::bind_controlnet(m);
  sdpy::bind_runtime(m);
  sdpy::bind_settings(m);
}
