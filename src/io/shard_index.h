#pragma once
// The index of a sharded safetensors checkpoint, as diffusers' and transformers' save_pretrained write it when a
// component is larger than max_shard_size (an SDXL UNet in float32, say):
//   <stem>.safetensors.index.json (a variant's: <stem>.safetensors.index.<variant>.json) =
//   {"metadata": {"total_size": N}, "weight_map": {"<tensor>": "<stem>-00001-of-00002.safetensors", ...}}
// beside the shards it names. Parsed without libtorch (the fuzz target calls it on its own).
#include <map>
#include <string>
#include <vector>

namespace sd {

struct ShardIndex {
  std::map<std::string, std::string> weight_map;  // tensor name -> shard file name (in the index's folder)
  std::vector<std::string> shards;                // the distinct shard file names, sorted
  std::map<std::string, std::string> metadata;    // "metadata": strings as they are, other values as their JSON
};

// What a weight file's name says it is, as diffusers' and transformers' save_pretrained name them:
//   single  <stem>.safetensors, a variant's <stem>.<variant>.safetensors
//   index   <stem>.safetensors.index.json, <stem>.safetensors.index.<variant>.json (diffusers' older variant
//           placement, still loaded with a deprecation warning: <stem>.safetensors.<variant>.index.json)
//   shard   <stem>-00001-of-00002.safetensors, <stem>.<variant>-00001-of-00002.safetensors (older:
//           <stem>-00001-of-00002.<variant>.safetensors)
//   pickle  .bin / .ckpt / .pt / .pth / .pkl (never loaded)
struct WeightFileName {
  enum Kind { kNone, kSingle, kIndex, kShard, kPickle } kind = kNone;
  std::string stem;     // "diffusion_pytorch_model"
  std::string variant;  // "fp16"; "" for the plain weights (and for pickles)
  bool legacy = false;  // diffusers' older variant placement
};
WeightFileName parse_weight_file_name(const std::string& file_name);

// A file name of a shard index (either form above).
inline bool is_shard_index_name(const std::string& file_name) {
  return parse_weight_file_name(file_name).kind == WeightFileName::kIndex;
}

// Parses and checks the index text; FormatError naming `index_path`, the key and what was expected when it is not
// JSON, has no non-empty "weight_map" object, maps a tensor to something other than a plain file name ending in
// .safetensors in the same folder (no path separators: an index must not reach outside its folder), or has a
// "metadata" that is not an object.
ShardIndex parse_shard_index(const std::string& text, const std::string& index_path);

}  // namespace sd
