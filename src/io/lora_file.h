#pragma once
// LoRA files in the layouts users download, read into one neutral form: low-rank pairs (down, up, optional alpha),
// each naming the component ("unet" / "text_encoder") and the diffusers module it patches. Matching the pairs
// against a model and fusing them into its weights is models/lora.h.
//
// Layouts (module paths are diffusers / transformers paths; fixtures README, section "LoRA"):
//   kohya / A1111     lora_unet_<module, '.' -> '_'>.lora_down.weight [r, in(, kh, kw)] / .lora_up.weight
//                     [out, r(, 1, 1)] / .alpha (0-d, F32 or F16; none = scale 1); lora_te_<text-encoder module>...
//                     The stem is resolved against the model's module names later (underscored = true).
//                     lycoris_<UNet module, '.' -> '_'> (SimpleTuner's LyCORIS files) is read as lora_unet_ is, as
//                     ComfyUI does (layout "kohya").
//   diffusers 0.24    unet.<module>.lora.down.weight / .lora.up.weight,
//                     text_encoder.<module>.lora_linear_layer.down.weight / .up.weight (no alphas). The doubled
//                     "unet.unet." prefix of 0.24's training scripts is accepted, as diffusers strips every "unet.".
//   legacy diffusers  unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight (to_out = to_out.0),
//                     text_encoder.<layer>.self_attn.to_{q,k,v,out}_lora.{down,up}.weight (= q/k/v/out_proj).
//   PEFT              <component>.<module>.lora_A.weight (down) / .lora_B.weight (up), optional "base_model.model."
//                     prefix; without a component prefix, "text_model.*" modules are the text encoder's, the rest
//                     the UNet's. Scale lora_alpha / r = 1 (diffusers' PEFT path without network alphas).
// A "<stem>.alpha" key is read in every layout. Keys no layout explains, and halves of a pair without the other
// half, are listed in `unparsed` (the caller reports them; --strict-lora makes them an error).
//
// Methods beyond a down / up pair, in any of these namings (kohya stems as LyCORIS writes them, or dotted module
// paths), each module's terms read into one LoraModule (formulas: lora_delta below):
//   LoCon Tucker  lora_down [r, in, 1, 1] / lora_mid [r, r, kh, kw] / lora_up [out, r, 1, 1] (+ alpha)
//   LoHa          hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b, optional hada_t1 / hada_t2 (Tucker), alpha
//   LoKr          lokr_w1 or lokr_w1_a / lokr_w1_b, lokr_w2 or lokr_w2_a / lokr_w2_b, optional lokr_t2, alpha
//   full          diff (the weight difference itself) and / or diff_b (the bias's)
//   DoRA          dora_scale (kohya / LyCORIS: [out, 1(, 1, 1)] or [1, in(, 1, 1)]) or lora_magnitude_vector
//                 (PEFT / diffusers: per output channel, [out] or a Conv2d's [1, out, 1, 1]) beside any of the
//                 above but full: the magnitude of the decomposed weight
// A module whose terms are incomplete (a LoHa without hada_w2_b, lokr_t2 without lokr_w2_a), mix methods or have
// an empty factor (rank 0) is a FormatError naming the keys. The LyCORIS methods that still have no fusion -
// (IA)^3 (on_input), OFT / BOFT (oft_blocks), GLoRA (a1 / a2 / b1 / b2) - refuse the whole file, naming the method
// and a key: fusing the rest of such a file would give other weights than it was trained for.
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

