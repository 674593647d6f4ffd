// `streamdiffusion info --model DIR|FILE`: what a model folder or single-file checkpoint holds, without loading the
// weights (headers only), and the defaults a stream on it uses.
// `streamdiffusion info --model DIR --lora FILE`: which keys of the LoRA patch which modules of that model (the
// model is loaded and the LoRA matched as --lora would; nothing is written).
// `streamdiffusion info --compiled-unet FILE [--model DIR]`: what a compiled UNet package was made for (its
// metadata); with --model, whether it fits that model (loaded with it, as --compiled-unet loads it).
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <functional>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "apps/cli/commands.h"
#include "apps/cli/pipeline_options.h"
#include "core/device.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "io/ldm_checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/compiled_unet.h"
#include "models/unet_2d_condition.h"
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
                "up_block_types", "mid_block_type", "transformer_layers_per_block", "only_cross_attention",
                "time_cond_proj_dim", "addition_embed_type", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim"}},
      {"vae", {"block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor",
               "force_upcast"}},
      {"taesd", {"encoder_block_out_channels", "decoder_block_out_channels", "latent_channels", "scaling_factor"}},
      {"taesdxl", {"encoder_block_out_channels", "decoder_block_out_channels", "latent_channels", "scaling_factor"}},
      {"text_encoder", {"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"}},
      {"text_encoder_2", {"architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "intermediate_size", "hidden_act", "projection_dim"}},
      {"tokenizer_2", {"model_max_length", "pad_token", "bos_token", "eos_token"}},
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
  std::vector<std::string> shards;         // a sharded checkpoint's shard files (path is its index)
};

WeightsSummary summarize(const std::string& path) {
  WeightsSummary s;
  s.path = path;
  auto f = sd::SafeTensorsFile::open(path);
  s.bytes = f.file_size();
  s.tensors = f.tensors().size();
  if (f.files() != std::vector<std::string>{path})
    for (const auto& file : f.files()) s.shards.push_back(std::filesystem::path(file).filename().string());
  for (const auto& t : f.tensors()) {
    s.parameters += static_cast<int64_t>(t.numel());
    s.dtypes[sd::safetensors::dtype_name(t.dtype)] += static_cast<int64_t>(t.numel());
  }
  return s;
}

nlohmann::json component_json(const std::string& name, const std::string& dir, const std::string& class_name,
                              const std::string& variant) {
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
  const bool tokenizer = name == "tokenizer" || name == "tokenizer_2";
  if (tokenizer && sd::is_file(dir + "/special_tokens_map.json")) {
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
  if (name != "scheduler" && !tokenizer && !config_only) {
    auto w = summarize(sd::find_weights(dir, variant));
    out["weights"] = {{"file", w.path}, {"bytes", w.bytes}, {"tensors", w.tensors}, {"parameters", w.parameters},
                      {"dtypes", w.dtypes}};
    if (!w.shards.empty()) out["weights"]["shards"] = w.shards;
  }
  return out;
}

template <typename M>
std::vector<std::string> module_keys(const M& m) {
  std::vector<std::string> keys;
  for (const auto& kv : sd::state_dict(*m)) keys.push_back(kv.first);
  return keys;
}

// A single-file (LDM) checkpoint: family, dtypes, per-component parameter counts (of the tensors each component's
// conversion table reads), what was inferred / assumed, and the keys nothing reads.
nlohmann::json single_file_json(const std::string& path, const std::string& config_dir, const std::string& pred) {
  sd::refuse_pickle(path);
  const auto file = sd::SafeTensorsFile::open(path);
  const auto info = sd::convert::inspect_ldm_checkpoint(file, pred);
  auto config = [&](const std::string& sub, const char* name, const nlohmann::json& inferred, std::string& from) {
    const std::string p = config_dir + "/" + sub + "/" + name;
    if (!config_dir.empty() && sd::is_file(p)) {
      from = p;
      return sd::read_json_file(p);
    }
    from = "inferred from the weights + " + std::string(sd::convert::family_name(info.family)) + " defaults";
    return inferred;
  };
  nlohmann::json out;
  out["file"] = path;
  out["bytes"] = file.file_size();
  out["tensors"] = file.tensors().size();
  out["layout"] = "original (LDM / CompVis)";
  out["family"] = sd::convert::family_name(info.family);
  out["dtypes"] = info.dtypes;
  out["prediction_type"] = info.prediction_type;
  out["prediction_type_note"] = info.prediction_type_note;
  std::vector<sd::convert::LdmTable> tables;
  nlohmann::json comps = nlohmann::json::array();
  // A component's parameters are those of the tensors its conversion table reads; when its config cannot build
  // the model (e.g. real-SD defaults on a non-standard model: use --config), the tensors under its prefix.
  auto add = [&](const std::string& name, const std::string& cls, const nlohmann::json& cfg, const std::string& from,
                 const std::string& prefix, const std::function<sd::convert::LdmTable()>& make_table) {
    sd::convert::LdmTable table;
    std::string config_error;
    try {
      table = make_table();
    } catch (const std::exception& e) {
      config_error = e.what();
    }
    std::set<std::string> seen;
    int64_t params = 0;
    std::vector<std::string> missing;
    if (!config_error.empty())  // every tensor under the prefix counts as this component's
      for (const auto& t : file.tensors())
        if (t.name.rfind(prefix, 0) == 0) table.push_back({t.name, t.name});
    for (const auto& e : table) {
      if (!file.contains(e.ldm)) {
        missing.push_back(e.ldm);
        continue;
      }
      if (seen.insert(e.ldm).second) params += static_cast<int64_t>(file.info(e.ldm).numel());
    }
    nlohmann::json c = {{"name", name}, {"class", cls}, {"parameters", params}, {"tensors", seen.size()},
                        {"config_from", from}};
    nlohmann::json brief = nlohmann::json::object();
    if (auto f = brief_fields().find(name); f != brief_fields().end())
      for (const auto& k : f->second)
        if (cfg.contains(k)) brief[k] = cfg[k];
    c["config"] = brief;
    if (!missing.empty()) c["missing"] = missing;
    if (!config_error.empty()) c["config_error"] = config_error;
    comps.push_back(c);
    tables.push_back(std::move(table));
  };
  std::string from;
  const auto ucfg = config("unet", "config.json", info.unet_config, from);
  add("unet", "UNet2DConditionModel", ucfg, from, sd::convert::kUNetPrefix, [&] {
    return sd::convert::unet_ldm_table(
        module_keys(sd::UNet2DConditionModel(sd::UNet2DConditionConfig::from_json(ucfg, from))));
  });
  if (info.has_text_encoder) {
    const auto tcfg = config("text_encoder", "config.json", info.text_encoder_config, from);
    add("text_encoder",
        info.text_layout == sd::convert::TextEncoderLayout::HfClip ? "CLIPTextModel (HF CLIP names)"
                                                                   : "CLIPTextModel (from OpenCLIP, fused in_proj)",
        tcfg, from, info.text_prefix, [&] {
          return sd::convert::text_encoder_ldm_table(
              module_keys(sd::CLIPTextModel(sd::CLIPTextConfig::from_json(tcfg, from))), info.text_layout,
              info.text_prefix);
        });
  }
  if (info.has_text_encoder_2) {  // SDXL: OpenCLIP bigG, every layer and its text_projection used
    const auto tcfg = config("text_encoder_2", "config.json", info.text_encoder_2_config, from);
    add("text_encoder_2", "CLIPTextModelWithProjection (from OpenCLIP, fused in_proj, transposed text_projection)",
        tcfg, from, info.text_encoder_2_prefix, [&] {
          return sd::convert::text_encoder_ldm_table(
              module_keys(sd::CLIPTextModel(sd::CLIPTextConfig::from_json(tcfg, from))),
              sd::convert::TextEncoderLayout::OpenClip, info.text_encoder_2_prefix);
        });
  }
  if (info.has_vae) {
    const auto vcfg = config("vae", "config.json", info.vae_config, from);
    add("vae", "AutoencoderKL", vcfg, from, sd::convert::kVaePrefix, [&] {
      return sd::convert::vae_ldm_table(module_keys(sd::AutoencoderKL(sd::AutoencoderKLConfig::from_json(vcfg, from))));
    });
  }
  out["components"] = comps;
  std::vector<const sd::convert::LdmTable*> ptrs;
  for (const auto& t : tables) ptrs.push_back(&t);
  const auto unused = sd::convert::unused_ldm_keys(file, ptrs);
  out["unused_known"] = unused.known;
  out["unused_unknown"] = unused.unknown;
  if (!info.has_text_encoder) out["note_text_encoder"] = "no text encoder in this file";
  if (info.family == sd::convert::LdmFamily::SDXL && !info.has_text_encoder_2)
    out["note_text_encoder_2"] = std::string("no text_encoder_2 (") + sd::convert::kSdxlOpenClipPrefix +
                                 "*) in this SDXL file: it cannot be loaded";
  if (!info.sample_size_note.empty() && config_dir.empty()) out["note_sample_size"] = info.sample_size_note;
  if (!info.has_vae) out["note_vae"] = "no VAE (first_stage_model.*): give --vae or --taesd to run it";
  return out;
}

void print_defaults(const nlohmann::json& j);

int print_single_file(const nlohmann::json& r) {
  std::cout << r["file"].get<std::string>() << ": single-file checkpoint, " << r["layout"].get<std::string>() << ", "
            << r["family"].get<std::string>() << ", " << human_bytes(r["bytes"].get<uint64_t>()) << ", "
            << r["tensors"].get<size_t>() << " tensors, dtype";
  for (auto it = r["dtypes"].begin(); it != r["dtypes"].end(); ++it) std::cout << " " << it.key();
  std::cout << "\n  prediction_type " << r["prediction_type"].get<std::string>() << " ("
            << r["prediction_type_note"].get<std::string>() << ")\n";
  int64_t total = 0;
  for (const auto& c : r["components"]) {
    total += c["parameters"].get<int64_t>();
    std::cout << "  " << std::left << std::setw(15) << c["name"].get<std::string>() << c["class"].get<std::string>()
              << "  " << c["parameters"].get<int64_t>() << " params, " << c["tensors"].get<size_t>()
              << " tensors; config " << c["config_from"].get<std::string>() << "\n";
    if (c.contains("config_error"))
      std::cout << "      CONFIG ERROR (give --config DIR for a non-standard model): "
                << c["config_error"].get<std::string>() << "\n";
    if (c.contains("missing"))
      std::cout << "      MISSING " << c["missing"].size() << " tensors, first " << c["missing"][0].get<std::string>()
                << "\n";
    for (auto it = c["config"].begin(); it != c["config"].end(); ++it)
      std::cout << "      " << it.key() << " = " << it.value().dump() << "\n";
  }
  for (const char* k : {"note_text_encoder", "note_text_encoder_2", "note_vae", "note_sample_size"})
    if (r.contains(k)) std::cout << "  " << r[k].get<std::string>() << "\n";
  std::cout << "  total parameters: " << total << "\n";
  const auto& known = r["unused_known"];
  const auto& unknown = r["unused_unknown"];
  std::cout << "  unused keys: " << known.size() + unknown.size() << " (" << known.size()
            << " that SD does not use: DDPM buffers, position_ids, OpenCLIP projection / last layer / logit_scale, EMA)";
  if (!unknown.empty()) {
    std::cout << "; " << unknown.size() << " unknown:";
    for (size_t i = 0; i < std::min<size_t>(unknown.size(), 20); ++i) std::cout << "\n      " << unknown[i].get<std::string>();
    if (unknown.size() > 20) std::cout << "\n      ... and " << unknown.size() - 20 << " more";
  }
  std::cout << "\n";
  if (r.contains("defaults")) print_defaults(r["defaults"]);
  return 0;
}

// What a stream on this model uses when no flag says otherwise, and why (pipeline/model_defaults.h).
nlohmann::json defaults_json(const std::string& model, const std::string& config, const std::string& pred) {
  const sd::ModelDefaults d = sd::read_model_defaults(model, config, pred);
  sd::cli::PipelineOptions none;
  none.model = model;
  none.config = config;
  none.prediction_type = pred;
  nlohmann::json j;
  j["family"] = d.family;
  if (d.native_width > 0)
    j["native_size"] = {{"width", d.native_width}, {"height", d.native_height}, {"reason", d.native_size_reason}};
  j["settings_source"] = d.settings_source;
  j["txt2img"] = sd::cli::explain_settings(none, true, d);
  j["img2img"] = sd::cli::explain_settings(none, false, d);
  j["warnings"] = d.warnings;
  if (!d.note.empty()) j["note"] = d.note;
  // What --dtype auto runs on this machine's CPU, and why.
  const auto cpu_auto = sd::parse_dtype(sd::dtype_request(d, "auto", true), c10::Device(c10::kCPU));
  j["cpu_dtype_auto"] = {{"dtype", sd::dtype_name(cpu_auto)},
                         {"reason", d.cpu_dtype ? d.settings_source + " cpu_dtype"
                                                : "this CPU (" + sd::cpu_simd_level() + ")"}};
  if (d.cpu_threads) j["cpu_threads"] = *d.cpu_threads;
  return j;
}

void print_defaults(const nlohmann::json& j) {
  std::cout << "defaults (explicit flags override them):\n  family " << j["family"].get<std::string>()
            << "; native size ";
  if (j.contains("native_size"))
    std::cout << j["native_size"]["width"].get<int64_t>() << "x" << j["native_size"]["height"].get<int64_t>() << " ("
              << j["native_size"]["reason"].get<std::string>() << ")\n";
  else
    std::cout << "unknown (UNet sample_size missing): --size is needed\n";
  std::cout << "  settings from " << j["settings_source"].get<std::string>() << "\n";
  if (j.contains("note")) std::cout << "  note: " << j["note"].get<std::string>() << "\n";
  if (j.contains("cpu_dtype_auto"))
    std::cout << "  --dtype auto on the CPU: " << j["cpu_dtype_auto"]["dtype"].get<std::string>() << " ("
              << j["cpu_dtype_auto"]["reason"].get<std::string>() << ")\n";
  if (j.contains("cpu_threads"))
    std::cout << "  --threads 0 (the default) on the CPU: " << j["cpu_threads"].get<int64_t>()
              << " (streamdiffusion.json cpu_threads)\n";
  for (const char* mode : {"txt2img", "img2img"}) {
    std::cout << "  " << mode << ":";
    for (const auto& line : j[mode]) std::cout << "\n    " << line.get<std::string>();
    std::cout << "\n";
  }
  for (const auto& w : j["warnings"]) std::cout << "  warning: " << w.get<std::string>() << "\n";
}

nlohmann::json lora_json(const sd::LoraReport& r) {
  return {{"name", r.name},
          {"file", r.path},
          {"layout", r.layout},
          {"scale", r.scale},
          {"keys", r.keys},
          {"matched_keys", r.matched_keys},
          {"ranks", r.ranks},
          {"methods", r.methods},
          {"modules", r.modules},
          {"unmatched_keys", r.unmatched}};
}

// info --lora: loads the model with the LoRAs (not strict: unmatched keys are listed, not refused) and prints what
// each matched. Wrong shapes (a LoRA for another family) are the same error --lora gives.
struct ComponentArgs {  // single files / components from elsewhere, as the loading commands take them
  std::string config, pred, vae, taesd, tokenizer, variant;
};

int lora_info(const std::string& model, const ComponentArgs& c, const std::vector<std::string>& loras,
              const std::string& lcm_lora, bool as_json) {
  sd::LoadOptions lo;
  lo.threads = -1;
  lo.taesd = c.taesd;  // the model's own autoencoder unless told (a TAESD-only model has no VAE weights)
  lo.vae = c.vae;
  lo.tokenizer = c.tokenizer;
  lo.config = c.config;  // single files
  lo.prediction_type = c.pred;
  lo.variant = c.variant;
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
              << "  layout " << r.layout;
    for (size_t i = 0; i < r.methods.size(); ++i)  // LyCORIS / DoRA modules: "layout kohya (LoHa, DoRA)"
      std::cout << (i ? ", " : " (") << r.methods[i] << (i + 1 == r.methods.size() ? ")" : "");
    std::cout << ", " << r.keys << " keys: " << r.matched_keys << " matched, "
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

// info --compiled-unet: the package's metadata; with a model, the package loaded with it (every load check, the
// weights handed over, one call) on the package's device and dtype.
int compiled_unet_info(const std::string& path, const std::string* model, const std::string& variant, bool as_json) {
  const sd::CompiledUNetInfo i = sd::read_compiled_unet_info(path);
  nlohmann::json j = {{"file", path},
                      {"device", i.device},
                      {"dtype", sd::dtype_name(i.dtype)},
                      {"sample", sd::compiled_unet_dims(i, i.sample)},
                      {"rows", {i.rows_min, i.rows_max}},
                      {"sample_layout", i.sample_channels_last ? "channels_last" : "contiguous"},
                      {"context", sd::compiled_unet_dims(i, i.context)},
                      {"torch", i.torch_version},
                      {"mode", i.mode},
                      {"weights", i.weights.size()}};
  nlohmann::json cfg = nlohmann::json::parse(i.config_json, nullptr, /*allow_exceptions=*/false);
  nlohmann::json brief = nlohmann::json::object();
  if (cfg.is_object())
    for (const auto& k : brief_fields().at("unet"))
      if (cfg.contains(k) && !cfg[k].is_null()) brief[k] = cfg[k];
  j["unet"] = brief;
  if (model) {
    sd::LoadOptions lo;
    lo.device = i.device;
    lo.dtype = i.dtype;
    lo.threads = -1;
    lo.compiled_unet = path;
    lo.variant = variant;
    const auto m = sd::load_pipeline(*model, lo);  // a package that does not fit: the loader's error, naming it
    j["model"] = *model;
    j["fits"] = true;
    j["loaded"] = m->describe();
  }
  if (as_json) {
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::cout << path << ": compiled UNet (AOTInductor) for " << i.device << " " << sd::dtype_name(i.dtype)
            << ", PyTorch " << i.torch_version << (i.mode.empty() ? "" : ", mode " + i.mode) << "\n"
            << "  sample " << j["sample"].get<std::string>() << " ("
            << (i.rows_min == i.rows_max ? std::to_string(i.rows_min) + (i.rows_min == 1 ? " row" : " rows")
                                         : "rows " + std::to_string(i.rows_min) + " to " + std::to_string(i.rows_max))
            << " per call), " << j["sample_layout"].get<std::string>() << "; context "
            << j["context"].get<std::string>() << "; " << i.weights.size() << " weights, handed over at load\n";
  for (auto it = brief.begin(); it != brief.end(); ++it)
    std::cout << "      " << it.key() << " = " << it.value().dump() << "\n";
  if (model) std::cout << "  fits " << *model << ": loaded with it (" << j["loaded"].get<std::string>() << ")\n";
  return 0;
}

sd::cli::Runner setup_info(CLI::App& app) {
  auto model = std::make_shared<std::string>(sd::cli::default_model_dir());
  auto as_json = std::make_shared<bool>(false);
  auto comp = std::make_shared<ComponentArgs>();
  auto& config = comp->config;
  auto& pred = comp->pred;
  auto loras = std::make_shared<std::vector<std::string>>();
  auto lcm_lora = std::make_shared<std::string>();
  auto compiled = std::make_shared<std::string>();
  CLI::Option* model_opt = app.add_option("--model", *model,
                 "diffusers Stable Diffusion pipeline folder or single-file .safetensors checkpoint (default: the "
                 "built-in emoji model)");
  app.add_option("--config", config, "single files: a diffusers folder of config files to use instead of inference");
  app.add_option("--prediction-type", pred, "single files: epsilon | v_prediction (else assumed, and said so)")
      ->check(CLI::IsMember({"epsilon", "v_prediction"}));
  sd::cli::add_variant_option(app, comp->variant, *model);
  app.add_flag("--json", *as_json, "print the summary as JSON");
  app.add_option("--lora", *loras,
                 "a LoRA file (FILE[:SCALE], repeatable): print which of its keys patch which modules of --model "
                 "and which match nothing (loads the model)");
  app.add_option("--lcm-lora", *lcm_lora, "an LCM-LoRA file, as --lora");
  app.add_option("--vae", comp->vae, "with --lora: an AutoencoderKL from elsewhere (as the loading commands)");
  app.add_option("--taesd", comp->taesd, "with --lora: a TAESD folder or file, or 'none' (as the loading commands)");
  app.add_option("--tokenizer", comp->tokenizer, "with --lora: a CLIP tokenizer folder (as the loading commands)");
  app.add_option("--compiled-unet", *compiled,
                 "a compiled UNet package (scripts/compile-unet.py): what it was made for (device, dtype, sample "
                 "shape and rows, PyTorch, UNet config); with --model, whether it fits that model (loads it; "
                 "libtorch >= 2.11 builds)");
  return [model, as_json, comp, loras, lcm_lora, compiled, model_opt] {
    if (!compiled->empty())
      return compiled_unet_info(*compiled, model_opt->count() > 0 ? model.get() : nullptr, comp->variant,
                                *as_json);
    const std::string* config = &comp->config;
    const std::string* pred = &comp->pred;
    if (!config->empty() && sd::is_directory(*model))
      throw sd::InvalidArgument("--config " + *config + " is for single-file checkpoints; " + *model +
                                " is a diffusers folder with its own configs");
    if (!loras->empty() || !lcm_lora->empty()) return lora_info(*model, *comp, *loras, *lcm_lora, *as_json);
    if (!sd::is_directory(*model)) {
      auto r = single_file_json(*model, *config, *pred);
      r["defaults"] = defaults_json(*model, *config, *pred);
      if (*as_json) {
        std::cout << r.dump(2) << "\n";
        return 0;
      }
      return print_single_file(r);
    }
    auto folder = sd::ModelFolder::open(*model);
    const std::string& variant = comp->variant;
    if (!variant.empty()) {
      sd::check_variant_name(variant);
      folder.check_variant(variant);
    }
    nlohmann::json report;
    report["model"] = *model;
    report["pipeline"] = folder.pipeline_class();
    report["components"] = nlohmann::json::array();
    for (const auto& [name, entry] : folder.components())
      report["components"].push_back(component_json(name, folder.component_dir(name), entry.class_name, variant));
    if (auto t = folder.taesd_dir())
      report["components"].push_back(
          component_json(folder.is_sdxl() ? "taesdxl" : "taesd", *t, "AutoencoderTiny", variant));
    if (!variant.empty()) report["variant"] = variant;
    report["defaults"] = defaults_json(*model, *config, *pred);
    if (*as_json) {
      std::cout << report.dump(2) << "\n";
      return 0;
    }
    std::cout << *model << ": " << report["pipeline"].get<std::string>() << "\n";
    int64_t total = 0;
    for (const auto& c : report["components"]) {
      std::cout << "  " << std::left << std::setw(15) << c["name"].get<std::string>() << c["class"].get<std::string>();
      if (c.contains("note")) std::cout << "  " << c["note"].get<std::string>();
      if (c.contains("weights")) {
        const auto& w = c["weights"];
        total += w["parameters"].get<int64_t>();
        std::cout << "  " << w["parameters"].get<int64_t>() << " params, " << human_bytes(w["bytes"].get<uint64_t>())
                  << ", " << w["tensors"].get<size_t>() << " tensors, dtype";
        for (auto it = w["dtypes"].begin(); it != w["dtypes"].end(); ++it) std::cout << " " << it.key();
        if (w.contains("shards"))
          std::cout << ", " << w["shards"].size() << (w["shards"].size() == 1 ? " shard" : " shards");
        // Which file each component reads is the point of asking for a variant (some may have only plain weights).
        if (!variant.empty())
          std::cout << ", " << std::filesystem::path(w["file"].get<std::string>()).filename().string();
      }
      std::cout << "\n";
      for (auto it = c["config"].begin(); it != c["config"].end(); ++it)
        std::cout << "      " << it.key() << " = " << it.value().dump() << "\n";
    }
    std::cout << "  total parameters: " << total << "\n";
    print_defaults(report["defaults"]);
    return 0;
  };
}

REGISTER_COMMAND("info",
                 "describe a model folder or single file: components, configs, parameter counts, dtypes, native size "
                 "and the default stream settings; with --lora: the LoRA's matched / unmatched keys; with "
                 "--compiled-unet: what a compiled UNet package was made for",
                 5, setup_info);

}  // namespace
