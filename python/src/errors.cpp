// C++ exceptions -> Python exceptions carrying the C++ message unchanged:
//   sd::InvalidArgument -> streamdiffusion_cpp.InvalidArgument (a ValueError)      bad calls: sizes, options, lists
//   sd::FormatError     -> streamdiffusion_cpp.FormatError (an OSError)            a missing or malformed file/folder
//   sd::Error           -> streamdiffusion_cpp.Error (a RuntimeError)              anything else the engine reports
// All three derive from streamdiffusion_cpp.Error, so `except streamdiffusion_cpp.Error` catches every engine error.
// FormatError.file holds the file the message names. c10::Error (libtorch) becomes a RuntimeError.
#include <c10/util/Exception.h>

#include "core/error.h"
#include "py_common.h"

namespace sdpy {

namespace {
py::handle error_type, invalid, format;
}  // namespace

py::object exception_object(std::exception_ptr p) {
  try {
    std::rethrow_exception(p);
  } catch (const sd::InvalidArgument& e) {
    return py::reinterpret_borrow<py::object>(invalid)(py::str(e.what()));
  } catch (const sd::FormatError& e) {
    // OSError(msg) keeps args = (msg,) so str(e) is the C++ message; .file names the file.
    py::object exc = py::reinterpret_borrow<py::object>(format)(py::str(e.what()));
    exc.attr("file") = e.file();  // not .filename: OSError would print "[Errno None] None: <file>" instead of the message
    return exc;
  } catch (const sd::Error& e) {
    return py::reinterpret_borrow<py::object>(error_type)(py::str(e.what()));
  } catch (const c10::Error& e) {
    return py::reinterpret_borrow<py::object>(PyExc_RuntimeError)(py::str(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return py::reinterpret_borrow<py::object>(PyExc_RuntimeError)(py::str(e.what()));
  }
}

void bind_errors(py::module_& m) {
  static py::exception<sd::Error> error(m, "Error", PyExc_RuntimeError);
  error_type = error;
  invalid = PyErr_NewExceptionWithDoc(
      "streamdiffusion_cpp._core.InvalidArgument",
      "A bad argument (size, option, t_index_list, image shape); the message is the engine's.",
      py::make_tuple(error, py::handle(PyExc_ValueError)).ptr(), nullptr);
  format = PyErr_NewExceptionWithDoc(
      "streamdiffusion_cpp._core.FormatError",
      "A missing or malformed model file or folder; the message names the file first (also in .file).",
      py::make_tuple(error, py::handle(PyExc_OSError)).ptr(), nullptr);
  if (!invalid || !format) throw py::error_already_set();
  m.attr("InvalidArgument") = invalid;
  m.attr("FormatError") = format;
  py::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    try {
      std::rethrow_exception(p);
    } catch (const sd::Error&) {
    } catch (const c10::Error&) {
    } catch (...) {
      std::rethrow_exception(p);  // pybind11's own translators (std::exception -> RuntimeError, ...)
    }
    const py::object exc = exception_object(p);
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  });
}

}  // namespace sdpy