// One patched module: a plain down / up pair, or the terms of another method (method != "lora" or factors set).
struct LoraPair {
  std::string component;      // "unet" | "text_encoder" | "text_encoder_2" (SDXL: lora_te2_, text_encoder_2.) | ""
                              // (PEFT without prefix: decided by the module path)
  std::string module;         // dotted module path, or the kohya stem with '_' for '.' when underscored
  bool underscored = false;
  std::string method = "lora";  // "lora" (with a lora_mid factor: Tucker LoCon) | "loha" | "lokr" | "full"
  std::string down_key, up_key, alpha_key;  // keys in the file (alpha_key empty without alpha; down / up: "lora" only)
  torch::Tensor down, up;     // float32 on the CPU, shapes as stored
  std::optional<double> alpha;
  // The other terms by their key's last name part ("lora_mid", "hada_w1_a", "lokr_w2", "diff", "diff_b", ...),
  // float32, and the file's keys for them.
  std::map<std::string, torch::Tensor> factors;
  std::map<std::string, std::string> factor_keys;
  // DoRA: the magnitude (dora_scale or lora_magnitude_vector) and its key; undefined without DoRA.
  torch::Tensor magnitude;
  std::string magnitude_key;
  // The weight difference lora_delta() makes: [out, in] / [out, in * kh * kw] (2-D products) or [out, in, kh, kw];
  // empty for a "full" module with only diff_b.
  std::vector<int64_t> delta_shape;
  int64_t delta_rank = 0;  // what alpha divides (0: alpha is not used, e.g. LoKr with two full factors, full)

  int64_t rank() const { return method == "lora" ? down.size(0) : delta_rank; }
  bool plain() const { return method == "lora" && factors.empty() && !magnitude.defined(); }
  bool has(const std::string& part) const { return factors.count(part) != 0; }
  const torch::Tensor& factor(const std::string& part) const { return factors.at(part); }
  // Every key of the file this module uses (down, up, alpha, factors, magnitude).
  std::vector<std::string> keys() const;
  // The key error messages name first: the down key, else the method's first factor.
  std::string first_key() const;
  // "LoRA" | "Tucker LoCon" | "LoHa" | "LoKr" | "full" (+ " + DoRA")
  std::string method_name() const;
};

// A module's weight difference before the user's scale (and before DoRA's normalisation), float32 of delta_shape.
// With scale = alpha / rank when the file stores an alpha (else 1), following LyCORIS (lycoris/modules/*.py,
// lycoris/functional/general.py) and ComfyUI (comfy/weight_adapter/*.py):
//   lora          up.flatten(1) @ down.flatten(1) * scale                        (rank = down dim 0)
//   Tucker LoCon  sum_ij mid[i, j, k, l] up[p, i] down[j, q] * scale -> [out, in, kh, kw]
//   LoHa          (w1_a @ w1_b) * (w2_a @ w2_b) * scale                           (rank = hada_w1_b dim 0); with
//                 Tucker each product is sum_ij t[i, j, k, l] w_a[i, p] w_b[j, q] -> [out, in, kh, kw]
//   LoKr          kron(w1, w2) * scale, w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2 or w2_a @ w2_b or the Tucker
//                 product of lokr_t2; a 4-D w2 makes w1 [a, b, 1, 1]. scale = alpha / rank only when a factor is
//                 decomposed (rank: w2_b dim 0, else w1_b dim 0), else 1 (LyCORIS ignores alpha then)
//   full          diff (no alpha)
torch::Tensor lora_delta(const LoraPair& p);
struct LoraFile {
  std::string path;
  std::string layout;  // "kohya" | "diffusers" | "diffusers_legacy" | "peft" | "mixed (a, b)" | "none"
  size_t keys = 0;
  std::vector<LoraPair> pairs;        // in file order of their first keys
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
  std::vector<std::string> methods;  // methods beyond plain LoRA that patch something ("LoHa", "DoRA", ...), sorted
  bool patches(const std::string& component) const {
    auto it = modules.find(component);
    return it != modules.end() && !it->second.empty();
  }
  size_t module_count(const std::string& component) const {
    auto it = modules.find(component);
    return it == modules.end() ? 0 : it->second.size();
  }
  // "kohya, 79 UNet + 0 text-encoder modules, rank 4, scale 1" (+ ", N unmatched keys"); "kohya (LoHa, DoRA), ..."
  // when other methods patch modules
  std::string summary() const;
};

// Reads and validates a LoRA file: FormatError naming the file and key for non-float factors, factors that are not
// 2-D / 4-D, ranks that disagree between down and up, factors of another method whose shapes do not chain (naming
// each key's shape and the one expected), incomplete or mixed modules, an alpha that is not one number, and NaN / Inf
// anywhere; and naming the method and an example key for a LyCORIS method without fusion ("LyCORIS OFT
// (oft_blocks) is not supported: KEY ...").
LoraFile read_lora_file(const std::string& path);

}  // namespace sd
