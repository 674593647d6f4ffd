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
// Any other field -> InvalidArgument naming it (nothing of the message is applied).
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "pipeline/stream_diffusion.h"

namespace sd::server {

// The server's defaults (from the command line).
struct StreamDefaults {
  StreamConfig img2img;  // base configs: size, cfg type, num_inference_steps, frame buffer, default t_index_list, ...
  StreamConfig txt2img;
  std::string prompt, negative_prompt;
  bool txt2img_mode = false;  // mode of a new WebSocket client
  int64_t start_index = 32;   // first index of `steps` for img2img
  int64_t native_width = 0, native_height = 0;  // the model's native size (0 = unknown), told to the page
  std::vector<std::string> lora_names;  // the LoRAs loaded (what "lora" may name)
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

  static StreamSettings defaults(const StreamDefaults& d, bool txt2img);
  // The base config of the mode with these settings applied.
  StreamConfig config(const StreamDefaults& d) const;
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
