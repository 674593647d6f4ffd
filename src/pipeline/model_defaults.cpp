#include "pipeline/model_defaults.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_config.h"
#include "io/ldm_checkpoint.h"
#include "io/model_folder.h"
#include "io/safetensors.h"

namespace sd {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// A config file or an empty object when absent or unreadable (loading reports those later, with context).
json config_or_empty(const std::string& path) {
  if (!is_file(path)) return json::object();
  try {
    json j = read_json_file(path);
    return j.is_object() ? j : json::object();
  } catch (const Error&) {
    return json::object();
  }
}

int64_t first_int(const json& v, int64_t def) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_array() && !v.empty() && v.front().is_number_integer()) return v.front().get<int64_t>();
  return def;
}

// The configs a family and a native size are read from (a folder's files, or what a single file's weights tell).
struct ModelConfigs {
  json index = json::object(), unet = json::object(), vae = json::object(), sched = json::object();
  std::string name;  // folder or file name, lower-cased (turbo / lcm are recognised from it too)
};

ModelConfigs folder_configs(const std::string& dir) {
  ModelConfigs c;
  c.index = config_or_empty(dir + "/model_index.json");
  c.unet = config_or_empty(dir + "/unet/config.json");
  c.vae = config_or_empty(dir + "/vae/config.json");
  c.sched = config_or_empty(dir + "/scheduler/scheduler_config.json");
  fs::path norm = fs::path(dir).lexically_normal();
  if (norm.filename().empty()) norm = norm.parent_path();  // "models/sd-turbo/"
  c.name = lower(norm.filename().string());
  return c;
}

// Family recognition and its recommended settings (used when streamdiffusion.json does not set them).
void family_defaults(const ModelConfigs& c, ModelDefaults& d) {
  const json& index = c.index;
  const json& unet = c.unet;
  const json& sched = c.sched;
  const std::string& name = c.name;
  const int64_t ctx = unet.contains("cross_attention_dim") ? first_int(unet["cross_attention_dim"], 0) : 0;
  const bool sdxl = index.contains("text_encoder_2") || ctx == 2048 ||
                    (unet.contains("addition_embed_type") && unet["addition_embed_type"] == "text_time");
  const auto str = [](const json& j, const char* key) {  // a string field, "" when absent or of another type
    return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : std::string();
  };
  std::string sched_class = str(sched, "_class_name");
  if (index.contains("scheduler") && index["scheduler"].is_array() && index["scheduler"].size() == 2 &&
      index["scheduler"][1].is_string())
    sched_class = index["scheduler"][1].get<std::string>();
  const bool trailing = str(sched, "timestep_spacing") == "trailing";
  const bool turbo = name.find("turbo") != std::string::npos ||
                     (trailing && (sched_class == "EulerDiscreteScheduler" ||
                                   sched_class == "EulerAncestralDiscreteScheduler"));
  const bool lcm = (unet.contains("time_cond_proj_dim") && !unet["time_cond_proj_dim"].is_null()) ||
                   name.find("lcm") != std::string::npos;

  if (sdxl)
    d.family = turbo ? "sdxl-turbo" : "sdxl";
  else if (ctx == 768)
    d.family = "sd15";
  else if (ctx == 1024)
    d.family = turbo ? "sd-turbo" : "sd21";
  else
    d.family = turbo ? "turbo" : "unknown";
  if (lcm && !turbo) d.family += "-lcm";

  if (turbo) {
    // Adversarially distilled: one step, no guidance (the model was trained without CFG).
    d.txt2img.t_index_list = std::vector<int64_t>{0};
    d.txt2img.cfg_type = "none";
    d.img2img.t_index_list = std::vector<int64_t>{32};
    d.img2img.cfg_type = "none";
    d.settings_source = "family defaults (" + d.family + ": one step, no guidance)";
  } else if (d.family == "sd15" || d.family == "sd21" || d.family == "sdxl") {
    d.settings_source = "built-in defaults (the LCM-LoRA recipe: txt2img 0,16,32,45, img2img 32,45)";
    d.warnings.push_back(d.family + " without LCM: few-step output needs an LCM-LoRA (--lcm-lora) or a turbo / "
                         "LCM-distilled model; expect blurry or noisy images");
  } else if (lcm) {
    d.settings_source = "family defaults (" + d.family + ": LCM, 4 steps 0,16,32,45)";
    d.txt2img.t_index_list = std::vector<int64_t>{0, 16, 32, 45};
    d.txt2img.cfg_type = "none";
  } else {
    d.settings_source = "built-in defaults (family not recognised)";
  }
}

}  // namespace

ModelDefaults read_model_defaults(const std::string& model_path, const std::string& config_dir,
                                  const std::string& prediction_type) {
  ModelDefaults d;
  std::string folder = model_path;
  ModelConfigs c;
  std::string size_note;  // what an inferred single-file sample_size cannot tell (SDXL base vs turbo)
  if (is_directory(model_path)) {
    if (!is_file(model_path + "/model_index.json")) return d;
    c = folder_configs(model_path);
  } else if (!config_dir.empty()) {
    // A single file with --config: the config folder says what the weights cannot.
    if (!is_directory(config_dir)) return d;
    folder = config_dir;
    c = folder_configs(config_dir);
    c.name = lower(fs::path(model_path).stem().string());
  } else {
    // A single file: the configs inferred from its weights (io/ldm_checkpoint), its name for turbo / lcm.
    try {
      const auto file = SafeTensorsFile::open(model_path);
      if (!convert::is_ldm_checkpoint(file)) return d;
      const convert::LdmCheckpointInfo info = convert::inspect_ldm_checkpoint(file, prediction_type);
      c.unet = info.unet_config;
      c.vae = info.vae_config;
      c.sched = info.scheduler_config;
      c.name = lower(fs::path(model_path).stem().string());
      size_note = info.sample_size_note;
    } catch (const Error&) {
      return d;  // not readable: loading reports it with context
    }
    folder.clear();
  }
  family_defaults(c, d);

  const json& unet = c.unet;
  const json& vae = c.vae;
  const int64_t sample = unet.contains("sample_size") ? first_int(unet["sample_size"], 0) : 0;
  const int64_t levels = vae.contains("block_out_channels") && vae["block_out_channels"].is_array()
                             ? static_cast<int64_t>(vae["block_out_channels"].size())
                             : 4;  // diffusers' AutoencoderKL default is one level; every SD VAE has 4
  const int64_t scale = int64_t{1} << std::clamp<int64_t>(levels - 1, 0, 8);  // real VAEs: 4 levels
  if (sample > 0 && sample <= (int64_t{1} << 16)) {  // (the UNet config refuses larger ones; this reads the raw JSON)
    d.native_width = d.native_height = sample * scale;
    d.native_size_reason = "UNet sample_size " + std::to_string(sample) + " x VAE scale factor " + std::to_string(scale);
    if (!size_note.empty()) {
      d.native_size_reason += " (assumed)";
      if (d.family == "sdxl-turbo") {  // told by the file name only: sdxl-turbo is a 512 px model
        d.native_width = d.native_height = 512;
        d.native_size_reason = "sdxl-turbo (by its file name): 512 px (assumed: the weights cannot tell)";
      }
      d.warnings.push_back(size_note);
    }
  }

  const std::string rec = folder + "/" + kRecommendationsFile;
  if (!folder.empty() && is_file(rec)) {
    std::ifstream in(rec, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!in.good() && !in.eof()) throw FormatError(rec, "cannot read");
    apply_recommendations_json(ss.str(), rec, d);
  }
  return d;
}

}  // namespace sd
