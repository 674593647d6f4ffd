#include "models/compiled_unet.h"

#include <algorithm>
#include <filesystem>
#include <mutex>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/version.h>

#include "core/device.h"
#include "core/error.h"
#include "core/json_limits.h"
#include "core/torch_compat.h"
#include "io/state_dict.h"
#include "models/layers.h"
#include "models/unet_2d_condition.h"

#if SD_HAS_AOTI
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#endif
#if SD_HAS_AOTI && SD_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace sd {

namespace {

constexpr const char* kPrefix = "streamdiffusion.";

std::vector<int64_t> parse_dims(const std::string& s, const std::string& path, const std::string& key) {
  std::vector<int64_t> dims;
  std::stringstream in(s);
  std::string part;
  while (std::getline(in, part, ',')) {
    size_t used = 0;
    int64_t v = -1;
    try {
      v = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != part.size() || v <= 0)
      throw FormatError(path, "metadata " + key + " = \"" + s + "\" is not a list of positive sizes (\"1,4,64,64\")");
    dims.push_back(v);
  }
  return dims;
}

std::string dims_str(const std::vector<int64_t>& d) { return shape_str(at::IntArrayRef(d)); }

c10::ScalarType torch_dtype(const std::string& name, const std::string& path, const std::string& what) {
  if (name == "float32" || name == "fp32") return c10::kFloat;
  if (name == "float16" || name == "fp16") return c10::kHalf;
  if (name == "bfloat16" || name == "bf16") return c10::kBFloat16;
  throw FormatError(path, what + ": dtype \"" + name + "\" is not fp32, fp16 or bf16");
}

// "2.15.0+cu130" -> "2.15"
std::string major_minor(const std::string& v) {
  const size_t a = v.find('.');
  if (a == std::string::npos) return v;
  const size_t b = v.find_first_not_of("0123456789", a + 1);
  return v.substr(0, b == std::string::npos ? v.size() : b);
}

// The fields of the UNet config that shape the computation, as JSON (for the comparison and its message).
nlohmann::json config_fields(const UNet2DConditionConfig& c) {
  return {{"in_channels", c.in_channels},
          {"out_channels", c.out_channels},
          {"center_input_sample", c.center_input_sample},
          {"flip_sin_to_cos", c.flip_sin_to_cos},
          {"freq_shift", c.freq_shift},
          {"down_block_types", c.down_block_types},
          {"mid_block_type", c.mid_block_type},
          {"up_block_types", c.up_block_types},
          {"block_out_channels", c.block_out_channels},
          {"layers_per_block", c.layers_per_block},
          {"transformer_layers_per_block", c.transformer_layers_per_block},
          {"only_cross_attention", c.only_cross_attention},
          {"downsample_padding", c.downsample_padding},
          {"mid_block_scale_factor", c.mid_block_scale_factor},
          {"norm_num_groups", c.norm_num_groups},
          {"norm_eps", c.norm_eps},
          {"cross_attention_dim", c.cross_attention_dim},
          {"num_attention_heads", c.num_attention_heads},
          {"use_linear_projection", c.use_linear_projection},
          {"upcast_attention", c.upcast_attention},
          {"time_embedding_dim", c.time_embed_dim()},
          {"time_cond_proj_dim", c.time_cond_proj_dim},
          {"conv_in_kernel", c.conv_in_kernel},
          {"conv_out_kernel", c.conv_out_kernel},
          {"addition_embed_type", c.addition_embed_type}};
}

std::vector<int64_t> strides_of(const torch::Tensor& t) { return t.strides().vec(); }

}  // namespace

