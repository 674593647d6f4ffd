#pragma once
// Checkpoint layouts other than diffusers', converted to diffusers' key names in this one place, once, at load time.
// Every model names its parameters exactly as diffusers does (io/state_dict.h loads by name), so supporting another
// published layout means adding a key mapping here, never a second module tree.
//
// Layouts handled so far:
//   * madebyollin/taesd's original files (taesd_encoder / taesd_decoder, each the state dict of one nn.Sequential):
//     encoder keys "{idx}.weight|bias" and "{idx}.conv.{0,2,4}.weight|bias" ("{idx}.skip.weight" where a Block
//     changes width) map to "encoder.layers.{idx}..." with the same idx; the decoder's layer 0 is the parameterless
//     Clamp, which diffusers does in forward(), so decoder idx N maps to "decoder.layers.{N-1}...".
#include <map>
#include <string>
#include <utility>

#include <torch/types.h>

namespace sd::convert {

enum class TaesdHalf { Encoder, Decoder };

// One original TAESD key -> its diffusers AutoencoderTiny key. A key that does not fit the layout (wrong shape of
// name, the decoder's parameterless index 0) is a FormatError naming `source` and the key.
std::string taesd_key_to_diffusers(const std::string& key, TaesdHalf half, const std::string& source);

// The inverse: a diffusers AutoencoderTiny key -> the original key and which file it belongs to. InvalidArgument for
// a key outside "encoder.layers." / "decoder.layers.".
std::pair<TaesdHalf, std::string> taesd_key_from_diffusers(const std::string& key);

// The two original state dicts merged into one diffusers-layout state dict (tensors are shared, not copied).
// `encoder_source` / `decoder_source` name the files in errors.
std::map<std::string, torch::Tensor> taesd_original_to_diffusers(const std::map<std::string, torch::Tensor>& encoder,
                                                                 const std::string& encoder_source,
                                                                 const std::map<std::string, torch::Tensor>& decoder,
                                                                 const std::string& decoder_source);

// A diffusers-layout AutoencoderTiny state dict split back into the original {encoder, decoder} state dicts
// (for exporting and for testing the conversion).
std::pair<std::map<std::string, torch::Tensor>, std::map<std::string, torch::Tensor>> taesd_diffusers_to_original(
    const std::map<std::string, torch::Tensor>& diffusers);

}  // namespace sd::convert
