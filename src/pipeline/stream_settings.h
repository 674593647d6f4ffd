#pragma once
// How a stream's settings are resolved when the caller leaves some unset (the CLI's flags, the Python package's
// keyword arguments): per setting, the caller's value > the model's recommendation (pipeline/model_defaults.h: its
// streamdiffusion.json, else its family) > the built-in defaults (50 inference steps; txt2img 0,16,32,45 cfg none,
// img2img 32,45 cfg self; guidance 1.2; delta 1.0; the model's native size, else 512x512).
// One definition, so every front end picks the same settings for the same model.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/model_defaults.h"
#include "pipeline/stream_diffusion.h"

namespace sd {

inline constexpr int64_t kBuiltinInferenceSteps = 50;
inline constexpr double kBuiltinGuidance = 1.2, kBuiltinDelta = 1.0;
inline constexpr int64_t kFallbackSize = 512;  // when the model's native size cannot be told

// What a caller asked for; unset = from the model, else built in.
struct StreamRequest {
  std::optional<std::vector<int64_t>> t_index_list;
  std::optional<int64_t> num_inference_steps;
  std::optional<std::string> cfg_type;
  std::optional<double> guidance, delta;
  std::optional<int64_t> width, height;  // both or neither
};

// The requested count, else the model's, else 50.
int64_t resolve_inference_steps(std::optional<int64_t> requested, const ModelDefaults& d);
// The model's recommended t_index_list for the mode, else the built-in one for `num_inference_steps` steps
// (50: txt2img 0,16,32,45 / img2img 32,45; otherwise txt2img 0 / img2img steps/2).
std::vector<int64_t> default_index_list(bool txt2img, int64_t num_inference_steps, const ModelDefaults& d);
// Fills t_index_list, num_inference_steps, cfg_type, guidance_scale, delta, width and height of `base` (the other
// fields are kept) from the request, the model defaults and the built-in defaults. InvalidArgument for a bad
// cfg_type, a size that is not a positive multiple of 8, or only one of width/height.
StreamConfig resolve_stream_config(const StreamRequest& request, bool txt2img, const ModelDefaults& d,
                                   StreamConfig base = {});

// The model used when none is named: the shipped tiny emoji model (models/emoji-tiny, trained in-house), looked up
// as $SD_DEFAULT_MODEL, then models/emoji-tiny above the executable, in the source tree the engine was built from,
// and in the working directory; the first that holds model_index.json wins, else the source-tree path (which a
// loader reports as missing).
std::string default_model_dir();

}  // namespace sd
