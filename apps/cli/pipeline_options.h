#pragma once
// The pipeline options every command that runs a stream takes (txt2img, img2img, stream), their defaults and their
// translation into a StreamConfig and a loaded model set — one definition so the commands stay consistent.
// Defaults that depend on the mode (t_index_list, cfg_type) are resolved by stream_config(options, txt2img).
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "apps/cli/commands.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/model_defaults.h"
#include "pipeline/stream_diffusion.h"

namespace sd::cli {

// Settings left unset (empty string, 0, NaN) come from the model (pipeline/model_defaults.h: its
// streamdiffusion.json, else its family), else from the built-in defaults below; explicit flags always win.
struct PipelineOptions {
  static constexpr double kUnset = std::numeric_limits<double>::quiet_NaN();
  static constexpr int kBuiltinInferenceSteps = 50;
  static constexpr double kBuiltinGuidance = 1.2, kBuiltinDelta = 1.0;
  static constexpr int64_t kFallbackSize = 512;  // when the model's native size cannot be told

  CommonOptions common;
  std::string model, taesd, prompt, negative_prompt;
  // Single-file checkpoints and components from elsewhere (see sd::LoadOptions).
  std::string vae, config, tokenizer, prediction_type;
  std::string variant;  // --variant NAME: <stem>.NAME.safetensors in the model's component folders ("" = plain)
  std::string t_index_list;  // "" = model / mode default
  int steps = 0;
  int start_index = 32;
  int num_inference_steps = 0;  // 0 = model default, else 50
  std::string cfg_type;         // "" = model default, else none for txt2img, self for img2img
  double guidance = kUnset;     // NaN = model default, else 1.2
  double delta = kUnset;        // NaN = model default, else 1.0
  uint64_t seed = 2;
  std::string size;             // "" = the model's native size
  int frame_buffer_size = 1;
  bool no_denoising_batch = false;
  bool no_add_noise = false;
  double similarity_filter = 0;  // 0 = off (img2img)
  int max_skip_frame = 10;
  int deep_cache_every = 1;             // --deep-cache-every K (1 = off)
  double deep_cache_similarity = 0.95;  // --deep-cache-similarity S
  bool no_cuda_graphs = false;          // --no-cuda-graphs (CUDA: launch every kernel, no recorded graphs)
  std::string compiled_unet;            // --compiled-unet FILE (scripts/compile-unet.py; libtorch >= 2.6 builds)
  std::optional<double> lcm_guidance;  // --lcm-guidance W (LCM-distilled UNets)
  std::vector<std::string> loras;  // --lora FILE[:SCALE], repeatable
  std::string lcm_lora;            // --lcm-lora FILE (= --lora FILE:1.0, fused first as in StreamDiffusionWrapper)
  bool strict_lora = false;
  int clip_skip = 0;  // --clip-skip / --text-encoder-clip-skip
  bool lora_live = true;           // keep the unfused weights for live scale changes (txt2img / img2img: off)
  // IP-Adapter (add_ip_adapter_options: txt2img, img2img, stream).
  std::string ip_adapter;          // --ip-adapter FILE|DIR
  double ip_adapter_scale = 1.0;   // --ip-adapter-scale (diffusers' default after load_ip_adapter)
  std::string image_prompt;        // --image-prompt FILE
  // ControlNet (add_controlnet_options: txt2img, img2img, stream, serve).
  std::vector<std::string> controlnets;            // --controlnet DIR|FILE[:SCALE], repeatable
  std::vector<std::string> control_preprocessors;  // --control-preprocessor SPEC: one for all, or one per ControlNet
  // --control-guidance-start / --control-guidance-end: one for all, or one per ControlNet (default 0 and 1)
  std::vector<double> control_guidance_start, control_guidance_end;
  std::string control_input;                       // --control-input SRC (stream: a source; txt2img/img2img: an image)
  int controlnet_every = 1;                        // --controlnet-every N
  // Live performance controls (pipeline/prompt_blend.h), also as control commands.
  std::string prompt_list;     // --prompt-list LIST (instead of --prompt)
  std::string seed_list;       // --seed-list LIST (instead of --seed)
  std::string transition;      // --transition T ("" = at once)
  std::string prompt_blend;    // --prompt-blend linear|slerp ("" = linear)
  double latent_feedback = 0;  // --latent-feedback A (img2img / either)
};

enum class PipelineMode { Txt2Img, Img2Img, Either };

// Adds --model, --taesd, --vae, --config, --tokenizer, --prediction-type, --prompt, --negative-prompt, --t-index-list, --steps, --start-index (img2img / either),
// --num-inference-steps, --cfg-type, --guidance, --delta, --seed, --size, --frame-buffer-size, --no-denoising-batch,
// --no-add-noise, --similarity-filter and --max-skip-frame (img2img / either), --deep-cache-every and
// --deep-cache-similarity, --lcm-guidance, and the common options.
void add_pipeline_options(CLI::App& app, PipelineOptions& o, PipelineMode mode);

// "32,45" -> {32, 45}; InvalidArgument naming the bad item.
std::vector<int64_t> parse_index_list(const std::string& s);
// "512x512" -> {512, 512}, multiples of 8 (a model size); InvalidArgument otherwise. model_size false: any size of 1
// to 16384 px per side (a camera's or a raw input's frames, which the stream fits to its own size).
std::pair<int64_t, int64_t> parse_size(const std::string& s, const std::string& option = "--size",
                                       bool model_size = true);
// The explicit --t-index-list, or --steps indices spread evenly (txt2img from index 0, img2img from --start-index),
// or the model's recommendation, or the mode's default (txt2img 0,16,32,45 / img2img 32,45 with 50 inference
// steps).
std::vector<int64_t> index_list_from(const PipelineOptions& o, bool txt2img, const ModelDefaults& d = {});
// The stream configuration of these options for `o.model`, unset settings filled from the model (read here, from
// its configs and streamdiffusion.json) or the given defaults.
StreamConfig stream_config(const PipelineOptions& o, bool txt2img);
StreamConfig stream_config(const PipelineOptions& o, bool txt2img, const ModelDefaults& d);
// Where each effective setting of a mode comes from ("flag", "streamdiffusion.json", "family defaults", "built-in"),
// one line per setting, for `info` and the load log.
std::vector<std::string> explain_settings(const PipelineOptions& o, bool txt2img, const ModelDefaults& d);

// Adds --variant (add_pipeline_options does; bench, info, eval and contact-sheet call it on their own). A name that
// is not plain, or a variant with a single-file --model (`model`, read after parsing), is a usage error (exit 2).
void add_variant_option(CLI::App& app, std::string& variant, const std::string& model);

// Adds --lora, --lcm-lora and --strict-lora (add_pipeline_options does; the bench and info call it on their own).
void add_lora_options(CLI::App& app, std::vector<std::string>& loras, std::string& lcm_lora, bool& strict_lora);
// Adds --ip-adapter, --ip-adapter-scale and --image-prompt (txt2img, img2img, stream).
void add_ip_adapter_options(CLI::App& app, PipelineOptions& o);

// Adds --controlnet, --control-preprocessor, --control-input (help text per command: `control_input_help`) and
// --controlnet-every.
void add_controlnet_options(CLI::App& app, PipelineOptions& o, const std::string& control_input_help);

// "DIR|FILE[:SCALE]" -> {path, scale}: the text after the last ':' is the scale when it is a number.
std::pair<std::string, double> parse_controlnet_spec(const std::string& spec);

// The weighted prompt list of these options: --prompt-list parsed, else {{--prompt, 1}}.
std::vector<WeightedPrompt> prompt_list_from(const PipelineOptions& o);

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
