#pragma once
// LoRA fused into a model's weights, as diffusers 0.24's load_lora_weights + fuse_lora(lora_scale) do (the non-PEFT
// path StreamDiffusion uses), with the low-rank factors kept so that a scale change re-fuses without reloading.
//
// Per patched Linear / Conv2d weight W, in float32 (fixtures README "LoRA", "Fusion"):
//   up'_k = (up_k * alpha_k) / rank_k                 only when the file stores an alpha (else up'_k = up_k)
//   W     = cast( float32(W_base) + s_1 * (up'_1 @ down_1) + s_2 * (up'_2 @ down_2) + ... )
// with conv factors flattened to [out, r] x [r, in*kh*kw] and the product reshaped to W's shape, LoRAs in the order
// they were added (= diffusers loading and fusing each on top of the previous ones), cast once to the run dtype.
// Other methods add s_k * lora_delta_k (io/lora_file.h: LoCon Tucker, LoHa, LoKr, full diff; a full module's diff_b
// adds s_k * diff_b to the bias, the only bias a LoRA changes). A DoRA term (magnitude m) replaces the running sum W
// by DoRA's decomposed weight (the norm per output channel, over the other axes, as LyCORIS' apply_weight_decompose
// and PEFT do; eps = float32 epsilon). The user's scale s enters by the rule of the file's naming:
//   PEFT / diffusers (lora_magnitude_vector, what diffusers loads through PEFT, fuse_lora(lora_scale=s) included;
//   peft/tuners/lora/dora.py scales the difference before the norm):
//     W <- m * (W + s * delta) / (||W + s * delta|| + eps)
//   kohya / LyCORIS (dora_scale; ComfyUI's weight_decompose, comfy/weight_adapter/base.py):
//     W_d = m * (W + delta) / (||W + delta|| + eps),   W <- W + s * (W_d - W)   (s blends towards DoRA's weight)
// lora_magnitude_vector is always per output channel ([out]; PEFT stores a Conv2d's as [1, out, 1, 1]); dora_scale's
// shape decides: [out] / [out, 1, ..] per output channel, [1, in, ..] per input channel (the norm then per input
// channel). Both rules give DoRA's merged weight at s = 1; s = 0 leaves the LoRA out (as unloading it does; PEFT's
// rule would give m * W / ||W||). DoRA is not a difference that can be added: a scale change, or any earlier LoRA's, is
// re-fused from W_base through every term in order. W_base is the weight as loaded (in the run dtype; for float32 runs
// it is the memory-mapped file itself and costs no memory). Prepacked convolutions (nn::Conv2d::prepack) are packed
// again after every fuse, so the kernels read the fused weights, not a stale packed copy.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "io/lora_file.h"

namespace sd {

namespace nn {
class Conv2dImpl;
class LinearImpl;
}

// Named module trees a LoRA may patch: {"unet", UNet}, {"text_encoder", CLIPTextModel}. Module names are the
// diffusers / transformers keys (down_blocks.0.attentions.0.proj_in, text_model.encoder.layers.0.self_attn.q_proj).
// kohya stems of the "unet" component also match in the original (LDM / sgm) layout's names that single-file
// checkpoints use (input_blocks_4_1_transformer_blocks_0_attn1_to_q, middle_block_2_emb_layers_1; kohya's SDXL
// files), from convert::unet_ldm_table of the UNet's own modules.
using LoraComponents = std::vector<std::pair<std::string, torch::nn::Module*>>;


// Matches `file` against the components without changing anything. Throws FormatError naming the file when a pair
// names an existing module with shapes that do not fit it (each such key with the LoRA's and the weight's shapes:
// a LoRA for another model family), when nothing in the file patches any module, or when its text-encoder pairs
// match but none of its UNet pairs does (naming one: half a LoRA is not applied). Pairs whose module does not
// exist (or is not a Linear / Conv2d) and keys no layout explains are listed in `unmatched`.
LoraReport match_lora(const LoraFile& file, const LoraComponents& components);

class LoraSet {
 public:
  // keep_base: keep the unfused weights so set_scale() can re-fuse (free for float32 weights that alias their file;
  // a second copy of the patched weights otherwise). Without it, set_scale() throws.
  LoraSet(LoraComponents components, bool keep_base);
  ~LoraSet();
  LoraSet(const LoraSet&) = delete;
  LoraSet& operator=(const LoraSet&) = delete;

