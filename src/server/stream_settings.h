#pragma once
// What a client may set on its stream (WebSocket "config" messages) or per request (HTTP API), validated as JSON.
//
// Fields (all optional; absent = unchanged / the server's default):
//   mode              "img2img" | "txt2img"        (WebSocket only; the API picks it by endpoint)
//   prompt            string, at most 2000 bytes
//   negative_prompt   string, at most 2000 bytes   (used when guidance is active with cfg full / initialize)
//   guidance          number in [0, 20]            (active when > 1; ignored by cfg none)
//   delta             number in [0, 10]            (RCFG δ)
//   t_index_list      array of 1..10 integers in [0, num_inference_steps)
//   steps             integer 1..10: that many indices spread evenly (txt2img from 0, img2img from start_index);
//                     not together with t_index_list
//   seed              integer in [0, 2^53]
//   similarity_filter number in [0, 1): threshold of the stochastic similarity filter, 0 = off (img2img only)
//   lora              object {name: scale}, scales in [-10, 10], names of the LoRAs the server loaded (--lora,
//                     name = file stem). SERVER-WIDE: the one loaded model is re-fused at that scale (no reload), so
//                     every client sees it; streams re-encode their prompts. A request, applied once by the model
//                     thread; the "config" reply carries the model's current scales.
//   controlnets       array [{scale, preprocessor, guidance_start, guidance_end}], one entry per ControlNet the
//                     server loaded (--controlnet; the hello message lists them), in that order; any key of an entry
//                     may be left out (unchanged). scale: number in [0, 2] (0 = that ControlNet is skipped, exactly
//                     as without it); preprocessor: a control_preprocessor_names() spec ("canny", "canny:50:150",
//                     "gray", "passthrough", "feedback" = this client's previous output frame); guidance_start /
//                     guidance_end: numbers, 0 <= start < end <= 1 once both are applied, the share of the steps of
//                     t_index_list the ControlNet conditions (diffusers' control_guidance_start / _end; default
//                     serve's --control-guidance-start / -end). Per client. Equal t_index_list entries that a range
//                     tells apart (one step kept, the other not) are refused: the stream tells rows by timestep.
//   control_image     base64 / data-URL JPEG or PNG, or null: a static control image for every ControlNet of this
//                     client (centre-cropped and resized to the stream size) instead of preprocessing each input
//                     frame, until cleared with null. txt2img needs it unless the preprocessors are `feedback` (or the
//                     ControlNets do not run: scale 0, or a range keeping no step): there are no input frames to
//                     preprocess.
//   image_prompt      base64 / data-URL JPEG or PNG, or null (servers with --ip-adapter): this client's IP-Adapter
//                     image prompt (null = none: the unconditional image). Per client.
//   ip_adapter_scale  number in [0, 2] (servers with --ip-adapter). SERVER-WIDE like lora: the weight of the image
//                     attention of the one loaded model, a request applied once by the model thread.
//   prompt_list       array of 1..16 [text, weight] pairs (or {"text", "weight"} objects), texts as prompt, weights
//                     in [0, 100] (normalised; at least one > 0): a prompt blend used instead of prompt; [] or null =
//                     back to prompt. Sending prompt clears it. Only new texts are encoded.
//   seed_list         array of 1..16 [seed, weight] pairs, seeds as seed, weights in [0, 100]: the init noise is the
//                     variance-preserving blend of the seeds' noise, instead of seed; [] or null = back to seed.
//                     Sending seed clears it.
//   transition        how prompt / prompt_list / seed / seed_list changes morph: a number of seconds in [0, 60], or a
//                     string "2.5s" / "30f" (frames, at most 3600); 0 = at once. Applied before the other fields of
//                     the same message.
//   prompt_blend      "linear" | "slerp"
//   latent_feedback   number in [0, 1]: img2img input latent = (1 - a)·encoded frame + a·previous output latent
// Any other field -> InvalidArgument naming it (nothing of the message is applied).
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <opencv2/core/mat.hpp>

#include "pipeline/control_guidance.h"
#include "pipeline/stream_diffusion.h"

