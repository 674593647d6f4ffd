#include "io/checkpoint_convert.h"

#include <cctype>
#include <cstring>

#include "core/error.h"

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

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

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

}  // namespace sd::convert