CompiledUNetInfo parse_compiled_unet_metadata(const std::map<std::string, std::string>& metadata,
                                              const std::string& path) {
  auto get = [&](const std::string& key) -> const std::string& {
    auto it = metadata.find(kPrefix + key);
    if (it == metadata.end())
      throw FormatError(path, "metadata has no " + std::string(kPrefix) + key +
                                  " (not a UNet package made by scripts/compile-unet.py)");
    return it->second;
  };
  if (get("component") != "unet")
    throw FormatError(path, "metadata streamdiffusion.component is \"" + get("component") + "\", expected \"unet\"");
  if (get("format") != "1")
    throw FormatError(path, "metadata streamdiffusion.format is \"" + get("format") +
                                "\"; this engine reads format 1 (compile it again with this checkout's "
                                "scripts/compile-unet.py)");
  CompiledUNetInfo info;
  info.device = get("device");
  if (info.device != "cpu" && info.device != "cuda")
    throw FormatError(path, "metadata streamdiffusion.device is \"" + info.device + "\", expected cpu or cuda");
  info.dtype = torch_dtype(get("dtype"), path, "metadata streamdiffusion.dtype");
  info.sample = parse_dims(get("sample"), path, "streamdiffusion.sample");
  info.context = parse_dims(get("context"), path, "streamdiffusion.context");
  if (info.sample.size() != 4 || info.context.size() != 3 || info.context[0] != info.sample[0])
    throw FormatError(path, "metadata: sample " + dims_str(info.sample) + " and context " + dims_str(info.context) +
                                " are not [rows, C, h, w] and [rows, tokens, D]");
  const std::string& layout = get("sample_layout");
  if (layout != "channels_last" && layout != "contiguous")
    throw FormatError(path, "metadata streamdiffusion.sample_layout is \"" + layout +
                                "\", expected channels_last or contiguous");
  info.sample_channels_last = layout == "channels_last";
  info.rows_min = info.rows_max = info.sample[0];
  if (auto it = metadata.find(std::string(kPrefix) + "rows"); it != metadata.end()) {
    // "MIN-MAX" (or "N"), and the example's rows among them.
    const std::string& r = it->second;
    const size_t dash = r.find('-');
    const auto lo = parse_dims(r.substr(0, dash), path, "streamdiffusion.rows");
    const auto hi = dash == std::string::npos ? lo : parse_dims(r.substr(dash + 1), path, "streamdiffusion.rows");
    if (lo.size() != 1 || hi.size() != 1 || lo[0] > hi[0] || info.sample[0] < lo[0] || info.sample[0] > hi[0])
      throw FormatError(path, "metadata streamdiffusion.rows = \"" + r + "\" is not MIN-MAX with MIN <= " +
                                  std::to_string(info.sample[0]) + " (the sample's rows) <= MAX");
    info.rows_min = lo[0];
    info.rows_max = hi[0];
  }
  info.config_json = get("config");
  info.torch_version = get("torch");
  if (auto it = metadata.find(std::string(kPrefix) + "mode"); it != metadata.end()) info.mode = it->second;
  nlohmann::json w;
  const std::string weights = get("weights");
  // Nested too deep, the value would overflow the stack where it is copied or quoted (core/json_limits.h).
  if (const std::string why = json_depth_problem(weights); !why.empty())
    throw FormatError(path, "metadata streamdiffusion.weights is not JSON of weights: " + why);
  try {
    w = nlohmann::json::parse(weights);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(path, std::string("metadata streamdiffusion.weights is not JSON: ") + e.what());
  }
  if (!w.is_object() || w.empty())
    throw FormatError(path, "metadata streamdiffusion.weights is not an object of weights");
  for (const auto& [name, v] : w.items()) {
    const std::string what = "metadata streamdiffusion.weights[\"" + name + "\"]";
    if (!v.is_array() || v.size() != 3 || !v[0].is_array() || !v[1].is_array() || !v[2].is_string() ||
        v[0].size() != v[1].size())
      throw FormatError(path, what + " is not [shape, strides, dtype]");
    CompiledUNetInfo::Weight wt;
    for (const auto& d : v[0]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) throw FormatError(path, what + ": bad shape");
      wt.shape.push_back(d.get<int64_t>());
    }
    for (const auto& d : v[1]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) throw FormatError(path, what + ": bad strides");
      wt.strides.push_back(d.get<int64_t>());
    }
    wt.dtype = torch_dtype(v[2].get<std::string>(), path, what);
    info.weights.emplace(name, std::move(wt));
  }
  return info;
}

