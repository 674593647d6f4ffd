#include "apps/cli/pipeline_options.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <tuple>

#include "core/device.h"
#include "core/error.h"
#include "core/log.h"
#include "io/model_folder.h"
#include "pipeline/controlnet.h"
#include "pipeline/image.h"
#include "pipeline/stream_settings.h"

namespace sd::cli {

std::vector<int64_t> parse_index_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t pos = 0;
      const long long v = std::stoll(item, &pos);
      if (pos != item.size()) throw std::invalid_argument(item);
      out.push_back(v);
    } catch (const std::exception&) {
      throw InvalidArgument("--t-index-list: '" + item + "' is not an integer (expected e.g. 32,45)");
    }
  }
  if (out.empty()) throw InvalidArgument("--t-index-list is empty (expected e.g. 32,45)");
  return out;
}

std::pair<int64_t, int64_t> parse_size(const std::string& s, const std::string& option, bool model_size) {
  const auto x = s.find('x');
  int64_t w = 0, h = 0;
  try {
    if (x == std::string::npos) throw std::invalid_argument(s);
    size_t p1 = 0, p2 = 0;
    w = std::stoll(s.substr(0, x), &p1);
    h = std::stoll(s.substr(x + 1), &p2);
    if (p1 != x || p2 != s.size() - x - 1) throw std::invalid_argument(s);
  } catch (const std::exception&) {
    throw InvalidArgument(option + " '" + s + "': expected WIDTHxHEIGHT, e.g. 512x512");
  }
  if (!model_size) {
    if (w < 1 || h < 1 || w > 16384 || h > 16384)
      throw InvalidArgument(option + " '" + s + "': expected 1 to 16384 px per side");
    return {w, h};
  }
  check_image_size(w, h, option.c_str());
  return {w, h};
}

namespace {

int64_t inference_steps(const PipelineOptions& o, const ModelDefaults& d) {
  return resolve_inference_steps(o.num_inference_steps > 0 ? std::optional<int64_t>(o.num_inference_steps) : std::nullopt, d);
}

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

}  // namespace

std::vector<int64_t> index_list_from(const PipelineOptions& o, bool txt2img, const ModelDefaults& d) {
  if (!o.t_index_list.empty()) {
    if (o.steps > 0) throw InvalidArgument("give either --t-index-list or --steps, not both");
    return parse_index_list(o.t_index_list);
  }
  const int64_t S = inference_steps(o, d);
  if (o.steps <= 0) return default_index_list(txt2img, S, d);
  // txt2img starts from pure noise (index 0, t = 999); img2img from --start-index (how much the input may change).
  const int64_t first = txt2img ? 0 : o.start_index;
  const int64_t last = txt2img ? S * 45 / 50 : std::max<int64_t>(first, S * 45 / 50);
  if (first < 0 || first >= S)
    throw InvalidArgument("--start-index " + std::to_string(first) + " must be in [0, " + std::to_string(S) + ")");
  std::vector<int64_t> out;
  for (int64_t i = 0; i < o.steps; ++i) {
    const int64_t v = o.steps == 1 ? first : first + (last - first) * i / (o.steps - 1);
    if (!out.empty() && v <= out.back())
      throw InvalidArgument("--steps " + std::to_string(o.steps) + " does not fit between index " +
                            std::to_string(first) + " and " + std::to_string(last) +
                            "; use --t-index-list or more --num-inference-steps");
    out.push_back(v);
  }
  return out;
}

