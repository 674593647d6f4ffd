// pipeline/model_defaults: a model's native size and recommended stream settings, from its configs and its optional
// streamdiffusion.json, and the family defaults used when that file is absent.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/ldm_checkpoint.h"
#include "io/safetensors.h"
#include "pipeline/model_defaults.h"

#ifndef SD_SOURCE_DIR_FOR_TESTS
#define SD_SOURCE_DIR_FOR_TESTS "."
#endif

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

void write(const fs::path& p, const json& j) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << j.dump(2);
}

// A config-only pipeline folder (defaults never read weights).
class ModelDefaultsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::temp_directory_path() / ("sd_model_defaults_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
                                         "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
  }
  void TearDown() override { fs::remove_all(root_); }

  // name: the folder name (turbo / lcm are also recognised from it).
  fs::path folder(const std::string& name, int64_t sample_size, json unet_extra = json::object(),
                  json index_extra = json::object(), json sched = json::object(), int vae_levels = 4) {
    for (json* j : {&unet_extra, &index_extra, &sched})
      if (j->is_null()) *j = json::object();  // `{}` at a call site is a JSON null
    const fs::path d = root_ / name;
    json index{{"_class_name", "StableDiffusionPipeline"},
               {"scheduler", {"diffusers", sched.value("_class_name", std::string("PNDMScheduler"))}},
               {"unet", {"diffusers", "UNet2DConditionModel"}},
               {"vae", {"diffusers", "AutoencoderKL"}}};
    index.update(index_extra);
    write(d / "model_index.json", index);
    json unet{{"sample_size", sample_size}, {"cross_attention_dim", 768}};
    unet.update(unet_extra);
    write(d / "unet" / "config.json", unet);
    write(d / "vae" / "config.json", json{{"block_out_channels", std::vector<int>(vae_levels, 128)}});
    if (sched.empty()) sched = json{{"_class_name", "PNDMScheduler"}, {"timestep_spacing", "leading"}};
    write(d / "scheduler" / "scheduler_config.json", sched);
    return d;
  }

  fs::path root_;
};

TEST_F(ModelDefaultsTest, NativeSizeIsSampleSizeTimesVaeScale) {
  // SD 1.5 (64 x 8), SD 2.1-768 (96 x 8), SDXL base (128 x 8), sdxl-turbo (64 x 8), a 3-level VAE (x 4).
  EXPECT_EQ(sd::read_model_defaults(folder("sd15", 64).string()).native_width, 512);
  const auto sd21 = sd::read_model_defaults(folder("sd21-768", 96, {{"cross_attention_dim", 1024}}).string());
  EXPECT_EQ(sd21.native_width, 768);
  EXPECT_EQ(sd21.native_height, 768);
  EXPECT_EQ(sd21.native_size_reason, "UNet sample_size 96 x VAE scale factor 8");
  const auto xl = sd::read_model_defaults(
      folder("sdxl-base", 128, {{"cross_attention_dim", 2048}}, {{"text_encoder_2", {"transformers", "X"}}}).string());
  EXPECT_EQ(xl.native_width, 1024);
  EXPECT_EQ(xl.family, "sdxl");
  const auto xlt = sd::read_model_defaults(
      folder("sdxl-turbo", 64, {{"cross_attention_dim", 2048}}, {{"text_encoder_2", {"transformers", "X"}}}).string());
  EXPECT_EQ(xlt.native_width, 512);
  EXPECT_EQ(xlt.family, "sdxl-turbo");
  EXPECT_EQ(sd::read_model_defaults(folder("three-levels", 16, {}, {}, {}, 3).string()).native_width, 64);
  // No sample_size: unknown (the commands fall back to 512 and say so).
  EXPECT_EQ(sd::read_model_defaults(folder("nosize", 0).string()).native_width, 0);
  // Not a model folder at all: empty defaults, no throw (loading reports it with context).
  EXPECT_EQ(sd::read_model_defaults((root_ / "missing").string()).native_width, 0);
}

