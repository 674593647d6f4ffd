// ControlNets (pipeline/controlnet.h) and the control preprocessors (runtime/control_preprocessor.h), plus the
// Stream's ControlNet and IP-Adapter methods (sd::StreamDiffusion: set_controlnets, set_control_image,
// set_controlnet_every, set_image_prompt, ...), added to the Stream class bind_stream made.
#include "core/error.h"
#include "io/state_dict.h"
#include "pipeline/controlnet.h"
#include "pipeline/stream_diffusion.h"
#include "py_common.h"
#include "py_stream.h"
#ifdef SD_PY_HAVE_RUNTIME
#include "runtime/control_preprocessor.h"
#endif

namespace sdpy {
namespace {

// pybind11 holders cannot be shared_ptr<const T>: the Python object holds a non-const pointer to the immutable net.
using Net = std::shared_ptr<sd::ControlNet>;
using Models = std::shared_ptr<sd::DiffusionModels>;

// A control image or image prompt from Python: uint8 RGB [H, W, 3] as it is; float [3, H, W] / [1, 3, H, W] in
// [0, 1] as float32. The engine checks the shape and names it in its error.
at::Tensor image_arg(py::handle image, const char* what) {
  at::Tensor t = to_tensor(image, what);
  if (t.is_floating_point() && t.scalar_type() != c10::kFloat) t = t.to(c10::kFloat);
  return t.contiguous();
}

// [(ControlNet, scale), ...], [(ControlNet, scale, guidance_start, guidance_end), ...] or [ControlNet, ...] (scale
// 1, the whole range).
std::vector<sd::ControlNetUnit> units_arg(py::handle seq) {
  std::vector<sd::ControlNetUnit> units;
  for (auto item : seq) {
    if (py::isinstance<sd::ControlNet>(item)) {
      units.push_back({item.cast<Net>(), 1.0});
      continue;
    }
    if (!py::isinstance<py::sequence>(item) || py::isinstance<py::str>(item) ||
        (py::len(item) != 2 && py::len(item) != 4))
      throw sd::InvalidArgument("set_controlnets: expected ControlNet objects, (ControlNet, scale) pairs or "
                                "(ControlNet, scale, guidance_start, guidance_end) (load them with "
                                "ControlNet.load(path, models))");
    auto tuple = item.cast<py::sequence>();
    if (!py::isinstance<sd::ControlNet>(tuple[0]))
      throw sd::InvalidArgument("set_controlnets: the first item of each tuple must be a ControlNet (got " +
                                py::str(py::type::of(tuple[0])).cast<std::string>() + ")");
    sd::ControlNetUnit u{tuple[0].cast<Net>(), tuple[1].cast<double>()};
    if (py::len(tuple) == 4) {
      u.guidance_start = tuple[2].cast<double>();
      u.guidance_end = tuple[3].cast<double>();
    }
    units.push_back(std::move(u));
  }
  return units;
}

}  // namespace

void bind_controlnet(py::module_& m) {
  py::class_<sd::ControlNet, Net>(m, "ControlNet", R"doc(
A ControlNet loaded for a model set (diffusers folder or single control_*.safetensors file), checked against its
UNet's family and cast to its dtype and device. Immutable; any number of Streams may use it.
)doc")
      .def_static(
          "load",
          [](const std::string& path, Models models) {
            if (!models) throw sd::InvalidArgument("ControlNet.load: models is None (use load_pipeline())");
            py::gil_scoped_release release;
            return std::const_pointer_cast<sd::ControlNet>(sd::ControlNet::load(path, *models));
          },
          py::arg("path"), py::arg("models"),
          "Loads a ControlNet for `models`. Raises FormatError (no such file, not a ControlNet) or InvalidArgument "
          "(a ControlNet of another family, e.g. SD 2.x on SD 1.5).")
      .def_property_readonly("path", &sd::ControlNet::path)
      .def_property_readonly("name", &sd::ControlNet::name, "file stem or folder name")
      .def_property_readonly("image_scale", &sd::ControlNet::image_scale,
                             "the control image is this many times the latent size (8)")
      .def("describe", &sd::ControlNet::describe, "path, layout, parameters")
      .def("__repr__", [](const sd::ControlNet& c) { return "streamdiffusion_cpp.ControlNet(" + c.describe() + ")"; });

  m.def(
      "control_preprocess",
      [](const std::string& name, py::handle image) -> py::object {
#ifdef SD_PY_HAVE_RUNTIME
        const auto pre = sd::make_control_preprocessor(name);
        if (pre->feedback())
          throw sd::InvalidArgument("control_preprocess: '" + name +
                                    "' uses the stream's previous output, not an image; pass that output instead");
        at::Tensor x = to_tensor(image, "image");
        if (x.dim() != 3 || x.size(2) != 3 || x.scalar_type() != c10::kByte)
          throw sd::InvalidArgument("control_preprocess: image must be uint8 RGB [H, W, 3], got " +
                                    sd::shape_str(x.sizes()) + " " + std::string(c10::toString(x.scalar_type())));
        at::Tensor out;
        {
          py::gil_scoped_release release;
          out = pre->apply(x.contiguous());
        }
        return py::module_::import("numpy").attr("asarray")(wrap(std::move(out)));
#else
        (void)name;
        (void)image;
        throw sd::Error("control_preprocess: this build has no runtime (OpenCV); control preprocessors need it");
#endif
      },
      py::arg("name"), py::arg("image"),
      "A control image from a frame: name 'canny[:LOW:HIGH]' (white edges on black), 'gray' or 'passthrough'; "
      "image uint8 RGB [H, W, 3]. Returns a numpy uint8 RGB [H, W, 3] array.");
  m.def(
      "control_preprocessor_names",
      []() -> std::vector<std::string> {
#ifdef SD_PY_HAVE_RUNTIME
        return sd::control_preprocessor_names();
#else
        return {};
#endif
      },
      "the known preprocessor names (empty in builds without the runtime)");

  // The Stream's ControlNet and IP-Adapter methods.
  auto stream = py::reinterpret_borrow<py::class_<PyStream, std::shared_ptr<PyStream>>>(m.attr("Stream"));
  stream
      .def(
          "set_controlnets",
          [](PyStream& s, py::handle units) {
            auto list = units_arg(units);
            locked(s)->set_controlnets(std::move(list));
          },
          py::arg("controlnets"),
          "[(ControlNet, scale), ...], [(ControlNet, scale, guidance_start, guidance_end), ...] or [ControlNet, ...] "
          "(scale 1): run before every UNet call, residuals summed. guidance_start / guidance_end (default 0 / 1): "
          "diffusers' control_guidance_start / _end, the share of the denoising steps it conditions (step i of n "
          "unless i/n < start or (i+1)/n > end). Replacing the list clears the control images; each that runs (not at "
          "scale 0 nor with a range keeping none of the steps) needs one (set_control_image) before the next call.")
      .def_property_readonly(
          "controlnets",
          [](const PyStream& s) {
            const auto units = locked(s)->controlnets();
            py::list out;
            for (const auto& u : units)
              out.append(py::make_tuple(std::const_pointer_cast<sd::ControlNet>(u.net), u.scale));
            return out;
          },
          "the stream's ControlNets as (ControlNet, scale) pairs")
      .def(
          "set_controlnet_scale",
          [](PyStream& s, size_t i, double scale) { locked(s)->set_controlnet_scale(i, scale); },
          py::arg("index"), py::arg("scale"), "conditioning scale of ControlNet `index` (0 = skipped: as without it)")
      .def_property_readonly(
          "controlnet_guidance",
          [](const PyStream& s) {
            const auto units = locked(s)->controlnets();
            std::vector<std::pair<double, double>> out;
            for (const auto& u : units) out.emplace_back(u.guidance_start, u.guidance_end);
            return out;
          },
          "(guidance_start, guidance_end) of each ControlNet, in controlnets order")
      .def(
          "set_controlnet_guidance",
          [](PyStream& s, size_t i, double start, double end) { locked(s)->set_controlnet_guidance(i, start, end); },
          py::arg("index"), py::arg("start"), py::arg("end"),
          "control_guidance_start / _end of ControlNet `index`, live (0 <= start < end <= 1)")
      .def(
          "set_control_image",
          [](PyStream& s, size_t i, py::handle image) {
            at::Tensor t = image_arg(image, "image");
            locked(s)->set_control_image(i, t);
          },
          py::arg("index"), py::arg("image"),
          "control image of ControlNet `index`: uint8 RGB [H, W, 3] (numpy HWC) or float [3, H, W] / [1, 3, H, W] in "
          "[0, 1]; any size (resized to the stream's). Takes effect from the next call.")
      .def(
          "set_controlnet_every", [](PyStream& s, int64_t n) { locked(s)->set_controlnet_every(n); }, py::arg("n"),
          "recompute the ControlNet residuals every n calls and reuse them in between (1 = every call)")
      .def_property_readonly("controlnet_every", [](const PyStream& s) { return locked(s)->controlnet_every(); })
      .def(
          "set_image_prompt",
          [](PyStream& s, py::handle image) {
            at::Tensor t = image_arg(image, "image");
            locked(s)->set_image_prompt(t);
          },
          py::arg("image"),
          "IP-Adapter image prompt (models loaded with ip_adapter=): uint8 RGB [H, W, 3], any size; encoded once, "
          "used from the next call.")
      .def("clear_image_prompt", [](PyStream& s) { locked(s)->clear_image_prompt(); },
           "back to the unconditional image prompt")
      .def_property_readonly("has_image_prompt", [](const PyStream& s) { return locked(s)->has_image_prompt(); });
}

}  // namespace sdpy
