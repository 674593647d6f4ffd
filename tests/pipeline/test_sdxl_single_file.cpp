// SDXL single-file checkpoints (Stability's sgm layout: model.diffusion_model.*, first_stage_model.*,
// conditioner.embedders.0.transformer.* CLIP ViT-L, conditioner.embedders.1.model.* OpenCLIP bigG) through
// load_pipeline: the tiny-sdxl folder written as one file gives bit-identical text embeddings, UNet and VAE outputs
// (with --config), a small SDXL-shaped folder whose configs follow the published defaults gives them without
// --config (the inferred configs are the folder's), inference, and the errors of incomplete files. The golden
// stream cases through the same file are in test_pipeline_golden.cpp (SdxlSingleFile).
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/cli_run.h"
#include "common/fixtures.h"
#include "config_only_folder.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/ldm_checkpoint.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"
#include "models/clip_text_model.h"
#include "models/random_model.h"
#include "models/unet_2d_condition.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/model_defaults.h"
#include "pipeline/rng.h"
#include "sdxl_single_file_fixture.h"

namespace sd {
namespace {

namespace fs = std::filesystem;
namespace cv = convert;
using torch::Tensor;

#define SD_REQUIRE_SDXL_FILE()                                                     \
  if (test::tiny_sdxl_single_file().empty()) GTEST_SKIP() << test::kTinySdxl << " not in the fixture root"

std::shared_ptr<const DiffusionModels> load(const std::string& path, LoadOptions opt) {
  opt.threads = -1;
  return load_pipeline(path, opt);
}

// What the three converted components give: encode_text rows for a few prompts (prompt_2 too), one UNet call with
// added conditioning, a VAE encode (rng draw) and decode.
std::vector<Tensor> outputs(const DiffusionModels& m, int64_t latent = 8) {
  std::vector<Tensor> out;
  for (const char* p : {"a photo of a cat", "", "an oil painting of a fox in the snow, trending on artstation"}) {
    const auto t = m.encode_text(p);
    out.push_back(t.embeds);
    out.push_back(t.pooled);
  }
  const auto t2 = m.encode_text("a cat", std::string("a dog"));
  out.push_back(t2.embeds);
  out.push_back(t2.pooled);
  auto g = at::detail::createCPUGenerator(7);
  const int64_t px = latent * m.vae_scale_factor();
  const Tensor x = torch::randn({2, m.latent_channels(), latent, latent}, g).to(m.dtype());
  const Tensor ts = torch::tensor({999, 259}, torch::kLong);
  const Tensor ehs = torch::cat({t2.embeds, m.encode_text("x").embeds}, 0);
  const auto added = repeat_added_conditioning(m, t2.pooled, 2, px, px);
  out.push_back(m.unet(x, ts, ehs, added));
  TorchRng rng(3);
  const Tensor img = torch::linspace(-1, 1, 3 * px * px).view({1, 3, px, px}).to(m.dtype());
  out.push_back(m.encode_image(img, rng));
  out.push_back(m.decode_latent(x.narrow(0, 0, 1)));
  return out;
}

void expect_identical(const std::vector<Tensor>& a, const std::vector<Tensor>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].sizes(), b[i].sizes()) << what << " output " << i;
    EXPECT_TRUE(torch::equal(a[i], b[i])) << what << " output " << i << " max diff "
                                          << (a[i].to(torch::kDouble) - b[i].to(torch::kDouble)).abs().max().item<double>();
  }
}

// ---- the tiny-sdxl folder as a single file ----------------------------------------------------------------------

