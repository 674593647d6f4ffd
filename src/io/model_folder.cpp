#include "io/model_folder.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "core/log.h"
#include "core/text.h"
#include "io/json_config.h"
#include "io/pickle_guard.h"
#include "io/shard_index.h"

namespace fs = std::filesystem;

namespace sd {

bool is_directory(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec);
}

bool is_file(const std::string& path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec);
}

uint64_t file_size_bytes(const std::string& path) {
  std::error_code ec;
  auto n = fs::file_size(path, ec);
  return ec ? 0 : n;
}

ModelFolder ModelFolder::open(const std::string& dir) {
  if (!is_directory(dir)) throw FormatError(dir, "not a directory (expected a diffusers model folder)");
  const std::string index = (fs::path(dir) / "model_index.json").string();
  if (!is_file(index))
    throw FormatError(dir, "no model_index.json: not a diffusers pipeline folder (expected model_index.json and "
                           "unet/, vae/, text_encoder/, tokenizer/, scheduler/)");
  return from_index(read_json_file(index), dir, index);
}

ModelFolder ModelFolder::from_index(const nlohmann::json& j, const std::string& dir, const std::string& index) {
  if (!j.is_object()) throw FormatError(index, "expected a JSON object");
  ModelFolder f;
  f.dir_ = dir;
  if (j.contains("_class_name") && j["_class_name"].is_string()) f.class_name_ = j["_class_name"].get<std::string>();
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key().empty() || it.key()[0] == '_') continue;
    const auto& v = it.value();
    if (!v.is_array()) continue;  // requires_safety_checker and other flags
    if (v.size() != 2) throw FormatError(index, "component '" + it.key() + "': expected [library, class]");
    ComponentEntry e;
    e.name = it.key();
    if (v[0].is_string()) e.library = v[0].get<std::string>();
    if (v[1].is_string()) e.class_name = v[1].get<std::string>();
    if (e.class_name.empty()) continue;  // [null, null]: component not present (safety_checker, ...)
    f.components_[e.name] = e;
  }
  for (const char* required : {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}) {
    if (!f.components_.count(required))
      throw FormatError(index, std::string("component '") + required +
                                   "' missing: not a Stable Diffusion pipeline (class '" + f.class_name_ + "')");
  }
  return f;
}

bool ModelFolder::has_component(const std::string& name) const { return components_.count(name) != 0; }

std::string ModelFolder::component_dir(const std::string& name) const {
  const std::string d = (fs::path(dir_) / name).string();
  if (!is_directory(d)) throw FormatError(dir_, "component folder '" + name + "/' is missing");
  return d;
}

std::string ModelFolder::config_path(const std::string& name) const {
  const std::string d = component_dir(name);
  for (const char* file : {"config.json", "scheduler_config.json", "tokenizer_config.json"}) {
    const std::string p = (fs::path(d) / file).string();
    if (is_file(p)) return p;
  }
  throw FormatError(d, "no config.json");
}

std::string ModelFolder::weights_path(const std::string& name, const std::string& variant) const {
  return find_weights(component_dir(name), variant);
}

void ModelFolder::check_variant(const std::string& variant) const {
  std::string found;
  for (const auto& [name, entry] : components_) {
    const std::string d = (fs::path(dir_) / name).string();
    if (!is_directory(d)) continue;
    if (has_variant_weights(d, variant)) return;
    std::string list;
    for (const auto& f : weight_files(d)) list += (list.empty() ? "" : ", ") + f;
    if (!list.empty()) found += (found.empty() ? "" : "; ") + name + "/: " + list;
  }
  // Worded without the option's name: the CLI's --variant and Python's load_pipeline(variant=) both come here.
  throw InvalidArgument("variant '" + variant + "': no component folder of " + dir_ + " has '" + variant +
                        "' weights (<stem>." + variant + ".safetensors); found " +
                        (found.empty() ? std::string("no weight files") : found) +
                        ". Load it without a variant, or name the variant its files have");
}

bool ModelFolder::is_sdxl() const {
  return has_component("text_encoder_2") || class_name_.find("XL") != std::string::npos;
}

std::optional<std::string> ModelFolder::taesd_dir() const {
  const std::string d = (fs::path(dir_) / (is_sdxl() ? "taesdxl" : "taesd")).string();
  if (is_directory(d)) return d;
  return std::nullopt;
}

namespace {
// "<base>-00001-of-00003": a shard of a sharded checkpoint (diffusers / transformers save_pretrained).
bool is_shard_stem(const std::string& stem) {
  const size_t of = stem.rfind("-of-");
  const size_t dash = of == std::string::npos || of == 0 ? std::string::npos : stem.rfind('-', of - 1);
  return dash != std::string::npos && is_decimal(stem.substr(dash + 1, of - dash - 1)) &&
         is_decimal(stem.substr(of + 4));
}
}  // namespace

