// Single-file checkpoints (io/ldm_checkpoint.h, io/checkpoint_convert.h): what `--model file.safetensors`, a bare VAE
// file, an original ControlNet file and TAESD's original files go through before any module is built: layout and
// family detection, the inferred diffusers configs (read by the components' from_json as the loader does), the key
// tables gathered from the file (tables of the tiny fixture models, when SD_FIXTURES is set) and the TAESD key mapping.
// The file comes from fuzz_util.h's FileImage (input = header JSON, NUL, data bytes; zeros pad the data region to
// 64 MiB, sparse). Every input must either convert or throw sd::Error (FormatError naming the file).
#include <cstdint>
#include <cstdlib>
#include <optional>

#include <torch/torch.h>

#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "io/checkpoint_convert.h"
#include "io/ldm_checkpoint.h"
#include "io/safetensors.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/controlnet.h"
#include "models/unet_2d_condition.h"
#include "pipeline/lcm_scheduler.h"

namespace {

using namespace sd;

struct Tables {
  std::optional<convert::LdmTable> unet, vae, text;
  convert::ShapeMap unet_shapes, vae_shapes, text_shapes;
};

// The diffusers keys / shapes of a fixture component (what the loader takes from the module built from the config).
std::vector<std::string> fixture_keys(const std::string& file, convert::ShapeMap& shapes) {
  const auto f = SafeTensorsFile::open(file);
  std::vector<std::string> keys;
  for (const auto& t : f.tensors()) {
    keys.push_back(t.name);
    shapes[t.name] = t.shape;
  }
  return keys;
}

Tables make_tables() {
  Tables t;
  const char* fix = std::getenv("SD_FIXTURES");
  if (!fix) return t;
  const std::string m = std::string(fix) + "/models/tiny-sd15/";
  try {
    t.unet = convert::unet_ldm_table(fixture_keys(m + "unet/diffusion_pytorch_model.safetensors", t.unet_shapes));
    t.vae = convert::vae_ldm_table(fixture_keys(m + "vae/diffusion_pytorch_model.safetensors", t.vae_shapes));
    t.text = convert::text_encoder_ldm_table(fixture_keys(m + "text_encoder/model.safetensors", t.text_shapes),
                                             convert::TextEncoderLayout::HfClip);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_single_file: no conversion tables (%s)\n", e.what());
  }
  return t;
}

template <class F>
void expect_sd_error(const std::string& path, F&& f) {
  try {
    f();
  } catch (const FormatError& e) {
    // Inferred configs are named "<path> (inferred ...)".
    if (e.file().rfind(path, 0) != 0) {
      std::fprintf(stderr, "error does not name the file %s: %s\n", path.c_str(), e.what());
      std::abort();
    }
  } catch (const InvalidArgument&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Tables tables = make_tables();
  static fuzz::FileImage image;
  const std::string& path = image.write(data, size, 64u << 20);
  std::optional<SafeTensorsFile> file;
  try {
    file = SafeTensorsFile::open(path);
  } catch (const FormatError& e) {
    fuzz::expect_names_file(e, path);
    return 0;
  }
  const SafeTensorsFile& f = *file;
  if (convert::is_ldm_checkpoint(f)) {
    expect_sd_error(path, [&] {
      const auto info = convert::inspect_ldm_checkpoint(f, size % 2 ? "" : "v_prediction");
      const std::string src = path + " (inferred config)";
      if (info.has_unet) UNet2DConditionConfig::from_json(info.unet_config, src);
      if (info.has_vae) AutoencoderKLConfig::from_json(info.vae_config, src);
      if (info.has_text_encoder) CLIPTextConfig::from_json(info.text_encoder_config, src);
      if (info.has_text_encoder_2) CLIPTextConfig::from_json(info.text_encoder_2_config, src);
      LCMSchedulerConfig::from_json(info.scheduler_config, src);
    });
    std::vector<const convert::LdmTable*> used;
    if (tables.unet) {
      expect_sd_error(path, [&] { convert::gather_ldm(f, *tables.unet, "UNet", tables.unet_shapes); });
      used.push_back(&*tables.unet);
    }
    if (tables.vae) {
      expect_sd_error(path, [&] { convert::gather_ldm(f, *tables.vae, "VAE", tables.vae_shapes); });
      used.push_back(&*tables.vae);
    }
    if (tables.text) {
      expect_sd_error(path, [&] { convert::gather_ldm(f, *tables.text, "text encoder", tables.text_shapes); });
      used.push_back(&*tables.text);
    }
    expect_sd_error(path, [&] { convert::unused_ldm_keys(f, used); });
  }
  expect_sd_error(path, [&] {
    const auto v = convert::inspect_vae_file(f);
    AutoencoderKLConfig::from_json(v.config, path + " (inferred AutoencoderKL config)");
  });
  if (convert::is_ldm_controlnet(f)) {
    expect_sd_error(path, [&] {
      const auto c = convert::inspect_controlnet_file(f);
      ControlNetConfig::from_json(c.config, path + " (inferred ControlNet config)");
    });
  }
  for (const auto& t : f.tensors()) {
    for (auto half : {convert::TaesdHalf::Encoder, convert::TaesdHalf::Decoder}) {
      expect_sd_error(path, [&] {
        const std::string k = convert::taesd_key_to_diffusers(t.name, half, path);
        const auto back = convert::taesd_key_from_diffusers(k);
        if (back.first != half || back.second != t.name) {
          std::fprintf(stderr, "TAESD key %s -> %s -> %s does not round-trip\n", t.name.c_str(), k.c_str(),
                       back.second.c_str());
          std::abort();
        }
      });
    }
  }
  return 0;
}
