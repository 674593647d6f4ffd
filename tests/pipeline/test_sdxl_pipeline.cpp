// SDXL through load_pipeline (fixtures sdxl/, diffusers 0.24): StableDiffusionXLPipeline.encode_prompt (two
// tokenizers and encoders, pooled embeds, force_zeros_for_empty_prompt, prompt_2), _get_add_time_ids, diffusers' own
// SDXL pipeline with the LCMScheduler replayed step by step on our DiffusionModels (1 and 4 steps, with and without
// CFG), bf16 against the float32 reference, and the load errors of broken SDXL folders. The StreamDiffusion-on-SDXL
// cases run in test_pipeline_golden.cpp (suite Sdxl).
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/image.h"
#include "pipeline/lcm_scheduler.h"
#include "pipeline/stream_diffusion.h"

namespace fs = std::filesystem;

namespace sd {
namespace {

using torch::Tensor;

constexpr double kModuleAtol = 1e-4, kModuleRtol = 1e-5;  // README: module outputs
constexpr double kPipeAtol = 5e-4, kPipeRtol = 1e-4;      // README: pipeline latents and images
const std::string kModel = "sdxl/models/tiny-sdxl";

bool have_fixtures() { return test::fixture_exists(kModel + "/model_index.json"); }
#define SD_REQUIRE_SDXL() \
  if (!have_fixtures()) GTEST_SKIP() << kModel << " not in the fixture root"

std::shared_ptr<const DiffusionModels> tiny_sdxl(const std::string& taesd = "none",
                                                 c10::ScalarType dtype = c10::kFloat) {
  LoadOptions o;
  o.threads = -1;
  o.taesd = taesd;
  o.dtype = dtype;
  return load_pipeline(test::fixture_path(kModel), o);
}

std::shared_ptr<const DiffusionModels> shared_fp32() {
  static auto m = tiny_sdxl();
  return m;
}

nlohmann::json module_cases() { return read_json_file(test::fixture_path("sdxl/modules/cases.json")); }

TEST(SdxlModels, LoadsAsAnSdxlModelSet) {
  SD_REQUIRE_SDXL();
  const auto m = shared_fp32();
  EXPECT_EQ(m->family(), "sdxl");
  EXPECT_EQ(m->pooled_text_dim(), 12);
  EXPECT_TRUE(m->force_zeros_for_empty_prompt());
  EXPECT_EQ(m->vae_scale_factor(), 8);
  EXPECT_NE(m->describe().find("SDXL, text 4+8-d, pooled 12"), std::string::npos) << m->describe();
  // The folder's taesdxl/ is found by default (and never an SD taesd/).
  LoadOptions o;
  o.threads = -1;
  const auto t = load_pipeline(test::fixture_path(kModel), o);
  EXPECT_NE(t->describe().find("TAESDXL"), std::string::npos) << t->describe();
}

class SdxlEncodePrompt : public ::testing::TestWithParam<std::string> {};

TEST_P(SdxlEncodePrompt, MatchesStableDiffusionXLPipeline) {
  SD_REQUIRE_SDXL();
  const std::string name = GetParam();
  const auto args = module_cases().at("modules").at("encode_prompt").at("cases").at(name);
  const auto ref = SafeTensorsFile::open(test::fixture_path("sdxl/modules/tiny-sdxl/encode_prompt.safetensors"));
  const auto m = shared_fp32();
  const auto opt_str = [&](const char* k) -> std::optional<std::string> {
    if (!args.contains(k) || args.at(k).is_null()) return std::nullopt;
    return args.at(k).get<std::string>();
  };
  const TextEmbeddings pos = m->encode_text(args.at("prompt").get<std::string>(), opt_str("prompt_2"));
  ASSERT_EQ(pos.embeds.sizes(), (std::vector<int64_t>{1, 77, 12}));
  SD_EXPECT_CLOSE(pos.embeds, ref.get(name + ".prompt_embeds"), kModuleAtol, kModuleRtol, name + " prompt_embeds");
  SD_EXPECT_CLOSE(pos.pooled, ref.get(name + ".pooled_prompt_embeds"), kModuleAtol, kModuleRtol,
                  name + " pooled_prompt_embeds");
  if (!args.at("do_classifier_free_guidance").get<bool>()) {
    EXPECT_FALSE(ref.contains(name + ".negative_prompt_embeds"));
    return;
  }
  TextEmbeddings neg;
  const auto negative = opt_str("negative_prompt");
  if (!negative && m->force_zeros_for_empty_prompt()) {
    // diffusers: no negative prompt + force_zeros_for_empty_prompt -> zeros, not the encoding of "".
    neg = {torch::zeros_like(pos.embeds), torch::zeros_like(pos.pooled)};
  } else {
    neg = m->encode_text(negative.value_or(""), opt_str("negative_prompt_2").has_value()
                                                    ? opt_str("negative_prompt_2")
                                                    : negative);
  }
  SD_EXPECT_CLOSE(neg.embeds, ref.get(name + ".negative_prompt_embeds"), kModuleAtol, kModuleRtol,
                  name + " negative_prompt_embeds");
  SD_EXPECT_CLOSE(neg.pooled, ref.get(name + ".negative_pooled_prompt_embeds"), kModuleAtol, kModuleRtol,
                  name + " negative_pooled_prompt_embeds");
}

INSTANTIATE_TEST_SUITE_P(TinySdxl, SdxlEncodePrompt,
                         ::testing::Values("cfg_neg", "cfg_noneg_forcezeros", "cfg_emptyneg", "nocfg", "cfg_prompt2"),
                         [](const auto& info) { return test::test_name(info.param); });

TEST(SdxlEncodePrompt, EmptyNegativeIsEncodedNotZeros) {
  // StreamDiffusion's default negative prompt is "": the stream encodes it (the cfg_emptyneg case), it is not zeros.
  SD_REQUIRE_SDXL();
  const auto e = shared_fp32()->encode_text("");
  EXPECT_GT(e.embeds.abs().max().item<double>(), 0.1);
  EXPECT_GT(e.pooled.abs().max().item<double>(), 0.01);
}

TEST(SdxlAddTimeIds, MatchesGetAddTimeIds) {
  SD_REQUIRE_SDXL();
  const auto ref = SafeTensorsFile::open(test::fixture_path("sdxl/modules/tiny-sdxl/add_time_ids.safetensors"));
  const auto cases = module_cases().at("modules").at("add_time_ids");
  ASSERT_EQ(cases.size(), 3u);
  for (const auto& c : cases) {
    const auto o = c.at("original_size").get<std::vector<int64_t>>();
    const auto k = c.at("crops_coords_top_left").get<std::vector<int64_t>>();
    const auto t = c.at("target_size").get<std::vector<int64_t>>();
    const Tensor ours = sdxl_add_time_ids(o[0], o[1], k[0], k[1], t[0], t[1]);
    EXPECT_TRUE(torch::equal(ours, ref.get(c.at("name").get<std::string>()))) << c.dump() << "\n" << ours;
  }
}

// diffusers' StableDiffusionXLPipeline + LCMScheduler, replayed on our models: per step the UNet inputs (sample,
// timestep, text rows, pooled rows, time ids), its output, the guided prediction, the LCM step and the injected
// noise; then the AutoencoderKL decode and the uint8 image.
class SdxlDiffusersPipeline : public ::testing::TestWithParam<std::string> {};

TEST_P(SdxlDiffusersPipeline, MatchesReference) {
  SD_REQUIRE_SDXL();
  const auto all = read_json_file(test::fixture_path("sdxl/pipeline/cases.json"));
  const nlohmann::json* c = nullptr;
  for (const auto& x : all.at("cases"))
    if (x.at("file").get<std::string>() == GetParam() + ".safetensors") c = &x;
  ASSERT_NE(c, nullptr) << GetParam();
  const auto& p = c->at("params");
  const auto f = SafeTensorsFile::open(test::fixture_path("sdxl/pipeline/" + GetParam() + ".safetensors"));
  const auto m = shared_fp32();
  const double g = p.at("guidance_scale").get<double>();
  const bool cfg = g > 1.0;
  ASSERT_EQ(cfg, c->at("do_classifier_free_guidance").get<bool>());
  const int64_t H = p.at("height").get<int64_t>(), W = p.at("width").get<int64_t>();

  const TextEmbeddings pos = m->encode_text(p.at("prompt").get<std::string>());
  TextEmbeddings neg;
  if (cfg) {
    if (p.at("negative_prompt").is_null() && m->force_zeros_for_empty_prompt())
      neg = {torch::zeros_like(pos.embeds), torch::zeros_like(pos.pooled)};
    else
      neg = m->encode_text(p.at("negative_prompt").get<std::string>());
  }
  const Tensor ehs = cfg ? torch::cat({neg.embeds, pos.embeds}) : pos.embeds;
  AddedConditioning added = repeat_added_conditioning(*m, pos.pooled, ehs.size(0), H, W);
  if (cfg) added.text_embeds = torch::cat({neg.pooled, pos.pooled});

  LCMScheduler sched(m->scheduler_config());
  const auto timesteps = sched.timesteps(p.at("num_inference_steps").get<int64_t>());
  EXPECT_EQ(timesteps, c->at("timesteps").get<std::vector<int64_t>>());
  Tensor x = f.get("latents_in"), denoised;
  int draw = 0;
  for (size_t i = 0; i < timesteps.size(); ++i) {
    const std::string s = "step" + std::to_string(i) + ".";
    const Tensor sample = cfg ? torch::cat({x, x}) : x;
    const Tensor t = torch::full({sample.size(0)}, timesteps[i], torch::kLong);
    EXPECT_EQ(f.get(s + "timestep").item<int64_t>(), timesteps[i]);
    SD_EXPECT_CLOSE(sample, f.get(s + "unet_sample"), kPipeAtol, kPipeRtol, s + "unet_sample");
    SD_EXPECT_CLOSE(ehs, f.get(s + "encoder_hidden_states"), kModuleAtol, kModuleRtol, s + "encoder_hidden_states");
    SD_EXPECT_CLOSE(added.text_embeds, f.get(s + "text_embeds"), kModuleAtol, kModuleRtol, s + "text_embeds");
    EXPECT_TRUE(torch::equal(added.time_ids, f.get(s + "time_ids"))) << s << added.time_ids;
    const Tensor out = m->unet(sample, t, ehs, added);
    SD_EXPECT_CLOSE(out, f.get(s + "unet_out"), kPipeAtol, kPipeRtol, s + "unet_out");
    Tensor eps = out;
    if (cfg) {
      const auto h = out.chunk(2);
      eps = h[0] + g * (h[1] - h[0]);
    }
    SD_EXPECT_CLOSE(eps, f.get(s + "guided_noise_pred"), kPipeAtol, kPipeRtol, s + "guided_noise_pred");
    const LCMCoefficients k = sched.coefficients(timesteps[i]);
    denoised = k.c_out * ((x - k.beta_prod_t_sqrt * eps) / k.alpha_prod_t_sqrt) + k.c_skip * x;
    SD_EXPECT_CLOSE(denoised, f.get(s + "denoised"), kPipeAtol, kPipeRtol, s + "denoised");
    if (i + 1 < timesteps.size()) {
      const LCMCoefficients n = sched.coefficients(timesteps[i + 1]);
      x = n.alpha_prod_t_sqrt * denoised + n.beta_prod_t_sqrt * f.get("rng" + std::to_string(draw++) + ".randn");
    } else {
      x = denoised;
    }
    SD_EXPECT_CLOSE(x, f.get(s + "prev_sample"), kPipeAtol, kPipeRtol, s + "prev_sample");
  }
  EXPECT_EQ(draw, static_cast<int>(c->at("random_draws").size()));
  const Tensor image = m->decode_latent(x);
  SD_EXPECT_CLOSE(x / 0.13025, f.get("vae_decode.in"), kPipeAtol, kPipeRtol, "vae_decode.in");
  SD_EXPECT_CLOSE(image, f.get("vae_decode.out"), kPipeAtol, kPipeRtol, "vae_decode.out");
  // The uint8 image: at most one level off (float32 rounding at .5 boundaries; the README's f64 column).
  const Tensor u8 = tensor_to_image(image)[0].to(torch::kInt);
  const Tensor diff = (u8 - f.get("image_u8")[0].to(torch::kInt)).abs();
  EXPECT_LE(diff.max().item<int>(), 1);
}

INSTANTIATE_TEST_SUITE_P(TinySdxl, SdxlDiffusersPipeline,
                         ::testing::Values("xl_pipe_s1_g0", "xl_pipe_s4_g0", "xl_pipe_s1_g2_neg",
                                           "xl_pipe_s4_g1.5_zeros"),
                         [](const auto& info) { return test::test_name(info.param); });

// bf16 (weights, activations; the force_upcast VAE stays float32) against the float32 reference of the 1-step case.
// Measured 0.074 max abs on the decoded image (Xeon with AMX, with oneDNN's AMX kernels and capped at AVX512-BF16
// alike); bound 0.1 + 0.05 x max|ref|, the SD bf16 stream bound (PipelineReducedPrecision).
TEST(SdxlReducedPrecision, Bf16FollowsTheFloat32Reference) {
  SD_REQUIRE_SDXL();
  const auto m = tiny_sdxl("none", c10::kBFloat16);
  EXPECT_NE(m->describe().find("AutoencoderKL in float32 (force_upcast)"), std::string::npos) << m->describe();
  EXPECT_EQ(m->dtype(), c10::kBFloat16);
  EXPECT_EQ(m->autoencoder_dtype(), c10::kFloat);  // what the bench's layout rows go by
  const auto f = SafeTensorsFile::open(test::fixture_path("sdxl/pipeline/xl_pipe_s1_g0.safetensors"));
  const TextEmbeddings pos = m->encode_text("a photo of a cat, trending on artstation");
  EXPECT_EQ(pos.embeds.scalar_type(), c10::kBFloat16);
  const AddedConditioning added = repeat_added_conditioning(*m, pos.pooled, 1, 64, 64);
  const Tensor x = f.get("latents_in").to(c10::kBFloat16);
  LCMScheduler sched(m->scheduler_config());
  const Tensor eps = m->unet(x, torch::full({1}, 999, torch::kLong), pos.embeds, added);
  const LCMCoefficients k = sched.coefficients(999);
  const Tensor denoised = k.c_out * ((x - k.beta_prod_t_sqrt * eps) / k.alpha_prod_t_sqrt) + k.c_skip * x;
  const Tensor image = m->decode_latent(denoised);
  EXPECT_EQ(image.scalar_type(), c10::kBFloat16);
  const Tensor ref = f.get("vae_decode.out");
  const double err = (image.to(torch::kFloat) - ref).abs().max().item<double>();
  std::cout << "[ errors ] sdxl bf16 xl_pipe_s1_g0 image max abs err " << err << "\n";
  EXPECT_TRUE(test::tensors_close(image.to(torch::kFloat), ref, 0.1, 0.05, "sdxl bf16 image"));
}

// ---- Errors of broken SDXL folders -----------------------------------------------------------------------------

// A copy of tiny-sdxl to break.
std::string copy_model(const std::string& tag) {
  const std::string dir = test::make_temp_dir("sdxl_" + tag);
  fs::copy(test::fixture_path(kModel), dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  for (const auto& e : fs::recursive_directory_iterator(dir))
    fs::permissions(e.path(), fs::perms::owner_write, fs::perm_options::add);
  return dir;
}

std::string load_error(const std::string& dir) {
  try {
    LoadOptions o;
    o.threads = -1;
    o.taesd = "none";
    load_pipeline(dir, o);
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(SdxlErrors, MissingTextEncoder2) {
  SD_REQUIRE_SDXL();
  const std::string dir = copy_model("no_te2");
  fs::remove_all(dir + "/text_encoder_2");
  const std::string e = load_error(dir);
  EXPECT_NE(e.find("text_encoder_2/"), std::string::npos) << e;
  EXPECT_NE(e.find("missing"), std::string::npos) << e;
  EXPECT_NE(e.find(dir), std::string::npos) << e;
  // Also when model_index.json does not list it but the UNet is an SDXL one.
  auto index = read_json_file(dir + "/model_index.json");
  index.erase("text_encoder_2");
  index.erase("tokenizer_2");
  index["_class_name"] = "StableDiffusionPipeline";
  std::ofstream(dir + "/model_index.json") << index.dump();
  const std::string e2 = load_error(dir);
  EXPECT_NE(e2.find("text_time"), std::string::npos) << e2;
  EXPECT_NE(e2.find("text_encoder_2"), std::string::npos) << e2;
  fs::remove_all(dir);
}

TEST(SdxlErrors, Tokenizer2WithAnotherVocabularySize) {
  SD_REQUIRE_SDXL();
  const std::string dir = copy_model("tok2_vocab");
  auto vocab = read_json_file(dir + "/tokenizer_2/vocab.json");
  vocab["zzzextra</w>"] = 49408;
  std::ofstream(dir + "/tokenizer_2/vocab.json") << vocab.dump();
  const std::string e = load_error(dir);
  EXPECT_NE(e.find("tokenizer_2/vocab.json"), std::string::npos) << e;
  EXPECT_NE(e.find("49409"), std::string::npos) << e;
  EXPECT_NE(e.find("vocab_size 49408"), std::string::npos) << e;
  fs::remove_all(dir);
}

TEST(SdxlErrors, TextEncoder2WithoutProjection) {
  SD_REQUIRE_SDXL();
  const std::string dir = copy_model("te2_noproj");
  auto cfg = read_json_file(dir + "/text_encoder_2/config.json");
  cfg["architectures"] = {"CLIPTextModel"};
  std::ofstream(dir + "/text_encoder_2/config.json") << cfg.dump();
  const std::string e = load_error(dir);
  // The weights hold text_projection.weight, which a plain CLIPTextModel does not have; either way it is named.
  EXPECT_NE(e.find("text_projection"), std::string::npos) << e;
  fs::remove_all(dir);
}

TEST(SdxlErrors, ModelIndexAndSchedulerOfTheWrongTypeNameTheirFile) {
  SD_REQUIRE_SDXL();
  const std::string dir = copy_model("types");
  // force_zeros_for_empty_prompt as a string: once nlohmann's type_error with no file in it.
  auto index = read_json_file(dir + "/model_index.json");
  index["force_zeros_for_empty_prompt"] = "false";
  std::ofstream(dir + "/model_index.json") << index.dump();
  const std::string e = load_error(dir);
  EXPECT_NE(e.find(dir + "/model_index.json"), std::string::npos) << e;
  EXPECT_NE(e.find("force_zeros_for_empty_prompt"), std::string::npos) << e;
  index["force_zeros_for_empty_prompt"] = false;
  std::ofstream(dir + "/model_index.json") << index.dump();
  // A scheduler config that is no object, with --prediction-type to write into it.
  std::ofstream(dir + "/scheduler/scheduler_config.json") << "[1]";
  try {
    LoadOptions o;
    o.threads = -1;
    o.taesd = "none";
    o.prediction_type = "v_prediction";
    load_pipeline(dir, o);
    ADD_FAILURE() << "no error";
  } catch (const FormatError& x) {
    EXPECT_NE(std::string(x.what()).find("scheduler_config.json: expected a JSON object"), std::string::npos)
        << x.what();
  }
  fs::remove_all(dir);
}

TEST(SdxlErrors, SizeNotAMultipleOfTheVaeFactor) {
  SD_REQUIRE_SDXL();
  StreamConfig c;
  c.width = 60;
  c.height = 64;
  c.t_index_list = {0};
  c.cfg_type = CfgType::None;
  try {
    StreamDiffusion s(shared_fp32(), c);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("size 60x64 is not supported"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("multiples of 8"), std::string::npos) << e.what();
  }
}

// The stream's added conditioning follows its text rows for every cfg type (one row per UNet row).
TEST(SdxlStream, AddedConditioningRowsFollowThePromptRows) {
  SD_REQUIRE_SDXL();
  for (const auto& [cfg, rows] : std::vector<std::pair<CfgType, int64_t>>{
           {CfgType::None, 2}, {CfgType::Self, 2}, {CfgType::Full, 4}, {CfgType::Initialize, 3}}) {
    StreamConfig c;
    c.width = c.height = 64;
    c.t_index_list = {20, 40};
    c.cfg_type = cfg;
    c.guidance_scale = 1.5;
    StreamDiffusion s(shared_fp32(), c);
    s.prepare("a cat", "blurry");
    const auto& a = s.added_conditioning();
    ASSERT_TRUE(a.defined());
    EXPECT_EQ(s.prompt_embeds().size(0), rows) << cfg_type_name(cfg);
    EXPECT_EQ(a.text_embeds.size(0), rows) << cfg_type_name(cfg);
    EXPECT_EQ(a.time_ids.size(0), rows);
    EXPECT_TRUE(torch::equal(a.time_ids[0], sdxl_add_time_ids(64, 64, 0, 0, 64, 64)[0]));
    const int64_t u = s.uncond_rows();
    for (int64_t r = 0; r < rows; ++r)
      EXPECT_TRUE(torch::equal(a.text_embeds[r], r < u ? s.uncond_pooled()[0] : s.cond_pooled()[0]))
          << cfg_type_name(cfg) << " row " << r;
    const Tensor out = s.txt2img();
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{1, 3, 64, 64}));
    EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  }
  // One-shot batch: cond rows only.
  StreamConfig c;
  c.width = c.height = 64;
  c.t_index_list = {0, 30};
  c.cfg_type = CfgType::None;
  StreamDiffusion s(shared_fp32(), c);
  s.prepare("a cat");
  EXPECT_EQ(s.txt2img_one_shot().size(0), 2);
}

}  // namespace
}  // namespace sd

namespace sd {
namespace {

// SDXL LoRAs patch both text encoders (kohya lora_te1_ / lora_te2_, diffusers text_encoder_2.) and the UNet: a fused
// load equals a folder whose weights were patched by hand with W + scale * alpha / rank * up @ down.
TEST(SdxlLora, TextEncoderAndUNetLorasEqualHandPatchedWeights) {
  SD_REQUIRE_SDXL();
  const std::string dir = copy_model("lora");
  const int64_t r = 2;
  const double alpha = 1.0, scale = 0.8;
  torch::manual_seed(3);
  struct Patch {
    std::string component, module, key_stem;  // key_stem: kohya stem or diffusers module path
    bool kohya;
  };
  const std::vector<Patch> patches = {
      {"text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", true},
      {"text_encoder_2", "text_model.encoder.layers.1.mlp.fc1", "lora_te2_text_model_encoder_layers_1_mlp_fc1", true},
      {"unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
       "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k", true},
      {"text_encoder_2", "text_model.encoder.layers.2.self_attn.k_proj",
       "text_encoder_2.text_model.encoder.layers.2.self_attn.k_proj", false},
  };
  std::map<std::string, std::map<std::string, Tensor>> weights;  // component -> patched state dict
  auto weights_file = [&](const std::string& c) {
    return c == "unet" ? dir + "/unet/diffusion_pytorch_model.safetensors" : dir + "/" + c + "/model.safetensors";
  };
  for (const char* c : {"text_encoder", "text_encoder_2", "unet"})
    weights[c] = SafeTensorsFile::open(weights_file(c)).load_all();
  std::vector<std::pair<std::string, Tensor>> kohya, diffusers;
  for (const auto& p : patches) {
    Tensor& w = weights[p.component].at(p.module + ".weight");
    w = w.clone();
    const Tensor down = torch::randn({r, w.size(1)}) * 0.3, up = torch::randn({w.size(0), r}) * 0.3;
    w += scale * (alpha / static_cast<double>(r)) * torch::matmul(up, down);
    if (p.kohya) {
      kohya.emplace_back(p.key_stem + ".lora_down.weight", down);
      kohya.emplace_back(p.key_stem + ".lora_up.weight", up);
      kohya.emplace_back(p.key_stem + ".alpha", torch::tensor(alpha, torch::kFloat));
    } else {
      // diffusers files carry no alpha: the factor is the plain up @ down (alpha = rank).
      diffusers.emplace_back(p.key_stem + ".lora.down.weight", down * std::sqrt(alpha / r));
      diffusers.emplace_back(p.key_stem + ".lora.up.weight", up * std::sqrt(alpha / r));
    }
  }
  const std::string kohya_file = dir + "/xl_kohya.safetensors", diffusers_file = dir + "/xl_diffusers.safetensors";
  save_safetensors(kohya_file, kohya, {});
  save_safetensors(diffusers_file, diffusers, {});
  // The hand-patched folder.
  const std::string patched = copy_model("lora_patched");
  for (auto& [c, sd] : weights) {
    std::vector<std::pair<std::string, Tensor>> v(sd.begin(), sd.end());
    const std::string f = c == "unet" ? patched + "/unet/diffusion_pytorch_model.safetensors"
                                      : patched + "/" + c + "/model.safetensors";
    save_safetensors(f, v, {});
  }
  LoadOptions o;
  o.threads = -1;
  o.taesd = "none";
  o.strict_lora = true;  // every key must patch something
  o.loras = {{kohya_file, scale, ""}, {diffusers_file, scale, ""}};
  const auto fused = load_pipeline(dir, o);
  ASSERT_EQ(fused->loras().size(), 2u);
  EXPECT_TRUE(fused->loras()[0].patches("text_encoder_2"));
  o.loras.clear();
  const auto hand = load_pipeline(patched, o);
  const auto a = fused->encode_text("a photo of a cat"), b = hand->encode_text("a photo of a cat");
  SD_EXPECT_CLOSE(a.embeds, b.embeds, 1e-5, 1e-5, "SDXL LoRA prompt_embeds");
  SD_EXPECT_CLOSE(a.pooled, b.pooled, 1e-5, 1e-5, "SDXL LoRA pooled");
  const auto base = shared_fp32()->encode_text("a photo of a cat");
  EXPECT_GT((a.embeds - base.embeds).abs().max().item<double>(), 1e-3) << "the LoRA changes the text embeddings";
  const Tensor x = torch::randn({1, 4, 8, 8});
  const Tensor t = torch::full({1}, 500, torch::kLong);
  const AddedConditioning added = repeat_added_conditioning(*hand, b.pooled, 1, 64, 64);
  SD_EXPECT_CLOSE(fused->unet(x, t, b.embeds, added), hand->unet(x, t, b.embeds, added), 1e-5, 1e-5, "SDXL LoRA unet");
  // A live scale change re-encodes (the text encoders changed).
  const uint64_t v0 = fused->text_encoder_version();
  fused->set_lora_scale(fused->loras()[0].name, 0.0);
  EXPECT_NE(fused->text_encoder_version(), v0);
  fs::remove_all(dir);
  fs::remove_all(patched);
}

}  // namespace
}  // namespace sd