TEST(SdxlSingleFile, WrittenInThePublishedLayoutAndInspected) {
  SD_REQUIRE_SDXL_FILE();
  const auto f = SafeTensorsFile::open(test::tiny_sdxl_single_file());
  // The published names (a few per component), literally.
  for (const char* k : {"model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
                        "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
                        "model.diffusion_model.middle_block.1.transformer_blocks.1.norm3.weight",
                        "model.diffusion_model.output_blocks.1.2.conv.weight",
                        "first_stage_model.decoder.up.3.block.0.conv1.weight",
                        "first_stage_model.encoder.mid.attn_1.q.weight",
                        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
                        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
                        "conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_proj.bias",
                        "conditioner.embedders.1.model.positional_embedding", "conditioner.embedders.1.model.ln_final.weight",
                        "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.logit_scale",
                        "alphas_cumprod"})
    EXPECT_TRUE(f.contains(k)) << k;
  EXPECT_FALSE(f.contains("conditioner.embedders.1.model.transformer.resblocks.3.ln_1.weight"));
  EXPECT_FALSE(f.contains("cond_stage_model.transformer.text_model.final_layer_norm.weight"));
  // OpenCLIP's [hidden, proj] text_projection = diffusers' weight transposed.
  const auto te2 = SafeTensorsFile::open(test::fixture_path(std::string(test::kTinySdxl) + "/text_encoder_2/model.safetensors"));
  EXPECT_TRUE(torch::equal(f.get("conditioner.embedders.1.model.text_projection"), te2.get("text_projection.weight").t()));
  EXPECT_EQ(f.info("conditioner.embedders.1.model.text_projection").shape, (std::vector<int64_t>{8, 12}));

  const auto info = cv::inspect_ldm_checkpoint(f);
  EXPECT_EQ(info.family, cv::LdmFamily::SDXL);
  EXPECT_STREQ(cv::family_name(info.family), "SDXL");
  EXPECT_TRUE(info.has_unet && info.has_vae && info.has_text_encoder && info.has_text_encoder_2);
  EXPECT_EQ(info.text_prefix, cv::kSdxlClipPrefix);
  EXPECT_EQ(info.text_encoder_2_prefix, cv::kSdxlOpenClipPrefix);
  const auto& u = info.unet_config;
  EXPECT_EQ(u.at("block_out_channels"), nlohmann::json({16, 32}));
  EXPECT_EQ(u.at("layers_per_block"), 1);
  EXPECT_EQ(u.at("transformer_layers_per_block"), nlohmann::json({1, 2}));
  EXPECT_EQ(u.at("down_block_types"), nlohmann::json({"DownBlock2D", "CrossAttnDownBlock2D"}));
  EXPECT_EQ(u.at("cross_attention_dim"), 12);
  EXPECT_EQ(u.at("use_linear_projection"), true);
  EXPECT_EQ(u.at("addition_embed_type"), "text_time");
  EXPECT_EQ(u.at("addition_time_embed_dim"), 8);  // (label_emb input 60 - projection_dim 12) / 6
  EXPECT_EQ(u.at("projection_class_embeddings_input_dim"), 60);
  EXPECT_EQ(u.at("sample_size"), 128);
  const auto& t1 = info.text_encoder_config;
  EXPECT_EQ(t1.at("hidden_size"), 4);
  EXPECT_EQ(t1.at("num_hidden_layers"), 2);
  EXPECT_EQ(t1.at("hidden_act"), "quick_gelu");
  const auto& t2 = info.text_encoder_2_config;
  EXPECT_EQ(t2.at("hidden_size"), 8);
  EXPECT_EQ(t2.at("num_hidden_layers"), 3);  // every stored resblock (SD 2.x drops the last)
  EXPECT_EQ(t2.at("intermediate_size"), 32);
  EXPECT_EQ(t2.at("projection_dim"), 12);
  EXPECT_EQ(t2.at("hidden_act"), "gelu");
  EXPECT_EQ(t2.at("architectures"), nlohmann::json({"CLIPTextModelWithProjection"}));
  EXPECT_TRUE(CLIPTextConfig::from_json(t2, "inferred").with_projection);
  EXPECT_DOUBLE_EQ(info.vae_config.at("scaling_factor").get<double>(), 0.13025);
  EXPECT_EQ(info.vae_config.at("force_upcast"), true);
  EXPECT_NE(info.sample_size_note.find("--size 512x512"), std::string::npos) << info.sample_size_note;
  EXPECT_EQ(info.prediction_type, "epsilon");

  // Unused keys: the DDPM buffers, position_ids and logit_scale are known; nothing else is left over.
  const auto folder_cfg = [&](const std::string& c) {
    return read_json_file(test::fixture_path(std::string(test::kTinySdxl) + "/" + c + "/config.json"));
  };
  const auto keys = [](const auto& m) {
    std::vector<std::string> k;
    for (const auto& kv : state_dict(*m)) k.push_back(kv.first);
    return k;
  };
  const auto tu = cv::unet_ldm_table(keys(UNet2DConditionModel(UNet2DConditionConfig::from_json(folder_cfg("unet"), "u"))));
  const auto tv = cv::vae_ldm_table(keys(AutoencoderKL(AutoencoderKLConfig::from_json(folder_cfg("vae"), "v"))));
  const auto tt1 = cv::text_encoder_ldm_table(keys(CLIPTextModel(CLIPTextConfig::from_json(folder_cfg("text_encoder"), "t"))),
                                              cv::TextEncoderLayout::HfClip, cv::kSdxlClipPrefix);
  const auto tt2 = cv::text_encoder_ldm_table(
      keys(CLIPTextModel(CLIPTextConfig::from_json(folder_cfg("text_encoder_2"), "t2"))), cv::TextEncoderLayout::OpenClip,
      cv::kSdxlOpenClipPrefix);
  const auto unused = cv::unused_ldm_keys(f, {&tu, &tv, &tt1, &tt2});
  EXPECT_TRUE(unused.unknown.empty()) << unused.unknown.size() << " unknown, first " << unused.unknown.front();
  const std::set<std::string> known(unused.known.begin(), unused.known.end());
  EXPECT_EQ(known.size(), 12u + 2u);
  EXPECT_TRUE(known.count("conditioner.embedders.1.model.logit_scale"));
  EXPECT_TRUE(known.count("conditioner.embedders.0.transformer.text_model.embeddings.position_ids"));
  EXPECT_FALSE(known.count("conditioner.embedders.1.model.text_projection"));
}