void check_compiled_unet(const CompiledUNetInfo& info, const UNet2DConditionConfig& config,
                         const std::vector<std::pair<std::string, torch::Tensor>>& weights, c10::Device device,
                         c10::ScalarType dtype, const std::string& path) {
  const std::string dev = device.is_cuda() ? "cuda" : device.is_cpu() ? "cpu" : device.str();
  if (info.device != dev || info.dtype != dtype)
    throw FormatError(path, "compiled for " + info.device + " " + dtype_name(info.dtype) + ", the models are on " +
                                dev + " in " + dtype_name(dtype) +
                                " (compile it again with scripts/compile-unet.py --device / --dtype)");
  if (major_minor(info.torch_version) != major_minor(TORCH_VERSION))
    throw FormatError(path, "compiled by PyTorch " + info.torch_version + ", this engine's libtorch is " +
                                std::string(TORCH_VERSION) + " (compile it with the matching torch)");
  if (info.sample[1] != config.in_channels || info.context[2] != config.cross_attention_dim.front())
    throw FormatError(path, "compiled for sample " + dims_str(info.sample) + " and context " +
                                dims_str(info.context) + ", but the UNet takes " +
                                std::to_string(config.in_channels) + " channels and a context of width " +
                                std::to_string(config.cross_attention_dim.front()));
  nlohmann::json theirs;
  if (const std::string why = json_depth_problem(info.config_json); !why.empty())
    throw FormatError(path, "metadata streamdiffusion.config is not a UNet config: " + why);
  try {
    theirs = config_fields(
        UNet2DConditionConfig::from_json(nlohmann::json::parse(info.config_json), path + " (streamdiffusion.config)"));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(path, std::string("metadata streamdiffusion.config is not JSON: ") + e.what());
  }
  const nlohmann::json ours = config_fields(config);
  std::string diffs;
  for (const auto& [k, v] : ours.items())
    if (theirs.at(k) != v) diffs += (diffs.empty() ? "" : "; ") + k + " " + theirs.at(k).dump() + " vs " + v.dump();
  if (!diffs.empty())
    throw FormatError(path, "compiled from another UNet config than the loaded one (package vs loaded: " + diffs + ")");

  std::vector<std::string> problems;
  std::map<std::string, const torch::Tensor*> have;
  for (const auto& [name, t] : weights) have.emplace(name, &t);
  for (const auto& [name, w] : info.weights) {
    auto it = have.find(name);
    if (it == have.end()) {
      problems.push_back(name + " is not a weight of the loaded UNet");
      continue;
    }
    const torch::Tensor& t = *it->second;
    if (t.sizes().vec() != w.shape)
      problems.push_back(name + ": shape " + dims_str(w.shape) + " vs loaded " + shape_str(t.sizes()));
    else if (t.scalar_type() != w.dtype)
      problems.push_back(name + ": dtype " + dtype_name(w.dtype) + " vs loaded " + dtype_name(t.scalar_type()));
    else if (t.numel() > 1 && strides_of(t) != w.strides)
      problems.push_back(name + ": strides " + dims_str(w.strides) + " vs loaded " + shape_str(t.strides()));
  }
  for (const auto& [name, t] : weights)
    if (!info.weights.count(name)) problems.push_back(name + " (a weight of the loaded UNet) is not in the package");
  if (!problems.empty()) {
    std::string msg = std::to_string(problems.size()) + " weight(s) differ from the loaded UNet's:";
    for (size_t i = 0; i < problems.size() && i < 5; ++i)
      msg += " " + problems[i] + (i + 1 < problems.size() ? ";" : "");
    if (problems.size() > 5) msg += " ...";
    throw FormatError(path, msg);
  }
}