namespace sd::server {

// The server's defaults (from the command line).
struct StreamDefaults {
  StreamConfig img2img;  // base configs: size, cfg type, num_inference_steps, frame buffer, default t_index_list, ...
  StreamConfig txt2img;
  std::string prompt, negative_prompt;
  std::vector<WeightedPrompt> prompt_list;  // --prompt-list (empty = prompt)
  bool txt2img_mode = false;  // mode of a new WebSocket client
  int64_t start_index = 32;   // first index of `steps` for img2img
  int64_t native_width = 0, native_height = 0;  // the model's native size (0 = unknown), told to the page
  // The largest width / height an API request may ask for (serve --max-size); 0 = the stream size (no larger).
  int64_t max_width = 0, max_height = 0;
  std::vector<std::string> lora_names;  // the LoRAs loaded (what "lora" may name)
  // ControlNets loaded at start (--controlnet): shared by every client and never changed; each client's stream gets
  // them with its own scales, preprocessors and guidance ranges. The defaults of a new client: the units' scales and
  // ranges and these specs.
  std::vector<ControlNetUnit> controlnets;
  std::vector<std::string> control_preprocessors;  // one spec per ControlNet
  int64_t controlnet_every = 1;                    // --controlnet-every (server-wide)
  bool ip_adapter = false;                         // the model has an IP-Adapter (image_prompt, ip_adapter_scale)
  cv::Mat image_prompt;                            // --image-prompt: a new client's image prompt (RGB; empty = none)
};

// One loaded ControlNet as a client uses it.
struct ControlSetting {
  double scale = 1.0;
  std::string preprocessor;  // a make_control_preprocessor() spec
  double guidance_start = 0.0, guidance_end = 1.0;  // ControlNetUnit's range
  // Whether the stream runs this ControlNet over a t_index_list of `steps` entries: not at scale 0, nor with a range
  // that keeps none of its steps. One that does not run needs no control image.
  bool runs(size_t steps) const {
    return scale != 0 && control_guidance_keeps_any(guidance_start, guidance_end, static_cast<int64_t>(steps));
  }
  bool operator==(const ControlSetting& o) const {
    return scale == o.scale && preprocessor == o.preprocessor && guidance_start == o.guidance_start &&
           guidance_end == o.guidance_end;
  }
};

struct StreamSettings {
  bool txt2img = false;
  std::string prompt, negative_prompt;
  double guidance = 1.2, delta = 1.0;
  std::vector<int64_t> t_index_list;
  uint64_t seed = 2;
  double similarity_filter = 0;  // threshold, 0 = off
  // Requested LoRA scales (server-wide; consumed by the model thread, not compared, not in to_json()).
  std::map<std::string, double> lora;
  std::vector<ControlSetting> controlnets;  // one per StreamDefaults::controlnets
  // Decoded images (RGB 8UC3; empty = none). Compared by buffer: a new message decodes into a new one. control_image
  // is already fitted to the stream size.
  cv::Mat control_image, image_prompt;
  // Requested IP-Adapter scale (server-wide like lora; consumed by the model thread, not in to_json()).
  std::optional<double> ip_adapter_scale;
  // Live performance controls (pipeline/prompt_blend.h); empty lists = prompt / seed alone.
  std::vector<WeightedPrompt> prompt_list;
  std::vector<WeightedSeed> seed_list;
  Transition transition;
  BlendMethod prompt_blend = BlendMethod::Linear;
  double latent_feedback = 0;
  // The prompts the stream conditions on: prompt_list, else {{prompt, 1}}.
  std::vector<WeightedPrompt> prompts() const;

  static StreamSettings defaults(const StreamDefaults& d, bool txt2img);
  // The base config of the mode with these settings applied.
  StreamConfig config(const StreamDefaults& d) const;
  // The server's shared ControlNets with this client's scales and guidance ranges (StreamDiffusion::set_controlnets).
  std::vector<ControlNetUnit> control_units(const StreamDefaults& d) const;
  // The fields a client may send, in their JSON form; images as "has_control_image" / "has_image_prompt" booleans.
  nlohmann::json to_json() const;
  bool operator==(const StreamSettings& o) const;
  bool operator!=(const StreamSettings& o) const { return !(*this == o); }
};

// Applies the fields of the JSON object `j` to a copy of `s` and returns it; fields in `skip` are ignored (e.g.
// "type", "image"), `allow_mode` false refuses "mode". Throws sd::InvalidArgument naming the field and what was
// expected; `s` itself is never partly changed.
StreamSettings apply_settings_json(const nlohmann::json& j, const StreamSettings& s, const StreamDefaults& d,
                                   const std::set<std::string>& skip, bool allow_mode = true);

}  // namespace sd::server
