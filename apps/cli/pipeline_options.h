#pragma once
// The pipeline options every command that runs a stream takes (txt2img, img2img, stream), their defaults and their
// translation into a StreamConfig and a loaded model set — one definition so the commands stay consistent.
// Defaults that depend on the mode (t_index_list, cfg_type) are resolved by stream_config(options, txt2img).
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "apps/cli/commands.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"

namespace sd::cli {

struct PipelineOptions {
  CommonOptions common;
  std::string model, taesd, prompt, negative_prompt;
  std::string t_index_list;
  int steps = 0;
  int start_index = 32;
  int num_inference_steps = 50;
  std::string cfg_type;  // "" = none for txt2img, self for img2img
  double guidance = 1.2;
  double delta = 1.0;
  uint64_t seed = 2;
  std::string size = "512x512";
  int frame_buffer_size = 1;
  bool no_denoising_batch = false;
  bool no_add_noise = false;
  double similarity_filter = 0;  // 0 = off (img2img)
  int max_skip_frame = 10;
  std::vector<std::string> loras;  // --lora FILE[:SCALE], repeatable
  std::string lcm_lora;            // --lcm-lora FILE (= --lora FILE:1.0, fused first as in StreamDiffusionWrapper)
  bool strict_lora = false;
  bool lora_live = true;           // keep the unfused weights for live scale changes (txt2img / img2img: off)
};

enum class PipelineMode { Txt2Img, Img2Img, Either };

// Adds --model, --taesd, --prompt, --negative-prompt, --t-index-list, --steps, --start-index (img2img / either),
// --num-inference-steps, --cfg-type, --guidance, --delta, --seed, --size, --frame-buffer-size, --no-denoising-batch,
// --no-add-noise, --similarity-filter and --max-skip-frame (img2img / either), and the common options.
void add_pipeline_options(CLI::App& app, PipelineOptions& o, PipelineMode mode);

// "32,45" -> {32, 45}; InvalidArgument naming the bad item.
std::vector<int64_t> parse_index_list(const std::string& s);
// "512x512" -> {512, 512}, multiples of 8; InvalidArgument otherwise.
std::pair<int64_t, int64_t> parse_size(const std::string& s, const std::string& option = "--size");
// The explicit --t-index-list, or --steps indices spread evenly (txt2img from index 0, img2img from --start-index),
// or the mode's default (txt2img 0,16,32,45 / img2img 32,45 with 50 inference steps).
std::vector<int64_t> index_list_from(const PipelineOptions& o, bool txt2img);
StreamConfig stream_config(const PipelineOptions& o, bool txt2img);

// Adds --lora, --lcm-lora and --strict-lora (add_pipeline_options does; the bench and info call it on their own).
void add_lora_options(CLI::App& app, std::vector<std::string>& loras, std::string& lcm_lora, bool& strict_lora);
// --lcm-lora first, then every --lora in order, parsed (FILE[:SCALE]) and named (file stems).
std::vector<LoraSpec> lora_specs(const std::vector<std::string>& loras, const std::string& lcm_lora);

// The model used when --model is not given: the shipped tiny emoji model (models/emoji-tiny, trained in-house).
// Looked up as $SD_DEFAULT_MODEL, then models/emoji-tiny in a folder above the executable, in the source tree the
// CLI was built from, and in the working directory; the first that holds model_index.json wins (else the
// source-tree path, which load_models reports as missing with a hint).
std::string default_model_dir();

struct LoadedModels {
  std::shared_ptr<const DiffusionModels> models;
  double load_s = 0;
};
LoadedModels load_models(const PipelineOptions& o);

}  // namespace sd::cli