std::string compiled_unet_dims(const CompiledUNetInfo& info, const std::vector<int64_t>& dims) {
  if (info.rows_min == info.rows_max || dims.empty()) return dims_str(dims);
  // Appended piece by piece: `"[" + std::to_string(...)` gives GCC 12 a false -Wstringop-overflow here.
  std::string s = "[";
  s += std::to_string(info.rows_min);
  s += '-';
  s += std::to_string(info.rows_max);
  for (size_t i = 1; i < dims.size(); ++i) {
    s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

std::string compiled_unet_mismatch(const CompiledUNetInfo& info, const torch::Tensor& sample,
                                   const torch::Tensor& timesteps, const torch::Tensor& encoder_hidden_states) {
  const int64_t rows = sample.dim() == 4 ? sample.size(0) : -1;
  if (rows < info.rows_min || rows > info.rows_max ||
      !std::equal(info.sample.begin() + 1, info.sample.end(), sample.sizes().begin() + 1))
    return "sample " + shape_str(sample.sizes()) + ", compiled for " + compiled_unet_dims(info, info.sample);
  if (encoder_hidden_states.dim() != 3 || encoder_hidden_states.size(0) != rows ||
      encoder_hidden_states.size(1) != info.context[1] || encoder_hidden_states.size(2) != info.context[2]) {
    std::vector<int64_t> want = info.context;
    want[0] = rows;
    return "encoder_hidden_states " + shape_str(encoder_hidden_states.sizes()) + ", expected " + dims_str(want);
  }
  if (sample.scalar_type() != info.dtype || encoder_hidden_states.scalar_type() != info.dtype)
    return "inputs in " + dtype_name(sample.scalar_type()) + ", compiled for " + dtype_name(info.dtype);
  if (timesteps.numel() != rows && timesteps.numel() != 1)
    return "timesteps " + shape_str(timesteps.sizes()) + " for " + std::to_string(rows) + " rows";
  return "";
}

#if SD_HAS_AOTI

namespace {
// The UNet's tensors by diffusers key (parameters and buffers). The package reads plain weights: a CPU convolution
// that kept only its oneDNN copy gets its dense weight back (and keeps the copy, still current, for the calls the
// engine's own UNet runs).
std::vector<std::pair<std::string, torch::Tensor>> plain_weights(UNet2DConditionModelImpl& unet) {
  for (auto& m : unet.modules(/*include_self=*/false))
    if (auto* conv = dynamic_cast<sd::nn::Conv2dImpl*>(m.get())) conv->restore_dense();
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : unet.named_parameters(/*recurse=*/true)) out.emplace_back(p.key(), p.value());
  for (const auto& b : unet.named_buffers(/*recurse=*/true)) out.emplace_back(b.key(), b.value());
  return out;
}

}  // namespace

bool compiled_unet_available() { return true; }
std::string compiled_unet_unavailable_reason() { return ""; }

struct CompiledUNet::Impl {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  // The runner is the single-threaded one: the threaded one tracks each run with a CUDA event that its next run
  // queries (or waits for), which a CUDA graph capture forbids; calls from several threads take turns here instead.
  std::mutex mu;
};

CompiledUNetInfo read_compiled_unet_info(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) throw InvalidArgument("compiled UNet " + path + ": no such file");
  std::map<std::string, std::string> metadata;
  try {
    const auto m = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
    metadata.insert(m.begin(), m.end());
  } catch (const c10::Error& e) {
    throw FormatError(path, std::string("not an AOTInductor package: ") + e.what_without_backtrace());
  }
  return parse_compiled_unet_metadata(metadata, path);
}

std::unique_ptr<CompiledUNet> CompiledUNet::load(const std::string& path, UNet2DConditionModelImpl& unet,
                                                 c10::Device device, c10::ScalarType dtype) {
  CompiledUNetInfo info = read_compiled_unet_info(path);
  // Checked before the package's code is loaded (a package for another device or torch would fail obscurely there).
  auto weights = plain_weights(unet);
  check_compiled_unet(info, unet.config(), weights, device, dtype, path);
  auto impl = std::make_unique<Impl>();
  try {
    impl->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        path, "model", /*run_single_threaded=*/true, /*num_runners=*/1,
        device.has_index() ? device.index() : static_cast<c10::DeviceIndex>(-1));
  } catch (const c10::Error& e) {
    throw FormatError(path, std::string("AOTInductor could not load the package: ") + e.what_without_backtrace());
  }
  std::unique_ptr<CompiledUNet> c(new CompiledUNet(path, std::move(info), unet, device, dtype, std::move(impl)));
  c->hand_over(weights);
  return c;
}

void CompiledUNet::load_weights() {
  auto weights = plain_weights(unet_);
  check_compiled_unet(info_, unet_.config(), weights, device_, dtype_, path_);
  hand_over(weights);
}

