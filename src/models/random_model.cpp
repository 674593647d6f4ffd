#include "models/random_model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "core/log.h"
#include "io/json_config.h"
#include "io/ldm_checkpoint.h"
#include "io/model_folder.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/controlnet.h"
#include "models/unet_2d_condition.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace sd {

namespace {
void check_arch(const std::string& arch) {
  if (arch != "sd-turbo" && arch != "sd15" && arch != "bk-sdm-tiny" && arch != "sdxs-512" && arch != "sdxl-turbo" &&
      arch != "sdxl")
    throw InvalidArgument("unknown architecture '" + arch +
                          "' (expected sd-turbo, sd15, bk-sdm-tiny, sdxs-512, sdxl-turbo or sdxl)");
}

// The base family of a distilled UNet: its text encoder and VAE are the base model's (BK-SDM-Tiny: SD 1.4;
// SDXS-512-0.9: SD 2.1 base, whose text encoder and VAE are sd-turbo's).
std::string family_of(const std::string& arch) {
  if (arch == "bk-sdm-tiny") return "sd15";
  if (arch == "sdxs-512") return "sd-turbo";
  return arch;
}

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

void write_json(const fs::path& path, const json& j) {
  std::ofstream out(path);
  if (!out) throw FormatError(path.string(), "cannot write");
  out << j.dump(2) << "\n";
}

uint64_t save_module(torch::nn::Module& m, const fs::path& file, torch::ScalarType dtype) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, t] : state_dict(m))
    tensors.emplace_back(name, t.is_floating_point() ? t.to(dtype) : t);
  save_safetensors(file.string(), tensors, {{"format", "pt"}, {"generator", "streamdiffusion make-random-model"}});
  return file_size_bytes(file.string());
}
}  // namespace

bool is_sdxl_arch(const std::string& arch) { return arch == "sdxl-turbo" || arch == "sdxl"; }

bool is_controlnet_arch(const std::string& arch) {
  return arch == "controlnet-sd15" || arch == "controlnet-sd21" || arch == "controlnet";
}

std::string controlnet_base_arch(const std::string& arch) {
  if (arch == "controlnet-sd15") return "sd15";
  if (arch == "controlnet-sd21") return "sd-turbo";
  throw InvalidArgument("unknown ControlNet architecture '" + arch + "' (expected controlnet-sd15 or controlnet-sd21)");
}