void add_pipeline_options(CLI::App& app, PipelineOptions& o, PipelineMode mode) {
  const bool img = mode != PipelineMode::Txt2Img;
  const char* index_default =
      mode == PipelineMode::Txt2Img ? "0,16,32,45" : mode == PipelineMode::Img2Img ? "32,45" : "32,45 (txt2img: 0,16,32,45)";
  const char* cfg_default =
      mode == PipelineMode::Txt2Img ? "none" : mode == PipelineMode::Img2Img ? "self" : "self (txt2img: none)";
  if (o.model.empty()) o.model = default_model_dir();
  app.add_option("--model", o.model,
                 "diffusers StableDiffusionPipeline folder or single-file .safetensors checkpoint (original "
                 "CompVis/Stability layout, SD 1.x / 2.x) (default: the shipped tiny emoji model, " + o.model +
                     "). Unset settings come from the model: its native size and its streamdiffusion.json or "
                     "family defaults (see `streamdiffusion info`)");
  app.add_option("--taesd", o.taesd,
                 "TAESD folder or file for encode/decode, or 'none' for the model's AutoencoderKL "
                 "(default: <model>/taesd when present)");
  app.add_option("--vae", o.vae,
                 "AutoencoderKL from elsewhere: a diffusers folder or a .safetensors file (diffusers or original "
                 "layout), e.g. a fine-tuned VAE; implies --taesd none unless --taesd is given");
  app.add_option("--config", o.config,
                 "single-file checkpoints: a diffusers folder of config files (model_index.json, */config.json, "
                 "scheduler/scheduler_config.json) used instead of what is inferred from the weights");
  app.add_option("--tokenizer", o.tokenizer,
                 "CLIP tokenizer folder (vocab.json + merges.txt); default: the model's, else the shipped "
                 "models/clip-tokenizer");
  app.add_option("--prediction-type", o.prediction_type,
                 "epsilon | v_prediction: what the UNet predicts (cannot be read from SD 2.x weights: SD 2.1-768 is "
                 "v_prediction; default: the model's scheduler config, single files epsilon)")
      ->check(CLI::IsMember({"epsilon", "v_prediction"}));
  add_variant_option(app, o.variant, o.model);
  app.add_option("--compiled-unet", o.compiled_unet,
                 "UNet compiled by scripts/compile-unet.py (PyTorch AOTInductor, libtorch >= 2.11 builds) for this "
                 "model, device, dtype and UNet call shape (its rows fixed or a range, --rows MIN-MAX: serve's "
                 "batched streams): runs those calls with fused kernels and the model's weights; calls of other "
                 "shapes run the model's own UNet");
  app.add_option("--prompt", o.prompt, "text prompt")->capture_default_str();
  app.add_option("--negative-prompt", o.negative_prompt, "negative prompt (cfg full / initialize)");
  app.add_option("--t-index-list", o.t_index_list,
                 std::string("comma-separated indices into the LCM timesteps (0 = t 999), default: the model's, "
                             "else ") + index_default);
  // The validators below refuse what the unset value (0, or -1 where 0 is a value) would otherwise silently mean.
  app.add_option("--steps", o.steps, "number of denoising steps, spread evenly instead of --t-index-list")
      ->check(sd::cli::at_least(1));
  if (img)
    app.add_option("--start-index", o.start_index, "first index used with --steps for img2img (smaller = more change)")
        ->capture_default_str();
  app.add_option("--num-inference-steps", o.num_inference_steps,
                 "length of the LCM timestep list (default: the model's, else 50)");
  app.add_option("--cfg-type", o.cfg_type,
                 std::string("none | full | self | initialize (default: the model's, else ") + cfg_default + ")");
  app.add_option("--guidance", o.guidance,
                 "guidance scale (active when > 1; ignored by cfg none; default: the model's, else 1.2)");
  app.add_option("--delta", o.delta, "RCFG delta, scales the virtual residual noise (default: the model's, else 1.0)");
  app.add_option("--seed", o.seed, "seed of the stream's noise")->capture_default_str();
  app.add_option("--size", o.size,
                 "WIDTHxHEIGHT, multiples of 8 (default: the model's native size, e.g. 64x64 for the built-in model, "
                 "512x512 for SD 1.5 / sd-turbo)");
  app.add_option("--frame-buffer-size", o.frame_buffer_size, "frames per call (F)")->capture_default_str();
  app.add_flag("--no-denoising-batch", o.no_denoising_batch, "sequential mode: all steps in every call");
  app.add_flag("--no-add-noise", o.no_add_noise, "re-noise in-flight latents without noise");
  app.add_option("--deep-cache-every", o.deep_cache_every,
                 "reuse the UNet's deep features: one full UNet call every K stream calls, the K - 1 between run only "
                 "its first level (faster, approximate; 1 = off; live: 'deep_cache K')")
      ->capture_default_str();
  app.add_flag("--no-cuda-graphs", o.no_cuda_graphs,
               "on CUDA, launch every kernel of each frame instead of replaying the recorded CUDA graphs of the UNet "
               "and TAESD (for comparison or debugging)");
  app.add_option("--deep-cache-similarity", o.deep_cache_similarity,
                 "with --deep-cache-every: an input whose cosine similarity to the last fully computed one is below "
                 "this forces a full UNet call")
      ->capture_default_str();
  app.add_option("--prompt-list", o.prompt_list,
                 "weighted prompt blend instead of --prompt: 'a cat:1 | a dog:0.5' (weight after the item's last ':') "
                 "or JSON [[\"a cat\", 1], [\"a dog\", 0.5]]; weights are normalised (live: 'prompt_list LIST')");
  app.add_option("--seed-list", o.seed_list,
                 "weighted seed blend of the fixed noise instead of --seed: '1:0.7, 2:0.3' or JSON [[1, 0.7], [2, 0.3]] "
                 "(variance-preserving: sum w_i N_i / sqrt(sum w_i^2); live: 'seed_list LIST')");
  app.add_option("--transition", o.transition,
                 "how live prompt / seed changes morph: seconds (2, 2.5s), frames (30f) or 0 = at once (default; live: "
                 "'transition T')");
  app.add_option("--prompt-blend", o.prompt_blend,
                 "linear | slerp: how a prompt list and a transition blend the embeddings (default linear; live: "
                 "'prompt_blend M')")
      ->check(CLI::IsMember({"linear", "slerp"}));
  if (img) {
    app.add_option("--latent-feedback", o.latent_feedback,
                   "latent feedback A in [0, 1]: the input latent is (1 - A) x encoded frame + A x the previous output "
                   "latent, a cheap temporal smoothing against flicker (0 = off; live: 'latent_feedback A')")
        ->capture_default_str();
    app.add_option("--similarity-filter", o.similarity_filter,
                   "enable the stochastic similarity filter with this threshold (e.g. 0.98; 0 = off)")
        ->check(CLI::Range(0.0, 1.0))
        ->capture_default_str();
    app.add_option("--max-skip-frame", o.max_skip_frame, "similarity filter: forced pass after this many skips")
        ->check(sd::cli::at_least(0))
        ->capture_default_str();
  }
  app.add_option_function<double>(
      "--lcm-guidance", [&o](double w) { o.lcm_guidance = w; },
      "guidance scale W baked into LCM-distilled UNets (config time_cond_proj_dim, e.g. LCM-Dreamshaper): every UNet "
      "call gets the embedding of W - 1 (default 8.5, as diffusers' LatentConsistencyModelPipeline)");
  add_lora_options(app, o.loras, o.lcm_lora, o.strict_lora);
  app.add_option("--clip-skip,--text-encoder-clip-skip", o.clip_skip,
                 "prompt embeddings from the text encoder layer N before the last (diffusers' clip_skip; 0 = the "
                 "last layer, default)");
  add_common_options(app, o.common);
}

