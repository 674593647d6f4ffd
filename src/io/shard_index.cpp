#include "io/shard_index.h"

#include <algorithm>
#include <set>

#include "core/error.h"
#include "core/json_limits.h"
#include "core/text.h"
#include "io/json_config.h"

namespace sd {

namespace {

// A variant name: non-empty, no dot (what diffusers' _add_variant inserts as one name component).
bool plain_part(const std::string& s) { return !s.empty() && s.find('.') == std::string::npos; }

// "<base>-00001-of-00002" -> base; "" when `s` has no shard suffix.
std::string shard_base(const std::string& s) {
  const size_t of = s.rfind("-of-");
  if (of == std::string::npos || of == 0) return "";
  const size_t dash = s.rfind('-', of - 1);
  if (dash == std::string::npos || dash == 0 || !is_decimal(s.substr(dash + 1, of - dash - 1)) ||
      !is_decimal(s.substr(of + 4)))
    return "";
  return s.substr(0, dash);
}

}  // namespace

WeightFileName parse_weight_file_name(const std::string& name) {
  WeightFileName w;
  for (const char* ext : {".bin", ".ckpt", ".pt", ".pth", ".pkl"})
    if (ends_with(name, ext)) {
      w.kind = WeightFileName::kPickle;
      w.stem = name.substr(0, name.find('.'));
      return w;
    }
  if (ends_with(name, ".json")) {
    const std::string tag = ".safetensors.index.";
    const size_t at = name.rfind(tag);
    if (at != std::string::npos && at > 0) {
      const std::string rest = name.substr(at + tag.size());  // "json" or "<variant>.json"
      const std::string v = rest == "json" ? "" : rest.substr(0, rest.size() - 5);
      if (rest == "json" || plain_part(v)) {
        w.kind = WeightFileName::kIndex;
        w.stem = name.substr(0, at);
        w.variant = v;
      }
      return w;
    }
    if (ends_with(name, ".index.json")) {  // diffusers' older "<stem>.safetensors.<variant>.index.json"
      const std::string head = name.substr(0, name.size() - 11);
      const size_t st = head.rfind(".safetensors.");
      if (st != std::string::npos && st > 0 && plain_part(head.substr(st + 13))) {
        w.kind = WeightFileName::kIndex;
        w.stem = head.substr(0, st);
        w.variant = head.substr(st + 13);
        w.legacy = true;
      }
    }
    return w;
  }
  if (!ends_with(name, ".safetensors") || name.size() == 12) return w;
  const std::string base = name.substr(0, name.size() - 12);
  if (std::string head = shard_base(base); !head.empty()) {  // "<stem>[.<variant>]-00001-of-00002"
    const size_t dot = head.find('.');
    if (dot == std::string::npos || (dot > 0 && plain_part(head.substr(dot + 1)))) {
      w.kind = WeightFileName::kShard;
      w.stem = head.substr(0, dot);
      w.variant = dot == std::string::npos ? "" : head.substr(dot + 1);
    }
    return w;
  }
  const size_t last = base.rfind('.');
  if (last != std::string::npos && last > 0) {  // the older "<stem>-00001-of-00002.<variant>"
    const std::string head = shard_base(base.substr(0, last));
    if (!head.empty() && head.find('.') == std::string::npos && plain_part(base.substr(last + 1))) {
      w.kind = WeightFileName::kShard;
      w.stem = head;
      w.variant = base.substr(last + 1);
      w.legacy = true;
      return w;
    }
  }
  const size_t dot = base.find('.');
  if (dot == 0) return w;
  if (dot == std::string::npos || plain_part(base.substr(dot + 1))) {
    w.kind = WeightFileName::kSingle;
    w.stem = base.substr(0, dot);
    w.variant = dot == std::string::npos ? "" : base.substr(dot + 1);
  }
  return w;
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
    for (const auto& [k, v] : meta->items())
      out.metadata[k] = v.is_string() ? v.get<std::string>()
                                      : v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
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
