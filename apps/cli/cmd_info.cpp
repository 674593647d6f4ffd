// `streamdiffusion info --model DIR`: what a model folder holds, without loading the weights (headers only).
// `streamdiffusion info --model DIR --lora FILE`: which keys of the LoRA patch which modules of that model (the
// model is loaded and the LoRA matched as --lora would; nothing is written).
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
#include "core/log.h"
#include "pipeline/diffusion_models.h"

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
                "up_block_types"}},
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

nlohmann::json lora_json(const sd::LoraReport& r) {
  return {{"name", r.name},
          {"file", r.path},
          {"layout", r.layout},
          {"scale", r.scale},
          {"keys", r.keys},
          {"matched_keys", r.matched_keys},
          {"ranks", r.ranks},
          {"modules", r.modules},
          {"unmatched_keys", r.unmatched}};
}

// info --lora: loads the model with the LoRAs (not strict: unmatched keys are listed, not refused) and prints what
// each matched. Wrong shapes (a LoRA for another family) are the same error --lora gives.
int lora_info(const std::string& model, const std::vector<std::string>& loras, const std::string& lcm_lora,
              bool as_json) {
  sd::LoadOptions lo;
  lo.threads = -1;
  lo.taesd = "none";
  lo.loras = sd::cli::lora_specs(loras, lcm_lora);
  lo.lora_live = false;
  sd::log::set_level("warn");  // the load's own info lines would repeat what is printed below
  auto models = sd::load_pipeline(model, lo);
  nlohmann::json out;
  out["model"] = model;
  out["loras"] = nlohmann::json::array();
  for (const auto& r : models->loras()) out["loras"].push_back(lora_json(r));
  if (as_json) {
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  for (const auto& r : models->loras()) {
    std::cout << r.name << " (" << r.path << ") on " << model << "\n"
              << "  layout " << r.layout << ", " << r.keys << " keys: " << r.matched_keys << " matched, "
              << r.unmatched.size() << " unmatched; scale " << r.scale << ", rank";
    for (size_t i = 0; i < r.ranks.size(); ++i) std::cout << (i ? "/" : " ") << r.ranks[i];
    std::cout << "\n";
    for (const char* comp : {"unet", "text_encoder"}) {
      std::cout << "  " << comp << ": " << r.module_count(comp) << " modules patched\n";
      if (r.modules.count(comp))
        for (const auto& m : r.modules.at(comp)) std::cout << "      " << m << "\n";
    }
    if (!r.unmatched.empty()) {
      std::cout << "  unmatched keys (patch nothing; --strict-lora refuses the file):\n";
      for (const auto& k : r.unmatched) std::cout << "      " << k << "\n";
    }
  }
  return 0;
}

sd::cli::Runner setup_info(CLI::App& app) {
  auto model = std::make_shared<std::string>();
  auto as_json = std::make_shared<bool>(false);
  auto loras = std::make_shared<std::vector<std::string>>();
  auto lcm_lora = std::make_shared<std::string>();
  app.add_option("--model", *model, "diffusers Stable Diffusion pipeline folder")->required();
  app.add_flag("--json", *as_json, "print the summary as JSON");
  app.add_option("--lora", *loras,
                 "a LoRA file (FILE[:SCALE], repeatable): print which of its keys patch which modules of --model "
                 "and which match nothing (loads the model)");
  app.add_option("--lcm-lora", *lcm_lora, "an LCM-LoRA file, as --lora");
  return [model, as_json, loras, lcm_lora] {
    if (!loras->empty() || !lcm_lora->empty()) return lora_info(*model, *loras, *lcm_lora, *as_json);
    auto folder = sd::ModelFolder::open(*model);
    nlohmann::json report;
    report["model"] = *model;
    report["pipeline"] = folder.pipeline_class();
    report["components"] = nlohmann::json::array();
    for (const auto& [name, entry] : folder.components())
      report["components"].push_back(component_json(name, folder.component_dir(name), entry.class_name));
    if (auto t = folder.taesd_dir()) report["components"].push_back(component_json("taesd", *t, "AutoencoderTiny"));
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
    return 0;
  };
}

REGISTER_COMMAND("info",
                 "describe a diffusers model folder: components, configs, parameter counts, dtypes, sizes; with "
                 "--lora: the LoRA's matched / unmatched keys",
                 10,
                 setup_info);

}  // namespace
