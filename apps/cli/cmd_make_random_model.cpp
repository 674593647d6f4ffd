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

template <typename M>
std::vector<std::string> module_keys(const M& m) {
  std::vector<std::string> keys;
  for (const auto& kv : sd::state_dict(*m)) keys.push_back(kv.first);
  return keys;
}

// The diffusers folder `dir` as one original-layout (LDM) file, through the inverse of the load-time tables
// (io/ldm_checkpoint): UNet, VAE and text encoder (HF CLIP names, or OpenCLIP with fused in_proj for SD 2.x), plus
// what real files carry and SD does not use (OpenCLIP: one more resblock, text_projection, logit_scale; the 12 DDPM
// buffers). Tensors are the folder's memory-mapped ones (no copy but the fused in_proj).
uint64_t write_ldm_single_file(const std::string& dir, const std::string& path, bool open_clip, uint64_t seed) {
  namespace cv = sd::convert;
  std::vector<std::pair<std::string, torch::Tensor>> out;
  auto append = [&](std::vector<std::pair<std::string, torch::Tensor>> v) {
    for (auto& kv : v) out.push_back(std::move(kv));
  };
  const auto cfg = [&](const std::string& sub) {
    const std::string p = dir + "/" + sub + "/config.json";
    return std::make_pair(sd::read_json_file(p), p);
  };
  const auto [uj, up] = cfg("unet");
  const auto ufile = sd::SafeTensorsFile::open(sd::find_weights(dir + "/unet"));
  append(cv::scatter_ldm(ufile.load_all(), cv::unet_ldm_table(module_keys(
                                               sd::UNet2DConditionModel(sd::UNet2DConditionConfig::from_json(uj, up))))));
  const auto [vj, vp] = cfg("vae");
  const auto vfile = sd::SafeTensorsFile::open(sd::find_weights(dir + "/vae"));
  append(cv::scatter_ldm(vfile.load_all(),
                         cv::vae_ldm_table(module_keys(sd::AutoencoderKL(sd::AutoencoderKLConfig::from_json(vj, vp))))));
  const auto [tj, tp] = cfg("text_encoder");
  const auto tcfg = sd::CLIPTextConfig::from_json(tj, tp);
  const auto tfile = sd::SafeTensorsFile::open(sd::find_weights(dir + "/text_encoder"));
  auto tw = tfile.load_all();
  tw.erase("text_model.embeddings.position_ids");
  const auto layout = open_clip ? cv::TextEncoderLayout::OpenClip : cv::TextEncoderLayout::HfClip;
  auto text = cv::scatter_ldm(tw, cv::text_encoder_ldm_table(module_keys(sd::CLIPTextModel(tcfg)), layout));
  if (open_clip) {
    // SD 2.x conditions on the penultimate layer: real files store one more resblock (random here).
    auto g = at::detail::createCPUGenerator(seed + 1000);
    const std::string last = std::string(cv::kOpenClipPrefix) + "transformer.resblocks." +
                             std::to_string(tcfg.num_hidden_layers - 1) + ".";
    const std::string extra = std::string(cv::kOpenClipPrefix) + "transformer.resblocks." +
                              std::to_string(tcfg.num_hidden_layers) + ".";
    std::vector<std::pair<std::string, torch::Tensor>> more;
    for (const auto& [k, t] : text)
      if (k.rfind(last, 0) == 0) more.emplace_back(extra + k.substr(last.size()), torch::randn(t.sizes(), g).to(t.dtype()) * 0.02);
    for (auto& kv : more) text.push_back(std::move(kv));
    const auto dt = text.front().second.dtype();
    text.emplace_back(std::string(cv::kOpenClipPrefix) + "text_projection",
                      torch::randn({tcfg.hidden_size, tcfg.hidden_size}, g).to(dt) * 0.02);
    text.emplace_back(std::string(cv::kOpenClipPrefix) + "logit_scale", torch::tensor(4.6052f).to(dt));
  } else {
    text.emplace_back(std::string(cv::kHfClipPrefix) + "text_model.embeddings.position_ids",
                      torch::arange(tcfg.max_position_embeddings, torch::kLong).view({1, -1}));
  }
  append(std::move(text));
  // LatentDiffusion's DDPM buffers (computed in float64, stored float32), unused by diffusers and by the loader.
  {
    auto o = torch::TensorOptions().dtype(torch::kFloat64);
    const auto betas = torch::linspace(std::sqrt(0.00085), std::sqrt(0.012), 1000, o).pow(2);
    const auto alphas = 1 - betas;
    const auto ac = torch::cumprod(alphas, 0);
    const auto ac_prev = torch::cat({torch::ones({1}, o), ac.slice(0, 0, 999)});
    const auto pv = betas * (1 - ac_prev) / (1 - ac);
    const std::vector<std::pair<std::string, torch::Tensor>> bufs = {
        {"betas", betas},
        {"alphas_cumprod", ac},
        {"alphas_cumprod_prev", ac_prev},
        {"sqrt_alphas_cumprod", ac.sqrt()},
        {"sqrt_one_minus_alphas_cumprod", (1 - ac).sqrt()},
        {"log_one_minus_alphas_cumprod", (1 - ac).log()},
        {"sqrt_recip_alphas_cumprod", (1 / ac).sqrt()},
        {"sqrt_recipm1_alphas_cumprod", (1 / ac - 1).sqrt()},
        {"posterior_variance", pv},
        {"posterior_log_variance_clipped", pv.clamp_min(1e-20).log()},
        {"posterior_mean_coef1", betas * ac_prev.sqrt() / (1 - ac)},
        {"posterior_mean_coef2", (1 - ac_prev) * alphas.sqrt() / (1 - ac)}};
    for (const auto& [k, t] : bufs) out.emplace_back(k, t.to(torch::kFloat32));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  sd::save_safetensors(path, out, {{"format", "pt"}, {"generator", "streamdiffusion make-random-model --single-file"}});
  return sd::file_size_bytes(path);
}

sd::cli::Runner setup_make_random_model(CLI::App& app) {
  auto o = std::make_shared<sd::RandomModelOptions>();
  auto dtype = std::make_shared<std::string>("fp32");
  auto no_taesd = std::make_shared<bool>(false);
  auto single_file = std::make_shared<std::string>();
  app.add_option("--arch", o->arch,
                 "sd-turbo | sd15 | bk-sdm-tiny (nota-ai, 323M-parameter UNet) | sdxs-512 (IDKiro sdxs-512-0.9, 328M) | "
                 "sdxl-turbo (SDXL UNet 2.57B, two text encoders, TAESDXL; 512 px) | sdxl (the same, 1024 px)")
      ->capture_default_str()
      ->check(CLI::IsMember({"sd-turbo", "sd15", "bk-sdm-tiny", "sdxs-512", "sdxl-turbo", "sdxl"}));
  app.add_option("--out", o->out_dir, "output folder (created)")->required();
  app.add_option("--tokenizer", o->tokenizer_dir,
                 "CLIP tokenizer folder to copy (vocab.json + merges.txt), e.g. <a model>/tokenizer")
      ->required();
  app.add_option("--seed", o->seed, "random seed")->capture_default_str();
  app.add_option("--weights-dtype", *dtype, "dtype of the written weights: fp32 | bf16 | fp16")->capture_default_str();
  app.add_flag("--no-taesd", *no_taesd, "do not write the taesd/ folder");
  app.add_option("--single-file", *single_file,
                 "also write the model as one original-layout (LDM / CompVis) .safetensors checkpoint, as "
                 "published single files are (SD 2.x architectures with the OpenCLIP text-encoder layout)");
  return [o, dtype, no_taesd, single_file] {
    sd::set_threads(0);
    o->dtype = sd::parse_dtype(*dtype);
    o->with_taesd = !*no_taesd;
    const auto t0 = std::chrono::steady_clock::now();
    auto r = sd::write_random_model(*o);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << "wrote " << o->out_dir << " (" << o->arch << ", " << *dtype << ") in " << s << " s: unet "
              << r.unet_parameters << ", vae " << r.vae_parameters << ", text_encoder " << r.text_encoder_parameters;
    if (r.text_encoder_2_parameters > 0) std::cout << ", text_encoder_2 " << r.text_encoder_2_parameters;
    std::cout << ", taesd " << r.taesd_parameters << " parameters; " << r.bytes_written / (1024 * 1024) << " MiB\n";
    if (!single_file->empty()) {
      if (o->arch == "sdxl-turbo" || o->arch == "sdxl")
        throw sd::InvalidArgument("--single-file is not available for SDXL architectures yet (SDXL single files "
                                  "are not loaded either)");
      const auto t1 = std::chrono::steady_clock::now();
      const uint64_t bytes = write_ldm_single_file(o->out_dir, *single_file, o->arch == "sd-turbo", o->seed);
      std::cout << "wrote " << *single_file << " (original LDM layout) in "
                << std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count() << " s; "
                << bytes / (1024 * 1024) << " MiB\n";
    }
    return 0;
  };
}

REGISTER_COMMAND("make-random-model",
                 "write a full-size diffusers folder (sd-turbo, SD 1.5, BK-SDM-Tiny, SDXS-512, SDXL-Turbo or SDXL architecture) with random weights", 90,
                 setup_make_random_model);

}  // namespace
