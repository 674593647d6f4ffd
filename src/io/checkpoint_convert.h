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
//   * diffusers AutoencoderKL weights saved before diffusers ~0.14 (the SD 1.x / 2.x vae/ folders on the hub,
//     sd-vae-ft-mse): the mid-block attention's "query", "key", "value", "proj_attn" are today's "to_q", "to_k",
//     "to_v", "to_out.0" (diffusers 0.24 renames them at load: ModelMixin._convert_deprecated_attention_blocks).
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

// Renames, in place, the deprecated attention names of an AutoencoderKL state dict:
// "{encoder,decoder}.mid_block.attentions.{i}.{query,key,value,proj_attn}.{weight,bias}" -> ".to_q", ".to_k", ".to_v",
// ".to_out.0" (the same tensors). Weights already under the current names pass unchanged. A layer under both names is
// a FormatError naming `source` and both keys: diffusers would keep the old one without a word, and which one the
// file meant cannot be told. Returns how many keys were renamed.
size_t vae_deprecated_attention_to_current(std::map<std::string, torch::Tensor>& weights, const std::string& source);
// True for a key under a deprecated name that vae_deprecated_attention_to_current renames.
bool is_deprecated_vae_attention_key(const std::string& key);

}  // namespace sd::convert