  // Reads and matches a LoRA (spec.name must be set, unique); its weights change on the next fuse(). Unmatched keys
  // are logged (count and first names) or, with `strict`, a FormatError. Returns its report.
  const LoraReport& add(const LoraSpec& spec, bool strict);
  // Fuses every added LoRA into the weights (see the header comment). Called once after the adds. InvalidArgument
  // when a fused weight would not be finite (see set_scale): with keep_base the weights are left as loaded; without,
  // the unfused weights are freed as the fuse goes, so those fused before stay fused and the model is to be discarded
  // (as a failed load_pipeline does).
  void fuse();
  // Re-fuses the modules LoRA `name` patches with its new scale, from the kept base weights and factors: the result
  // is bit-identical to a fresh load fused at that scale. InvalidArgument for an unknown name or non-finite scale,
  // and for a scale at which a module it patches would not be finite: its float32 sum overflows (naming the file and
  // key of the first term that does: a difference too large at its scale, a DoRA magnitude over a near-zero norm) or
  // the cast to the weights' dtype does (fp16's 65504). The scale and the weights then stay as they were (targets
  // fused before the refusal are fused back, new tensors with the old values: weight_changes() counts them). Any
  // other error (out of memory) puts the scale back and fuses back as far as it can. Not thread-safe: call it where
  // nothing else uses the model (the model thread, between frames).
  void set_scale(const std::string& name, double scale);

  const std::vector<LoraReport>& reports() const { return reports_; }
  bool keeps_base() const { return keep_base_; }
  // Bumped by every set_scale() of a LoRA that patches the text encoder (prompt embeddings must be re-encoded).
  uint64_t text_encoder_version() const { return text_encoder_version_; }
  double fuse_seconds() const { return fuse_s_; }  // wall time of the last fuse() / set_scale()
  // Bumped by every weight tensor replaced (set_data): a CUDA graph recorded before holds the old storage.
  uint64_t weight_changes() const { return weight_changes_; }

 private:
  struct Term {
    size_t lora;
    torch::Tensor up;    // plain pairs: up' [out, r] float32 (alpha / rank applied), on the weight's device
    torch::Tensor down;  // [r, in * kh * kw] float32
    // Other methods and DoRA: the module's terms (on the weight's device), its difference rebuilt on every fuse.
    std::shared_ptr<const LoraPair> module;
    bool bias = false;         // the term is a full module's diff_b (the target is the bias)
    torch::Tensor magnitude;   // DoRA: shaped to broadcast against the weight ([out, 1, ..] or [1, in, ..])
    bool peft_dora = false;    // the magnitude is PEFT's lora_magnitude_vector (PEFT's scale rule, not ComfyUI's)
  };
  struct Target {
    std::string component, module;
    torch::Tensor weight;  // the module's parameter, or its bias (set_data on it replaces what the module reads)
    torch::Tensor base;    // the unfused weight (a separate handle to the loaded storage)
    nn::Conv2dImpl* conv = nullptr;      // a weight target's layer (its packed / int8 copies are made again)
    nn::LinearImpl* linear = nullptr;
    bool repack = false;   // it was prepacked when the LoRA was added
    // A bias target's layer: an int8 copy holds the bias too and sees only weight changes by itself.
    nn::LinearImpl* bias_linear = nullptr;
    nn::Conv2dImpl* bias_conv = nullptr;
    std::vector<Term> terms;
  };
  // Where a fused weight stops being finite: the loaded weight itself, a term's difference (at its scale), the norm
  // a DoRA term divides by, or its magnitude over that norm; no term (kCast) when the float32 sum is finite and only
  // the cast is not.
  struct Overflow {
    enum What { kCast, kBase, kDifference, kNorm, kMagnitude } what = kCast;
    const Term* term = nullptr;
  };
  // The target's weight from its base through every term at the LoRAs' current scales, in float32; undefined when
  // no term applies (every scale 0). With `overflow`, the sum stops where the weight stops being finite and says so.
  torch::Tensor fused_weight(const Target& t, Overflow* overflow) const;
  // Sums target t at the current scales; with `apply`, puts the result in the module's weight. Returns why it is not
  // finite (empty when it is; nothing applied then).
  std::string fuse_target(Target& t, bool apply);
  void put(Target& t, const torch::Tensor& w);  // the weight the module reads (re-packed / re-quantized as it was)
  std::string overflow_message(const Target& t, const Overflow& o) const;
  std::string scales() const;  // "'a' 1, 'b' 0.5"

  LoraComponents components_;
  bool keep_base_;
  std::vector<LoraReport> reports_;
  std::vector<Target> targets_;
  std::map<std::string, size_t> target_index_;  // "component|module" -> targets_ index
  std::vector<std::vector<size_t>> lora_targets_;  // per LoRA: the targets it patches
  bool fused_ = false;
  uint64_t text_encoder_version_ = 0;
  uint64_t weight_changes_ = 0;
  double fuse_s_ = 0;
};

}  // namespace sd
