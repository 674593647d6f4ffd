#pragma once
// What a model folder recommends to the stream when the user gives no flag: its native image size and its stream
// settings, so a newcomer's first command gives a good picture (a 64x64 model is not asked for 512x512 noise).
//
// Precedence, per setting: an explicit flag > the folder's streamdiffusion.json > the family's defaults > the
// engine's built-in defaults (txt2img 0,16,32,45 / img2img 32,45, cfg none / self, guidance 1.2, delta 1).
//
// streamdiffusion.json (optional, in the model folder; every field optional; unknown fields or wrong types are a
// FormatError naming the field):
//   {
//     "size": "64x64" | [64, 64] | 64,          native output size (WIDTHxHEIGHT, multiples of 8)
//     "num_inference_steps": 50,
//     "t_index_list": [0, 16, 32, 45], "cfg_type": "none", "guidance": 1.2, "delta": 1.0,   both modes
//     "txt2img": { same four fields },          per mode, over the top-level ones
//     "img2img": { same four fields },
//     "cpu_dtype": "fp32" | "bf16",             what --dtype auto runs on a CPU (else the machine's rule: bf16
//                                               where the CPU computes it natively); a flag still wins
//     "cpu_threads": 1,                         the intra-op threads of --threads 0 (the default: every core) on a
//                                               CPU; a flag (--threads N) still wins
//     "note": "free text"
//   }
// Without it the family is recognised from the configs (cross_attention_dim 768 = SD 1.x, 1024 = SD 2.x, 2048 or a
// text_encoder_2 = SDXL; turbo from an Euler "trailing" scheduler or "turbo" in the folder name; LCM-distilled from
// time_cond_proj_dim, an LCMScheduler in model_index.json or "lcm" in the name).
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace sd {

// Settings of one mode; unset = no recommendation.
struct ModeRecommendation {
  std::optional<std::vector<int64_t>> t_index_list;
  std::optional<std::string> cfg_type;
  std::optional<double> guidance;
  std::optional<double> delta;
};

struct ModelDefaults {
  std::string family = "unknown";  // sd15 | sd21 | sd-turbo | sdxl | sdxl-turbo | lcm | unknown (+ "-lcm")
  // The model's native output size: UNet sample_size x VAE scale factor (0 when it cannot be told).
  int64_t native_width = 0, native_height = 0;
  std::string native_size_reason;  // "UNet sample_size 8 x VAE scale factor 8" / "streamdiffusion.json"
  std::optional<int64_t> num_inference_steps;
  ModeRecommendation txt2img, img2img;
  std::string settings_source;  // "streamdiffusion.json", "family defaults (sd-turbo)", "built-in defaults"
  std::vector<std::string> warnings;  // e.g. plain SD without LCM: few-step output needs an LCM-LoRA or a turbo model
  std::string note;                   // streamdiffusion.json's "note"
  // streamdiffusion.json's "cpu_dtype" ("fp32" | "bf16"): a model small enough that bf16's conversions outweigh its
  // arithmetic (the built-in 64x64 model ran at half the fp32 frame rate in bf16) names fp32 here.
  std::optional<std::string> cpu_dtype;
  // streamdiffusion.json's "cpu_threads" (1..1024): a model too small to gain from a thread team names its count here
  // (the built-in model streamed at 90 fps on 1 thread and 44 on 2, on a 2-core machine).
  std::optional<int64_t> cpu_threads;

  const ModeRecommendation& mode(bool txt2img_mode) const { return txt2img_mode ? txt2img : img2img; }
};

// Reads the folder's configs (never weights). A single-file checkpoint is read through `config_dir` (--config: its
// configs and streamdiffusion.json) or else through the configs its tensor names and shapes tell (headers only). A
// path that is neither gives empty defaults (loading reports that later); a malformed streamdiffusion.json is a
// FormatError naming the file and field.
// `prediction_type` (--prediction-type) picks the SD 2.x variant of a single file (v_prediction = the 768 px model).
ModelDefaults read_model_defaults(const std::string& model_path, const std::string& config_dir = "",
                                  const std::string& prediction_type = "");

// Parses a streamdiffusion.json document into `d` (fields present override); `file` names errors.
void apply_recommendations_json(const std::string& json_text, const std::string& file, ModelDefaults& d);

// The dtype name to resolve (sd::parse_dtype) for a `requested` one ("auto", "fp32", ...) on a CPU or not: "auto"
// on a CPU becomes the model's cpu_dtype where it names one; anything else is returned as given.
std::string dtype_request(const ModelDefaults& d, const std::string& requested, bool on_cpu);
// The intra-op thread count for a `requested` one (0 = every core, the default; < 0 = leave as is): 0 on a CPU becomes
// the model's cpu_threads where it names one; anything else is returned as given.
int threads_request(const ModelDefaults& d, int requested, bool on_cpu);

// The name of the recommendations file in a model folder.
inline const char* kRecommendationsFile = "streamdiffusion.json";

}  // namespace sd
