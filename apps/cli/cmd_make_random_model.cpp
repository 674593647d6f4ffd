// `streamdiffusion make-random-model`: a full-size diffusers folder with random weights in a real architecture.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>

#include "apps/cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/ldm_checkpoint.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/random_model.h"
#include "models/unet_2d_condition.h"

namespace {

sd::cli::Runner setup_make_random_model(CLI::App& app) {
  auto o = std::make_shared<sd::RandomModelOptions>();
  auto dtype = std::make_shared<std::string>("fp32");
  auto no_taesd = std::make_shared<bool>(false);
  auto single_file = std::make_shared<std::string>();
  app.add_option("--arch", o->arch,
                 "sd-turbo | sd15 | bk-sdm-tiny (nota-ai, 323M-parameter UNet) | sdxs-512 (IDKiro sdxs-512-0.9, 328M) | "
                 "sdxl-turbo (SDXL UNet 2.57B, two text encoders, TAESDXL; 512 px) | sdxl (the same, 1024 px) | "
                 "controlnet-sd15 (a ControlNet folder: lllyasviel control_v11p_sd15_* architecture, 361M, for sd15) | "
                 "controlnet-sd21 (thibaud controlnet-sd21-*, for SD 2.1 / sd-turbo) | controlnet (for the UNet of "
                 "--for-model)")
      ->capture_default_str()
      ->check(CLI::IsMember({"sd-turbo", "sd15", "bk-sdm-tiny", "sdxs-512", "sdxl-turbo", "sdxl", "controlnet-sd15",
                             "controlnet-sd21", "controlnet"}));
  app.add_option("--out", o->out_dir, "output folder (created)")->required();
  app.add_option("--tokenizer", o->tokenizer_dir,
                 "CLIP tokenizer folder to copy (vocab.json + merges.txt), e.g. <a model>/tokenizer (required for "
                 "models, not for ControlNets)");
  app.add_option("--for-model", o->for_model,
                 "--arch controlnet: the diffusers model folder whose UNet (unet/config.json) the ControlNet copies");
  app.add_option("--seed", o->seed, "random seed")->capture_default_str();
  app.add_option("--weights-dtype", *dtype, "dtype of the written weights: fp32 | bf16 | fp16")->capture_default_str();
  app.add_flag("--no-taesd", *no_taesd, "do not write the taesd/ folder");
  app.add_option("--single-file", *single_file,
                 "also write the model as one original-layout (LDM / CompVis) .safetensors checkpoint, as "
                 "published single files are (SD 2.x architectures with the OpenCLIP text-encoder layout; SDXL "
                 "architectures in Stability's conditioner.embedders.0 / .1 layout)");
  return [o, dtype, no_taesd, single_file] {
    sd::set_threads(0);
    o->dtype = sd::parse_dtype(*dtype);
    o->with_taesd = !*no_taesd;
    const auto t0 = std::chrono::steady_clock::now();
    if (sd::is_controlnet_arch(o->arch)) {
      if (!single_file->empty()) throw sd::InvalidArgument("make-random-model --single-file: not for ControlNets");
      if (*no_taesd) throw sd::InvalidArgument("make-random-model --no-taesd: not for ControlNets");
      const auto r = sd::write_random_controlnet(*o);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cout << "wrote " << o->out_dir << " (" << o->arch << ", " << *dtype << ") in " << s << " s: ControlNet "
                << r.controlnet_parameters << " parameters; " << r.bytes_written / (1024 * 1024) << " MiB\n";
      return 0;
    }
    auto r = sd::write_random_model(*o);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << "wrote " << o->out_dir << " (" << o->arch << ", " << *dtype << ") in " << s << " s: unet "
              << r.unet_parameters << ", vae " << r.vae_parameters << ", text_encoder " << r.text_encoder_parameters;
    if (r.text_encoder_2_parameters > 0) std::cout << ", text_encoder_2 " << r.text_encoder_2_parameters;
    std::cout << ", taesd " << r.taesd_parameters << " parameters; " << r.bytes_written / (1024 * 1024) << " MiB\n";
    if (!single_file->empty()) {
      const auto t1 = std::chrono::steady_clock::now();
      const uint64_t bytes = sd::write_ldm_single_file(o->out_dir, *single_file, o->arch == "sd-turbo", o->seed);
      std::cout << "wrote " << *single_file << " (original LDM layout) in "
                << std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count() << " s; "
                << bytes / (1024 * 1024) << " MiB\n";
    }
    return 0;
  };
}

REGISTER_COMMAND("make-random-model",
                 "write a full-size diffusers folder (sd-turbo, SD 1.5, BK-SDM-Tiny, SDXS-512, SDXL-Turbo or SDXL architecture, or "
                 "a ControlNet for SD 1.5 / SD 2.1) with random weights", 90,
                 setup_make_random_model);

}  // namespace
