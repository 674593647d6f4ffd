#pragma once
// A diffusers pipeline folder: model_index.json + one sub-folder per component (config.json + weights).
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace sd {

struct ComponentEntry {
  std::string name;        // "unet"
  std::string library;     // "diffusers" / "transformers" ("" when null)
  std::string class_name;  // "UNet2DConditionModel" ("" when null)
};

class ModelFolder {
 public:
  // Reads <dir>/model_index.json; FormatError if the folder is not a diffusers Stable Diffusion pipeline
  // (missing index, or missing one of unet / vae / text_encoder / tokenizer / scheduler).
  static ModelFolder open(const std::string& dir);
  // The same from the parsed model_index.json `index` (at `index_path`) of `dir`, without touching the disk.
  static ModelFolder from_index(const nlohmann::json& index, const std::string& dir, const std::string& index_path);

  const std::string& dir() const { return dir_; }
  const std::string& pipeline_class() const { return class_name_; }
  const std::map<std::string, ComponentEntry>& components() const { return components_; }
  bool has_component(const std::string& name) const;
  std::string component_dir(const std::string& name) const;  // <dir>/<name>; FormatError if absent on disk
  std::string config_path(const std::string& name) const;     // <dir>/<name>/config.json (scheduler_config.json)
  // Weights of a component; see find_weights.
  std::string weights_path(const std::string& name, const std::string& variant = "") const;
  // An SDXL pipeline: StableDiffusionXLPipeline (or a pipeline class with "XL" in its name) or a text_encoder_2.
  bool is_sdxl() const;
  // The optional tiny autoencoder shipped beside the pipeline, if present: <dir>/taesd, for SDXL <dir>/taesdxl (the
  // two have the same architecture but different latent spaces, so an SD folder never picks up a TAESDXL and v.v.).
  std::optional<std::string> taesd_dir() const;
  // InvalidArgument naming the folder, `variant` and the weight files found when no component folder holds weights
  // of `variant` (has_variant_weights), as diffusers' DiffusionPipeline.from_pretrained refuses it ("no such modeling
  // files are available"): loading every plain file instead would silently ignore the request.
  void check_variant(const std::string& variant) const;

 private:
  std::string dir_;
  std::string class_name_;
  std::map<std::string, ComponentEntry> components_;
};

// The safetensors weight file inside a component folder: the single "<stem>.safetensors", preferring
// "<stem>.<variant>.safetensors" when `variant` (e.g. "fp16") is given and present. A folder with no plain file and
// exactly one variant file (only the fp16 files downloaded) gives that file, logged at info; several variants and no
// plain file -> FormatError naming them. A sharded checkpoint gives its index ("<stem>.safetensors.index.json", a
// variant's "<stem>.safetensors.index.<variant>.json" or diffusers' older names, io/shard_index.h;
// SafeTensorsFile::open opens its shards); beside a single file the index wins for diffusers' "diffusion_pytorch_model" and loses for
// transformers' "model", as each library orders them; shards without their index -> FormatError naming the index. Only
// pickles (.bin/.ckpt/.pt/.pth) -> FormatError telling the user to convert them to safetensors (never loaded).
std::string find_weights(const std::string& component_dir, const std::string& variant = "");
// A variant asked for (diffusers' from_pretrained(variant=)): the components holding it load its file, the others
// their plain weights (logged at info); a component with neither, or with the variant's shards but not their index, is
// a FormatError naming the folder, the variant and the files found.

// The weight-like files of a folder (.safetensors, pickles, shard indexes), sorted by name: for messages.
std::vector<std::string> weight_files(const std::string& component_dir);
// Whether a component folder holds weights of `variant` that find_weights would take ("<stem>.<variant>.safetensors",
// its shards or shard index; not pickles): what diffusers' _identify_model_variants looks for before passing the
// variant to a component.
bool has_variant_weights(const std::string& component_dir, const std::string& variant);
// InvalidArgument unless `variant` is a plain name (letters, digits, '_', '-'): it becomes part of a file name.
void check_variant_name(const std::string& variant);

bool is_directory(const std::string& path);
bool is_file(const std::string& path);
uint64_t file_size_bytes(const std::string& path);

}  // namespace sd
