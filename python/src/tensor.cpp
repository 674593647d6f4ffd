// Tensors across the boundary without copies.
//  in:  streamdiffusion_cpp.Tensor, any __dlpack__ producer (torch, numpy >= 1.22, CuPy, JAX: at::fromDLPack), or a
//       numpy-viewable object (buffer protocol / __array_interface__, viewed through numpy's own DLPack export).
//  out: streamdiffusion_cpp.Tensor, which has __dlpack__ / __dlpack_device__ (torch.from_dlpack, np.from_dlpack,
//       cupy.from_dlpack) and __array_interface__ (np.asarray), all aliasing the engine's memory.
// The producer's deleter may touch Python objects (numpy's does), so it always runs with the GIL held, whichever
// engine thread drops the last reference.
#include <ATen/DLConvertor.h>
#include <ATen/dlpack.h>

#include "core/error.h"
#include "py_common.h"

namespace sdpy {
namespace {

// Wraps a producer's DLManagedTensor so its deleter runs under the GIL.
struct GilDeleterCtx {
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

void gil_deleter(DLManagedTensor* self) {
  auto* ctx = static_cast<GilDeleterCtx*>(self->manager_ctx);
  self->manager_ctx = ctx->manager_ctx;
  auto* original = ctx->deleter;
  delete ctx;
  if (!original) return;
  if (!Py_IsInitialized()) return;  // interpreter gone: leak rather than crash at exit
  py::gil_scoped_acquire gil;
  original(self);
}

// True when the capsule's tensor has a negative stride on a dimension longer than 1 (numpy's a[..., ::-1], np.flip):
// libtorch 1.13's from_blob computes the storage size with unsigned arithmetic, and its overflow check then throws
// inside a noexcept function (std::terminate: the whole interpreter aborts), so such a capsule must not reach it.
bool has_negative_strides(py::capsule cap) {
  if (!PyCapsule_IsValid(cap.ptr(), "dltensor")) return false;
  const auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  if (!managed || !managed->dl_tensor.strides) return false;
  for (int i = 0; i < managed->dl_tensor.ndim; ++i)
    if (managed->dl_tensor.strides[i] < 0 && managed->dl_tensor.shape[i] > 1) return true;
  return false;
}

at::Tensor from_capsule(py::capsule cap, const char* what) {
  if (has_negative_strides(cap))
    throw py::value_error(std::string(what) + ": the tensor has negative strides (a reversed view such as "
                          "a[..., ::-1]); pass a copy: numpy.ascontiguousarray(a)");
  const char* name = PyCapsule_GetName(cap.ptr());
  if (!name || std::string(name) != "dltensor") {
    PyErr_Clear();
    throw py::type_error(std::string(what) + ": the DLPack capsule was already consumed (name '" +
                         (name ? name : "") + "')");
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  if (!managed) throw py::error_already_set();
  auto* ctx = new GilDeleterCtx{managed->manager_ctx, managed->deleter};
  managed->manager_ctx = ctx;
  managed->deleter = gil_deleter;
  at::Tensor t;
  try {
    t = at::fromDLPack(managed);
  } catch (...) {
    // Not taken over: restore and leave the capsule to free it.
    managed->manager_ctx = ctx->manager_ctx;
    managed->deleter = ctx->deleter;
    delete ctx;
    throw;
  }
  PyCapsule_SetName(cap.ptr(), "used_dltensor");
  PyCapsule_SetDestructor(cap.ptr(), nullptr);
  return t;
}

void capsule_destructor(PyObject* cap) {
  // Called when the capsule dies; a consumer renames it to "used_dltensor" after taking ownership.
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    if (managed && managed->deleter) managed->deleter(managed);
  } else {
    PyErr_Clear();
  }
}

py::capsule to_capsule(const at::Tensor& t) {
  DLManagedTensor* managed = at::toDLPack(t);
  return py::reinterpret_steal<py::capsule>(PyCapsule_New(managed, "dltensor", capsule_destructor));
}

// numpy's typestr for the array interface; "" = no numpy equivalent (bf16).
std::string typestr(c10::ScalarType s) {
  switch (s) {
    case c10::kFloat: return "<f4";
    case c10::kDouble: return "<f8";
    case c10::kHalf: return "<f2";
    case c10::kByte: return "|u1";
    case c10::kChar: return "|i1";
    case c10::kShort: return "<i2";
    case c10::kInt: return "<i4";
    case c10::kLong: return "<i8";
    case c10::kBool: return "|b1";
    default: return "";
  }
}

std::string dtype_str(c10::ScalarType s) {
  switch (s) {
    case c10::kFloat: return "float32";
    case c10::kDouble: return "float64";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kByte: return "uint8";
    case c10::kChar: return "int8";
    case c10::kShort: return "int16";
    case c10::kInt: return "int32";
    case c10::kLong: return "int64";
    case c10::kBool: return "bool";
    default: return c10::toString(s);
  }
}

}  // namespace

py::object wrap(at::Tensor t) { return py::cast(PyTensor{std::move(t)}); }

at::Tensor to_tensor(py::handle obj, const char* what) {
  if (py::isinstance<PyTensor>(obj)) return obj.cast<PyTensor&>().t;
  if (py::hasattr(obj, "__dlpack__")) {
    py::object cap;
    try {
      cap = obj.attr("__dlpack__")();
    } catch (py::error_already_set& e) {
      // numpy refuses read-only arrays (DLPack has no read-only flag; e.g. np.asarray(PIL image)): copy once.
      if (!e.matches(PyExc_BufferError) && !e.matches(PyExc_TypeError)) throw;
      py::module_ np = py::module_::import("numpy");
      cap = np.attr("array")(obj, py::arg("copy") = true).attr("__dlpack__")();
    }
    if (has_negative_strides(cap.cast<py::capsule>())) {
      // A reversed numpy view (frame[..., ::-1], the usual BGR -> RGB): one copy, as for read-only arrays.
      py::module_ np = py::module_::import("numpy");
      if (py::isinstance(obj, np.attr("ndarray")))
        cap = np.attr("ascontiguousarray")(obj).attr("__dlpack__")();
    }
    return from_capsule(cap.cast<py::capsule>(), what);
  }
  if (py::isinstance<py::capsule>(obj)) return from_capsule(obj.cast<py::capsule>(), what);
  if (PyObject_CheckBuffer(obj.ptr()) || py::hasattr(obj, "__array_interface__")) {
    py::module_ np = py::module_::import("numpy");
    py::object arr = np.attr("asarray")(obj);
    return to_tensor(arr, what);
  }
  throw py::type_error(std::string(what) + ": expected a tensor (an object with __dlpack__: torch.Tensor, "
                       "numpy.ndarray, streamdiffusion_cpp.Tensor, ...), got " +
                       py::str(py::type::of(obj)).cast<std::string>());
}

void bind_tensor(py::module_& m) {
  py::class_<PyTensor>(m, "Tensor", R"doc(
An engine tensor (libtorch) exposed without copying.

Images are NCHW float; what a function returns says whether values are in [-1, 1] (the model side: Stream inputs
and outputs) or [0, 1] / uint8 (the picture side). Convert with ``torch.from_dlpack(t)``, ``np.from_dlpack(t)`` or
``np.asarray(t)``: all three alias this memory (bfloat16 has no numpy dtype: use ``t.float()`` first).
)doc")
      .def(py::init([](py::handle obj) { return PyTensor{to_tensor(obj, "Tensor")}; }), py::arg("obj"),
           "Wraps any __dlpack__ / numpy-viewable object without copying.")
      .def("__dlpack__",
           [](const PyTensor& s, py::object stream) {
             if (!stream.is_none() && s.t.device().is_cpu())
               throw py::value_error("__dlpack__: stream must be None for CPU tensors");
             return to_capsule(s.t);
           },
           py::arg("stream") = py::none(), "DLPack capsule aliasing this tensor (consumed by from_dlpack).")
      .def("__dlpack_device__",
           [](const PyTensor& s) {
             const auto d = s.t.device();
             const int type = d.is_cuda() ? 2 /* kDLCUDA */ : 1 /* kDLCPU */;
             return py::make_tuple(type, d.is_cuda() ? d.index() : 0);
           })
      .def_property_readonly("__array_interface__",
                             [](const PyTensor& s) -> py::dict {
                               if (!s.t.device().is_cpu())
                                 throw py::type_error("__array_interface__: the tensor is on " + s.t.device().str());
                               const std::string ts = typestr(s.t.scalar_type());
                               if (ts.empty())
                                 throw py::type_error("numpy has no " + dtype_str(s.t.scalar_type()) +
                                                      " dtype: call .float() first");
                               py::tuple strides(s.t.dim());
                               for (int64_t i = 0; i < s.t.dim(); ++i)
                                 strides[i] = s.t.stride(i) * static_cast<int64_t>(s.t.element_size());
                               py::dict d;
                               d["shape"] = py::tuple(py::cast(s.t.sizes().vec()));
                               d["typestr"] = ts;
                               d["data"] = py::make_tuple(reinterpret_cast<uintptr_t>(s.t.data_ptr()), false);
                               d["strides"] = strides;
                               d["version"] = 3;
                               return d;
                             })
      .def_property_readonly("shape", [](const PyTensor& s) { return py::tuple(py::cast(s.t.sizes().vec())); })
      .def_property_readonly("dtype", [](const PyTensor& s) { return dtype_str(s.t.scalar_type()); },
                             "'float32', 'bfloat16', 'uint8', ...")
      .def_property_readonly("device", [](const PyTensor& s) { return s.t.device().str(); })
      .def_property_readonly("ndim", [](const PyTensor& s) { return s.t.dim(); })
      .def("data_ptr", [](const PyTensor& s) { return reinterpret_cast<uintptr_t>(s.t.data_ptr()); },
           "Address of the first element (equal to torch's / numpy's after a zero-copy conversion).")
      .def("numel", [](const PyTensor& s) { return s.t.numel(); })
      .def("float", [](const PyTensor& s) { return PyTensor{s.t.to(c10::kFloat)}; },
           "float32 copy (the same tensor when already float32).")
      .def("cpu", [](const PyTensor& s) { return PyTensor{s.t.cpu()}; })
      .def("contiguous", [](const PyTensor& s) { return PyTensor{s.t.contiguous()}; })
      .def("clone", [](const PyTensor& s) { return PyTensor{s.t.clone()}; })
      .def("tolist",
           [](const PyTensor& s) {
             const at::Tensor d = s.t.to(c10::kCPU, c10::kDouble).contiguous();
             return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
           },
           "The values, flattened, as Python floats.")
      .def("__len__", [](const PyTensor& s) { return s.t.dim() ? s.t.size(0) : 0; })
      .def("__repr__", [](const PyTensor& s) {
        std::string shape;
        for (int64_t i = 0; i < s.t.dim(); ++i) shape += (i ? ", " : "") + std::to_string(s.t.size(i));
        return "streamdiffusion_cpp.Tensor(shape=[" + shape + "], dtype=" + dtype_str(s.t.scalar_type()) +
               ", device=" + s.t.device().str() + ")";
      });
  m.def("as_tensor", [](py::handle obj) { return PyTensor{to_tensor(obj, "as_tensor")}; }, py::arg("obj"),
        "Any __dlpack__ / numpy-viewable object as a streamdiffusion_cpp.Tensor, without copying.");
}

}  // namespace sdpy