void CompiledUNet::hand_over(const std::vector<std::pair<std::string, torch::Tensor>>& weights) {
  std::unordered_map<std::string, at::Tensor> constants(weights.begin(), weights.end());
  try {
    // user_managed: the package reads these tensors themselves (no copy); its folded constants are folded again
    // from them on the next run.
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->loader->load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true,
                                  /*user_managed=*/true);
  } catch (const c10::Error& e) {
    throw FormatError(path_, std::string("could not hand the UNet's weights to the package: ") +
                                 e.what_without_backtrace());
  }
  // One call now: the package folds its constants from the new weights on its first run, which must not be inside a
  // CUDA graph capture (nor a frame's time); a package that cannot run fails here, at load.
  const auto opt = torch::TensorOptions().device(device_).dtype(info_.dtype);
  run(torch::zeros(info_.sample, opt), torch::full({info_.sample[0]}, 500, opt.dtype(torch::kLong)),
      torch::zeros(info_.context, opt));
}

torch::Tensor CompiledUNet::run(const torch::Tensor& sample, const torch::Tensor& timesteps,
                                const torch::Tensor& encoder_hidden_states) const {
  if (const std::string why = mismatch(sample, timesteps, encoder_hidden_states); !why.empty())
    throw InvalidArgument("compiled UNet " + path_ + ": " + why);
  const int64_t rows = sample.size(0);
  std::vector<at::Tensor> in{
      sample.to(device_).contiguous(info_.sample_channels_last ? at::MemoryFormat::ChannelsLast
                                                               : at::MemoryFormat::Contiguous),
      timesteps.to(device_, torch::kLong).reshape({-1}).expand({rows}).contiguous(),
      encoder_hidden_states.to(device_).contiguous()};
  void* stream = nullptr;
#if SD_WITH_CUDA
  if (device_.is_cuda()) stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
#endif
  std::vector<at::Tensor> out;
  try {
    std::lock_guard<std::mutex> lock(impl_->mu);
    out = impl_->loader->run(in, stream);
  } catch (const c10::Error& e) {
    throw Error("compiled UNet " + path_ + ": " + e.what_without_backtrace());
  }
  if (out.size() != 1 || out[0].sizes() != in[0].sizes())
    throw Error("compiled UNet " + path_ + ": expected one output of shape " + shape_str(in[0].sizes()) + ", got " +
                std::to_string(out.size()) + (out.empty() ? "" : " of shape " + shape_str(out[0].sizes())));
  return out[0];
}

#else

bool compiled_unet_available() { return false; }
std::string compiled_unet_unavailable_reason() {
  return std::string("this build's libtorch is ") + TORCH_VERSION +
         "; compiled UNets (AOTInductor packages) need libtorch >= 2.11 (scripts/test-libtorch2.sh's build, or a "
         "CUDA build against PyTorch 2.11+)";
}

struct CompiledUNet::Impl {};

CompiledUNetInfo read_compiled_unet_info(const std::string& path) {
  throw InvalidArgument("compiled UNet " + path + ": " + compiled_unet_unavailable_reason());
}

std::unique_ptr<CompiledUNet> CompiledUNet::load(const std::string& path, UNet2DConditionModelImpl&, c10::Device,
                                                 c10::ScalarType) {
  throw InvalidArgument("compiled UNet " + path + ": " + compiled_unet_unavailable_reason());
}
void CompiledUNet::load_weights() {}
void CompiledUNet::hand_over(const std::vector<std::pair<std::string, torch::Tensor>>&) {}
torch::Tensor CompiledUNet::run(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&) const {
  throw InvalidArgument(compiled_unet_unavailable_reason());
}

#endif

CompiledUNet::CompiledUNet(std::string path, CompiledUNetInfo info, UNet2DConditionModelImpl& unet,
                           c10::Device device, c10::ScalarType dtype, std::unique_ptr<Impl> impl)
    : path_(std::move(path)), info_(std::move(info)), unet_(unet), device_(device), dtype_(dtype),
      impl_(std::move(impl)) {}

CompiledUNet::~CompiledUNet() = default;

std::string CompiledUNet::mismatch(const torch::Tensor& sample, const torch::Tensor& timesteps,
                                   const torch::Tensor& encoder_hidden_states) const {
  return compiled_unet_mismatch(info_, sample, timesteps, encoder_hidden_states);
}

}  // namespace sd