TEST_F(ModelDefaultsTest, FamilyDefaults) {
  // sd-turbo: an Euler "trailing" scheduler on an SD 2.x UNet -> one step, no guidance, both modes.
  const auto turbo = sd::read_model_defaults(
      folder("my-model", 64, {{"cross_attention_dim", 1024}}, {},
             {{"_class_name", "EulerDiscreteScheduler"}, {"timestep_spacing", "trailing"}})
          .string());
  EXPECT_EQ(turbo.family, "sd-turbo");
  ASSERT_TRUE(turbo.txt2img.t_index_list.has_value());
  EXPECT_EQ(*turbo.txt2img.t_index_list, std::vector<int64_t>({0}));
  EXPECT_EQ(turbo.img2img.t_index_list->size(), 1u);
  EXPECT_EQ(*turbo.txt2img.cfg_type, "none");
  EXPECT_EQ(*turbo.img2img.cfg_type, "none");
  EXPECT_TRUE(turbo.warnings.empty());
  // "turbo" in the folder name is enough.
  EXPECT_EQ(sd::read_model_defaults(folder("sd-turbo", 64, {{"cross_attention_dim", 1024}}).string() + "/").family,
            "sd-turbo");
  // Plain SD 1.5: the LCM-LoRA recipe's indices (built-in defaults) and a warning naming the fix.
  const auto sd15 = sd::read_model_defaults(folder("stable-diffusion-v1-5", 64).string());
  EXPECT_EQ(sd15.family, "sd15");
  EXPECT_FALSE(sd15.txt2img.t_index_list.has_value());
  ASSERT_EQ(sd15.warnings.size(), 1u);
  EXPECT_NE(sd15.warnings[0].find("LCM-LoRA"), std::string::npos) << sd15.warnings[0];
  EXPECT_NE(sd15.warnings[0].find("turbo"), std::string::npos) << sd15.warnings[0];
  // An LCM-distilled UNet (guidance embedding): 4 steps, no warning.
  const auto lcm = sd::read_model_defaults(folder("dreamshaper", 64, {{"time_cond_proj_dim", 256}}).string());
  EXPECT_EQ(lcm.family, "sd15-lcm");
  EXPECT_EQ(*lcm.txt2img.t_index_list, std::vector<int64_t>({0, 16, 32, 45}));
  EXPECT_TRUE(lcm.warnings.empty());
  // Tiny / custom models: not recognised, built-in defaults, no warning.
  const auto custom = sd::read_model_defaults(folder("tiny", 8, {{"cross_attention_dim", 32}}).string());
  EXPECT_EQ(custom.family, "unknown");
  EXPECT_TRUE(custom.warnings.empty());
}

TEST_F(ModelDefaultsTest, RecommendationsFileOverridesTheFamily) {
  const fs::path d = folder("stable-diffusion-v1-5", 64);
  write(d / sd::kRecommendationsFile,
        json{{"size", "384x256"},
             {"num_inference_steps", 20},
             {"t_index_list", {2, 10}},
             {"guidance", 1.5},
             {"txt2img", {{"t_index_list", {0, 10}}, {"cfg_type", "none"}}},
             {"img2img", {{"delta", 0.7}}},
             {"note", "hello"}});
  const auto r = sd::read_model_defaults(d.string());
  EXPECT_EQ(r.native_width, 384);
  EXPECT_EQ(r.native_height, 256);
  EXPECT_EQ(*r.num_inference_steps, 20);
  EXPECT_EQ(*r.txt2img.t_index_list, std::vector<int64_t>({0, 10}));  // the mode's own list wins
  EXPECT_EQ(*r.img2img.t_index_list, std::vector<int64_t>({2, 10}));  // the top-level one
  EXPECT_DOUBLE_EQ(*r.txt2img.guidance, 1.5);
  EXPECT_DOUBLE_EQ(*r.img2img.guidance, 1.5);
  EXPECT_DOUBLE_EQ(*r.img2img.delta, 0.7);
  EXPECT_FALSE(r.txt2img.delta.has_value());
  EXPECT_EQ(*r.txt2img.cfg_type, "none");
  EXPECT_FALSE(r.img2img.cfg_type.has_value());
  EXPECT_EQ(r.note, "hello");
  EXPECT_NE(r.settings_source.find(sd::kRecommendationsFile), std::string::npos);
  EXPECT_TRUE(r.warnings.empty());  // the author chose the settings
  // Other size spellings.
  sd::ModelDefaults x;
  sd::apply_recommendations_json(R"({"size": [64, 128]})", "f", x);
  EXPECT_EQ(x.native_width, 64);
  EXPECT_EQ(x.native_height, 128);
  sd::apply_recommendations_json(R"({"size": 96})", "f", x);
  EXPECT_EQ(x.native_height, 96);
}

