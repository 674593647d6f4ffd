#include "io/shard_index.h"

#include <algorithm>
#include <set>

#include "core/error.h"
#include "core/json_limits.h"
#include "io/json_config.h"

namespace sd {

bool is_shard_index_name(const std::string& file_name) {
  const std::string tag = ".safetensors.index.";
  const size_t at = file_name.rfind(tag);
  if (at == std::string::npos || at == 0) return false;
  const std::string rest = file_name.substr(at + tag.size());  // "json" or "<variant>.json"
  if (rest == "json") return true;
  return rest.size() > 5 && rest.compare(rest.size() - 5, 5, ".json") == 0 &&
         rest.find('.') == rest.size() - 5;
}

ShardIndex parse_shard_index(const std::string& text, const std::string& index_path) {
  const nlohmann::json j = parse_json_text(text, index_path);
  if (!j.is_object())
    throw FormatError(index_path, "expected a JSON object with a \"weight_map\" (a sharded checkpoint's index), "
                                  "found " + json_excerpt(j));
  ShardIndex out;
  const auto meta = j.find("metadata");
  if (meta != j.end() && !meta->is_null()) {
    if (!meta->is_object())
      throw FormatError(index_path, "field 'metadata': expected an object, found " + json_excerpt(*meta));
    for (const auto& [k, v] : meta->items()) out.metadata[k] = v.is_string() ? v.get<std::string>() : json_excerpt(v);
  }
  const auto map = j.find("weight_map");
  if (map == j.end() || !map->is_object() || map->empty())
    throw FormatError(index_path, "field 'weight_map': expected an object naming the shard of each tensor, found " +
                                      (map == j.end() ? std::string("nothing") : json_excerpt(*map)));
  std::set<std::string> shards;
  for (const auto& [tensor, file] : map->items()) {
    if (tensor.empty()) throw FormatError(index_path, "field 'weight_map': a tensor with an empty name");
    if (!file.is_string())
      throw FormatError(index_path, "field 'weight_map': tensor '" + tensor + "': expected a shard file name, found " +
                                        json_excerpt(file));
    const std::string name = file.get<std::string>();
    const bool plain = !name.empty() && name.find_first_of(std::string("/\\\0", 3)) == std::string::npos &&
                       name != "." && name != "..";
    const std::string ext = ".safetensors";
    if (!plain || name.size() <= ext.size() || name.compare(name.size() - ext.size(), ext.size(), ext) != 0)
      throw FormatError(index_path, "field 'weight_map': tensor '" + tensor + "': expected the name of a .safetensors "
                                    "shard in the index's folder (no path), found " + json_excerpt(file));
    out.weight_map[tensor] = name;
    shards.insert(name);
  }
  out.shards.assign(shards.begin(), shards.end());
  return out;
}

}  // namespace sd