void add_variant_option(CLI::App& app, std::string& variant, const std::string& model) {
  app.add_option("--variant", variant,
                 "weight-file variant of a diffusers model folder, as diffusers' from_pretrained(variant=NAME): each "
                 "component folder that has <stem>.NAME.safetensors (e.g. fp16: half the bytes to read) loads it, the "
                 "others their plain weights; the weights are cast to --dtype either way. Not for single files")
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            if (v.empty()) return "";  // the plain weights, as when unset
            try {
              check_variant_name(v);
            } catch (const InvalidArgument&) {
              return "'" + v + "' is not a variant name: expected e.g. fp16 (letters, digits, '_' or '-'; the NAME of "
                     "<stem>.NAME.safetensors)";
            }
            return "";
          },
          "NAME"));
  // Which --model is given is known only once every option is read (a settings file may set either), so the
  // single-file refusal waits for the end of parsing; it is still a usage error, before anything loads.
  app.callback([&variant, &model] {
    if (!variant.empty() && is_file(model))
      throw CLI::ValidationError("--variant", variant + ": variants are for diffusers model folders (<stem>." +
                                                  variant + ".safetensors in each component folder); --model " +
                                                  model + " is a single-file checkpoint: drop --variant");
  });
}

void add_lora_options(CLI::App& app, std::vector<std::string>& loras, std::string& lcm_lora, bool& strict_lora) {
  app.add_option("--lora", loras,
                 "LoRA .safetensors (kohya / A1111, diffusers or PEFT layout) fused into the UNet and text encoder, "
                 "FILE or FILE:SCALE (default scale 1; the text after the last ':' is the scale); repeatable, "
                 "fused in order. Live: 'lora NAME SCALE' (NAME = the file stem)");
  app.add_option("--lcm-lora", lcm_lora,
                 "LCM-LoRA file (= --lora FILE:1.0, fused before the --lora files as StreamDiffusion's recipe does)");
  app.add_flag("--strict-lora", strict_lora, "LoRA keys that patch nothing in the model are an error (default: a warning)");
}

