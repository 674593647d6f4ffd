// `streamdiffusion info --model DIR`: what a model folder holds, without loading the weights (headers only).
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "apps/cli/commands.h"
#include "apps/cli/pipeline_options.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "io/safetensors.h"

namespace {

std::string human_bytes(uint64_t n) {
  std::ostringstream o;
  o << std::fixed << std::setprecision(1);
  if (n >= (1ull << 30))
    o << n / double(1ull << 30) << " GiB";
  else if (n >= (1ull << 20))
    o << n / double(1ull << 20) << " MiB";
  else if (n >= 1024)
    o << n / 1024.0 << " KiB";
  else
    o << n << " B";
  return o.str();
}

// The config fields worth seeing at a glance, per component kind.
const std::map<std::string, std::vector<std::string>>& brief_fields() {
  static const std::map<std::string, std::vector<std::string>> f = {
      {"unet", {"block_out_channels", "layers_per_block", "attention_head_dim", "num_attention_heads",
                "cross_attention_dim", "use_linear_projection", "upcast_attention", "sample_size", "down_block_types",
                "up_block_types", "mid_block_type", "transformer_layers_per_block", "only_cross_attention",
                "time_cond_proj_dim"}},
      {"vae", {"block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"}},
      {"taesd", {"encoder_block_out_channels", "decoder_block_out_channels", "latent_channels", "scaling_factor"}},
      {"text_encoder", {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"}},
      {"scheduler", {"_class_name", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
                     "original_inference_steps", "prediction_type", "timestep_spacing"}},
      {"tokenizer", {"model_max_length", "pad_token", "bos_token", "eos_token"}},
  };
  return f;
}

struct WeightsSummary {
  std::string path;
  uint64_t bytes = 0;
  size_t tensors = 0;
  int64_t parameters = 0;
  std::map<std::string, int64_t> dtypes;  // dtype -> element count
};

WeightsSummary summarize(const std::string& path) {
  WeightsSummary s;
  s.path = path;
  auto f = sd::SafeTensorsFile::open(path);
  s.bytes = f.file_size();
  s.tensors = f.tensors().size();
  for (const auto& t : f.tensors()) {
    s.parameters += static_cast<int64_t>(t.numel());
    s.dtypes[sd::safetensors::dtype_name(t.dtype)] += static_cast<int64_t>(t.numel());
  }
  return s;
}

nlohmann::json component_json(const std::string& name, const std::string& dir, const std::string& class_name) {
  nlohmann::json out;
  out["name"] = name;
  out["class"] = class_name;
  out["dir"] = dir;
  nlohmann::json cfg;
  for (const char* file : {"config.json", "scheduler_config.json", "tokenizer_config.json"}) {
    const std::string p = dir + "/" + file;
    if (sd::is_file(p)) {
      cfg = sd::read_json_file(p);
      break;
    }
  }
  if (name == "tokenizer" && sd::is_file(dir + "/special_tokens_map.json")) {
    auto sp = sd::read_json_file(dir + "/special_tokens_map.json");
    for (auto it = sp.begin(); it != sp.end(); ++it) {
      const auto& v = it.value();
      cfg[it.key()] = v.is_object() && v.contains("content") ? v["content"] : v;
    }
  }
  nlohmann::json brief = nlohmann::json::object();
  auto fields = brief_fields().find(name);
  if (fields != brief_fields().end() && cfg.is_object())
    for (const auto& k : fields->second)
      if (cfg.contains(k)) brief[k] = cfg[k];
  out["config"] = brief;
  // A VAE folder with only its config (models/emoji-tiny: the TAESD beside it does all encoding and decoding; the
  // pipeline reads just the scale factor from vae/config.json) is described without weights.
  bool config_only = false;
  if (name == "vae" && sd::is_directory(dir)) {
    config_only = true;
    for (const auto& e : std::filesystem::directory_iterator(dir))
      if (e.path().extension() != ".json") config_only = false;
    if (config_only) out["note"] = "config only (no weights; use the TAESD)";
  }
  if (name != "scheduler" && name != "tokenizer" && !config_only) {
    auto w = summarize(sd::find_weights(dir));
    out["weights"] = {{"file", w.path}, {"bytes", w.bytes}, {"tensors", w.tensors}, {"parameters", w.parameters},
                      {"dtypes", w.dtypes}};
  }
  return out;
}

sd::cli::Runner setup_info(CLI::App& app) {
  auto model = std::make_shared<std::string>(sd::cli::default_model_dir());
  auto as_json = std::make_shared<bool>(false);
  app.add_option("--model", *model, "diffusers Stable Diffusion pipeline folder (default: the built-in emoji model)");
  app.add_flag("--json", *as_json, "print the summary as JSON");
  return [model, as_json] {
    auto folder = sd::ModelFolder::open(*model);
    nlohmann::json report;
    report["model"] = *model;
    report["pipeline"] = folder.pipeline_class();
    report["components"] = nlohmann::json::array();
    for (const auto& [name, entry] : folder.components())
      report["components"].push_back(component_json(name, folder.component_dir(name), entry.class_name));
    if (auto t = folder.taesd_dir()) report["components"].push_back(component_json("taesd", *t, "AutoencoderTiny"));
    // What a stream on this model uses when no flag says otherwise, and why.
    const sd::ModelDefaults d = sd::read_model_defaults(*model);
    sd::cli::PipelineOptions none;
    none.model = *model;
    nlohmann::json defaults;
    defaults["family"] = d.family;
    if (d.native_width > 0)
      defaults["native_size"] = {{"width", d.native_width}, {"height", d.native_height},
                                 {"reason", d.native_size_reason}};
    defaults["settings_source"] = d.settings_source;
    defaults["txt2img"] = sd::cli::explain_settings(none, true, d);
    defaults["img2img"] = sd::cli::explain_settings(none, false, d);
    defaults["warnings"] = d.warnings;
    if (!d.note.empty()) defaults["note"] = d.note;
    report["defaults"] = defaults;
    if (*as_json) {
      std::cout << report.dump(2) << "\n";
      return 0;
    }
    std::cout << *model << ": " << report["pipeline"].get<std::string>() << "\n";
    int64_t total = 0;
    for (const auto& c : report["components"]) {
      std::cout << "  " << std::left << std::setw(13) << c["name"].get<std::string>() << c["class"].get<std::string>();
      if (c.contains("note")) std::cout << "  " << c["note"].get<std::string>();
      if (c.contains("weights")) {
        const auto& w = c["weights"];
        total += w["parameters"].get<int64_t>();
        std::cout << "  " << w["parameters"].get<int64_t>() << " params, " << human_bytes(w["bytes"].get<uint64_t>())
                  << ", " << w["tensors"].get<size_t>() << " tensors, dtype";
        for (auto it = w["dtypes"].begin(); it != w["dtypes"].end(); ++it) std::cout << " " << it.key();
      }
      std::cout << "\n";
      for (auto it = c["config"].begin(); it != c["config"].end(); ++it)
        std::cout << "      " << it.key() << " = " << it.value().dump() << "\n";
    }
    std::cout << "  total parameters: " << total << "\n";
    std::cout << "defaults (explicit flags override them):\n  family " << d.family << "; native size ";
    if (d.native_width > 0)
      std::cout << d.native_width << "x" << d.native_height << " (" << d.native_size_reason << ")\n";
    else
      std::cout << "unknown (UNet sample_size missing): --size is needed\n";
    std::cout << "  settings from " << d.settings_source << "\n";
    if (!d.note.empty()) std::cout << "  note: " << d.note << "\n";
    for (const char* mode : {"txt2img", "img2img"}) {
      std::cout << "  " << mode << ":";
      for (const auto& line : defaults[mode]) std::cout << "\n    " << line.get<std::string>();
      std::cout << "\n";
    }
    for (const auto& w : d.warnings) std::cout << "  warning: " << w << "\n";
    return 0;
  };
}

REGISTER_COMMAND("info",
                 "describe a model folder: components, configs, parameter counts, dtypes, native size and the "
                 "default stream settings",
                 5,
                 setup_info);

}  // namespace
