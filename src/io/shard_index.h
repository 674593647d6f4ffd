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
  std::map<std::string, std::string> metadata;    // "metadata": strings as they are, other values as JSON text
};

// A file name of the index form above ("*.safetensors.index.json" or "*.safetensors.index.<variant>.json").
bool is_shard_index_name(const std::string& file_name);

// Parses and checks the index text; FormatError naming `index_path`, the key and what was expected when it is not
// JSON, has no non-empty "weight_map" object, maps a tensor to something other than a plain file name ending in
// .safetensors in the same folder (no path separators: an index must not reach outside its folder), or has a
// "metadata" that is not an object.
ShardIndex parse_shard_index(const std::string& text, const std::string& index_path);

}  // namespace sd