// --config <the folder>: every output is bit-identical to the folder's (float32, and bf16 where both load paths
// cast the same weights; the force_upcast VAE runs in float32 on both).
TEST(SdxlSingleFile, WithConfigSameOutputsAsTheFolder) {
  SD_REQUIRE_SDXL_FILE();
  for (const auto dtype : {c10::kFloat, c10::kBFloat16}) {
    LoadOptions folder_opt, file_opt;
    folder_opt.taesd = file_opt.taesd = "none";
    folder_opt.dtype = file_opt.dtype = dtype;
    file_opt.config = test::fixture_path(test::kTinySdxl);
    const auto a = load(test::fixture_path(test::kTinySdxl), folder_opt);
    const auto b = load(test::tiny_sdxl_single_file(), file_opt);
    EXPECT_NE(b->describe().find("single file, SDXL"), std::string::npos) << b->describe();
    EXPECT_EQ(b->family(), "sdxl");
    EXPECT_EQ(b->pooled_text_dim(), a->pooled_text_dim());
    EXPECT_EQ(b->force_zeros_for_empty_prompt(), a->force_zeros_for_empty_prompt());
    EXPECT_EQ(b->describe().find("force_upcast") != std::string::npos,
              a->describe().find("force_upcast") != std::string::npos);
    expect_identical(outputs(*a), outputs(*b), std::string("--config ") + c10::toString(dtype));
  }
  // A config-only folder (no weights, no tokenizers): the shipped CLIP vocabulary for both tokenizers, tokenizer_2
  // padding with "!" as SDXL's does; prompts encode exactly as with the folder's own tokenizers.
  if (find_clip_tokenizer_dir().empty()) GTEST_SKIP() << "models/clip-tokenizer not found";
  const std::string dir = test::config_only_folder(
      test::fixture_path(test::kTinySdxl),
      {"unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
       "scheduler/scheduler_config.json"},
      "sd-sdxl-config-only");
  LoadOptions o, fo;
  o.config = dir;
  o.taesd = fo.taesd = "none";
  const auto a = load(test::fixture_path(test::kTinySdxl), fo);
  const auto b = load(test::tiny_sdxl_single_file(), o);
  for (const char* p : {"a photo of a cat", "", "an oil painting of a fox in the snow, trending on artstation"}) {
    const auto x = a->encode_text(p), y = b->encode_text(p);
    EXPECT_TRUE(torch::equal(x.embeds, y.embeds)) << p;
    EXPECT_TRUE(torch::equal(x.pooled, y.pooled)) << p;
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}

// ---- without --config: a small SDXL-shaped folder whose configs are the published defaults ----------------------

// The published SDXL configs (make-random-model's) at small widths, chosen so that everything the weights cannot
// tell is what SDXL's configs say (head_dim 64, GroupNorm 32, addition_time_embed_dim 256, quick_gelu / gelu, the
// shipped tokenizers): a single file of it must load without --config into exactly the folder's models.
std::string small_sdxl_folder() {
  static std::string dir;
  if (!dir.empty()) return dir;
  const auto tok = find_clip_tokenizer_dir();
  if (tok.empty()) return "";
  const std::string d = test::make_temp_dir("sd-small-sdxl");
  nlohmann::json u = real_unet_config("sdxl");
  u["block_out_channels"] = {64, 128};
  u["down_block_types"] = {"DownBlock2D", "CrossAttnDownBlock2D"};
  u["up_block_types"] = {"CrossAttnUpBlock2D", "UpBlock2D"};
  u["layers_per_block"] = 1;
  u["transformer_layers_per_block"] = {1, 2};
  u["attention_head_dim"] = {1, 2};
  u["cross_attention_dim"] = 64 + 128;
  u["projection_class_embeddings_input_dim"] = 32 + 6 * 256;
  nlohmann::json t1 = real_text_encoder_config("sdxl");
  t1["hidden_size"] = 64;
  t1["intermediate_size"] = 128;
  t1["num_attention_heads"] = 1;
  t1["num_hidden_layers"] = 2;
  nlohmann::json t2 = real_text_encoder_2_config();
  t2["hidden_size"] = 128;
  t2["intermediate_size"] = 256;
  t2["num_attention_heads"] = 2;
  t2["num_hidden_layers"] = 3;
  t2["projection_dim"] = 32;
  nlohmann::json v = real_vae_config("sdxl");
  v["block_out_channels"] = {32, 64};
  v["down_block_types"] = {"DownEncoderBlock2D", "DownEncoderBlock2D"};
  v["up_block_types"] = {"UpDecoderBlock2D", "UpDecoderBlock2D"};
  v["layers_per_block"] = 1;
  const auto save = [&](torch::nn::Module& m, const std::string& sub, const nlohmann::json& cfg, const char* file,
                        uint64_t seed) {
    fs::create_directories(d + "/" + sub);
    std::ofstream(d + "/" + sub + "/config.json") << cfg.dump(2);
    randomize_parameters(m, seed);
    save_safetensors(d + "/" + sub + "/" + file, state_dict(m));
  };
  UNet2DConditionModel unet(UNet2DConditionConfig::from_json(u, "u"));
  save(*unet, "unet", u, "diffusion_pytorch_model.safetensors", 1);
  AutoencoderKL vae(AutoencoderKLConfig::from_json(v, "v"));
  save(*vae, "vae", v, "diffusion_pytorch_model.safetensors", 2);
  CLIPTextModel te1(CLIPTextConfig::from_json(t1, "t1"));
  save(*te1, "text_encoder", t1, "model.safetensors", 3);
  CLIPTextModel te2(CLIPTextConfig::from_json(t2, "t2"));
  save(*te2, "text_encoder_2", t2, "model.safetensors", 4);
  fs::create_directories(d + "/scheduler");
  std::ofstream(d + "/scheduler/scheduler_config.json") << lcm_scheduler_config().dump(2);
  std::ofstream(d + "/model_index.json") << pipeline_model_index("sdxl").dump(2);
  for (const char* sub : {"tokenizer", "tokenizer_2"}) {
    fs::create_directories(d + "/" + sub);
    for (const char* f : {"vocab.json", "merges.txt"}) fs::copy_file(fs::path(tok) / f, fs::path(d) / sub / f);
  }
  // tokenizer_2 pads with "!" (stabilityai's special_tokens_map.json), as the single-file load assumes.
  const auto tiny_tok2 = test::fixture_path(std::string(test::kTinySdxl) + "/tokenizer_2");
  for (const char* f : {"special_tokens_map.json", "tokenizer_config.json"})
    if (fs::exists(fs::path(tiny_tok2) / f)) fs::copy_file(fs::path(tiny_tok2) / f, fs::path(d) / "tokenizer_2" / f);
  dir = d;
  return dir;
}

TEST(SdxlSingleFile, WithoutConfigTheInferredConfigsAreThePublishedOnes) {
  if (!test::fixture_exists(std::string(test::kTinySdxl) + "/model_index.json")) GTEST_SKIP() << "no tiny-sdxl";
  const std::string dir = small_sdxl_folder();
  if (dir.empty()) GTEST_SKIP() << "models/clip-tokenizer not found";
  const std::string file = dir + "/../small-sdxl.safetensors";
  write_ldm_single_file(dir, file, false, 0);
  LoadOptions o;
  o.taesd = "none";
  const auto a = load(dir, o);
  const auto b = load(file, o);  // no --config: everything inferred
  EXPECT_NE(b->describe().find("single file, SDXL"), std::string::npos) << b->describe();
  EXPECT_EQ(b->pooled_text_dim(), 32);
  EXPECT_DOUBLE_EQ(b->scheduler_config().beta_end, a->scheduler_config().beta_end);
  expect_identical(outputs(*a, 4), outputs(*b, 4), "no --config");
  // The defaults path says what the weights cannot tell (sdxl-turbo is 512 px).
  const auto d = read_model_defaults(file, "", "");
  EXPECT_EQ(d.family, "sdxl");
  bool noted = false;
  for (const auto& w : d.warnings) noted = noted || w.find("--size 512x512") != std::string::npos;
  EXPECT_TRUE(noted);
  EXPECT_NE(d.native_size_reason.find("assumed"), std::string::npos) << d.native_size_reason;
  EXPECT_EQ(d.native_width, 128 * 2);  // sample_size 128 x this VAE's factor 2 (SDXL base: 128 x 8 = 1024)
  // A file named like sdxl-turbo: the family (by name) and its 512 px, still said to be assumed.
  const std::string turbo = dir + "/../small-sdxl-turbo.safetensors";
  fs::copy_file(file, turbo, fs::copy_options::overwrite_existing);
  const auto t = read_model_defaults(turbo, "", "");
  EXPECT_EQ(t.family, "sdxl-turbo");
  EXPECT_EQ(t.native_width, 512);
  EXPECT_NE(t.native_size_reason.find("assumed"), std::string::npos) << t.native_size_reason;
}

// ---- incomplete SDXL files: clear FormatErrors naming the file and the key ---------------------------------------

class SdxlSingleFileErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    if (test::tiny_sdxl_single_file().empty()) GTEST_SKIP() << "no tiny-sdxl";
    src_ = test::tiny_sdxl_single_file();
    tmp_ = test::make_temp_dir("sd-sdxl-sf-errors");
  }
  void TearDown() override {
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  // The file with `edit` applied to its tensors (return false to drop one).
  std::string edited(const std::string& name, const std::function<bool(const std::string&, Tensor&)>& edit) {
    const auto f = SafeTensorsFile::open(src_);
    std::map<std::string, Tensor> keep;
    for (const auto& k : f.keys()) {
      Tensor t = f.get(k).clone();
      if (edit(k, t)) keep[k] = t;
    }
    const std::string p = tmp_ + "/" + name;
    save_safetensors(p, keep);
    return p;
  }
  void expect_error(const std::string& path, bool with_config, const std::vector<std::string>& fragments) {
    LoadOptions o;
    o.taesd = "none";
    if (with_config) o.config = test::fixture_path(test::kTinySdxl);
    try {
      load(path, o);
      ADD_FAILURE() << "no error for " << path << (with_config ? " with --config" : "");
    } catch (const FormatError& e) {
      const std::string m = e.what();
      for (const auto& f : fragments)
        EXPECT_NE(m.find(f), std::string::npos) << "missing '" << f << "' in: " << m << (with_config ? " (--config)" : "");
      std::cout << "  [error] " << m.substr(0, 400) << "\n";
    }
  }
  std::string src_, tmp_;
};