void add_ip_adapter_options(CLI::App& app, PipelineOptions& o) {
  app.add_option("--ip-adapter", o.ip_adapter,
                 "IP-Adapter: its .safetensors file (image encoder in image_encoder/ beside it) or a folder with one "
                 "ip-adapter*.safetensors and image_encoder/ (h94/IP-Adapter layout: plain, Plus, full-face); "
                 "conditions on --image-prompt");
  app.add_option("--ip-adapter-scale", o.ip_adapter_scale,
                 "weight of the image prompt's attention (0 = off; live: 'ip_adapter_scale S')")
      ->capture_default_str();
  app.add_option("--image-prompt", o.image_prompt,
                 "image file for the IP-Adapter (any size: resized and centre-cropped for the image encoder; live: "
                 "'image_prompt FILE')");
}

void add_controlnet_options(CLI::App& app, PipelineOptions& o, const std::string& control_input_help) {
  app.add_option("--controlnet", o.controlnets,
                 "ControlNet: a diffusers folder or a single file (control_*.safetensors), DIR|FILE or DIR|FILE:SCALE "
                 "(conditioning scale, default 1); repeatable, the residuals are summed. Live: 'controlnet_scale I S'");
  app.add_option("--control-preprocessor", o.control_preprocessors,
                 "control image of each ControlNet: canny[:LOW:HIGH] | gray | passthrough | feedback (the previous "
                 "output); once for all or once per --controlnet (default: canny on the input, passthrough with "
                 "--control-input). Live: 'control_preprocessor I NAME'");
  app.add_option("--control-guidance-start", o.control_guidance_start,
                 "share of the denoising steps (of t_index_list) before which a ControlNet does not condition, as "
                 "diffusers' control_guidance_start: step i of n is conditioned unless i/n < START or (i+1)/n > END; "
                 "once for all or once per --controlnet (default 0)");
  app.add_option("--control-guidance-end", o.control_guidance_end,
                 "share of the denoising steps after which a ControlNet stops conditioning (diffusers' "
                 "control_guidance_end); once for all or once per --controlnet (default 1)");
  app.add_option("--control-input", o.control_input, control_input_help);
  app.add_option("--controlnet-every", o.controlnet_every,
                 "recompute the ControlNet residuals every N calls and reuse them in between (saves compute; the "
                 "control lags by up to N-1 calls)")
      ->capture_default_str();
}

std::pair<std::string, double> parse_controlnet_spec(const std::string& spec) {
  if (spec.empty()) throw InvalidArgument("--controlnet: empty path");
  const auto colon = spec.rfind(':');
  if (colon != std::string::npos && colon + 1 < spec.size() && colon > 0) {
    const std::string tail = spec.substr(colon + 1);
    char* end = nullptr;
    errno = 0;
    const double v = std::strtod(tail.c_str(), &end);
    if (end != tail.c_str() && *end == '\0' && errno != ERANGE) {
      if (!std::isfinite(v)) throw InvalidArgument("--controlnet " + spec + ": the scale must be finite");
      return {spec.substr(0, colon), v};
    }
  }
  return {spec, 1.0};
}

