// Every component's config file as the loaders read it (text -> parse_json_text -> <Component>Config::from_json):
// the first input byte picks the component, the rest is the file's text. Every input must either give a config or
// throw sd::FormatError naming the file; the LCM scheduler is also built from an accepted scheduler config. Kind 8
// is a compiled UNet package's metadata (models/compiled_unet.h: string entries, as AOTInductor keeps them), parsed
// and its UNet config read as the load check reads it.
#include <cstdint>
#include <map>
#include <string>

#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "io/json_config.h"
#include "io/model_folder.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/clip_vision_model.h"
#include "models/compiled_unet.h"
#include "models/controlnet.h"
#include "models/unet_2d_condition.h"
#include "pipeline/lcm_scheduler.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  static const char* kFiles[] = {"unet/config.json",         "controlnet/config.json",   "vae/config.json",
                                 "taesd/config.json",        "text_encoder/config.json", "image_encoder/config.json",
                                 "scheduler/scheduler_config.json", "model_index.json", "unet.pt2"};
  const int kind = data[0] % 9;
  const std::string file = kFiles[kind];
  try {
    const nlohmann::json j = sd::parse_json_text(sd::fuzz::bytes(data + 1, size - 1), file);
    switch (kind) {
      case 0: {
        // What the loaders derive from a config right away.
        const auto c = sd::UNet2DConditionConfig::from_json(j, file);
        (void)c.time_embed_dim();
        (void)c.pooled_text_dim();
        break;
      }
      case 1: sd::ControlNetConfig::from_json(j, file); break;
      case 2: (void)sd::AutoencoderKLConfig::from_json(j, file).spatial_factor(); break;
      case 3: sd::AutoencoderTinyConfig::from_json(j, file); break;
      case 4: sd::CLIPTextConfig::from_json(j, file); break;
      case 5: sd::CLIPVisionConfig::from_json(j, file); break;
      case 6: {
        const sd::LCMScheduler scheduler(sd::LCMSchedulerConfig::from_json(j, file));
        for (int64_t steps : {1, 4, 50}) {
          try {
            const auto ts = scheduler.timesteps(steps);
            for (int64_t t : ts) (void)scheduler.coefficients(t);
          } catch (const sd::InvalidArgument&) {
          }
        }
        break;
      }
      case 7: sd::ModelFolder::from_index(j, "model", file); break;
      case 8: {
        std::map<std::string, std::string> meta;
        if (j.is_object())
          for (const auto& [k, v] : j.items())
            if (v.is_string()) meta[k] = v.get<std::string>();
        const auto info = sd::parse_compiled_unet_metadata(meta, file);
        (void)sd::UNet2DConditionConfig::from_json(sd::parse_json_text(info.config_json, file), file);
        break;
      }
    }
  } catch (const sd::FormatError& e) {
    sd::fuzz::expect_names_file(e, file);
  }
  return 0;
}