TEST_F(SdxlSingleFileErrors, TextEncoder2Missing) {
  const std::string p = edited("no-te2.safetensors", [](const std::string& k, Tensor&) {
    return k.rfind("conditioner.embedders.1.", 0) != 0;
  });
  for (bool cfg : {false, true}) expect_error(p, cfg, {p, "conditioner.embedders.1.model.", "text_encoder_2"});
  // One resblock tensor missing: the gather names it.
  const std::string q = edited("te2-partial.safetensors", [](const std::string& k, Tensor&) {
    return k != "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight";
  });
  expect_error(q, true, {q, "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_fc.weight", "text_encoder_2"});
  // The first encoder missing.
  const std::string r = edited("no-te1.safetensors", [](const std::string& k, Tensor&) {
    return k.rfind("conditioner.embedders.0.", 0) != 0;
  });
  for (bool cfg : {false, true}) expect_error(r, cfg, {r, "conditioner.embedders.0.transformer."});
}

TEST_F(SdxlSingleFileErrors, TextProjectionWrongShape) {
  // Truncated rows ([hidden - 1, proj]) and a 1-D tensor: with and without --config, the file and the key are named.
  const std::string p = edited("proj-rows.safetensors", [](const std::string& k, Tensor& t) {
    if (k == "conditioner.embedders.1.model.text_projection") t = t.narrow(0, 0, t.size(0) - 1).contiguous();
    return true;
  });
  for (bool cfg : {false, true}) expect_error(p, cfg, {p, "conditioner.embedders.1.model.text_projection"});
  const std::string q = edited("proj-1d.safetensors", [](const std::string& k, Tensor& t) {
    if (k == "conditioner.embedders.1.model.text_projection") t = t.flatten().contiguous();
    return true;
  });
  for (bool cfg : {false, true}) expect_error(q, cfg, {q, "conditioner.embedders.1.model.text_projection"});
  // Transposed by mistake (diffusers' [proj, hidden] stored as is): [12, 8] is not [hidden 8, proj].
  const std::string r = edited("proj-transposed.safetensors", [](const std::string& k, Tensor& t) {
    if (k == "conditioner.embedders.1.model.text_projection") t = t.t().contiguous();
    return true;
  });
  for (bool cfg : {false, true}) expect_error(r, cfg, {r, "conditioner.embedders.1.model.text_projection"});
}