std::string find_weights(const std::string& component_dir, const std::string& variant) {
  if (!is_directory(component_dir)) throw FormatError(component_dir, "not a directory");
  // plain: "<base>.safetensors" or a shard index "<base>.safetensors.index.json"; variants (file name, variant name):
  // "<base>.<variant>.safetensors" or "<base>.safetensors.index.<variant>.json"; shards: what an index names.
  std::vector<std::string> plain, plain_index, pickles, shards;
  std::vector<std::pair<std::string, std::string>> variants;
  for (const auto& e : fs::directory_iterator(component_dir)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    auto ends = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    if (is_shard_index_name(name)) {
      const std::string tag = ".safetensors.index.";
      const std::string rest = name.substr(name.rfind(tag) + tag.size());  // "json" or "<variant>.json"
      if (rest == "json")
        plain_index.push_back(name);
      else
        variants.emplace_back(name, rest.substr(0, rest.size() - 5));
    } else if (ends(".safetensors")) {
      const std::string stem = name.substr(0, name.size() - 12);
      const size_t dot = stem.find('.');
      if (is_shard_stem(stem))
        shards.push_back(name);
      else if (dot == std::string::npos)
        plain.push_back(name);
      else if (stem.find('.', dot + 1) == std::string::npos)
        variants.emplace_back(name, stem.substr(dot + 1));
    } else if (ends(".bin") || ends(".ckpt") || ends(".pt") || ends(".pth") || ends(".pkl")) {
      pickles.push_back(name);
    }
  }
  std::sort(plain.begin(), plain.end());
  std::sort(plain_index.begin(), plain_index.end());
  std::sort(shards.begin(), shards.end());
  std::sort(variants.begin(), variants.end());
  const auto path_of = [&](const std::string& name) { return (fs::path(component_dir) / name).string(); };
  const auto list = [](const std::vector<std::string>& names) {
    std::string s;
    for (size_t i = 0; i < names.size() && i < 3; ++i) s += (i ? ", " : "") + names[i];
    return s + (names.size() > 3 ? ", ..." : "");
  };
  if (plain_index.size() > 1)
    throw FormatError(component_dir, "several sharded checkpoints (" + list(plain_index) + "); expected one");
  // The plain weights: a shard index wins over a single file beside it, as in diffusers' ModelMixin.from_pretrained.
  const auto plain_weights = [&]() -> std::string {
    if (plain_index.size() == 1) {
      if (!plain.empty())
        log::info("{}: both {} and the sharded checkpoint {}; loading the shards (as diffusers does)", component_dir,
                  plain[0], plain_index[0]);
      return path_of(plain_index[0]);
    }
    if (plain.size() == 1) return path_of(plain[0]);
    return "";
  };
  if (!variant.empty()) {
    std::vector<std::string> asked;
    for (const auto& [name, v] : variants)
      if (v == variant) asked.push_back(name);
    if (asked.size() > 1)
      throw FormatError(component_dir, "several weight files of the '" + variant + "' variant (" + list(asked) +
                                           "); expected one file or one shard index");
    if (asked.size() == 1) return path_of(asked[0]);
    // The asked variant's shards without their index must not silently give way to the plain weights.
    for (const auto& name : shards)
      if (name.find("." + variant + "-") != std::string::npos)
        throw FormatError(component_dir, "the '" + variant + "' variant's shards (" + name + ", ...) are here but "
                                             "not their index (<stem>.safetensors.index." + variant + ".json): "
                                             "download it too");
    std::string stem_src = !plain.empty()         ? plain[0]
                           : !plain_index.empty() ? plain_index[0]
                           : !variants.empty()    ? variants[0].first
                                                  : std::string("diffusion_pytorch_model.");
    const std::string wanted = stem_src.substr(0, stem_src.find('.')) + "." + variant + ".safetensors";
    // diffusers (pipeline_loading_utils._identify_model_variants) passes the variant only to the components that have
    // it; the others load their plain weights.
    if (const std::string w = plain_weights(); !w.empty()) {
      log::info("{}: no '{}' variant weight file ({}); loading the plain {}", component_dir, variant, wanted,
                fs::path(w).filename().string());
      return w;
    }
    if (plain.empty() && plain_index.empty() && !variants.empty()) {
      std::string found;
      for (const auto& [name, v] : variants) found += (found.empty() ? "" : ", ") + name;
      for (const auto& name : shards) found += (found.empty() ? "" : ", ") + name;
      throw FormatError(component_dir, "variant '" + variant + "' asked but there is no " + wanted +
                                           " and no plain weight file to fall back on; found: " + found);
    }
  }
  if (plain.size() > 1 && plain_index.empty())
    throw FormatError(component_dir, "several .safetensors weight files; expected one (" + list(plain) + ")");
  if (const std::string w = plain_weights(); !w.empty()) return w;
  // Only a variant's files downloaded (the fp16 files of a hub model, say): with one, it is the weights.
  if (variants.size() == 1) {
    log::info("{}: no plain .safetensors weight file; loading the '{}' variant {}", component_dir,
              variants[0].second, variants[0].first);
    return path_of(variants[0].first);
  }
  if (variants.size() > 1) {
    std::string names;
    for (const auto& [name, v] : variants) names += (names.empty() ? "" : ", ") + name;
    const std::string& first = variants[0].first;
    const std::string base = first.substr(0, first.find('.')) + ".safetensors";
    throw FormatError(component_dir, "no plain .safetensors weight file and " + std::to_string(variants.size()) +
                                         " variants (" + names + "): which one to load cannot be told; keep only "
                                         "that one in the folder (move the others out) or add the full weights as " +
                                         base);
  }
  if (!shards.empty()) {
    // "<base>[.<variant>]-00001-of-00002.safetensors" -> "<base>.safetensors.index[.<variant>].json"
    std::string stem = shards[0].substr(0, shards[0].size() - 12);
    stem = stem.substr(0, stem.rfind('-', stem.rfind("-of-") - 1));
    const size_t dot = stem.find('.');
    const std::string base = stem.substr(0, dot) + ".safetensors.index" +
                             (dot == std::string::npos ? "" : stem.substr(dot)) + ".json";
    throw FormatError(component_dir, "shards of a sharded checkpoint (" + list(shards) + ") but not their index " +
                                         base + ": download it too (it names the shard of every tensor)");
  }
  if (!pickles.empty())
    throw FormatError(component_dir, "only pickle weights (" + pickles[0] +
                                         ") found; pickles are never loaded - convert them to .safetensors first "
                                         "(e.g. with diffusers: save_pretrained(..., safe_serialization=True))");
  throw FormatError(component_dir, "no .safetensors weight file");
}

