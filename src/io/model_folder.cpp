#include "io/model_folder.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "core/log.h"
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

// The index a shard belongs to, as save_pretrained names it now: "<stem>.safetensors.index[.<variant>].json".
std::string index_name_of(const WeightFileName& w) {
  return w.stem + ".safetensors.index" + (w.variant.empty() ? "" : "." + w.variant) + ".json";
}

std::string list_names(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size() && i < 3; ++i) s += (i ? ", " : "") + names[i];
  return s + (names.size() > 3 ? ", ..." : "");
}

}  // namespace

std::string find_weights(const std::string& component_dir, const std::string& variant) {
  if (!is_directory(component_dir)) throw FormatError(component_dir, "not a directory");
  // Each weight-like file by what its name says (io/shard_index.h), sorted by name.
  std::vector<std::pair<std::string, WeightFileName>> files;
  std::vector<std::string> pickles;
  for (const auto& e : fs::directory_iterator(component_dir)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    const WeightFileName w = parse_weight_file_name(name);
    if (w.kind == WeightFileName::kPickle)
      pickles.push_back(name);
    else if (w.kind != WeightFileName::kNone)
      files.emplace_back(name, w);
  }
  std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::sort(pickles.begin(), pickles.end());
  const auto path_of = [&](const std::string& name) { return (fs::path(component_dir) / name).string(); };
  const auto named = [&](WeightFileName::Kind kind, const std::string& v) {
    std::vector<std::string> out;
    for (const auto& [name, w] : files)
      if (w.kind == kind && w.variant == v) out.push_back(name);
    return out;
  };
  // The weights of variant `v` ("" = plain): its single file or its shard index, "" when it has neither. With both,
  // the library's order: diffusers' ModelMixin takes the index, transformers' PreTrainedModel (model.safetensors,
  // the text and image encoders) the single file.
  const auto weights_of = [&](const std::string& v) -> std::string {
    const auto singles = named(WeightFileName::kSingle, v), indexes = named(WeightFileName::kIndex, v);
    const std::string what = v.empty() ? "" : " of the '" + v + "' variant";
    if (singles.size() > 1)
      throw FormatError(component_dir, "several .safetensors weight files" + what + "; expected one (" +
                                           list_names(singles) + ")");
    if (indexes.size() > 1)
      throw FormatError(component_dir, "several sharded checkpoints" + what + " (" + list_names(indexes) +
                                           "); expected one");
    if (singles.empty() && indexes.empty()) return "";
    if (indexes.empty()) return path_of(singles[0]);
    const WeightFileName index = parse_weight_file_name(indexes[0]);
    if (index.legacy)
      log::warn("{}: {} is diffusers' deprecated name for a variant's shard index (now {}); loading it", component_dir,
                indexes[0], index_name_of(index));
    if (singles.empty()) return path_of(indexes[0]);
    const bool single_wins = index.stem == "model";
    log::info("{}: both {} and the sharded checkpoint {}; loading {} (as {} does)", component_dir, singles[0],
              indexes[0], single_wins ? "the single file" : "the shards", single_wins ? "transformers" : "diffusers");
    return path_of(single_wins ? singles[0] : indexes[0]);
  };
  // Shards of variant `v` whose index is absent must not silently give way to other weights.
  const auto refuse_orphan_shards = [&](const std::string& v) {
    const auto shards = named(WeightFileName::kShard, v);
    if (shards.empty()) return;
    const std::string index = index_name_of(parse_weight_file_name(shards[0]));
    throw FormatError(component_dir, "shards of a sharded checkpoint (" + list_names(shards) + ") but not their "
                                         "index " + index + ": download it too (it names the shard of every tensor)");
  };
  // Variants with weights (a single file or an index), sorted.
  std::vector<std::string> variants;
  for (const auto& [name, w] : files)
    if (!w.variant.empty() && w.kind != WeightFileName::kShard &&
        std::find(variants.begin(), variants.end(), w.variant) == variants.end())
      variants.push_back(w.variant);
  std::sort(variants.begin(), variants.end());
  const auto variant_files = [&] {
    std::string found;
    for (const auto& [name, w] : files)  // an index stands for its shards
      if (!w.variant.empty() && w.kind != WeightFileName::kShard) found += (found.empty() ? "" : ", ") + name;
    return found;
  };
  std::string stem = files.empty() ? "diffusion_pytorch_model" : files[0].second.stem;
  for (const auto& [name, w] : files)
    if (w.variant.empty()) stem = w.stem;

  if (!variant.empty()) {
    if (std::string w = weights_of(variant); !w.empty()) return w;
    refuse_orphan_shards(variant);
    // diffusers (pipeline_loading_utils._identify_model_variants) passes the variant only to the components that have
    // it; the others load their plain weights.
    const std::string wanted = stem + "." + variant + ".safetensors";
    if (std::string w = weights_of(""); !w.empty()) {
      log::info("{}: no '{}' variant weight file ({}); loading the plain {}", component_dir, variant, wanted,
                fs::path(w).filename().string());
      return w;
    }
    refuse_orphan_shards("");
    if (!variants.empty())
      throw FormatError(component_dir, "variant '" + variant + "' asked but there is no " + wanted +
                                           " and no plain weight file to fall back on; found: " + variant_files());
  }
  if (std::string w = weights_of(""); !w.empty()) return w;
  refuse_orphan_shards("");
  // Only a variant's files downloaded (the fp16 files of a hub model, say): with one, it is the weights.
  if (variants.size() == 1) {
    const std::string w = weights_of(variants[0]);
    log::info("{}: no plain .safetensors weight file; loading the '{}' variant {}", component_dir, variants[0],
              fs::path(w).filename().string());
    return w;
  }
  if (variants.size() > 1)
    throw FormatError(component_dir, "no plain .safetensors weight file and " + std::to_string(variants.size()) +
                                         " variants (" + variant_files() + "): which one to load cannot be told; keep "
                                         "only that one in the folder (move the others out) or add the full weights "
                                         "as " + stem + ".safetensors");
  for (const auto& [name, w] : files)
    if (w.kind == WeightFileName::kShard) refuse_orphan_shards(w.variant);
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
    if (parse_weight_file_name(name).kind != WeightFileName::kNone) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool has_variant_weights(const std::string& component_dir, const std::string& variant) {
  // Only the names find_weights loads count: a single "<stem>.<variant>.safetensors", a shard index or a shard of the
  // variant. Not the extension of a plain file ("model.safetensors" is no variant 'safetensors') and not a pickle's
  // variant ("pytorch_model.fp16.bin" is never loaded, so it must not make --variant fp16 pass check_variant).
  for (const std::string& name : weight_files(component_dir)) {
    const WeightFileName w = parse_weight_file_name(name);
    if (w.kind != WeightFileName::kPickle && !w.variant.empty() && w.variant == variant) return true;
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