// ---- the CLI --------------------------------------------------------------------------------------------------

#ifdef SD_CLI_PATH
TEST(SdxlSingleFileCli, InfoListsBothTextEncoders) {
  SD_REQUIRE_SDXL_FILE();
  const std::string file = test::tiny_sdxl_single_file();
  auto r = test::run_command(std::string(SD_CLI_PATH) + " info --model " + test::q(file) + " --config " +
                             test::q(test::fixture_path(test::kTinySdxl)));
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* s : {"SDXL", "unet", "text_encoder_2", "CLIPTextModelWithProjection", "vae", "total parameters"})
    EXPECT_NE(r.output.find(s), std::string::npos) << s << " in:\n" << r.output;
  r = test::run_command(std::string(SD_CLI_PATH) + " info --json --model " + test::q(file) + " --config " +
                        test::q(test::fixture_path(test::kTinySdxl)));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(j.at("family"), "SDXL");
  EXPECT_TRUE(j.at("unused_unknown").empty()) << j.at("unused_unknown").dump();
  std::map<std::string, int64_t> params;
  for (const auto& c : j.at("components")) params[c.at("name").get<std::string>()] = c.at("parameters").get<int64_t>();
  // The folder's parameter counts.
  const auto count = [](const std::string& p) {
    int64_t n = 0;
    const auto f = SafeTensorsFile::open(p);
    for (const auto& t : f.tensors())
      if (t.name != "text_model.embeddings.position_ids") n += static_cast<int64_t>(t.numel());
    return n;
  };
  const std::string m = test::fixture_path(test::kTinySdxl);
  EXPECT_EQ(params["text_encoder_2"], count(m + "/text_encoder_2/model.safetensors"));
  EXPECT_EQ(params["text_encoder"], count(m + "/text_encoder/model.safetensors"));
  EXPECT_EQ(params["unet"], count(m + "/unet/diffusion_pytorch_model.safetensors"));
  EXPECT_EQ(params["vae"], count(m + "/vae/diffusion_pytorch_model.safetensors"));
  bool logit = false;
  for (const auto& k : j.at("unused_known")) logit = logit || k == "conditioner.embedders.1.model.logit_scale";
  EXPECT_TRUE(logit);
  // Without --config: inferred, with the sample-size caveat.
  r = test::run_command(std::string(SD_CLI_PATH) + " info --model " + test::q(file));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--size 512x512"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("text_encoder_2"), std::string::npos) << r.output;
}
#endif

}  // namespace
}  // namespace sd
