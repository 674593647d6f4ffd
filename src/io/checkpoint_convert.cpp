#include "io/checkpoint_convert.h"

#include <algorithm>
#include <cctype>
#include <cstring>

#include "core/error.h"
#include "core/text.h"

namespace sd::convert {

namespace {

const char* kEncoderPrefix = "encoder.layers.";
const char* kDecoderPrefix = "decoder.layers.";

// The parameter names inside one layer of a TAESD nn.Sequential: a plain conv ("weight", "bias") or a Block (three
// convs at Sequential indices 0, 2, 4 with ReLUs between, and a bias-free 1x1 "skip" conv when it changes width).
bool is_taesd_param(const std::string& rest) {
  static const char* kNames[] = {"weight",        "bias",          "conv.0.weight", "conv.0.bias", "conv.2.weight",
                                 "conv.2.bias",   "conv.4.weight", "conv.4.bias",   "skip.weight"};
  for (const char* n : kNames)
    if (rest == n) return true;
  return false;
}

// "12.conv.0.weight" -> {12, "conv.0.weight"}; false if the key does not start with a decimal index and a dot.
bool split_index(const std::string& key, long& idx, std::string& rest) {
  size_t i = 0;
  while (i < key.size() && std::isdigit(static_cast<unsigned char>(key[i]))) ++i;
  if (i == 0 || i > 6 || i >= key.size() || key[i] != '.') return false;
  if (i > 1 && key[0] == '0') return false;  // "01.weight" is not a Sequential index
  idx = std::stol(key.substr(0, i));
  rest = key.substr(i + 1);
  return true;
}

// The current name of a deprecated AutoencoderKL attention key ("" when `key` is not one). diffusers renames exactly
// "{path}.{old}.weight|bias" of each attention block built with _from_deprecated_attn_block: in an AutoencoderKL the
// mid blocks of encoder and decoder.
std::string current_vae_attention_name(const std::string& key) {
  static const std::pair<const char*, const char*> kRenamed[] = {
      {"query", "to_q"}, {"key", "to_k"}, {"value", "to_v"}, {"proj_attn", "to_out.0"}};
  const auto t = split(key, '.', /*keep_empty=*/true);
  if (t.size() != 6 || (t[0] != "encoder" && t[0] != "decoder") || t[1] != "mid_block" || t[2] != "attentions" ||
      !is_decimal(t[3]) || (t[5] != "weight" && t[5] != "bias"))
    return "";
  for (const auto& [old_name, name] : kRenamed)
    if (t[4] == old_name) return t[0] + ".mid_block.attentions." + t[3] + "." + name + "." + t[5];
  return "";
}

}  // namespace

std::string taesd_key_to_diffusers(const std::string& key, TaesdHalf half, const std::string& source) {
  long idx = 0;
  std::string rest;
  if (!split_index(key, idx, rest) || !is_taesd_param(rest))
    throw FormatError(source, "key '" + key + "' is not a TAESD " +
                                  (half == TaesdHalf::Encoder ? "encoder" : "decoder") +
                                  " key (expected '{idx}.weight', '{idx}.bias' or '{idx}.conv.{0,2,4}.weight|bias' "
                                  "of madebyollin/taesd's nn.Sequential)");
  if (half == TaesdHalf::Encoder) return kEncoderPrefix + std::to_string(idx) + "." + rest;
  // The original decoder's layer 0 is Clamp (no parameters); diffusers applies it in forward() and numbers the
  // remaining layers from 0.
  if (idx == 0)
    throw FormatError(source, "key '" + key + "': layer 0 of the TAESD decoder is the parameterless Clamp; a "
                              "parameter there means the file is not madebyollin/taesd's decoder layout");
  return kDecoderPrefix + std::to_string(idx - 1) + "." + rest;
}

std::pair<TaesdHalf, std::string> taesd_key_from_diffusers(const std::string& key) {
  long idx = 0;
  std::string rest;
  if (starts_with(key, kEncoderPrefix) && split_index(key.substr(std::strlen(kEncoderPrefix)), idx, rest))
    return {TaesdHalf::Encoder, std::to_string(idx) + "." + rest};
  if (starts_with(key, kDecoderPrefix) && split_index(key.substr(std::strlen(kDecoderPrefix)), idx, rest))
    return {TaesdHalf::Decoder, std::to_string(idx + 1) + "." + rest};
  throw InvalidArgument("key '" + key + "' is not an AutoencoderTiny key (expected 'encoder.layers.{idx}...' or "
                        "'decoder.layers.{idx}...')");
}

std::map<std::string, torch::Tensor> taesd_original_to_diffusers(const std::map<std::string, torch::Tensor>& encoder,
                                                                 const std::string& encoder_source,
                                                                 const std::map<std::string, torch::Tensor>& decoder,
                                                                 const std::string& decoder_source) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [k, t] : encoder) out[taesd_key_to_diffusers(k, TaesdHalf::Encoder, encoder_source)] = t;
  for (const auto& [k, t] : decoder) out[taesd_key_to_diffusers(k, TaesdHalf::Decoder, decoder_source)] = t;
  return out;
}

std::pair<std::map<std::string, torch::Tensor>, std::map<std::string, torch::Tensor>> taesd_diffusers_to_original(
    const std::map<std::string, torch::Tensor>& diffusers) {
  std::map<std::string, torch::Tensor> enc, dec;
  for (const auto& [k, t] : diffusers) {
    auto [half, key] = taesd_key_from_diffusers(k);
    (half == TaesdHalf::Encoder ? enc : dec)[key] = t;
  }
  return {enc, dec};
}

bool is_deprecated_vae_attention_key(const std::string& key) { return !current_vae_attention_name(key).empty(); }

size_t vae_deprecated_attention_to_current(std::map<std::string, torch::Tensor>& weights, const std::string& source) {
  std::vector<std::pair<std::string, std::string>> renames;  // old -> current
  for (const auto& kv : weights)
    if (std::string now = current_vae_attention_name(kv.first); !now.empty()) {
      if (weights.count(now))
        throw FormatError(source, kv.first + " (the name diffusers used before 0.14) and " + now +
                                      " are the same layer: expected one of the two names, not both");
      renames.emplace_back(kv.first, std::move(now));
    }
  for (const auto& [old_key, now] : renames) {
    auto node = weights.extract(old_key);
    node.key() = now;
    weights.insert(std::move(node));
  }
  return renames.size();
}

}  // namespace sd::convert
