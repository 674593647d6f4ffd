#pragma once
// The server defaults the WebSocket / HTTP API targets run against: every optional feature on (two ControlNets, two
// LoRAs, an IP-Adapter) so that every settings field is reachable; small sizes keep decoding and resizing cheap.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "pipeline/control_guidance.h"
#include "server/stream_settings.h"

namespace sd::fuzz {

inline server::StreamDefaults server_defaults() {
  server::StreamDefaults d;
  for (StreamConfig* c : {&d.img2img, &d.txt2img}) {
    c->width = 64;
    c->height = 64;
  }
  d.txt2img.t_index_list = {0};
  d.max_width = 256;
  d.max_height = 128;
  d.controlnets.resize(2);
  d.control_preprocessors = {"canny", "feedback"};
  d.lora_names = {"lcm", "style"};
  d.ip_adapter = true;
  d.prompt = "a cat";
  return d;
}

// What every accepted settings object must satisfy (the stream and the model thread rely on it).
inline void check_settings(const server::StreamSettings& s, const server::StreamDefaults& d) {
  const int64_t S = (s.txt2img ? d.txt2img : d.img2img).num_inference_steps;
  bool ok = !s.t_index_list.empty() && s.t_index_list.size() <= 10 && s.prompt.size() <= 2000 &&
            s.negative_prompt.size() <= 2000 && std::isfinite(s.guidance) && s.guidance >= 0 && s.guidance <= 20 &&
            std::isfinite(s.delta) && s.delta >= 0 && s.delta <= 10 && s.seed <= (uint64_t{1} << 53) &&
            s.similarity_filter >= 0 && s.similarity_filter < 1 && (!s.txt2img || s.similarity_filter == 0) &&
            s.controlnets.size() == d.controlnets.size();
  for (int64_t t : s.t_index_list) ok = ok && t >= 0 && t < S;
  for (const auto& [name, scale] : s.lora) ok = ok && std::isfinite(scale) && scale >= -10 && scale <= 10;
  for (const auto& c : s.controlnets)
    ok = ok && c.scale >= 0 && c.scale <= 2 && !c.preprocessor.empty() &&
         valid_control_guidance(c.guidance_start, c.guidance_end);
  if (s.ip_adapter_scale) ok = ok && *s.ip_adapter_scale >= 0 && *s.ip_adapter_scale <= 2;
  if (!s.control_image.empty())
    ok = ok && s.control_image.type() == CV_8UC3 && s.control_image.cols == d.img2img.width &&
         s.control_image.rows == d.img2img.height;
  if (!s.image_prompt.empty()) ok = ok && s.image_prompt.type() == CV_8UC3;
  if (!ok) {
    std::fprintf(stderr, "accepted settings break an invariant: %s\n",
                 s.to_json().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    std::abort();
  }
  // The "config" reply (strings may hold invalid UTF-8: the server dumps with replace).
  (void)s.to_json().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  (void)s.config(d);
}

}  // namespace sd::fuzz
