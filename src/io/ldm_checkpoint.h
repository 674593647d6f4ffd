#pragma once
// Single-file Stable Diffusion checkpoints in the original CompVis / Stability (LDM) layout, converted to diffusers'
// key names once, at load time (the sibling of io/checkpoint_convert.h, which holds the TAESD layout; together they
// are the one conversion unit: one mapping table per component, no second module tree).
//
//   model.diffusion_model.*          UNet (openaimodel names: input_blocks / middle_block / output_blocks)
//   first_stage_model.*              AutoencoderKL (encoder.down.N.block.M, decoder.up.N with the levels reversed,
//                                    mid.attn_1.{q,k,v,proj_out} stored as 1x1 convs)
//   cond_stage_model.transformer.*   SD 1.x text encoder: Hugging Face CLIPTextModel names (position_ids ignored)
//   cond_stage_model.model.*         SD 2.x text encoder: OpenCLIP names, fused attn.in_proj split into q/k/v; the
//                                    last resblock, text_projection and logit_scale are not used by SD 2
//   conditioner.embedders.0.transformer.*  SDXL text_encoder (CLIP ViT-L): Hugging Face CLIPTextModel names
//   conditioner.embedders.1.model.*  SDXL text_encoder_2 (OpenCLIP bigG): OpenCLIP names as SD 2.x, but every
//                                    resblock is used and text_projection [hidden, proj] is diffusers'
//                                    text_projection.weight transposed (OpenCLIP computes x @ text_projection);
//                                    logit_scale is not used
//   betas, alphas_cumprod, ...       the 12 DDPM buffers of LatentDiffusion: ignored (the schedule comes from config)
//
// A table is computed from the diffusers keys of the module built from its config (so it fits any number of levels,
// resnets per level, mid block or not) and maps each diffusers key to the file key it is read from plus an op
// (copy / 1x1 conv -> linear reshape / row block of a fused projection). Gathering returns views of the memory-mapped
// file (narrow, reshape): converting costs no copy; the cast to the run dtype happens in load_weights as for any file.
// The general UNet rule (n levels, L_i resnets per level):
//   down_blocks.i.resnets.j / attentions.j -> input_blocks.{1 + sum_{k<i}(L_k + d_k) + j}.0 / .1   (d_k: 1 if the
//   level has a downsampler); down_blocks.i.downsamplers.0.conv -> input_blocks.{1 + sum_{k<i}(L_k+d_k) + L_i}.0.op;
//   up_blocks.i.resnets.j / attentions.j -> output_blocks.{sum_{k<i} U_k + j}.0 / .1 (U_k resnets of up block k);
//   up_blocks.i.upsamplers.0.conv -> output_blocks.{sum_{k<i} U_k + U_i - 1}.{2 if attentions else 1}.conv;
//   mid_block.resnets.0 / attentions.0 / resnets.1 -> middle_block.0 / .1 / .2; resnet inner names
//   norm1 in_layers.0, conv1 in_layers.2, time_emb_proj emb_layers.1, norm2 out_layers.0, conv2 out_layers.3,
//   conv_shortcut skip_connection.
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "io/safetensors.h"

