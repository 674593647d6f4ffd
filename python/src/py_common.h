#pragma once
// Shared declarations of the binding files. Only tensor-handling files need libtorch's types (torch/types.h); no
// file includes <torch/torch.h> (the precompiled header shared with the engine provides it anyway).
#include <exception>
#include <memory>
#include <string>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/types.h>

namespace sdpy {
namespace py = pybind11;

// A libtorch tensor seen from Python: streamdiffusion_cpp.Tensor. It exports itself through the DLPack protocol
// (__dlpack__ / __dlpack_device__) and the numpy array interface, both without copying.
struct PyTensor {
  at::Tensor t;
};

// Any tensor-like Python object -> at::Tensor sharing its memory: a streamdiffusion_cpp.Tensor, any object with
// __dlpack__ (torch, numpy >= 1.22, CuPy, JAX), or anything numpy can view without copying (buffer protocol,
// __array_interface__). A read-only numpy array (numpy cannot export those through DLPack) is copied once.
// `what` names the argument in errors (TypeError).
at::Tensor to_tensor(py::handle obj, const char* what);
py::object wrap(at::Tensor t);

// Error translation (errors.cpp): sd::Error and its subclasses -> streamdiffusion_cpp exceptions.
void bind_errors(py::module_& m);
// The Python exception instance a C++ exception becomes (the same mapping as raising it), for APIs that return errors.
py::object exception_object(std::exception_ptr p);
void bind_batch(py::module_& m);  // many streams, one UNet call (after bind_stream)
void bind_tensor(py::module_& m);
void bind_models(py::module_& m);
void bind_stream(py::module_& m);
void bind_controlnet(py::module_& m);  // after bind_stream: adds the Stream's ControlNet / IP-Adapter methods
void bind_runtime(py::module_& m);
void bind_settings(py::module_& m);  // settings files (read_settings; the CLI's YAML reader where built)

}  // namespace sdpy