std::vector<std::string> weight_files(const std::string& component_dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(component_dir, ec)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    const std::string ext = e.path().extension().string();
    if (ext == ".safetensors" || ext == ".bin" || ext == ".ckpt" || ext == ".pt" || ext == ".pth" ||
        name.find(".safetensors.index.") != std::string::npos)
      out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool has_variant_weights(const std::string& component_dir, const std::string& variant) {
  // Only the names find_weights loads (or refuses as the variant sharded) count: "<stem>.<variant>.safetensors", a
  // shard "<stem>.<variant>-00001-of-00002.safetensors", an index "<stem>.safetensors.index.<variant>.json". Not the
  // extension of a plain file ("model.safetensors" is no variant 'safetensors') and not a pickle's variant
  // ("pytorch_model.fp16.bin" is never loaded, so it must not make --variant fp16 pass check_variant).
  const std::string index_tail = "." + variant + ".json";
  for (const std::string& name : weight_files(component_dir)) {
    const auto ends = [&](const std::string& s) {
      return name.size() > s.size() && name.compare(name.size() - s.size(), std::string::npos, s) == 0;
    };
    if (name.find(".safetensors.index.") != std::string::npos) {
      if (ends(index_tail)) return true;
    } else if (ends(".safetensors")) {
      const std::string stem = name.substr(0, name.size() - 12);
      const size_t dot = stem.find('.');
      if (dot == std::string::npos) continue;
      const std::string rest = stem.substr(dot + 1);
      if (rest == variant || (is_shard_stem(stem) && rest.rfind(variant + "-", 0) == 0)) return true;
    }
  }
  return false;
}

void check_variant_name(const std::string& variant) {
  const bool ok = !variant.empty() && std::all_of(variant.begin(), variant.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
  });
  if (!ok)
    throw InvalidArgument("variant '" + variant + "': expected the name of a weight-file variant such as fp16 "
                          "(letters, digits, '_' or '-'; it is the NAME of <stem>.NAME.safetensors)");
}

void refuse_pickle(const std::string& path) {
  const std::string ext = std::filesystem::path(path).extension().string();
  if (ext != ".ckpt" && ext != ".bin" && ext != ".pt" && ext != ".pth" && ext != ".pkl") return;
  const std::string out = std::filesystem::path(path).replace_extension(".safetensors").string();
  throw FormatError(path, "pickled checkpoints are refused: loading a pickle (" + ext +
                              ") runs whatever code it contains (arbitrary code execution). Convert it once, in a "
                              "Python you trust with this file, to .safetensors (tensors only): python -c \"import "
                              "torch, safetensors.torch as st; sd = torch.load('" + path +
                              "', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
                              "st.save_file({k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}, '" +
                              out + "')\"");
}

}  // namespace sd