json controlnet_config_from_unet(const json& unet, const std::string& source) {
  if (!unet.is_object()) throw InvalidArgument(source + ": expected a UNet config.json object");
  // The keyword arguments of diffusers' ControlNetModel (0.24); from_unet copies these from the UNet's config.
  static const char* kKeys[] = {
      "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
      "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
      "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
      "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection",
      "class_embed_type", "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
      "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "addition_embed_type_num_heads"};
  json c{{"_class_name", "ControlNetModel"}, {"_diffusers_version", "0.24.0"}};
  for (const char* k : kKeys)
    if (unet.contains(k)) c[k] = unet[k];
  if (!c.contains("mid_block_type")) c["mid_block_type"] = "UNetMidBlock2DCrossAttn";
  if (c["mid_block_type"].is_null())
    throw InvalidArgument(source + ": the UNet has no mid block (mid_block_type null, e.g. a distilled UNet); a "
                          "ControlNet copies the mid block");
  if (!c.contains("upcast_attention") || c["upcast_attention"].is_null()) c["upcast_attention"] = false;
  c["conditioning_channels"] = 3;
  c["conditioning_embedding_out_channels"] = {16, 32, 96, 256};
  c["controlnet_conditioning_channel_order"] = "rgb";
  c["global_pool_conditions"] = false;
  return c;
}

json real_controlnet_config(const std::string& arch) {
  // Both published families are ControlNetModel.from_unet of their base UNet: lllyasviel/control_v11p_sd15_* of
  // SD 1.5's, thibaud/controlnet-sd21-* of SD 2.1's (sd-turbo's UNet is SD 2.1's architecture).
  return controlnet_config_from_unet(real_unet_config(controlnet_base_arch(arch)), arch);
}

json real_unet_config(const std::string& arch) {
  check_arch(arch);
  if (is_sdxl_arch(arch)) {
    // stabilityai/sdxl-turbo and stable-diffusion-xl-base-1.0 (the same UNet; 64 vs 128 latent sample_size):
    // 2,567,463,684 parameters. SD's UNet config with SDXL's blocks, widths and added conditioning.
    json c = real_unet_config("sd-turbo");
    c.update(json{
        {"addition_embed_type", "text_time"},
        {"addition_embed_type_num_heads", 64},
        {"addition_time_embed_dim", 256},
        {"attention_head_dim", {5, 10, 20}},
        {"block_out_channels", {320, 640, 1280}},
        {"cross_attention_dim", 2048},
        {"down_block_types", {"DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"}},
        {"projection_class_embeddings_input_dim", 2816},
        {"sample_size", arch == "sdxl" ? 128 : 64},
        {"transformer_layers_per_block", {1, 2, 10}},
        {"up_block_types", {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}},
    });
    return c;
  }
  if (arch == "bk-sdm-tiny" || arch == "sdxs-512") {
    // nota-ai/bk-sdm-tiny: SD 1.4's UNet without the mid block, the innermost stage (down_blocks.3 / up_blocks.0) and
    // one resnet (+ attention) per remaining stage. IDKiro/sdxs-512-0.9: the same layout on SD 2.1 base (1024-d
    // text, linear projections, heads [5, 10, 20]) with only cross-attention in the highest-resolution
    // transformers. 323,384,964 and 328,177,284 parameters.
    const bool sdxs = arch == "sdxs-512";
    json c = real_unet_config(sdxs ? "sd-turbo" : "sd15");
    c["attention_head_dim"] = sdxs ? json::array({5, 10, 20}) : json(8);
    c["block_out_channels"] = {320, 640, 1280};
    c["down_block_types"] = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"};
    c["up_block_types"] = {"CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
    c["layers_per_block"] = 1;
    c["mid_block_type"] = nullptr;
    c["only_cross_attention"] = sdxs ? json::array({true, false, false}) : json(false);
    return c;
  }
  const bool turbo = arch == "sd-turbo";
  return json{
      {"_class_name", "UNet2DConditionModel"},
      {"_diffusers_version", "0.24.0"},
      {"act_fn", "silu"},
      {"attention_head_dim", turbo ? json::array({5, 10, 20, 20}) : json(8)},
      {"block_out_channels", {320, 640, 1280, 1280}},
      {"center_input_sample", false},
      {"cross_attention_dim", turbo ? 1024 : 768},
      {"down_block_types", {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}},
      {"downsample_padding", 1},
      {"dual_cross_attention", false},
      {"flip_sin_to_cos", true},
      {"freq_shift", 0},
      {"in_channels", 4},
      {"layers_per_block", 2},
      {"mid_block_scale_factor", 1},
      {"norm_eps", 1e-05},
      {"norm_num_groups", 32},
      {"num_class_embeds", nullptr},
      {"only_cross_attention", false},
      {"out_channels", 4},
      {"sample_size", turbo ? 64 : 64},
      {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"}},
      {"upcast_attention", turbo ? json(nullptr) : json(false)},
      {"use_linear_projection", turbo},
  };
}

json real_vae_config(const std::string& arch) {
  check_arch(arch);  // the same AutoencoderKL for every family; sd-turbo's config says 768 px, the others 512
  return json{
      {"_class_name", "AutoencoderKL"},
      {"_diffusers_version", "0.24.0"},
      {"act_fn", "silu"},
      {"block_out_channels", {128, 256, 512, 512}},
      {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"}},
      {"in_channels", 3},
      {"latent_channels", 4},
      {"layers_per_block", 2},
      {"norm_num_groups", 32},
      {"out_channels", 3},
      {"sample_size", arch == "sd-turbo" ? 768 : is_sdxl_arch(arch) ? 1024 : 512},
      // SDXL's VAE: the same architecture, its own latent scale, and fp16 overflow (force_upcast).
      {"scaling_factor", is_sdxl_arch(arch) ? 0.13025 : 0.18215},
      {"force_upcast", true},
      {"up_block_types", {"UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"}},
  };
}

json real_text_encoder_2_config() {
  // SDXL's text_encoder_2: OpenCLIP ViT-bigG/14's text tower as transformers' CLIPTextModelWithProjection,
  // 694,659,840 parameters.
  return json{
      {"architectures", {"CLIPTextModelWithProjection"}},
      {"attention_dropout", 0.0},
      {"bos_token_id", 0},
      {"dropout", 0.0},
      {"eos_token_id", 2},
      {"hidden_act", "gelu"},
      {"hidden_size", 1280},
      {"initializer_factor", 1.0},
      {"initializer_range", 0.02},
      {"intermediate_size", 5120},
      {"layer_norm_eps", 1e-05},
      {"max_position_embeddings", 77},
      {"model_type", "clip_text_model"},
      {"num_attention_heads", 20},
      {"num_hidden_layers", 32},
      {"pad_token_id", 1},
      {"projection_dim", 1280},
      {"torch_dtype", "float32"},
      {"vocab_size", 49408},
  };
}

json real_text_encoder_config(const std::string& arch) {
  check_arch(arch);
  // SDXL's first encoder is SD 1.x's CLIP ViT-L/14 text model (123,060,480 parameters).
  const bool turbo = family_of(arch) == "sd-turbo";
  return json{
      {"architectures", {"CLIPTextModel"}},
      {"attention_dropout", 0.0},
      {"bos_token_id", 0},
      {"dropout", 0.0},
      {"eos_token_id", 2},
      {"hidden_act", turbo ? "gelu" : "quick_gelu"},
      {"hidden_size", turbo ? 1024 : 768},
      {"initializer_factor", 1.0},
      {"initializer_range", 0.02},
      {"intermediate_size", turbo ? 4096 : 3072},
      {"layer_norm_eps", 1e-05},
      {"max_position_embeddings", 77},
      {"model_type", "clip_text_model"},
      {"num_attention_heads", turbo ? 16 : 12},
      {"num_hidden_layers", turbo ? 23 : 12},
      {"pad_token_id", 1},
      {"projection_dim", turbo ? 512 : 768},
      {"torch_dtype", "float32"},
      {"vocab_size", 49408},
  };
}

json pipeline_model_index(const std::string& arch) {
  if (is_sdxl_arch(arch))
    return json{{"_class_name", "StableDiffusionXLPipeline"},
                {"_diffusers_version", "0.24.0"},
                {"feature_extractor", {nullptr, nullptr}},
                {"force_zeros_for_empty_prompt", true},
                {"image_encoder", {nullptr, nullptr}},
                {"scheduler", {"diffusers", "LCMScheduler"}},
                {"text_encoder", {"transformers", "CLIPTextModel"}},
                {"text_encoder_2", {"transformers", "CLIPTextModelWithProjection"}},
                {"tokenizer", {"transformers", "CLIPTokenizer"}},
                {"tokenizer_2", {"transformers", "CLIPTokenizer"}},
                {"unet", {"diffusers", "UNet2DConditionModel"}},
                {"vae", {"diffusers", "AutoencoderKL"}}};
  return json{{"_class_name", "StableDiffusionPipeline"},
              {"_diffusers_version", "0.24.0"},
              {"feature_extractor", {nullptr, nullptr}},
              {"image_encoder", {nullptr, nullptr}},
              {"requires_safety_checker", false},
              {"safety_checker", {nullptr, nullptr}},
              {"scheduler", {"diffusers", "LCMScheduler"}},
              {"text_encoder", {"transformers", "CLIPTextModel"}},
              {"tokenizer", {"transformers", "CLIPTokenizer"}},
              {"unet", {"diffusers", "UNet2DConditionModel"}},
              {"vae", {"diffusers", "AutoencoderKL"}}};
}

json lcm_scheduler_config() {
  return json{
      {"_class_name", "LCMScheduler"},
      {"_diffusers_version", "0.24.0"},
      {"beta_end", 0.012},
      {"beta_schedule", "scaled_linear"},
      {"beta_start", 0.00085},
      {"clip_sample", false},
      {"num_train_timesteps", 1000},
      {"original_inference_steps", 50},
      {"prediction_type", "epsilon"},
      {"set_alpha_to_one", true},
      {"steps_offset", 1},
      {"timestep_scaling", 10.0},
      {"timestep_spacing", "leading"},
      {"trained_betas", nullptr},
  };
}

json recommended_settings(const std::string& arch) {
  const bool turbo = arch == "sd-turbo" || arch == "sdxl-turbo";
  json j{{"size", arch == "sdxl" ? "1024x1024" : "512x512"}, {"num_inference_steps", 50}};
  if (turbo) {
    // sd-turbo / sdxl-turbo: one step, no guidance (adversarially distilled without CFG).
    j["txt2img"] = {{"t_index_list", {0}}, {"cfg_type", "none"}};
    j["img2img"] = {{"t_index_list", {32}}, {"cfg_type", "none"}};
  } else {
    // SD 1.5 + LCM-LoRA, StreamDiffusion's default recipe.
    j["txt2img"] = {{"t_index_list", {0, 16, 32, 45}}, {"cfg_type", "none"}};
    j["img2img"] = {{"t_index_list", {32, 45}}, {"cfg_type", "self"}, {"guidance", 1.2}, {"delta", 1.0}};
  }
  j["note"] = "random weights in the real " + arch + " architecture (make-random-model): for speed, not pictures";
  return j;
}

json default_taesd_config() {
  return json{
      {"_class_name", "AutoencoderTiny"},
      {"_diffusers_version", "0.24.0"},
      {"act_fn", "relu"},
      {"decoder_block_out_channels", {64, 64, 64, 64}},
      {"encoder_block_out_channels", {64, 64, 64, 64}},
      {"force_upcast", false},
      {"in_channels", 3},
      {"latent_channels", 4},
      {"latent_magnitude", 3},
      {"latent_shift", 0.5},
      {"num_decoder_blocks", {3, 3, 3, 1}},
      {"num_encoder_blocks", {1, 3, 3, 3}},
      {"out_channels", 3},
      {"scaling_factor", 1.0},
      {"upsampling_scaling_factor", 2},
  };
}

void randomize_parameters(torch::nn::Module& module, uint64_t seed) {
  torch::NoGradGuard ng;
  auto gen = at::detail::createCPUGenerator(seed);
  for (auto& p : module.named_parameters(true)) {
    const std::string& name = p.key();
    auto t = p.value();
    auto opts = torch::TensorOptions().dtype(torch::kFloat32);
    torch::Tensor v;
    const bool is_norm = contains(name, "norm") && t.dim() == 1;
    // (A ControlNet's controlnet_cond_embedding is a stack of convs, scaled like any conv.)
    if (t.dim() >= 2 && contains(name, "embedding") && !contains(name, "time_embedding") &&
        !contains(name, "controlnet_cond_embedding")) {
      v = at::normal(0.0, 0.02, t.sizes(), gen, opts);  // token / position tables
    } else if (t.dim() >= 2) {
      const double fan_in = static_cast<double>(t.numel() / t.size(0));
      v = at::normal(0.0, 1.0 / std::sqrt(fan_in), t.sizes(), gen, opts);
    } else if (is_norm && contains(name, "weight")) {
      v = 1.0 + at::normal(0.0, 0.02, t.sizes(), gen, opts);
    } else {
      v = at::normal(0.0, 0.02, t.sizes(), gen, opts);  // biases, norm biases
    }
    p.value().set_data(v.to(t.scalar_type()));
  }
}

RandomModelReport write_random_controlnet(const RandomModelOptions& o) {
  if (!is_controlnet_arch(o.arch))
    throw InvalidArgument("make-random-model: '" + o.arch + "' is not a ControlNet architecture (expected "
                          "controlnet-sd15, controlnet-sd21 or controlnet with --for-model)");
  if (o.out_dir.empty()) throw InvalidArgument("make-random-model: --out is required");
  json cfg_json;
  if (o.arch == "controlnet") {
    if (o.for_model.empty())
      throw InvalidArgument("make-random-model --arch controlnet needs --for-model DIR (a diffusers model folder "
                            "whose UNet the ControlNet is made for)");
    const std::string unet_cfg = o.for_model + "/unet/config.json";
    if (!is_file(unet_cfg))
      throw InvalidArgument("make-random-model --for-model " + o.for_model + ": no unet/config.json (expected a "
                            "diffusers model folder)");
    cfg_json = controlnet_config_from_unet(read_json_file(unet_cfg), unet_cfg);
  } else {
    if (!o.for_model.empty())
      throw InvalidArgument("make-random-model --for-model goes with --arch controlnet (" + o.arch +
                            " is a published architecture)");
    cfg_json = real_controlnet_config(o.arch);
  }
  const fs::path out(o.out_dir);
  fs::create_directories(out);
  write_json(out / "config.json", cfg_json);
  ControlNetModel m(ControlNetConfig::from_json(cfg_json, (out / "config.json").string()));
  randomize_parameters(*m, o.seed);
  RandomModelReport r;
  r.controlnet_parameters = count_parameters(*m);
  r.bytes_written = save_module(*m, out / "diffusion_pytorch_model.safetensors", o.dtype);
  return r;
}

RandomModelReport write_random_model(const RandomModelOptions& o) {
  if (is_controlnet_arch(o.arch)) return write_random_controlnet(o);
  check_arch(o.arch);
  if (!o.for_model.empty()) throw InvalidArgument("make-random-model --for-model goes with --arch controlnet");
  if (o.out_dir.empty()) throw InvalidArgument("make-random-model: --out is required");
  if (o.tokenizer_dir.empty())
    throw InvalidArgument("make-random-model --arch " + o.arch + ": --tokenizer is required (a CLIP tokenizer folder, "
                          "e.g. models/clip-tokenizer)");
  if (!is_file(o.tokenizer_dir + "/vocab.json") || !is_file(o.tokenizer_dir + "/merges.txt"))
    throw InvalidArgument("make-random-model: tokenizer folder '" + o.tokenizer_dir +
                          "' must hold vocab.json and merges.txt (e.g. a model's tokenizer/ folder)");
  const fs::path out(o.out_dir);
  const bool xl = is_sdxl_arch(o.arch);
  for (const char* sub : {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}) fs::create_directories(out / sub);
  RandomModelReport r;

  write_json(out / "model_index.json", pipeline_model_index(o.arch));
  write_json(out / "scheduler" / "scheduler_config.json", lcm_scheduler_config());
  write_json(out / "streamdiffusion.json", recommended_settings(o.arch));
  for (const char* f : {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}) {
    const fs::path src = fs::path(o.tokenizer_dir) / f;
    if (fs::exists(src)) fs::copy_file(src, out / "tokenizer" / f, fs::copy_options::overwrite_existing);
  }
  uint64_t seed = o.seed;
  if (xl) {
    // The second tokenizer: the same BPE, padding with "!" (id 0) as SDXL's tokenizer_2 does.
    fs::create_directories(out / "tokenizer_2");
    for (const char* f : {"vocab.json", "merges.txt"})
      fs::copy_file(fs::path(o.tokenizer_dir) / f, out / "tokenizer_2" / f, fs::copy_options::overwrite_existing);
    write_json(out / "tokenizer_2" / "special_tokens_map.json",
               json{{"bos_token", "<|startoftext|>"}, {"eos_token", "<|endoftext|>"}, {"pad_token", "!"},
                    {"unk_token", "<|endoftext|>"}});
    write_json(out / "tokenizer_2" / "tokenizer_config.json",
               json{{"tokenizer_class", "CLIPTokenizer"}, {"model_max_length", 77}, {"pad_token", "!"},
                    {"do_lower_case", true}});
    fs::create_directories(out / "text_encoder_2");
    auto cfg_json = real_text_encoder_2_config();
    write_json(out / "text_encoder_2" / "config.json", cfg_json);
    CLIPTextModel m(CLIPTextConfig::from_json(cfg_json, "text_encoder_2/config.json"));
    randomize_parameters(*m, seed + 100);
    r.text_encoder_2_parameters = count_parameters(*m);
    r.bytes_written += save_module(*m, out / "text_encoder_2" / "model.safetensors", o.dtype);
  }

  {
    auto cfg_json = real_text_encoder_config(o.arch);
    write_json(out / "text_encoder" / "config.json", cfg_json);
    CLIPTextModel m(CLIPTextConfig::from_json(cfg_json, "text_encoder/config.json"));
    randomize_parameters(*m, seed++);
    r.text_encoder_parameters = count_parameters(*m);
    r.bytes_written += save_module(*m, out / "text_encoder" / "model.safetensors", o.dtype);
  }
  {
    auto cfg_json = real_unet_config(o.arch);
    write_json(out / "unet" / "config.json", cfg_json);
    UNet2DConditionModel m(UNet2DConditionConfig::from_json(cfg_json, "unet/config.json"));
    randomize_parameters(*m, seed++);
    r.unet_parameters = count_parameters(*m);
    r.bytes_written += save_module(*m, out / "unet" / "diffusion_pytorch_model.safetensors", o.dtype);
  }
  {
    auto cfg_json = real_vae_config(o.arch);
    write_json(out / "vae" / "config.json", cfg_json);
    AutoencoderKL m(AutoencoderKLConfig::from_json(cfg_json, "vae/config.json"));
    randomize_parameters(*m, seed++);
    r.vae_parameters = count_parameters(*m);
    r.bytes_written += save_module(*m, out / "vae" / "diffusion_pytorch_model.safetensors", o.dtype);
  }
  if (o.with_taesd) {
    // TAESDXL for SDXL: the same AutoencoderTiny architecture (its own weights, in a folder of its own).
    const char* taesd = xl ? "taesdxl" : "taesd";
    fs::create_directories(out / taesd);
    auto cfg_json = default_taesd_config();
    write_json(out / taesd / "config.json", cfg_json);
    AutoencoderTiny m(AutoencoderTinyConfig::from_json(cfg_json, std::string(taesd) + "/config.json"));
    randomize_parameters(*m, seed++);
    r.taesd_parameters = count_parameters(*m);
    r.bytes_written += save_module(*m, out / taesd / "diffusion_pytorch_model.safetensors", o.dtype);
  }
  return r;
}

namespace {
template <typename M>
std::vector<std::string> module_keys_of(const M& m) {
  std::vector<std::string> keys;
  for (const auto& kv : state_dict(*m)) keys.push_back(kv.first);
  return keys;
}
}  // namespace

uint64_t write_ldm_single_file(const std::string& dir, const std::string& path, bool open_clip, uint64_t seed) {
  namespace cv = convert;
  std::vector<std::pair<std::string, torch::Tensor>> out;
  auto append = [&](std::vector<std::pair<std::string, torch::Tensor>> v) {
    for (auto& kv : v) out.push_back(std::move(kv));
  };
  const auto cfg = [&](const std::string& sub) {
    const std::string p = dir + "/" + sub + "/config.json";
    return std::make_pair(read_json_file(p), p);
  };
  const bool sdxl = is_file(dir + "/text_encoder_2/config.json");
  const auto [uj, up] = cfg("unet");
  const auto ufile = SafeTensorsFile::open(find_weights(dir + "/unet"));
  append(cv::scatter_ldm(ufile.load_all(),
                         cv::unet_ldm_table(module_keys_of(UNet2DConditionModel(UNet2DConditionConfig::from_json(uj, up))))));
  const auto [vj, vp] = cfg("vae");
  const auto vfile = SafeTensorsFile::open(find_weights(dir + "/vae"));
  append(cv::scatter_ldm(vfile.load_all(),
                         cv::vae_ldm_table(module_keys_of(AutoencoderKL(AutoencoderKLConfig::from_json(vj, vp))))));
  auto g = at::detail::createCPUGenerator(seed + 1000);
  // One text encoder's tensors in `layout` under `prefix`.
  const auto text_encoder = [&](const std::string& sub, cv::TextEncoderLayout layout, const std::string& prefix) {
    const auto [tj, tp] = cfg(sub);
    const auto tcfg = CLIPTextConfig::from_json(tj, tp);
    const auto tfile = SafeTensorsFile::open(find_weights(dir + "/" + sub));
    auto tw = tfile.load_all();
    tw.erase("text_model.embeddings.position_ids");
    return std::make_pair(tcfg, cv::scatter_ldm(tw, cv::text_encoder_ldm_table(module_keys_of(CLIPTextModel(tcfg)),
                                                                                layout, prefix)));
  };
  const auto position_ids = [](const CLIPTextConfig& c) {
    return torch::arange(c.max_position_embeddings, torch::kLong).view({1, -1});
  };
  if (sdxl) {
    auto [c1, te1] = text_encoder("text_encoder", cv::TextEncoderLayout::HfClip, cv::kSdxlClipPrefix);
    te1.emplace_back(std::string(cv::kSdxlClipPrefix) + "text_model.embeddings.position_ids", position_ids(c1));
    append(std::move(te1));
    auto [c2, te2] = text_encoder("text_encoder_2", cv::TextEncoderLayout::OpenClip, cv::kSdxlOpenClipPrefix);
    if (!c2.with_projection)
      throw FormatError(dir + "/text_encoder_2/config.json", "an SDXL text_encoder_2 must be a CLIPTextModelWithProjection");
    const auto dt = te2.front().second.dtype();
    te2.emplace_back(std::string(cv::kSdxlOpenClipPrefix) + "logit_scale", torch::tensor(4.6052f).to(dt));
    append(std::move(te2));
  } else {
    const auto layout = open_clip ? cv::TextEncoderLayout::OpenClip : cv::TextEncoderLayout::HfClip;
    auto [tcfg, text] = text_encoder("text_encoder", layout, "");
    if (open_clip) {
      // SD 2.x conditions on the penultimate layer: real files store one more resblock (random here).
      const std::string last = std::string(cv::kOpenClipPrefix) + "transformer.resblocks." +
                               std::to_string(tcfg.num_hidden_layers - 1) + ".";
      const std::string extra = std::string(cv::kOpenClipPrefix) + "transformer.resblocks." +
                                std::to_string(tcfg.num_hidden_layers) + ".";
      std::vector<std::pair<std::string, torch::Tensor>> more;
      for (const auto& [k, t] : text)
        if (k.rfind(last, 0) == 0)
          more.emplace_back(extra + k.substr(last.size()), torch::randn(t.sizes(), g).to(t.dtype()) * 0.02);
      for (auto& kv : more) text.push_back(std::move(kv));
      const auto dt = text.front().second.dtype();
      text.emplace_back(std::string(cv::kOpenClipPrefix) + "text_projection",
                        torch::randn({tcfg.hidden_size, tcfg.hidden_size}, g).to(dt) * 0.02);
      text.emplace_back(std::string(cv::kOpenClipPrefix) + "logit_scale", torch::tensor(4.6052f).to(dt));
    } else {
      text.emplace_back(std::string(cv::kHfClipPrefix) + "text_model.embeddings.position_ids", position_ids(tcfg));
    }
    append(std::move(text));
  }
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
  save_safetensors(path, out, {{"format", "pt"}, {"generator", "streamdiffusion make-random-model --single-file"}});
  return file_size_bytes(path);
}

}  // namespace sd
