#pragma once
// LoRA files in the layouts users download, read into one neutral form: low-rank pairs (down, up, optional alpha),
// each naming the component ("unet" / "text_encoder") and the diffusers module it patches. Matching the pairs
// against a model and fusing them into its weights is models/lora.h.
//
// Layouts (module paths are diffusers / transformers paths; fixtures README, section "LoRA"):
//   kohya / A1111     lora_unet_<module, '.' -> '_'>.lora_down.weight [r, in(, kh, kw)] / .lora_up.weight
//                     [out, r(, 1, 1)] / .alpha (0-d, F32 or F16; none = scale 1); lora_te_<text-encoder module>...
//                     The stem is resolved against the model's module names later (underscored = true).
//   diffusers 0.24    unet.<module>.lora.down.weight / .lora.up.weight,
//                     text_encoder.<module>.lora_linear_layer.down.weight / .up.weight (no alphas). The doubled
//                     "unet.unet." prefix of 0.24's training scripts is accepted, as diffusers strips every "unet.".
//   legacy diffusers  unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight (to_out = to_out.0),
//                     text_encoder.<layer>.self_attn.to_{q,k,v,out}_lora.{down,up}.weight (= q/k/v/out_proj).
//   PEFT              <component>.<module>.lora_A.weight (down) / .lora_B.weight (up), optional "base_model.model."
//                     prefix; without a component prefix, "text_model.*" modules are the text encoder's, the rest
//                     the UNet's. Scale lora_alpha / r = 1 (diffusers' PEFT path without network alphas).
// A "<stem>.alpha" key is read in every layout. Keys no layout explains, and halves of a pair without the other
// half, are listed in `unparsed` (the caller reports them; --strict-lora makes them an error). Keys of LoRA methods
// with terms beyond a down / up pair refuse the whole file instead: DoRA (dora_scale, lora_magnitude_vector) and the
// LyCORIS methods (lora_mid, hada_*, lokr_*, diff / diff_b, on_input, oft_blocks, GLoRA a1 / a2 / b1 / b2).
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/types.h>

namespace sd {

// One --lora argument: FILE[:SCALE].
struct LoraSpec {
  std::string path;
  double scale = 1.0;
  std::string name;  // how the control channel / serve settings name it; set by name_loras() (the file stem)
};

// Parses "FILE" or "FILE:SCALE". A path that exists as given is taken whole (so a file named "a:0.5" still loads);
// otherwise the text after the last ':' is the scale when it is a finite number and the rest names an existing file
// ("/data/x:y/lcm.safetensors:0.7" -> that file at 0.7). InvalidArgument naming `option` when the file does not
// exist, the scale is not a finite number or the path is empty.
LoraSpec parse_lora_spec(const std::string& arg, const std::string& option = "--lora");
// Gives every spec without a name its file stem ("lcm-lora-sdv1-5.safetensors" -> "lcm-lora-sdv1-5"); a repeated
// stem gets "_2", "_3", ...
void name_loras(std::vector<LoraSpec>& specs);

struct LoraPair {
  std::string component;      // "unet" | "text_encoder" | "text_encoder_2" (SDXL: lora_te2_, text_encoder_2.) | ""
                              // (PEFT without prefix: decided by the module path)
  std::string module;         // dotted module path, or the kohya stem with '_' for '.' when underscored
  bool underscored = false;
  std::string down_key, up_key, alpha_key;  // keys in the file (alpha_key empty without alpha)
  torch::Tensor down, up;     // float32 on the CPU, shapes as stored
  std::optional<double> alpha;
  int64_t rank() const { return down.size(0); }
};

struct LoraFile {
  std::string path;
  std::string layout;  // "kohya" | "diffusers" | "diffusers_legacy" | "peft" | "mixed (a, b)" | "none"
  size_t keys = 0;
  std::vector<LoraPair> pairs;        // in file order of their down keys
  std::vector<std::string> unparsed;  // keys that are part of no pair
};

// What a LoRA patches in a model (models/lora.h: match_lora, LoraSet) and its current scale.
struct LoraReport {
  std::string name, path, layout;
  double scale = 1.0;
  size_t keys = 0;          // tensors in the file
  size_t matched_keys = 0;  // down / up / alpha keys of pairs that patch a module
  std::map<std::string, std::vector<std::string>> modules;  // component -> patched module paths, file order
  std::vector<std::string> unmatched;                       // keys that patch nothing, file order
  std::vector<int64_t> ranks;                               // distinct ranks, ascending
  bool patches(const std::string& component) const {
    auto it = modules.find(component);
    return it != modules.end() && !it->second.empty();
  }
  size_t module_count(const std::string& component) const {
    auto it = modules.find(component);
    return it == modules.end() ? 0 : it->second.size();
  }
  // "kohya, 79 UNet + 0 text-encoder modules, rank 4, scale 1" (+ ", N unmatched keys")
  std::string summary() const;
};

// Reads and validates a LoRA file: FormatError naming the file and key for non-float factors, factors that are not
// 2-D / 4-D, ranks that disagree between down and up, an alpha that is not one number, and NaN / Inf anywhere; and
// naming the method and an example key for a DoRA / LyCORIS file ("DoRA (dora_scale) is not supported: KEY ...").
LoraFile read_lora_file(const std::string& path);

}  // namespace sd
