// Model loading (sd::load_pipeline and its LoadOptions), the model's recommended settings (model_defaults.h,
// stream_settings.h), safetensors files and the image <-> tensor conversions of pipeline/image.h.
#include <map>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <variant>

#include "core/device.h"
#include "core/error.h"
#include "io/lora_file.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/model_defaults.h"
#include "pipeline/stream_settings.h"
#include "py_common.h"
#include "py_stream.h"

namespace sdpy {
namespace {

// pybind11 holders cannot be shared_ptr<const T>: the Python object holds a non-const pointer to the immutable set.
using Models = std::shared_ptr<sd::DiffusionModels>;

// "auto" (or None) | "fp32" | "bf16" | "fp16" | "float32" | ... or a torch / numpy dtype ("torch.float16",
// "<class 'numpy.float32'>"), for the device the models load on; "auto" follows the model's own cpu_dtype on a CPU
// (streamdiffusion.json, read through `defaults`) as the CLI does.
c10::ScalarType dtype_arg(py::handle d, const c10::Device& dev, const sd::ModelDefaults& defaults) {
  if (d.is_none()) return sd::parse_dtype(sd::dtype_request(defaults, "auto", dev.is_cpu()), dev);
  std::string s = py::str(d).cast<std::string>();
  const auto q = s.find('\'');
  if (q != std::string::npos) s = s.substr(q + 1, s.rfind('\'') - q - 1);  // <class 'numpy.float32'>
  const auto dot = s.rfind('.');
  if (dot != std::string::npos) s = s.substr(dot + 1);  // torch.float16 -> float16
  return sd::parse_dtype(sd::dtype_request(defaults, s, dev.is_cpu()), dev);
}

std::string model_path_or_default(const std::optional<std::string>& model) {
  if (model && !model->empty()) return *model;
  const std::string dir = sd::default_model_dir();
  if (!sd::is_file(dir + "/model_index.json"))
    throw sd::InvalidArgument("no model given and the built-in model was not found at " + dir +
                              " (it ships in the repository as models/emoji-tiny; set SD_DEFAULT_MODEL or pass a "
                              "model folder)");
  return dir;
}

std::vector<sd::LoraSpec> lora_specs(py::handle loras, const std::optional<std::string>& lcm_lora) {
  std::vector<sd::LoraSpec> specs;
  if (lcm_lora && !lcm_lora->empty()) specs.push_back({*lcm_lora, 1.0, ""});
  auto add = [&](py::handle path, double scale) {
    const std::string p = py::str(path).cast<std::string>();
    if (!sd::is_file(p)) throw sd::InvalidArgument("LoRA file not found: " + p);
    specs.push_back({p, scale, ""});
  };
  if (loras.is_none()) {
  } else if (py::isinstance<py::dict>(loras)) {  // upstream's lora_dict {path: scale}
    for (auto kv : loras.cast<py::dict>()) add(kv.first, kv.second.cast<double>());
  } else {
    for (auto item : loras) {  // "file", "file:scale", (file, scale)
      if (py::isinstance<py::str>(item)) {
        specs.push_back(sd::parse_lora_spec(item.cast<std::string>(), "loras"));
      } else {
        auto t = item.cast<py::sequence>();
        if (t.size() != 2) throw sd::InvalidArgument("loras: expected (path, scale) pairs");
        add(t[0], t[1].cast<double>());
      }
    }
  }
  sd::name_loras(specs);
  return specs;
}

py::dict mode_dict(const sd::ModeRecommendation& r) {
  py::dict d;
  d["t_index_list"] = r.t_index_list ? py::cast(*r.t_index_list) : py::none();
  d["cfg_type"] = r.cfg_type ? py::cast(*r.cfg_type) : py::none();
  d["guidance"] = r.guidance ? py::cast(*r.guidance) : py::none();
  d["delta"] = r.delta ? py::cast(*r.delta) : py::none();
  return d;
}

}  // namespace

std::shared_ptr<WeightsMutex> weights_mutex(const sd::DiffusionModels* models) {
  static std::mutex mu;
  static std::map<const sd::DiffusionModels*, std::weak_ptr<WeightsMutex>> locks;
  std::lock_guard<std::mutex> lock(mu);
  // A model set's entry lives while a stream or a setter holds its lock; expired ones go (an address can come back
  // for a later model set, which then gets a lock of its own).
  for (auto it = locks.begin(); it != locks.end();) it = it->second.expired() ? locks.erase(it) : std::next(it);
  auto& weak = locks[models];
  auto strong = weak.lock();
  if (!strong) weak = strong = std::make_shared<WeightsMutex>();
  return strong;
}

void bind_models(py::module_& m) {
  py::class_<sd::DiffusionModels, Models>(m, "Models", R"doc(
A loaded model set (tokenizer, text encoder, UNet, autoencoder, scheduler config): immutable and shared by any number
of Streams. Create it with load_pipeline().
)doc")
      .def_property_readonly("dtype", [](const sd::DiffusionModels& s) { return sd::dtype_name(s.dtype()); })
      .def_property_readonly("device", [](const sd::DiffusionModels& s) { return s.device().str(); })
      .def_property_readonly("vae_scale_factor", &sd::DiffusionModels::vae_scale_factor,
                             "pixels per latent cell (8 for Stable Diffusion)")
      .def_property_readonly("latent_channels", &sd::DiffusionModels::latent_channels)
      .def("describe", &sd::DiffusionModels::describe, "one line: folder, autoencoder, dtype, device")
      .def_property_readonly("variant", &sd::DiffusionModels::variant,
                             "the weight-file variant loaded with (load_pipeline(variant=)); \"\" = the plain files")
      .def("loras",
           [](const sd::DiffusionModels& s) {
             std::vector<sd::LoraReport> reports;
             {
               py::gil_scoped_release release;
               const auto mu = weights_mutex(&s);
               std::shared_lock<WeightsMutex> lock(*mu);  // not while set_lora_scale changes them
               reports = s.loras();
             }
             py::list out;
             for (const auto& r : reports) {
               py::dict d;
               d["name"] = r.name;
               d["path"] = r.path;
               d["layout"] = r.layout;
               d["scale"] = r.scale;
               d["keys"] = r.keys;
               d["matched_keys"] = r.matched_keys;
               d["methods"] = r.methods;
               d["ranks"] = r.ranks;
               d["modules"] = r.modules;
               d["unmatched_keys"] = r.unmatched;
               out.append(d);
             }
             return out;
           },
           "the fused LoRAs in load order: dicts with name, path, layout, scale, keys, matched_keys, methods (those "
           "beyond plain LoRA that patch modules, sorted, as `info --lora` names them: \"DoRA\", \"LoHa\", \"LoKr\", "
           "\"Tucker LoCon\", \"full\"; [] for a plain LoRA), ranks (distinct, ascending), modules (component -> "
           "the module paths it patches, file order) and unmatched_keys (keys that patch nothing, file order; loaded "
           "without strict_lora) - what `info --lora --json` prints, path there named file")
      .def_property_readonly("has_ip_adapter", [](const sd::DiffusionModels& s) { return s.ip_adapter() != nullptr; },
                             "loaded with ip_adapter=")
      .def(
          "set_ip_adapter_scale",
          [](const sd::DiffusionModels& s, double scale) {
            const auto mu = weights_mutex(&s);
            std::unique_lock<WeightsMutex> lock(*mu);  // after the frames in progress (py_stream.h)
            s.set_ip_adapter_scale(scale);
          },
          py::arg("scale"), py::call_guard<py::gil_scoped_release>(),
          "weight of the IP-Adapter's image attention (0 = the plain UNet, exactly); shared by every stream on "
          "these models, from their next frame (it waits for the frames in progress). InvalidArgument without an "
          "IP-Adapter.")
      .def(
          "set_lora_scale",
          [](const sd::DiffusionModels& s, const std::string& name, double scale) {
            const auto mu = weights_mutex(&s);
            std::unique_lock<WeightsMutex> lock(*mu);  // after the frames in progress (py_stream.h)
            s.set_lora_scale(name, scale);
          },
          py::arg("name"), py::arg("scale"), py::call_guard<py::gil_scoped_release>(),
          "Re-fuses LoRA `name` (its file stem) at `scale` without reloading; every stream on these models sees it "
          "from its next frame. Safe from any thread: it waits for the frames in progress on these models (Streams, "
          "Batchers, run_stream), which wait for it in turn. InvalidArgument, the scale and weights unchanged, where "
          "a fused weight would not be finite.")
      .def("__repr__", [](const sd::DiffusionModels& s) { return "streamdiffusion_cpp.Models(" + s.describe() + ")"; });

  m.def(
      "load_pipeline",
      [](std::optional<std::string> model, py::handle dtype, const std::string& device, int threads,
         const std::string& taesd, const std::string& vae, const std::string& config, const std::string& tokenizer,
         const std::string& prediction_type, py::handle loras, std::optional<std::string> lcm_lora,
         bool strict_lora, bool lora_live, int clip_skip, std::optional<double> lcm_guidance,
         const std::string& ip_adapter, double ip_adapter_scale, const std::string& variant) {
        const std::string path = model_path_or_default(model);
        sd::LoadOptions o;
        const sd::ModelDefaults defaults = sd::read_model_defaults(path, config, prediction_type);
        const c10::Device dev = sd::parse_device(device);
        o.dtype = dtype_arg(dtype, dev, defaults);
        o.device = device;
        o.threads = sd::threads_request(defaults, threads, dev.is_cpu());
        o.taesd = taesd;
        o.vae = vae;
        o.config = config;
        o.tokenizer = tokenizer;
        o.prediction_type = prediction_type;
        o.loras = lora_specs(loras, lcm_lora);
        o.strict_lora = strict_lora;
        o.lora_live = lora_live;
        o.clip_skip = clip_skip;
        o.lcm_guidance = lcm_guidance;
        o.ip_adapter = ip_adapter;
        o.ip_adapter_scale = ip_adapter_scale;
        o.variant = variant;
        py::gil_scoped_release release;
        return std::const_pointer_cast<sd::DiffusionModels>(sd::load_pipeline(path, o));
      },
      py::arg("model") = py::none(), py::kw_only(), py::arg("dtype") = "auto", py::arg("device") = "cpu",
      py::arg("threads") = 0, py::arg("taesd") = "", py::arg("vae") = "", py::arg("config") = "",
      py::arg("tokenizer") = "", py::arg("prediction_type") = "", py::arg("loras") = py::none(),
      py::arg("lcm_lora") = py::none(), py::arg("strict_lora") = false, py::arg("lora_live") = true,
      py::arg("clip_skip") = 0, py::arg("lcm_guidance") = py::none(), py::arg("ip_adapter") = "",
      py::arg("ip_adapter_scale") = 1.0, py::arg("variant") = "",
      R"doc(
Loads a model once (sd::load_pipeline): a diffusers folder or an original-layout single .safetensors file.

model: folder or file; None = the built-in models/emoji-tiny. dtype: "auto" (or None: the model's streamdiffusion.json
"cpu_dtype" on a CPU where it names one, else bf16 on a CPU with AVX512-BF16 or AMX-BF16, fp16 on CUDA, else fp32;
Models.dtype tells which) | "fp32" | "bf16" | "fp16" (or a torch dtype).
device: "cpu" | "cuda[:N]". threads: intra-op threads (0 = all cores, or the model's streamdiffusion.json
"cpu_threads" on a CPU where it names one; < 0 = leave as is). taesd: TAESD folder, "none"
for the AutoencoderKL, "" = <model>/taesd when present. vae: an AutoencoderKL folder or file. config / tokenizer /
prediction_type: for single files. loras: {path: scale}, ["file", "file:scale"] or [(path, scale)], fused in order
after lcm_lora (scale 1). ip_adapter: an IP-Adapter .safetensors file (image_encoder/ beside it) or a folder
(h94/IP-Adapter layout), ip_adapter_scale its weight (Stream.set_image_prompt gives the image). variant: as diffusers'
from_pretrained(variant=), e.g. "fp16": each component folder holding <stem>.fp16.safetensors loads it, the others
their plain weights (cast to dtype either way); "" = the plain files; refused for single files. Raises FormatError
(OSError) for missing or malformed files, InvalidArgument (ValueError)
for bad options.
)doc");

  m.def("default_model_dir", &sd::default_model_dir, "the built-in model's folder (models/emoji-tiny)");
  m.def("set_threads", &sd::set_threads, py::arg("n"), "libtorch intra-op threads (0 = all cores); returns the count");

  m.def(
      "model_defaults",
      [](std::optional<std::string> model, const std::string& config, const std::string& prediction_type) {
        const sd::ModelDefaults d = sd::read_model_defaults(model_path_or_default(model), config, prediction_type);
        py::dict out;
        out["family"] = d.family;
        out["native_width"] = d.native_width;
        out["native_height"] = d.native_height;
        out["native_size_reason"] = d.native_size_reason;
        out["num_inference_steps"] = d.num_inference_steps ? py::cast(*d.num_inference_steps) : py::none();
        out["txt2img"] = mode_dict(d.txt2img);
        out["img2img"] = mode_dict(d.img2img);
        out["settings_source"] = d.settings_source;
        out["warnings"] = d.warnings;
        out["note"] = d.note;
        out["cpu_dtype"] = d.cpu_dtype ? py::cast(*d.cpu_dtype) : py::none();
        out["cpu_threads"] = d.cpu_threads ? py::cast(*d.cpu_threads) : py::none();
        return out;
      },
      py::arg("model") = py::none(), py::arg("config") = "", py::arg("prediction_type") = "",
      "What the model recommends (native size, family, streamdiffusion.json or family settings), read from configs.");

  m.def(
      "load_safetensors",
      [](const std::string& path) {
        const auto f = sd::SafeTensorsFile::open(path);
        py::dict out;
        for (const auto& k : f.keys()) out[py::str(k)] = wrap(f.get(k));
        return out;
      },
      py::arg("path"), "All tensors of a .safetensors file as {name: Tensor} (memory-mapped, not copied).");

  m.def(
      "image_to_tensor",
      [](py::handle image, int64_t height, int64_t width) {
        at::Tensor t = to_tensor(image, "image");
        return wrap(sd::image_to_tensor(t, height, width));
      },
      py::arg("image"), py::arg("height") = 0, py::arg("width") = 0,
      "uint8 RGB [H, W, 3] or [N, H, W, 3] -> float32 NCHW [N, 3, H, W] in [-1, 1] (u8 / 255 * 2 - 1).");
  m.def(
      "tensor_to_image", [](py::handle images) { return wrap(sd::tensor_to_image(to_tensor(images, "images"))); },
      py::arg("images"),
      "NCHW [N, 3, H, W] in [-1, 1] (any float dtype) -> uint8 RGB [N, H, W, 3] (clamped, rounded half to even).");
}

}  // namespace sdpy
