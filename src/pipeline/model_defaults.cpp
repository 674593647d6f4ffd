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

[[noreturn]] void bad(const std::string& file, const std::string& field, const std::string& expected) {
  throw FormatError(file, "field '" + field + "': expected " + expected);
}

std::pair<int64_t, int64_t> parse_size_value(const json& v, const std::string& file, const std::string& field) {
  int64_t w = 0, h = 0;
  if (v.is_number_integer()) {
    w = h = v.get<int64_t>();
  } else if (v.is_array() && v.size() == 2 && v[0].is_number_integer() && v[1].is_number_integer()) {
    w = v[0].get<int64_t>();
    h = v[1].get<int64_t>();
  } else if (v.is_string()) {
    const std::string s = v.get<std::string>();
    const auto x = s.find('x');
    try {
      size_t p1 = 0, p2 = 0;
      if (x == std::string::npos) throw std::invalid_argument(s);
      w = std::stoll(s.substr(0, x), &p1);
      h = std::stoll(s.substr(x + 1), &p2);
      if (p1 != x || p2 != s.size() - x - 1) throw std::invalid_argument(s);
    } catch (const std::exception&) {
      bad(file, field, "\"WIDTHxHEIGHT\" (e.g. \"512x512\"), got \"" + s + "\"");
    }
  } else {
    bad(file, field, "\"WIDTHxHEIGHT\", [width, height] or one integer");
  }
  if (w < 8 || h < 8 || w > 4096 || h > 4096 || w % 8 || h % 8)
    bad(file, field, "a size of multiples of 8 between 8 and 4096, got " + std::to_string(w) + "x" + std::to_string(h));
  return {w, h};
}

double number(const json& v, const std::string& file, const std::string& field, double lo, double hi) {
  if (!v.is_number()) bad(file, field, "a number");
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi)) bad(file, field, "a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return x;
}

void read_mode(const json& j, const std::string& file, const std::string& prefix, ModeRecommendation& m) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string key = it.key(), field = prefix + key;
    const json& v = it.value();
    if (key == "t_index_list") {
      if (!v.is_array() || v.empty() || v.size() > 50) bad(file, field, "a list of 1..50 integers");
      std::vector<int64_t> t;
      for (const auto& e : v) {
        if (!e.is_number_integer() || e.get<int64_t>() < 0) bad(file, field, "non-negative integers");
        t.push_back(e.get<int64_t>());
      }
      m.t_index_list = t;
    } else if (key == "cfg_type") {
      static const std::vector<std::string> ok = {"none", "full", "self", "initialize"};
      if (!v.is_string() || std::find(ok.begin(), ok.end(), v.get<std::string>()) == ok.end())
        bad(file, field, "one of \"none\", \"full\", \"self\", \"initialize\"");
      m.cfg_type = v.get<std::string>();
    } else if (key == "guidance") {
      m.guidance = number(v, file, field, 0, 20);
    } else if (key == "delta") {
      m.delta = number(v, file, field, 0, 10);
    } else if (prefix.empty() && (key == "size" || key == "num_inference_steps" || key == "txt2img" ||
                                  key == "img2img" || key == "note")) {
      continue;  // top-level fields read by the caller
    } else {
      throw FormatError(file, "unknown field '" + field +
                                  "' (known: size, num_inference_steps, t_index_list, cfg_type, guidance, delta, "
                                  "txt2img, img2img, note)");
    }
  }
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

void apply_recommendations_json(const std::string& json_text, const std::string& file, ModelDefaults& d) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw FormatError(file, std::string("not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw FormatError(file, "expected a JSON object");
  ModeRecommendation both;
  read_mode(j, file, "", both);
  if (j.contains("size")) {
    const auto [w, h] = parse_size_value(j["size"], file, "size");
    d.native_width = w;
    d.native_height = h;
    d.native_size_reason = std::filesystem::path(file).filename().string();
  }
  if (j.contains("num_inference_steps")) {
    const json& v = j["num_inference_steps"];
    if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > 1000)
      bad(file, "num_inference_steps", "an integer in [1, 1000]");
    d.num_inference_steps = v.get<int64_t>();
  }
  if (j.contains("note")) {
    if (!j["note"].is_string()) bad(file, "note", "a string");
    d.note = j["note"].get<std::string>();
  }
  const auto merge = [](ModeRecommendation& into, const ModeRecommendation& from) {
    if (from.t_index_list) into.t_index_list = from.t_index_list;
    if (from.cfg_type) into.cfg_type = from.cfg_type;
    if (from.guidance) into.guidance = from.guidance;
    if (from.delta) into.delta = from.delta;
  };
  ModeRecommendation txt = both, img = both;
  for (const char* mode : {"txt2img", "img2img"}) {
    if (!j.contains(mode)) continue;
    if (!j[mode].is_object()) bad(file, mode, "an object");
    ModeRecommendation m;
    read_mode(j[mode], file, std::string(mode) + ".", m);
    merge(std::string(mode) == "txt2img" ? txt : img, m);
  }
  // The file's settings replace the family's wholesale per mode (a file that names t_index_list but no cfg_type
  // still gets the family's cfg_type: fields merge one by one).
  merge(d.txt2img, txt);
  merge(d.img2img, img);
  const int64_t S = d.num_inference_steps.value_or(50);
  for (const auto* m : {&d.txt2img, &d.img2img})
    if (m->t_index_list)
      for (int64_t t : *m->t_index_list)
        if (t >= S)
          throw FormatError(file, "t_index_list entry " + std::to_string(t) + " is not below num_inference_steps " +
                                      std::to_string(S));
  d.settings_source = std::filesystem::path(file).filename().string();
  d.warnings.clear();  // the model's author chose these settings
}

ModelDefaults read_model_defaults(const std::string& model_path, const std::string& config_dir,
                                  const std::string& prediction_type) {
  ModelDefaults d;
  std::string folder = model_path;
  ModelConfigs c;
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
  if (sample > 0) {
    d.native_width = d.native_height = sample * scale;
    d.native_size_reason = "UNet sample_size " + std::to_string(sample) + " x VAE scale factor " + std::to_string(scale);
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