namespace sd::convert {

// One diffusers key and where it lives in an LDM file.
struct LdmEntry {
  enum class Op {
    Copy,             // same tensor
    Conv1x1ToLinear,  // file [C, C, 1, 1] -> model [C, C] (VAE mid attention); a 2-D file tensor is taken as is
    Rows,             // row block `chunk` of `chunks` equal blocks along dim 0 (OpenCLIP fused in_proj -> q/k/v)
    Transpose,        // file [in, out] -> model [out, in] (OpenCLIP text_projection -> text_projection.weight)
  };
  std::string diffusers;
  std::string ldm;
  Op op = Op::Copy;
  int chunk = 0, chunks = 1;
};
using LdmTable = std::vector<LdmEntry>;

enum class TextEncoderLayout { HfClip, OpenClip };

// Mapping tables from the diffusers keys of a component (e.g. the keys of sd::state_dict(module)). `prefix` is the
// file's component prefix ("model.diffusion_model.", "first_stage_model." or "" for a bare VAE file, ...).
// InvalidArgument for a key the layout has no place for (a model feature LDM files do not have).
LdmTable unet_ldm_table(const std::vector<std::string>& diffusers_keys,
                        const std::string& prefix = "model.diffusion_model.");
LdmTable vae_ldm_table(const std::vector<std::string>& diffusers_keys, const std::string& prefix = "first_stage_model.");
LdmTable text_encoder_ldm_table(const std::vector<std::string>& diffusers_keys, TextEncoderLayout layout,
                                const std::string& prefix = "");  // "" = the layout's cond_stage_model prefix
// (SDXL: text_encoder_ldm_table(keys, HfClip, kSdxlClipPrefix) and (keys of a CLIPTextModelWithProjection, OpenClip,
// kSdxlOpenClipPrefix); the latter maps text_projection.weight to `text_projection` with Op::Transpose.)

// The component's state dict (diffusers keys) gathered from `file`: views of the mapped tensors, no copies. Every
// file key the table needs but the file lacks, and every tensor whose shape does not fit its op, is reported in one
// FormatError naming the file and `component`. `expected` (diffusers key -> shape, e.g. the module's state dict
// shapes): a converted tensor of another shape is reported there too, under its file key.
using ShapeMap = std::map<std::string, std::vector<int64_t>>;
std::map<std::string, torch::Tensor> gather_ldm(const SafeTensorsFile& file, const LdmTable& table,
                                                const std::string& component, const ShapeMap& expected = {});
// The inverse, for writing LDM files: diffusers tensors -> (file key, tensor) with 1x1 reshapes and fused in_proj
// rows concatenated back and text_projection transposed back. InvalidArgument for a table key missing from `diffusers`.
std::vector<std::pair<std::string, torch::Tensor>> scatter_ldm(const std::map<std::string, torch::Tensor>& diffusers,
                                                               const LdmTable& table);

// ---- what an LDM single file holds ------------------------------------------------------------------------------

enum class LdmFamily { Unknown, SD1, SD2, SDXL };
const char* family_name(LdmFamily f);  // "SD 1.x", "SD 2.x", "SDXL", "unknown"

constexpr const char* kUNetPrefix = "model.diffusion_model.";
constexpr const char* kVaePrefix = "first_stage_model.";
constexpr const char* kHfClipPrefix = "cond_stage_model.transformer.";
constexpr const char* kOpenClipPrefix = "cond_stage_model.model.";
constexpr const char* kSdxlClipPrefix = "conditioner.embedders.0.transformer.";  // SDXL text_encoder
constexpr const char* kSdxlOpenClipPrefix = "conditioner.embedders.1.model.";    // SDXL text_encoder_2

// Family, components present and diffusers configs inferred from the tensor names and shapes, with the values the
// weights cannot tell (heads, GroupNorm groups, activation, scaling factor, prediction type) from the family's
// defaults (architecture_inference.json of the fixtures lists them). The configs are diffusers config.json objects,
// read by the models' own from_json like any folder's.
struct LdmCheckpointInfo {
  std::string path;
  LdmFamily family = LdmFamily::Unknown;
  bool has_unet = false, has_vae = false, has_text_encoder = false;
  bool has_text_encoder_2 = false;  // SDXL: conditioner.embedders.1.model.* (always OpenCLIP layout)
  TextEncoderLayout text_layout = TextEncoderLayout::HfClip;
  std::string text_prefix, text_encoder_2_prefix;
  nlohmann::json unet_config, vae_config, text_encoder_config, text_encoder_2_config, scheduler_config;
  // What the weights cannot tell and the inferred configs assumed, for info / logs ("" = nothing to say). SDXL:
  // sample_size 128 (1024 px, SDXL base); sdxl-turbo is a 512 px model.
  std::string sample_size_note;
  std::string prediction_type;       // what was assumed (or given)
  std::string prediction_type_note;  // why
  std::map<std::string, int64_t> dtypes;  // safetensors dtype name -> element count
};

// True when the file holds an LDM UNet (model.diffusion_model.*).
bool is_ldm_checkpoint(const SafeTensorsFile& file);
// FormatError naming the file when it is not an LDM checkpoint (says which layouts are accepted) or the family
// cannot be told. `prediction_type` "" = the family default (SD 1.x epsilon; SD 2.x epsilon, with a note that
// 768-v models need v_prediction; SDXL epsilon), else "epsilon" | "v_prediction". SDXL files (conditioner.embedders.*
// or a UNet with label_emb) get text_encoder_2_config (CLIPTextModelWithProjection) and a text_time UNet config.
LdmCheckpointInfo inspect_ldm_checkpoint(const SafeTensorsFile& file, const std::string& prediction_type = "");

// Bare / prefixed AutoencoderKL files: "first_stage_model." (a full LDM checkpoint), "" with LDM names
// (encoder.down.0.block.0...: the published fine-tuned VAE files) or diffusers names (encoder.down_blocks...).
enum class VaeFileLayout { Diffusers, Ldm };
struct VaeFileInfo {
  VaeFileLayout layout = VaeFileLayout::Diffusers;
  std::string prefix;     // "" or "first_stage_model."
  nlohmann::json config;  // inferred (LDM defaults: 32 groups, scaling 0.18215)
};
VaeFileInfo inspect_vae_file(const SafeTensorsFile& file);

// Keys of `file` that no table reads, split into the ones every LDM file carries and SD does not use (DDPM buffers,
// position_ids, OpenCLIP's projection / logit scale / highest-numbered resblock, SDXL's
// conditioner.embedders.1.model.logit_scale, EMA copies, a training checkpoint's VAE loss weights) and the rest (an
// earlier resblock left unread is unknown: a text encoder config with fewer layers than the file).
struct UnusedKeys {
  std::vector<std::string> known, unknown;
};
UnusedKeys unused_ldm_keys(const SafeTensorsFile& file, const std::vector<const LdmTable*>& tables);
// After a load: the unknown unused keys under `prefixes` (the components read from `file`; "" is the whole file) are
// weights of layers the built models have no place for (a config that does not fit the file, a deeper block than
// the one the config was inferred from): a FormatError naming how many and the first of them, `config_note` saying
// where the config came from. Returns the other unknown keys (outside those components: nothing was loaded from
// there) for a warning.
std::vector<std::string> check_unread_ldm_keys(const SafeTensorsFile& file, const std::vector<const LdmTable*>& tables,
                                               const std::vector<std::string>& prefixes,
                                               const std::string& config_note);

// ---- ControlNet single files ------------------------------------------------------------------------------------
// The original ControlNet layout (lllyasviel's control_*.safetensors), with or without the "control_model." prefix:
//   controlnet_cond_embedding.conv_in / blocks.i / conv_out -> input_hint_block.0 / .{2(i+1)} / .{2(N+1)} (convs with
//   SiLUs between them), controlnet_down_blocks.k -> zero_convs.k.0, controlnet_mid_block -> middle_block_out.0, and
//   the encoder copy (conv_in, time_embedding, down_blocks, mid_block, add_embedding) as the UNet rule above.
constexpr const char* kControlNetPrefix = "control_model.";
struct ControlNetFileInfo {
  std::string path;
  std::string prefix;  // "control_model." or ""
  LdmFamily family = LdmFamily::Unknown;
  nlohmann::json config;  // a diffusers ControlNetModel config.json, inferred (heads / groups from the family)
};
LdmTable controlnet_ldm_table(const std::vector<std::string>& diffusers_keys, const std::string& prefix);
bool is_ldm_controlnet(const SafeTensorsFile& file);
// FormatError naming the file when it is not in that layout or its input_hint_block is malformed.
ControlNetFileInfo inspect_controlnet_file(const SafeTensorsFile& file);

// The names of the 12 DDPM buffers LatentDiffusion stores.
const std::vector<std::string>& ddpm_buffer_names();

}  // namespace sd::convert
