#include "pipeline/controlnet.h"

#include <filesystem>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_config.h"
#include "io/ldm_checkpoint.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/controlnet.h"
#include "models/layers.h"

namespace sd {

std::string unet_family_name(int64_t cross, bool text_time) {
  if (text_time) return "SDXL";
  if (cross == 768) return "SD 1.x";
  if (cross == 1024) return "SD 2.x";
  return "a UNet with cross_attention_dim " + std::to_string(cross);
}

// Every setting the residuals must agree on with the UNet they are added to.
void check_controlnet_fits(const ControlNetConfig& cn, const UNet2DConditionConfig& u, const std::string& path) {
  const auto& c = cn.unet;
  const std::string cn_family = unet_family_name(c.cross_attention_dim[0], c.text_time());
  const std::string model_family = unet_family_name(u.cross_attention_dim[0], u.text_time());
  if (c.cross_attention_dim[0] != u.cross_attention_dim[0] || c.text_time() != u.text_time())
    throw InvalidArgument("ControlNet " + path + " is for " + cn_family + " (cross_attention_dim " +
                          std::to_string(c.cross_attention_dim[0]) + ") but the model is " + model_family +
                          " (cross_attention_dim " + std::to_string(u.cross_attention_dim[0]) +
                          "): use a ControlNet trained for the model's family");
  auto vec = [](const std::vector<int64_t>& v) {
    std::string s;
    for (auto x : v) s += (s.empty() ? "[" : ", ") + std::to_string(x);
    return s + "]";
  };
  if (c.block_out_channels != u.block_out_channels || c.layers_per_block != u.layers_per_block ||
      c.in_channels != u.in_channels)
    throw InvalidArgument("ControlNet " + path + " does not fit the model's UNet: block_out_channels " +
                          vec(c.block_out_channels) + " vs " + vec(u.block_out_channels) + ", layers_per_block " +
                          vec(c.layers_per_block) + " vs " + vec(u.layers_per_block) + ", in_channels " +
                          std::to_string(c.in_channels) + " vs " + std::to_string(u.in_channels) +
                          " (a ControlNet for another architecture, e.g. a distilled UNet)");
  if (c.pooled_text_dim() != u.pooled_text_dim())
    throw InvalidArgument("ControlNet " + path + ": pooled text width " + std::to_string(c.pooled_text_dim()) +
                          " vs the UNet's " + std::to_string(u.pooled_text_dim()));
}

std::shared_ptr<const ControlNet> ControlNet::load(const std::string& path, const DiffusionModels& models) {
  refuse_pickle(path);
  std::shared_ptr<ControlNet> cn(new ControlNet());
  cn->path_ = path;
  const auto dtype = models.dtype();
  const auto device = models.device();
  ControlNetModel model{nullptr};
  if (is_directory(path)) {
    if (!is_file(path + "/config.json"))
      throw FormatError(path, "not a diffusers ControlNet folder: no config.json (expected config.json + "
                              "diffusion_pytorch_model.safetensors, or a single control_*.safetensors file)");
    // As diffusers' ControlNetModel.from_pretrained(variant=) with the pipeline's variant: the folder's variant file,
    // else its plain weights; a folder with only other variants is refused as a component is. The variant was not
    // asked for this folder but for the model set, so the message says where it came from.
    const std::string variant = models.variant();
    if (!variant.empty()) {
      try {
        find_weights(path, variant);
      } catch (const FormatError& e) {
        std::string what = e.what();
        const std::string prefix = e.file() + ": ";
        if (what.rfind(prefix, 0) == 0) what.erase(0, prefix.size());
        throw FormatError(e.file(), what + " (the variant '" + variant + "' is the model's (--variant, "
                                "load_pipeline(variant=)); ControlNet folders load it when they have it, else their "
                                "plain weights)");
      }
    }
    model = load_controlnet_model(path, dtype, device, variant);
    cn->layout_ = "diffusers folder";
  } else {
    if (!is_file(path))
      throw FormatError(path, "no such file or folder (expected a diffusers ControlNet folder or a "
                              "control_*.safetensors file)");
    const auto file = SafeTensorsFile::open(path);
    if (convert::is_ldm_controlnet(file)) {
      const auto info = convert::inspect_controlnet_file(file);
      const auto config = ControlNetConfig::from_json(info.config, path + " (inferred ControlNet config)");
      ControlNetModel shape_model(config);
      convert::ShapeMap shapes;
      std::vector<std::string> keys;
      for (const auto& kv : state_dict(*shape_model)) {
        shapes[kv.first] = kv.second.sizes().vec();
        keys.push_back(kv.first);
      }
      const auto table = convert::controlnet_ldm_table(keys, info.prefix);
      model = load_controlnet_model(config, convert::gather_ldm(file, table, "ControlNet", shapes), path, dtype,
                                    device);
      cn->layout_ = std::string("single file, original layout (") +
                    (info.prefix.empty() ? "no prefix" : info.prefix + "*") + ", " +
                    convert::family_name(info.family) + ")";
    } else if (file.contains("controlnet_cond_embedding.conv_in.weight")) {
      const std::string cfg = (std::filesystem::path(path).parent_path() / "config.json").string();
      if (!is_file(cfg))
        throw FormatError(path, "ControlNet weights in diffusers names need their config.json in the same folder "
                                "(not found: " + cfg + ")");
      const auto config = ControlNetConfig::from_json(read_json_file(cfg), cfg);
      model = load_controlnet_model(config, file.load_all(), path, dtype, device);
      cn->layout_ = "single file, diffusers names";
    } else {
      std::string hint;
      if (convert::is_ldm_checkpoint(file)) hint = " (it is a full Stable Diffusion checkpoint: pass it as the model)";
      throw FormatError(path, "not a ControlNet: expected control_model.input_hint_block.* / input_hint_block.* "
                              "(original layout) or controlnet_cond_embedding.* (diffusers names)" + hint);
    }
  }
  if (const auto* u = models.unet_config()) check_controlnet_fits(model->config(), *u, path);
  cn->parameters_ = sd::nn::parameter_count(*model);
  cn->model_ = model.ptr();
  return cn;
}

ControlResiduals ControlNet::residuals(const torch::Tensor& sample, const torch::Tensor& timesteps,
                                       const torch::Tensor& encoder_hidden_states, const AddedConditioning& added,
                                       const torch::Tensor& image, double scale) const {
  torch::NoGradGuard no_grad;
  const int64_t rows = sample.size(0);
  torch::Tensor img = image.dim() == 3 ? image.unsqueeze(0) : image;
  if (img.size(0) == 1 && rows > 1) img = img.expand({rows, -1, -1, -1});
  return model_->forward(sample, timesteps, encoder_hidden_states, img, scale, added.text_embeds, added.time_ids);
}

std::string ControlNet::name() const {
  std::filesystem::path p(path_);
  if (p.filename().empty()) p = p.parent_path();
  return is_directory(path_) ? p.filename().string() : p.stem().string();
}

std::string ControlNet::describe() const {
  return "ControlNet " + path_ + " (" + layout_ + ", " + std::to_string(parameters_ / 1000000.0).substr(0, 5) +
         " M parameters)";
}

const ControlNetConfig& ControlNet::config() const { return model_->config(); }
int64_t ControlNet::image_scale() const { return model_->config().cond_downscale(); }

}  // namespace sd