std::vector<WeightedPrompt> prompt_list_from(const PipelineOptions& o) {
  if (o.prompt_list.empty()) return {{o.prompt, 1.0}};
  return parse_prompt_list(o.prompt_list);
}

std::vector<LoraSpec> lora_specs(const std::vector<std::string>& loras, const std::string& lcm_lora) {
  std::vector<LoraSpec> specs;
  if (!lcm_lora.empty()) specs.push_back(parse_lora_spec(lcm_lora, "--lcm-lora"));
  for (const auto& l : loras) specs.push_back(parse_lora_spec(l, "--lora"));
  name_loras(specs);
  return specs;
}

StreamConfig stream_config(const PipelineOptions& o, bool txt2img) {
  return stream_config(o, txt2img, read_model_defaults(o.model, o.config, o.prediction_type));
}

StreamConfig stream_config(const PipelineOptions& o, bool txt2img, const ModelDefaults& d) {
  // Resolution (flag > model > built-in) is the engine's (pipeline/stream_settings.h), shared with the Python package.
  StreamRequest r;
  if (o.num_inference_steps > 0) r.num_inference_steps = o.num_inference_steps;
  r.t_index_list = index_list_from(o, txt2img, d);
  if (!o.cfg_type.empty()) r.cfg_type = o.cfg_type;
  if (!std::isnan(o.guidance)) r.guidance = o.guidance;
  if (!std::isnan(o.delta)) r.delta = o.delta;
  if (!o.size.empty()) std::tie(r.width, r.height) = parse_size(o.size);
  StreamConfig c = resolve_stream_config(r, txt2img, d);
  c.seed = o.seed;
  if (!o.seed_list.empty()) c.seed_list = parse_seed_list(o.seed_list);
  if (!o.transition.empty()) c.transition = parse_transition(o.transition);
  if (!o.prompt_blend.empty()) c.prompt_blend = parse_blend_method(o.prompt_blend);
  if (!(o.latent_feedback >= 0 && o.latent_feedback <= 1))
    throw InvalidArgument("--latent-feedback must be in [0, 1], got " + std::to_string(o.latent_feedback));
  if (o.latent_feedback > 0 && txt2img) throw InvalidArgument("--latent-feedback needs input images (img2img)");
  c.latent_feedback = o.latent_feedback;
  if (o.frame_buffer_size < 1) throw InvalidArgument("--frame-buffer-size must be >= 1");
  c.frame_buffer_size = o.frame_buffer_size;
  c.use_denoising_batch = !o.no_denoising_batch;
  c.do_add_noise = !o.no_add_noise;
  if (o.deep_cache_every < 1) throw InvalidArgument("--deep-cache-every must be >= 1 (1 = off)");
  c.deep_cache_every = o.deep_cache_every;
  c.deep_cache_min_similarity = o.deep_cache_similarity;
  c.cuda_graphs = !o.no_cuda_graphs;
  if (o.similarity_filter > 0) {
    if (txt2img) throw InvalidArgument("--similarity-filter needs input images (img2img)");
    c.similarity_filter.enabled = true;
    c.similarity_filter.threshold = o.similarity_filter;
    c.similarity_filter.max_skip_frame = o.max_skip_frame;
  }
  return c;
}

