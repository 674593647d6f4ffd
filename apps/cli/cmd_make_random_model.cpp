// `streamdiffusion make-random-model`: a full-size diffusers folder with random weights in a real architecture.
#include <chrono>
#include <iostream>

#include "apps/cli/commands.h"
#include "core/device.h"
#include "models/random_model.h"

namespace {

sd::cli::Runner setup_make_random_model(CLI::App& app) {
  auto o = std::make_shared<sd::RandomModelOptions>();
  auto dtype = std::make_shared<std::string>("fp32");
  auto no_taesd = std::make_shared<bool>(false);
  app.add_option("--arch", o->arch,
                 "sd-turbo | sd15 | bk-sdm-tiny (nota-ai, 323M-parameter UNet) | sdxs-512 (IDKiro sdxs-512-0.9, 328M)")
      ->capture_default_str()
      ->check(CLI::IsMember({"sd-turbo", "sd15", "bk-sdm-tiny", "sdxs-512"}));
  app.add_option("--out", o->out_dir, "output folder (created)")->required();
  app.add_option("--tokenizer", o->tokenizer_dir,
                 "CLIP tokenizer folder to copy (vocab.json + merges.txt), e.g. <a model>/tokenizer")
      ->required();
  app.add_option("--seed", o->seed, "random seed")->capture_default_str();
  app.add_option("--weights-dtype", *dtype, "dtype of the written weights: fp32 | bf16 | fp16")->capture_default_str();
  app.add_flag("--no-taesd", *no_taesd, "do not write the taesd/ folder");
  return [o, dtype, no_taesd] {
    sd::set_threads(0);
    o->dtype = sd::parse_dtype(*dtype);
    o->with_taesd = !*no_taesd;
    const auto t0 = std::chrono::steady_clock::now();
    auto r = sd::write_random_model(*o);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << "wrote " << o->out_dir << " (" << o->arch << ", " << *dtype << ") in " << s << " s: unet "
              << r.unet_parameters << ", vae " << r.vae_parameters << ", text_encoder " << r.text_encoder_parameters
              << ", taesd " << r.taesd_parameters << " parameters; " << r.bytes_written / (1024 * 1024) << " MiB\n";
    return 0;
  };
}

REGISTER_COMMAND("make-random-model",
                 "write a full-size diffusers folder (sd-turbo, SD 1.5, BK-SDM-Tiny or SDXS-512 architecture) with random weights", 90,
                 setup_make_random_model);

}  // namespace
