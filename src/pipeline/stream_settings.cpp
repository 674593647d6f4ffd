#include "pipeline/stream_settings.h"

#include <filesystem>

#include "core/error.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"

namespace sd {

int64_t resolve_inference_steps(std::optional<int64_t> requested, const ModelDefaults& d) {
  if (requested) {
    if (*requested < 1) throw InvalidArgument("num_inference_steps must be >= 1, got " + std::to_string(*requested));
    return *requested;
  }
  return d.num_inference_steps.value_or(kBuiltinInferenceSteps);
}

std::vector<int64_t> default_index_list(bool txt2img, int64_t S, const ModelDefaults& d) {
  if (d.mode(txt2img).t_index_list) return *d.mode(txt2img).t_index_list;
  if (txt2img) return S == 50 ? std::vector<int64_t>{0, 16, 32, 45} : std::vector<int64_t>{0};
  return S == 50 ? std::vector<int64_t>{32, 45} : std::vector<int64_t>{S / 2};
}

StreamConfig resolve_stream_config(const StreamRequest& r, bool txt2img, const ModelDefaults& d, StreamConfig c) {
  const ModeRecommendation& rec = d.mode(txt2img);
  c.num_inference_steps = resolve_inference_steps(r.num_inference_steps, d);
  c.t_index_list = r.t_index_list ? *r.t_index_list : default_index_list(txt2img, c.num_inference_steps, d);
  c.cfg_type = parse_cfg_type(r.cfg_type       ? *r.cfg_type
                              : rec.cfg_type   ? *rec.cfg_type
                              : txt2img        ? "none"
                                               : "self");
  c.guidance_scale = r.guidance ? *r.guidance : rec.guidance.value_or(kBuiltinGuidance);
  c.delta = r.delta ? *r.delta : rec.delta.value_or(kBuiltinDelta);
  if (r.width.has_value() != r.height.has_value())
    throw InvalidArgument("give both width and height, or neither (the model's native size)");
  if (r.width) {
    check_image_size(*r.width, *r.height, "size");
    c.width = *r.width;
    c.height = *r.height;
  } else if (d.native_width > 0) {
    check_image_size(d.native_width, d.native_height, "the model's native size");
    c.width = d.native_width;
    c.height = d.native_height;
  } else {
    c.width = c.height = kFallbackSize;
  }
  return c;
}

std::string default_model_dir() {
  const std::string found = find_shipped_folder("emoji-tiny", {"model_index.json"}, "SD_DEFAULT_MODEL");
  if (!found.empty()) return found;
#ifdef SD_SOURCE_DIR
  return (std::filesystem::path(SD_SOURCE_DIR) / "models" / "emoji-tiny").string();
#else
  return "models/emoji-tiny";
#endif
}

}  // namespace sd