TEST_F(ModelDefaultsTest, BadRecommendationsNameTheFileAndField) {
  const auto error_of = [](const std::string& text) {
    sd::ModelDefaults d;
    try {
      sd::apply_recommendations_json(text, "m/streamdiffusion.json", d);
    } catch (const sd::FormatError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const auto expect_error = [&](const std::string& text, const std::string& want) {
    const std::string e = error_of(text);
    EXPECT_NE(e.find("m/streamdiffusion.json"), std::string::npos) << text << " -> " << e;
    EXPECT_NE(e.find(want), std::string::npos) << text << " -> " << e;
  };
  expect_error("{", "not valid JSON");
  expect_error("[1]", "a JSON object");
  expect_error(R"({"sise": "64x64"})", "unknown field 'sise'");
  expect_error(R"({"txt2img": {"guidanse": 1}})", "unknown field 'txt2img.guidanse'");
  expect_error(R"({"size": "64"})", "field 'size'");
  expect_error(R"({"size": "60x60"})", "multiples of 8");
  expect_error(R"({"size": true})", "field 'size'");
  expect_error(R"({"t_index_list": [0, "a"]})", "field 't_index_list'");
  expect_error(R"({"t_index_list": []})", "field 't_index_list'");
  expect_error(R"({"img2img": {"cfg_type": "sometimes"}})", "field 'img2img.cfg_type'");
  expect_error(R"({"guidance": "high"})", "field 'guidance'");
  expect_error(R"({"delta": 11})", "field 'delta'");
  expect_error(R"({"num_inference_steps": 0})", "field 'num_inference_steps'");
  expect_error(R"({"num_inference_steps": 10, "t_index_list": [0, 10]})", "not below num_inference_steps 10");
  expect_error(R"({"txt2img": 3})", "field 'txt2img'");
  expect_error(R"({"cpu_dtype": "fp16"})", "field 'cpu_dtype': expected \"fp32\" or \"bf16\"");
  expect_error(R"({"cpu_dtype": 32})", "field 'cpu_dtype'");
  expect_error(R"({"txt2img": {"cpu_dtype": "fp32"}})", "unknown field 'txt2img.cpu_dtype'");  // top level only
  expect_error(R"({"cpu_threads": 0})", "field 'cpu_threads': expected an integer in [1, 1024]");
  expect_error(R"({"cpu_threads": 1.5})", "field 'cpu_threads'");
  expect_error(R"({"cpu_threads": "1"})", "field 'cpu_threads'");
  // A folder with a malformed file fails loudly (not silently ignored).
  const fs::path d = folder("broken", 64);
  std::ofstream(d / sd::kRecommendationsFile) << R"({"size": "huge"})";
  EXPECT_THROW(sd::read_model_defaults(d.string()), sd::FormatError);
}

// "cpu_dtype" is what --dtype auto runs on a CPU; an explicit dtype, or a device other than the CPU, ignores it.
TEST_F(ModelDefaultsTest, CpuDtypeAnswersAutoOnTheCpuOnly) {
  const fs::path d = folder("small", 8);
  EXPECT_FALSE(sd::read_model_defaults(d.string()).cpu_dtype.has_value());
  const auto none = sd::read_model_defaults(d.string());
  EXPECT_EQ(sd::dtype_request(none, "auto", true), "auto");  // no opinion: the machine's rule
  write(d / sd::kRecommendationsFile, json{{"cpu_dtype", "fp32"}});
  const auto r = sd::read_model_defaults(d.string());
  ASSERT_TRUE(r.cpu_dtype.has_value());
  EXPECT_EQ(*r.cpu_dtype, "fp32");
  EXPECT_EQ(sd::dtype_request(r, "auto", true), "fp32");
  EXPECT_EQ(sd::dtype_request(r, "auto", false), "auto");  // CUDA keeps its own rule (fp16)
  EXPECT_EQ(sd::dtype_request(r, "bf16", true), "bf16");   // a flag wins
  EXPECT_EQ(sd::dtype_request(r, "int8", true), "int8");
  sd::ModelDefaults b;
  sd::apply_recommendations_json(R"({"cpu_dtype": "bf16"})", "f", b);
  EXPECT_EQ(sd::dtype_request(b, "auto", true), "bf16");
}

// "cpu_threads" is what --threads 0 (the default) runs a CPU stream with; an explicit count, "leave as is" (< 0) or a
// device other than the CPU ignores it.
TEST_F(ModelDefaultsTest, CpuThreadsAnswerTheDefaultThreadCountOnTheCpuOnly) {
  const fs::path d = folder("small", 8);
  EXPECT_EQ(sd::threads_request(sd::read_model_defaults(d.string()), 0, true), 0);  // no opinion: every core
  write(d / sd::kRecommendationsFile, json{{"cpu_threads", 1}});
  const auto r = sd::read_model_defaults(d.string());
  EXPECT_EQ(r.cpu_threads.value_or(0), 1);
  EXPECT_EQ(sd::threads_request(r, 0, true), 1);
  EXPECT_EQ(sd::threads_request(r, 0, false), 0);
  EXPECT_EQ(sd::threads_request(r, 2, true), 2);
  EXPECT_EQ(sd::threads_request(r, -1, true), -1);
}

TEST_F(ModelDefaultsTest, ConfigsOfTheWrongTypeGiveEmptyNotAnError) {
  // A null / numeric scheduler class or spacing: no family guess from them, no exception (the loader reports it).
  const fs::path d = folder("odd", 64, {{"cross_attention_dim", 1024}}, {{"scheduler", nullptr}});
  write(d / "scheduler" / "scheduler_config.json", json{{"_class_name", 7}, {"timestep_spacing", nullptr}});
  const auto r = sd::read_model_defaults(d.string());
  EXPECT_EQ(r.family, "sd21");
  EXPECT_EQ(r.native_width, 512);
  // A VAE config with absurdly many levels does not overflow the scale factor.
  const fs::path deep = folder("deep", 8, {}, {}, {}, 70);
  EXPECT_GT(sd::read_model_defaults(deep.string()).native_width, 0);
}

// A single file with a malformed text encoder: no defaults (and no exception) here; loading names the tensor.
TEST(ModelDefaults, MalformedSingleFileGivesEmptyDefaults) {
  if (!sd::test::fixture_exists("single_file/tiny-sd15.safetensors")) GTEST_SKIP() << "no single_file fixtures";
  const auto src = sd::SafeTensorsFile::open(sd::test::fixture_path("single_file/tiny-sd15.safetensors"));
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  const std::string emb = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
  for (const auto& t : src.tensors())
    tensors.emplace_back(t.name, t.name == emb ? torch::zeros({5}) : src.get(t.name));
  const std::string dir = sd::test::make_temp_dir("sd_bad_single");
  const std::string file = dir + "/bad.safetensors";
  sd::save_safetensors(file, tensors);
  sd::ModelDefaults d;
  EXPECT_NO_THROW(d = sd::read_model_defaults(file));
  EXPECT_EQ(d.native_width, 0);
  try {
    sd::convert::inspect_ldm_checkpoint(sd::SafeTensorsFile::open(file));
    ADD_FAILURE() << "a 1-d token embedding was accepted";
  } catch (const sd::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("token_embedding"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}

TEST(ModelDefaults, FixtureAndBuiltInModels) {
  // The fixture models: UNet sample_size 8 x a 4-level VAE = 64; a custom family (cross_attention_dim 32).
  for (const auto& m : sd::test::fixture_models()) {
    const auto d = sd::read_model_defaults(sd::test::fixture_path("models/" + m));
    EXPECT_EQ(d.native_width, 64) << m;
    EXPECT_EQ(d.family, "unknown") << m;
  }
  // The shipped model: streamdiffusion.json says 64x64 and the settings it is measured with.
  const std::string emoji = std::string(SD_SOURCE_DIR_FOR_TESTS) + "/models/emoji-tiny";
  if (!fs::exists(emoji + "/model_index.json")) GTEST_SKIP() << "no " << emoji;
  const auto d = sd::read_model_defaults(emoji);
  EXPECT_EQ(d.native_width, 64);
  EXPECT_EQ(d.native_height, 64);
  EXPECT_EQ(*d.txt2img.t_index_list, std::vector<int64_t>({0, 16, 32, 45}));
  EXPECT_EQ(*d.img2img.t_index_list, std::vector<int64_t>({32, 45}));
  EXPECT_EQ(*d.img2img.cfg_type, "self");
}

}  // namespace