std::vector<std::string> explain_settings(const PipelineOptions& o, bool txt2img, const ModelDefaults& d) {
  const StreamConfig c = stream_config(o, txt2img, d);
  const ModeRecommendation& rec = d.mode(txt2img);
  const std::string model = d.settings_source.empty() ? "the model" : d.settings_source;
  const auto from = [&](bool flag, bool recommended) {
    return flag ? std::string("flag") : recommended ? model : std::string("built-in default");
  };
  std::vector<std::string> out;
  out.push_back("size " + std::to_string(c.width) + "x" + std::to_string(c.height) + " (" +
                (!o.size.empty()        ? std::string("flag")
                 : d.native_width > 0   ? "native: " + d.native_size_reason
                                        : "fallback: the model's native size is unknown") +
                ")");
  out.push_back("num_inference_steps " + std::to_string(c.num_inference_steps) + " (" +
                from(o.num_inference_steps > 0, d.num_inference_steps.has_value()) + ")");
  out.push_back("t_index_list " + join(c.t_index_list) + " (" +
                from(!o.t_index_list.empty() || o.steps > 0, rec.t_index_list.has_value()) + ")");
  out.push_back("cfg_type " + cfg_type_name(c.cfg_type) + " (" + from(!o.cfg_type.empty(), rec.cfg_type.has_value()) +
                ")");
  std::ostringstream g;
  g << "guidance " << c.guidance_scale << " (" << from(!std::isnan(o.guidance), rec.guidance.has_value()) << "), delta "
    << c.delta << " (" << from(!std::isnan(o.delta), rec.delta.has_value()) << ")";
  out.push_back(g.str());
  return out;
}

std::string default_model_dir() { return ::sd::default_model_dir(); }

LoadedModels load_models(const PipelineOptions& o) {
  if (o.model == default_model_dir() && !is_file(o.model + "/model_index.json") && !is_file(o.model))
    throw InvalidArgument("no --model given and the default model was not found at " + o.model +
                          " (it ships in the repository as models/emoji-tiny; retrain it with scripts/train-emoji.sh, "
                          "set SD_DEFAULT_MODEL, or pass --model DIR)");
  const ModelDefaults d = read_model_defaults(o.model, o.config, o.prediction_type);
  LoadOptions lo;
  const c10::Device device = parse_device(o.common.device);
  if (o.common.dtype == "int8") {
    lo.int8 = true;
    lo.dtype = int8_float_dtype();
  } else {
    lo.dtype = parse_dtype(dtype_request(d, o.common.dtype, device.is_cpu()), device);
    if (o.common.dtype == "auto" && lo.dtype != auto_dtype(device))
      log::info("dtype {}: the model's {} names it for CPUs (this machine's own choice would be {})",
                dtype_name(lo.dtype), d.settings_source, dtype_name(auto_dtype(device)));
  }
  lo.device = o.common.device;
  lo.threads = threads_request(d, o.common.threads, device.is_cpu());
  if (lo.threads != o.common.threads)
    log::info("threads {}: the model's {} names it for CPUs (--threads N overrides)", lo.threads, d.settings_source);
  lo.taesd = o.taesd;
  lo.lcm_guidance = o.lcm_guidance;
  lo.vae = o.vae;
  lo.config = o.config;
  lo.tokenizer = o.tokenizer;
  lo.prediction_type = o.prediction_type;
  lo.loras = lora_specs(o.loras, o.lcm_lora);
  lo.strict_lora = o.strict_lora;
  lo.clip_skip = o.clip_skip;
  lo.lora_live = o.lora_live;
  if (!o.image_prompt.empty() && o.ip_adapter.empty())
    throw InvalidArgument("--image-prompt needs an IP-Adapter: give --ip-adapter FILE|DIR");
  if (!std::isfinite(o.ip_adapter_scale)) throw InvalidArgument("--ip-adapter-scale must be finite");
  lo.ip_adapter = o.ip_adapter;
  lo.ip_adapter_scale = o.ip_adapter_scale;
  lo.compiled_unet = o.compiled_unet;
  lo.variant = o.variant;
  const auto t0 = std::chrono::steady_clock::now();
  LoadedModels l;
  // The plain-SD warning is about the missing LCM-LoRA: quiet once one is given (--lcm-lora, or an "lcm" LoRA file).
  bool lcm_given = !o.lcm_lora.empty();
  for (const auto& l : o.loras) {
    std::string low = l;
    std::transform(low.begin(), low.end(), low.begin(), [](unsigned char c) { return std::tolower(c); });
    lcm_given = lcm_given || low.find("lcm") != std::string::npos;
  }
  if (!lcm_given)
    for (const auto& w : d.warnings) log::warn("{}", w);
  l.models = load_pipeline(o.model, lo);
  l.load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return l;
}

}  // namespace sd::cli
