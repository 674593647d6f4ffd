// `streamdiffusion eval`: how good an emoji model is (src/train/emoji_eval.h): the autoencoder's reconstruction
// PSNR / SSIM over every emoji, retrieval top-1 / top-5 of the images generated for the 50 test names among all emoji
// at 1, 2 and 4 steps, and their sharpness against the real emoji. The built-in model by default.
#include <chrono>
#include <fstream>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "apps/cli/commands.h"
#include "apps/cli/pipeline_options.h"
#include "core/device.h"
#include "core/error.h"
#include "pipeline/diffusion_models.h"
#include "train/emoji_eval.h"

namespace {

struct EvalCliOptions {
  std::string model, data, style = "google", json, steps = "1,2,4";
  std::string variant;  // --variant
  int threads = 0;
  bool per_name = false, no_reconstruction = false;
  uint64_t seed = 2;
};

std::vector<int> parse_steps(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    int v = 0;
    try {
      v = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != item.size() || v < 1 || v > 46)
      throw sd::InvalidArgument("--steps: '" + item + "' is not a step count in [1, 46] (list like 1,2,4)");
    out.push_back(v);
  }
  if (out.empty()) throw sd::InvalidArgument("--steps: give at least one step count (like 1,2,4)");
  return out;
}

sd::cli::Runner setup_eval(CLI::App& app) {
  auto o = std::make_shared<EvalCliOptions>();
  app.add_option("--model", o->model, "diffusers model folder (default: the shipped models/emoji-tiny)");
  sd::cli::add_variant_option(app, o->variant, o->model);
  app.add_option("--data", o->data,
                 "emoji cache folder holding node_modules/emoji-datasource-* (default: $SD_EMOJI_DATA or "
                 "~/.cache/streamdiffusion/emoji; scripts/fetch-emoji-data.sh installs it)");
  app.add_option("--style", o->style, "emoji-datasource style to measure against")->capture_default_str();
  app.add_option("--steps", o->steps, "txt2img step counts to measure (1: t 999; 2: 0,45; 4: 0,16,32,45)")
      ->capture_default_str();
  app.add_option("--seed", o->seed, "noise seed of the generated images")->capture_default_str();
  app.add_option("--json", o->json, "also write the result (with every name's ranks) as JSON to this file");
  app.add_flag("--per-name", o->per_name, "print every name's retrieval ranks");
  app.add_flag("--no-reconstruction", o->no_reconstruction, "skip the autoencoder measure");
  app.add_option("--threads", o->threads, "libtorch threads (0 = all cores)")
      ->check(CLI::Range(0, 1024))  // more is a typo that would hang the command making threads
      ->capture_default_str();
  return [o] {
    sd::train::EmojiEvalOptions eo;
    eo.steps = parse_steps(o->steps);
    eo.seed = o->seed;
    eo.reconstruction = !o->no_reconstruction;
    if (o->model.empty()) o->model = sd::cli::default_model_dir();
    const std::string data = o->data.empty() ? sd::train::default_emoji_data_dir() : o->data;
    if (!sd::train::emoji_data_available(data, o->style))
      throw sd::InvalidArgument("eval: no emoji data of style '" + o->style + "' in " + data +
                                " (run scripts/fetch-emoji-data.sh, or give --data)");
    const auto t0 = std::chrono::steady_clock::now();
    sd::LoadOptions lo;
    lo.threads = o->threads;
    lo.variant = o->variant;
    const auto models = sd::load_pipeline(o->model, lo);
    const auto ds = sd::train::load_emoji_dataset(data, {o->style}, 64);
    const auto r = sd::train::evaluate_emoji_model(models, ds, eo);
    std::cout << "eval: " << o->model << " against " << ds.size() << " emoji (" << o->style << ", 64x64), seed "
              << o->seed << "\n"
              << sd::train::format_eval(r);
    if (o->per_name)
      for (const auto& s : r.retrieval)
        for (size_t i = 0; i < s.names.size(); ++i)
          std::cout << "  " << s.steps << " step(s) '" << s.names[i] << "': rank " << s.rank_l2[i] << " (L2), "
                    << s.rank_grad[i] << " (gradients)\n";
    if (!o->json.empty()) {
      auto j = sd::train::to_json(r);
      j["model"] = o->model;
      j["style"] = o->style;
      j["seed"] = o->seed;
      std::ofstream f(o->json);
      f << j.dump(2) << "\n";
      if (!f) throw sd::Error("eval: cannot write " + o->json);
    }
    std::cerr << "eval: " << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s\n";
    return 0;
  };
}

REGISTER_COMMAND("eval", "measure an emoji model: autoencoder PSNR/SSIM, retrieval top-1/top-5, sharpness", 86,
                 setup_eval);

}  // namespace
