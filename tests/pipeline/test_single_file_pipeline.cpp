// Single-file checkpoints through load_pipeline and the CLI: the same images as the equal diffusers folder, the
// bad inputs of issue 13 (truncated file, VAE missing, pickles, unknown layout) as clear errors, --vae from a file,
// `info` on a file, and v_prediction in the stream (against the epsilon stream with the converted stub UNet).
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/cli_run.h"
#include "common/error_of.h"
#include "common/fixtures.h"
#include "config_only_folder.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/lcm_scheduler.h"
#include "pipeline/stream_diffusion.h"
#include "stream_outputs.h"
#include "stream_test_stubs.h"

namespace sd {
namespace {

namespace fs = std::filesystem;
using test::load_models;
using test::stream_outputs;

struct FileCase {
  std::string file, folder, dtype;
};
void PrintTo(const FileCase& c, std::ostream* os) { *os << c.file; }

std::vector<FileCase> file_cases() {
  std::vector<FileCase> out;
  if (!test::fixture_exists("single_file/cases.json")) return out;
  const auto j = read_json_file(test::fixture_path("single_file/cases.json"));
  for (const auto& f : j.at("files"))
    out.push_back({f.at("file").get<std::string>(), f.at("equal_diffusers_folder").get<std::string>(),
                   f.at("dtype").get<std::string>()});
  return out;
}

class SingleFilePipeline : public ::testing::TestWithParam<FileCase> {};

// The float32 files hold exactly the folders' weights: the outputs are bit-identical. The float16 file's weights
// are the folder's rounded to fp16 (up to 9.4e-4 apart): the same stream within the fixture README's 1e-2 bound.
TEST_P(SingleFilePipeline, SameImagesAsTheDiffusersFolder) {
  const auto& c = GetParam();
  if (!test::fixture_exists("single_file/" + c.file) || !test::fixture_exists(c.folder)) GTEST_SKIP();
  LoadOptions folder_opt, file_opt;
  folder_opt.taesd = file_opt.taesd = "none";
  file_opt.config = test::fixture_path(c.folder);
  const auto a = stream_outputs(load_models(test::fixture_path(c.folder), folder_opt), 3);
  const auto m = load_models(test::fixture_path("single_file/" + c.file), file_opt);
  EXPECT_NE(m->describe().find("single file"), std::string::npos) << m->describe();
  const auto b = stream_outputs(m, 3);
  // bf16 runs: both load paths cast the same weights, so they agree exactly too (fp32 files).
  if (c.dtype == "float32") {
    folder_opt.dtype = file_opt.dtype = torch::kBFloat16;
    const auto a16 = stream_outputs(load_models(test::fixture_path(c.folder), folder_opt), 3);
    const auto b16 = stream_outputs(load_models(test::fixture_path("single_file/" + c.file), file_opt), 3);
    for (size_t i = 0; i < a16.size(); ++i) EXPECT_TRUE(torch::equal(a16[i], b16[i])) << "bf16 output " << i;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (c.dtype == "float32") {
      EXPECT_TRUE(torch::equal(a[i], b[i])) << "output " << i << " max diff " << (a[i] - b[i]).abs().max().item<double>();
    } else {
      SD_EXPECT_CLOSE(b[i], a[i], 1e-2, 0.0, c.file + " output " + std::to_string(i));
    }
  }
}

// --config as the issue defines it (a folder of config files only, no weights, no tokenizer): the tokenizer is then
// the shipped models/clip-tokenizer, with SD 2.x's "!" padding; prompts encode as with the folder's own tokenizer.
TEST_P(SingleFilePipeline, ConfigOnlyFolderAndTheShippedTokenizer) {
  const auto& c = GetParam();
  if (!test::fixture_exists("single_file/" + c.file) || !test::fixture_exists(c.folder)) GTEST_SKIP();
  if (find_clip_tokenizer_dir().empty()) GTEST_SKIP() << "models/clip-tokenizer not found";
  const std::string dir = test::config_only_folder(
      test::fixture_path(c.folder),
      {"unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"},
      "sd-config-only");
  LoadOptions file_opt, folder_opt;
  file_opt.config = dir;
  file_opt.taesd = folder_opt.taesd = "none";
  const auto a = load_models(test::fixture_path(c.folder), folder_opt);
  const auto b = load_models(test::fixture_path("single_file/" + c.file), file_opt);
  for (const char* prompt : {"a photo of a cat", "", "an oil painting of a fox in the snow, trending on artstation"}) {
    if (c.dtype == "float32")
      EXPECT_TRUE(torch::equal(a->encode_prompt(prompt), b->encode_prompt(prompt))) << prompt;
    else
      SD_EXPECT_CLOSE(b->encode_prompt(prompt), a->encode_prompt(prompt), 1e-2, 0.0, c.file + " text");
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, SingleFilePipeline, ::testing::ValuesIn(file_cases()),
                         [](const auto& info) { return test::test_name(info.param.file); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(SingleFilePipeline);

class SingleFileErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("single_file/tiny-sd15.safetensors")) GTEST_SKIP() << "fixture absent";
    src_ = test::fixture_path("single_file/tiny-sd15.safetensors");
    config_ = test::fixture_path("models/tiny-sd15");
    tmp_ = test::make_temp_dir("sd-single-file");
  }
  void TearDown() override {
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  // load_pipeline must throw FormatError / InvalidArgument whose message holds every fragment.
  void expect_error(const std::string& path, LoadOptions opt, const std::vector<std::string>& fragments) {
    try {
      load_models(path, opt);
      ADD_FAILURE() << "no error for " << path;
    } catch (const Error& e) {
      const std::string m = e.what();
      for (const auto& f : fragments) EXPECT_NE(m.find(f), std::string::npos) << "missing '" << f << "' in: " << m;
      std::cout << "  [error] " << m.substr(0, 300) << "\n";
    }
  }
  // The fixture file without the tensors whose key starts with `drop` (all of them when drop_all).
  std::string without(const std::string& name, const std::string& drop, bool drop_all = true) {
    const auto f = SafeTensorsFile::open(src_);
    std::map<std::string, torch::Tensor> keep;
    bool dropped_one = false;
    for (const auto& k : f.keys()) {
      if (k.rfind(drop, 0) == 0 && (drop_all || !dropped_one)) {
        dropped_one = true;
        continue;
      }
      keep[k] = f.get(k);
    }
    const std::string p = tmp_ + "/" + name;
    save_safetensors(p, keep);
    return p;
  }
  LoadOptions with_config() const {
    LoadOptions o;
    o.config = config_;
    o.taesd = "none";
    return o;
  }
  std::string src_, config_, tmp_;
};

TEST_F(SingleFileErrors, TruncatedFile) {
  std::ifstream in(src_, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  for (size_t keep : {size_t{5}, size_t{1000}, bytes.size() / 2, bytes.size() - 1}) {
    const std::string p = tmp_ + "/truncated.safetensors";
    std::ofstream(p, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(keep));
    expect_error(p, with_config(), {p});
  }
}

TEST_F(SingleFileErrors, VaeMissing) {
  const std::string none = without("no-vae.safetensors", "first_stage_model.");
  expect_error(none, with_config(), {none, "no VAE", "--vae", "--taesd"});
  // ... which TAESD or --vae then supply.
  LoadOptions t = with_config();
  t.taesd = test::fixture_path("models/tiny-sd15/taesd");
  EXPECT_NO_THROW(load_models(none, t));
  LoadOptions v = with_config();
  v.taesd = "";
  v.vae = src_;  // the AutoencoderKL of a full checkpoint (first_stage_model.*)
  const auto with_vae = load_models(none, v);
  LoadOptions ref_opt;
  ref_opt.taesd = "none";
  const auto ref = load_models(test::fixture_path("models/tiny-sd15"), ref_opt);
  const auto z = torch::linspace(-1, 1, 4 * 8 * 8).view({1, 4, 8, 8});
  EXPECT_TRUE(torch::equal(with_vae->decode_latent(z), ref->decode_latent(z)));
  // --vae as a diffusers folder, a diffusers-layout file and a bare original-layout file (keys without
  // first_stage_model., as the published fine-tuned VAE files are): the same decoder.
  std::map<std::string, torch::Tensor> bare;
  const auto full = SafeTensorsFile::open(src_);
  for (const auto& k : full.keys())
    if (k.rfind("first_stage_model.", 0) == 0) bare[k.substr(18)] = full.get(k);
  save_safetensors(tmp_ + "/bare-vae.safetensors", bare);
  for (const std::string& vae : {test::fixture_path("models/tiny-sd15/vae"),
                                 test::fixture_path("models/tiny-sd15/vae/diffusion_pytorch_model.safetensors"),
                                 tmp_ + "/bare-vae.safetensors"}) {
    LoadOptions o = with_config();
    o.taesd = "";
    o.vae = vae;
    EXPECT_TRUE(torch::equal(load_models(none, o)->decode_latent(z), ref->decode_latent(z))) << vae;
  }
  // A bare VAE file with a layer the inferred AutoencoderKL has no place for names it; a training checkpoint's loss
  // weights are known and skipped.
  bare["decoder.up.0.extra.weight"] = torch::ones({4});
  save_safetensors(tmp_ + "/bare-vae-extra.safetensors", bare);
  {
    LoadOptions o = with_config();
    o.taesd = "";
    o.vae = tmp_ + "/bare-vae-extra.safetensors";
    expect_error(none, o, {o.vae, "1 tensor ", "decoder.up.0.extra.weight"});
    bare.erase("decoder.up.0.extra.weight");
    bare["loss.logvar"] = torch::zeros({});
    save_safetensors(tmp_ + "/bare-vae-loss.safetensors", bare);
    o.vae = tmp_ + "/bare-vae-loss.safetensors";
    EXPECT_TRUE(torch::equal(load_models(none, o)->decode_latent(z), ref->decode_latent(z)));
  }
  // A VAE with one tensor missing names it.
  const std::string part = without("part-vae.safetensors", "first_stage_model.decoder.up.", false);
  expect_error(part, with_config(), {part, "VAE", "missing", "first_stage_model.decoder.up."});
}

TEST_F(SingleFileErrors, PickleIsRefusedWithTheConversion) {
  const std::string p = tmp_ + "/model.ckpt";
  std::ofstream(p) << "not even a pickle";
  expect_error(p, with_config(), {p, "arbitrary code", "safetensors", "python -c", "torch.load"});
  const std::string b = tmp_ + "/pytorch_model.bin";
  std::ofstream(b) << "x";
  expect_error(b, {}, {b, "arbitrary code"});
  LoadOptions v;
  v.vae = p;
  v.taesd = "";
  expect_error(test::fixture_path("models/tiny-sd15"), v, {p, "arbitrary code"});
}

TEST_F(SingleFileErrors, UnknownLayout) {
  const std::string p = tmp_ + "/other.safetensors";
  save_safetensors(p, std::map<std::string, torch::Tensor>{{"foo.weight", torch::zeros({4, 4})}});
  expect_error(p, with_config(), {p, "unknown checkpoint layout", "model.diffusion_model"});
  // A diffusers UNet file given as the model says what it looks like.
  const std::string unet = test::fixture_path("models/tiny-sd15/unet/diffusion_pytorch_model.safetensors");
  expect_error(unet, {}, {"diffusers"});
  // No text encoder.
  const std::string no_te = without("no-te.safetensors", "cond_stage_model.");
  expect_error(no_te, with_config(), {no_te, "no text encoder"});
  // A missing file, a config that is not a folder, --config on a folder model.
  expect_error(tmp_ + "/missing.safetensors", {}, {"missing.safetensors"});
  LoadOptions bad = with_config();
  bad.config = tmp_ + "/nope";
  expect_error(src_, bad, {"nope", "--config"});
  LoadOptions folder = with_config();
  expect_error(test::fixture_path("models/tiny-sd15"), folder, {"--config", "single-file"});
}

// Weights of the loaded components that no layer of the built models reads (a --config of another model, a deeper
// block than the config has) are an error naming them, not dropped; a tensor outside those components (an SGM file's
// denoiser.sigmas, say) is not read and does not stop the load.
TEST_F(SingleFileErrors, WeightsNoLayerReadsAreAnErrorNamingThem) {
  const auto with_extra = [&](const std::string& name, const std::map<std::string, torch::Tensor>& extra) {
    const auto f = SafeTensorsFile::open(src_);
    std::map<std::string, torch::Tensor> all;
    for (const auto& k : f.keys()) all[k] = f.get(k);
    for (const auto& kv : extra) all[kv.first] = kv.second;
    const std::string p = tmp_ + "/" + name;
    save_safetensors(p, all);
    return p;
  };
  const std::string deeper = with_extra(
      "deeper.safetensors", {{"model.diffusion_model.input_blocks.1.1.transformer_blocks.7.attn1.to_q.weight",
                              torch::zeros({4, 4})},
                             {"first_stage_model.decoder.up.9.block.0.conv1.weight", torch::zeros({4, 4, 3, 3})}});
  expect_error(deeper, with_config(),
               {deeper, "2 tensors", "fit no layer", "--config " + config_,
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.7.attn1.to_q.weight",
                "first_stage_model.decoder.up.9.block.0.conv1.weight"});
  // (A deeper transformer block than the first ones would change the inferred depth; a layer of no known name does
  // not.)
  const std::string unet_only = with_extra(
      "unknown-unet-layer.safetensors",
      {{"model.diffusion_model.input_blocks.1.1.extra_norm.weight", torch::ones({4})}});
  expect_error(unet_only, with_config(),
               {unet_only, "1 tensor ", "model.diffusion_model.input_blocks.1.1.extra_norm.weight"});
  // Outside the loaded components: loaded, the same model as without it.
  const std::string other = with_extra("sigmas.safetensors", {{"denoiser.sigmas", torch::ones({1000})}});
  const auto a = load_models(other, with_config());
  const auto b = load_models(src_, with_config());
  const auto z = torch::linspace(-1, 1, 4 * 8 * 8).view({1, 4, 8, 8});
  EXPECT_TRUE(torch::equal(a->decode_latent(z), b->decode_latent(z)));
  // Without the VAE loaded from the file (TAESD), its unknown keys are not read either and do not stop the load.
  LoadOptions t = with_config();
  t.taesd = test::fixture_path("models/tiny-sd15/taesd");
  const std::string vae_extra = with_extra(
      "vae-extra.safetensors", {{"first_stage_model.decoder.up.9.block.0.conv1.weight", torch::zeros({4, 4, 3, 3})}});
  EXPECT_NO_THROW(load_models(vae_extra, t));
}

// SD 2.x conditions on the penultimate OpenCLIP layer, so only the file's last resblock is known to be unused: a
// --config whose text encoder has fewer layers than the file's (3 resblocks here, 2 used) leaves a layer unread, which
// is refused as for every other component instead of dropping it.
TEST(SingleFileSd2, ConfigWithFewerTextLayersThanTheFileIsRefused) {
  const std::string model = "models/tiny-sd21", file_rel = "single_file/tiny-sd21.safetensors";
  if (!test::fixture_exists(file_rel) || !test::fixture_exists(model)) GTEST_SKIP() << "fixture absent";
  const std::string file = test::fixture_path(file_rel);
  const std::string dir = test::config_only_folder(
      test::fixture_path(model),
      {"unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"},
      "sd-config-fewer-layers");
  const std::string te_config = dir + "/text_encoder/config.json";
  nlohmann::json te = read_json_file(te_config);
  ASSERT_EQ(te.at("num_hidden_layers"), 2);
  LoadOptions o;
  o.config = dir;
  o.taesd = "none";
  o.tokenizer = test::fixture_path(model + "/tokenizer");
  EXPECT_NO_THROW(load_models(file, o));
  te["num_hidden_layers"] = 1;
  std::ofstream(te_config, std::ios::trunc) << te.dump(2);
  const std::string b = "cond_stage_model.model.transformer.resblocks.1.";
  EXPECT_EQ(test::error_of<Error>([&] { load_models(file, o); }),
            file + ": 12 tensors of the components loaded from this file fit no layer of the models built from "
                   "--config " + dir + " (" + b + "attn.in_proj_bias, " + b + "attn.in_proj_weight, " + b +
                "attn.out_proj.bias, " + b + "attn.out_proj.weight, " + b + "ln_1.bias, ...): a config that does "
                "not match the file (--config of another model?), or layers this loader does not know; they would "
                "be dropped");
  std::error_code ec;
  fs::remove_all(dir, ec);
}

// Without --config the real-SD family defaults are used (README: GroupNorm 32): the tiny VAE's 8-channel blocks do
// not divide into 32 groups, which is a config error naming the file and saying the config was inferred, not a
// crash; with a TAESD (no AutoencoderKL weights needed) the VAE config is still read for the scale factor.
TEST_F(SingleFileErrors, WithoutConfigTheFamilyDefaultsAreUsed) {
  LoadOptions o;
  o.taesd = "none";
  expect_error(src_, o, {src_, "inferred", "norm_num_groups 32"});
}

// ---- the CLI ------------------------------------------------------------------------------------------------------

#ifdef SD_CLI_PATH
using test::RunResult;
RunResult run(const std::string& args) { return test::run_command(std::string(SD_CLI_PATH) + " " + args); }
using test::q;
std::string read_file(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

TEST_F(SingleFileErrors, CliTxt2ImgSameImageAsTheFolder) {
  const std::string common = " --prompt 'a cat' --t-index-list 0,2 --num-inference-steps 4 --size 64x64 --threads 1 "
                             "--seed 5 --taesd none";
  auto r = run("txt2img --model " + q(test::fixture_path("models/tiny-sd15")) + common + " -o " + q(tmp_ + "/a.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  r = run("txt2img --model " + q(src_) + " --config " + q(config_) + common + " -o " + q(tmp_ + "/b.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string a = read_file(tmp_ + "/a.png"), b = read_file(tmp_ + "/b.png");
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "the single-file PNG differs from the folder's";
  // --vae FILE with a folder model: the same again.
  r = run("txt2img --model " + q(test::fixture_path("models/tiny-sd15")) + " --vae " + q(src_) + common + " -o " +
          q(tmp_ + "/c.png"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(read_file(tmp_ + "/c.png") == a);
  r = run("txt2img --model " + q(tmp_ + "/m.ckpt") + common + " -o " + q(tmp_ + "/d.png"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("arbitrary code"), std::string::npos) << r.output;
}

TEST_F(SingleFileErrors, CliInfoOnAFile) {
  auto r = run("info --model " + q(src_));
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* s : {"SD 1.x", "unet", "text_encoder", "vae", "unused keys", "prediction_type epsilon", "assumed",
                        "F32", "total parameters"})
    EXPECT_NE(r.output.find(s), std::string::npos) << s << " in:\n" << r.output;
  // tokenize on a file: the shipped vocabulary, SD 2.x padding with "!" (id 0) like the tiny-sd21 tokenizer.
  r = run("tokenize --model " + q(test::fixture_path("single_file/tiny-sd21.safetensors")) + " --prompt 'a cat'");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto folder = run("tokenize --model " + q(test::fixture_path("models/tiny-sd21")) + " --prompt 'a cat'");
  EXPECT_EQ(r.output, folder.output);
  r = run("info --json --model " + q(test::fixture_path("single_file/tiny-sd21.safetensors")) + " --config " +
          q(test::fixture_path("models/tiny-sd21")));
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(j.at("family"), "SD 2.x");
  EXPECT_TRUE(j.at("unused_unknown").empty());
  int64_t total = 0;
  for (const auto& c : j.at("components")) total += c.at("parameters").get<int64_t>();
  EXPECT_GT(total, 0);
}
#endif

// ---- v_prediction in the stream ---------------------------------------------------------------------------------

// A stub UNet that predicts v for the stub's ε (v = (ε − sqrt(1−ᾱ)·x) / sqrt(ᾱ)); with prediction_type v_prediction
// the stream must give what the ε stub gives with epsilon.
class VStub : public test::StubModels {
 public:
  VStub() { sched_.prediction_type = "v_prediction"; }
  torch::Tensor unet(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& ehs,
                     const AddedConditioning& added, const ControlResiduals& control) const override {
    const torch::Tensor eps = StubModels::unet(x, t, ehs, added, control);
    const torch::Tensor ac = LCMScheduler(sched_).alphas_cumprod().index_select(0, t.to(torch::kLong)).view({-1, 1, 1, 1});
    return (eps - (1 - ac).sqrt() * x) / ac.sqrt();
  }
  const LCMSchedulerConfig& scheduler_config() const override { return sched_; }

 private:
  LCMSchedulerConfig sched_;
};

TEST(VPrediction, StreamEqualsTheEpsilonStream) {
  for (auto cfg_type : {CfgType::None, CfgType::Self, CfgType::Full, CfgType::Initialize}) {
    for (bool batch : {true, false}) {
      StreamConfig c;
      c.t_index_list = {10, 30};
      c.width = c.height = 32;
      c.cfg_type = cfg_type;
      c.guidance_scale = 1.5;
      c.delta = 0.7;
      c.use_denoising_batch = batch;
      if (!batch && cfg_type == CfgType::Self) continue;
      StreamDiffusion e(std::make_shared<test::StubModels>(), c), v(std::make_shared<VStub>(), c);
      e.prepare("a cat", "blurry");
      v.prepare("a cat", "blurry");
      for (int i = 0; i < 4; ++i) {
        const auto x = torch::linspace(-1, 1, 3 * 32 * 32).view({1, 3, 32, 32}) * (0.5 + 0.1 * i);
        EXPECT_TRUE(test::tensors_close(v.img2img(x), e.img2img(x), 1e-4, 1e-4,
                                        "cfg " + std::to_string(static_cast<int>(cfg_type)) + " batch " +
                                            std::to_string(batch) + " call " + std::to_string(i)));
      }
    }
  }
}

TEST(VPrediction, OneShotTxt2ImgEqualsTheEpsilonOne) {
  StreamConfig c;
  c.t_index_list = {10, 30};
  c.width = c.height = 32;
  c.cfg_type = CfgType::None;
  StreamDiffusion e(std::make_shared<test::StubModels>(), c), v(std::make_shared<VStub>(), c);
  e.prepare("a cat");
  v.prepare("a cat");
  for (int i = 0; i < 2; ++i)
    EXPECT_TRUE(test::tensors_close(v.txt2img_one_shot(), e.txt2img_one_shot(), 1e-4, 1e-4,
                                    "one-shot call " + std::to_string(i)));
}

}  // namespace
}  // namespace sd
