// The built CLI with LoRAs: `txt2img` / `img2img` with --lcm-lora / --lora reproduce the original StreamDiffusion's
// runs with fused LoRAs (lora/pipeline/cases.json, PNG vs the post-processed fixture output, +-1 per pixel), bad
// LoRA inputs end with one clear error line (exit 1, no crash), `info --lora` lists matched and unmatched keys, and
// the bench loads LoRAs and times a live re-fuse.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "common/cli_run.h"
#include "common/fixtures.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "pipeline/image.h"

#ifdef SD_TEST_HAVE_OPENCV
#include "pipeline/cli_images.h"
#endif

namespace sd {
namespace {

namespace fs = std::filesystem;

#if defined(SD_CLI_PATH) && defined(SD_TEST_HAVE_OPENCV)

using test::RunResult;
RunResult run(const std::string& args) { return test::run_command(std::string(SD_CLI_PATH) + " " + args); }

using test::q;
using test::max_pixel_diff;
using test::read_png_rgb;
using test::write_png_rgb;




std::string lora_path(const std::string& name) { return test::fixture_path("lora/files/" + name + ".safetensors"); }

// The stream options of a case, and its LoRAs as --lcm-lora / --lora arguments (load_lcm_lora -> --lcm-lora).
std::string case_args(const nlohmann::json& p, const std::string& model_arg) {
  std::string tl;
  for (const auto& t : p.at("t_index_list")) tl += (tl.empty() ? "" : ",") + std::to_string(t.get<int>());
  std::ostringstream o;
  o << " --model " << model_arg << " --prompt " << q(p.at("prompt").get<std::string>()) << " --negative-prompt "
    << q(p.at("negative_prompt").get<std::string>()) << " --t-index-list " << tl << " --num-inference-steps "
    << p.at("num_inference_steps").get<int>() << " --cfg-type " << p.at("cfg_type").get<std::string>()
    << " --guidance " << p.at("guidance_scale").get<double>() << " --delta " << p.at("delta").get<double>()
    << " --seed " << p.at("seed").get<int>() << " --size 64x64 --threads 1 --dtype fp32 --taesd "
    << q(test::fixture_path("models/" + p.at("model").get<std::string>() + "/taesd"));
  for (const auto& l : p.at("loras")) {
    const std::string file = lora_path(l.at("file").get<std::string>());
    if (l.at("api") == "load_lcm_lora" && l.at("scale").get<double>() == 1.0)
      o << " --lcm-lora " << q(file);
    else
      o << " --lora " << q(file + ":" + std::to_string(l.at("scale").get<double>()));
  }
  return o.str();
}

class CliLora : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("lora/pipeline/cases.json") || !test::fixture_exists("models/tiny-sd15"))
      GTEST_SKIP() << "LoRA fixtures or tiny-sd15 absent";
    all_ = read_json_file(test::fixture_path("lora/pipeline/cases.json"));
    tmp_ = test::make_temp_dir("sd-cli-lora");
    model_ = q(test::fixture_path("models/tiny-sd15"));
  }
  void TearDown() override {
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  const nlohmann::json& find(const std::string& name) {
    for (const auto& c : all_.at("cases"))
      if (c.at("params").at("name") == name) return c;
    throw std::runtime_error("no case " + name);
  }
  // txt2img: --warmup picks which recorded call is saved. Returns the max pixel difference.
  int64_t txt2img_case(const std::string& name, const std::string& model_arg) {
    const auto& c = find(name);
    const auto& p = c.at("params");
    const auto f = SafeTensorsFile::open(test::fixture_path("lora/pipeline/" + c.at("file").get<std::string>()));
    const int last = p.at("n_calls").get<int>() - 1;
    const std::string out = tmp_ + "/" + name + ".png";
    const auto r = run("txt2img" + case_args(p, model_arg) + " --warmup " + std::to_string(last) + " -o " + q(out));
    EXPECT_EQ(r.status, 0) << r.output;
    const auto got = read_png_rgb(out);
    if (!got.defined()) {
      ADD_FAILURE() << "no PNG: " << r.output;
      return 255;
    }
    return max_pixel_diff(got, tensor_to_image(f.get("call" + std::to_string(last) + ".output"))[0]);
  }
  // img2img over a folder of the case's input frames: output k belongs to input k = the reference's call k + n - 1.
  int64_t img2img_case(const std::string& name, const std::string& model_arg) {
    const auto& c = find(name);
    const auto& p = c.at("params");
    const auto f = SafeTensorsFile::open(test::fixture_path("lora/pipeline/" + c.at("file").get<std::string>()));
    const auto imgs = SafeTensorsFile::open(test::fixture_path("lora/pipeline/input_images.safetensors"));
    const auto& calls = c.at("result").at("calls");
    const std::string in = tmp_ + "/" + name + "_in", out = tmp_ + "/" + name + "_out";
    fs::create_directories(in);
    for (size_t i = 0; i < calls.size(); ++i) {
      char file[32];
      std::snprintf(file, sizeof(file), "frame_%03zu.png", i);
      write_png_rgb(in + "/" + file, imgs.get("image" + std::to_string(calls[i].at("input_image_ids")[0].get<int>())));
    }
    const auto r = run("img2img" + case_args(p, model_arg) + " --input " + q(in) + " --output " + q(out));
    EXPECT_EQ(r.status, 0) << r.output;
    const int n = static_cast<int>(p.at("t_index_list").size());
    int64_t worst = 0;
    int compared = 0;
    for (size_t k = 0; k + n - 1 < calls.size(); ++k) {
      char file[32];
      std::snprintf(file, sizeof(file), "frame_%03zu.png", k);
      const auto got = read_png_rgb(out + "/" + file);
      if (!got.defined()) {
        ADD_FAILURE() << file << " not written: " << r.output;
        return 255;
      }
      worst = std::max(worst, max_pixel_diff(got, tensor_to_image(f.get("call" + std::to_string(k + n - 1) + ".output"))[0]));
      ++compared;
    }
    EXPECT_GT(compared, 0);
    return worst;
  }
  nlohmann::json all_;
  std::string tmp_, model_;
};

TEST_F(CliLora, LcmLoraTxt2ImgReproducesTheReference) {
  EXPECT_LE(txt2img_case("sd15_lcmlora_txt2img_none_t4", model_), 1);
}

// The check: a single-file checkpoint (+ --config) with a kohya LoRA at 0.7 gives exactly the image of the
// diffusers folder with the same LoRA, and both reproduce the reference runs.
TEST_F(CliLora, SingleFileWithLoraEqualsTheFolderRun) {
  if (!test::fixture_exists("single_file/tiny-sd15.safetensors")) GTEST_SKIP() << "no single_file fixtures";
  const std::string file = q(test::fixture_path("single_file/tiny-sd15.safetensors")) + " --config " + model_;
  const auto& p = find("sd15_lora_img2img_self_t2").at("params");  // sd15_kohya_unet_te @ 0.7 (UNet + text encoder)
  ASSERT_EQ(p.at("loras").size(), 1u);
  std::map<std::string, torch::Tensor> images;
  for (const auto& [name, arg] : {std::pair<std::string, std::string>{"folder", model_}, {"file", file}}) {
    const std::string out = tmp_ + "/" + name + ".png";
    const auto r = run("txt2img" + case_args(p, arg) + " -o " + q(out));
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("sd15_kohya_unet_te"), std::string::npos) << r.output;
    images[name] = read_png_rgb(out);
    ASSERT_TRUE(images[name].defined()) << r.output;
  }
  EXPECT_EQ(max_pixel_diff(images["file"], images["folder"]), 0);
  EXPECT_LE(txt2img_case("sd15_lcmlora_txt2img_none_t4", file), 1);
  EXPECT_LE(img2img_case("sd15_lora_img2img_self_t2", file), 1);
}

TEST_F(CliLora, LoraImg2ImgReproducesTheReference) {
  EXPECT_LE(img2img_case("sd15_lora_img2img_self_t2", model_), 1);
  EXPECT_LE(img2img_case("sd15_2lora_img2img_self_t2", model_), 1);
}

TEST_F(CliLora, BadLoraInputsAreOneClearError) {
  const std::string base = "txt2img --model " + model_ + " --size 64x64 --threads 1 -o " + q(tmp_ + "/x.png");
  auto expect_error = [&](const std::string& args, const std::vector<std::string>& parts) {
    const auto r = run(base + " " + args);
    EXPECT_EQ(r.status, 1) << args << "\n" << r.output;
    for (const auto& s : parts) EXPECT_NE(r.output.find(s), std::string::npos) << args << "\n" << r.output;
    EXPECT_EQ(r.output.find("terminate called"), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(tmp_ + "/x.png")) << args;
  };
  // A LoRA for SD 2.x on SD 1.5: each key and both shapes.
  expect_error("--lora " + q(lora_path("sd21_kohya")),
               {"another model family", "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight [4, 32]",
                "Conv2d weight [32, 32, 1, 1]"});
  // A LoRA with a NaN.
  {
    const auto f = SafeTensorsFile::open(lora_path("sd15_kohya_lcm"));
    std::vector<std::pair<std::string, torch::Tensor>> t;
    for (const auto& info : f.tensors()) {
      torch::Tensor v = f.get(info.name).clone();
      if (info.name == "lora_unet_mid_block_attentions_0_proj_out.lora_down.weight") v.view(-1)[0] = std::nanf("");
      t.emplace_back(info.name, v);
    }
    save_safetensors(tmp_ + "/nan.safetensors", t);
    expect_error("--lora " + q(tmp_ + "/nan.safetensors"),
                 {"lora_unet_mid_block_attentions_0_proj_out.lora_down.weight", "NaN or Inf"});
    // Truncated.
    std::ifstream in(lora_path("sd15_kohya_lcm"), std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(tmp_ + "/cut.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() - 1000);
    expect_error("--lora " + q(tmp_ + "/cut.safetensors"), {"cut.safetensors", "truncated"});
  }
  // A pickle.
  std::ofstream(tmp_ + "/lcm.ckpt") << "pickle";
  expect_error("--lora " + q(tmp_ + "/lcm.ckpt"), {"pickle", "convert it to .safetensors"});
  // FILE[:SCALE] edge cases.
  expect_error("--lora " + q(tmp_ + "/missing.safetensors:0.5"), {"--lora", "missing.safetensors' not found"});
  expect_error("--lora " + q(lora_path("sd15_kohya_lcm") + ":"), {"nothing after ':'"});
  expect_error("--lora " + q(lora_path("sd15_kohya_lcm") + ":x"), {"no such file"});
  expect_error("--lora " + q(lora_path("sd15_kohya_lcm") + ":inf"), {"not a finite number"});
  expect_error("--lcm-lora " + q(":1"), {"--lcm-lora", "no file before the scale"});
  // Unmatched keys: a warning by default, an error with --strict-lora.
  {
    const auto f = SafeTensorsFile::open(lora_path("sd15_kohya_lcm"));
    std::vector<std::pair<std::string, torch::Tensor>> t;
    for (const auto& info : f.tensors()) t.emplace_back(info.name, f.get(info.name));
    t.emplace_back("lora_unet_not_a_module.lora_down.weight", torch::zeros({4, 8}));
    t.emplace_back("lora_unet_not_a_module.lora_up.weight", torch::zeros({8, 4}));
    save_safetensors(tmp_ + "/extra.safetensors", t);
    expect_error("--strict-lora --lora " + q(tmp_ + "/extra.safetensors"),
                 {"2 of its 239 keys patch nothing", "lora_unet_not_a_module.lora_down.weight", "--strict-lora"});
    const auto ok = run(base + " --lora " + q(tmp_ + "/extra.safetensors") + " --t-index-list 0");
    EXPECT_EQ(ok.status, 0) << ok.output;
    EXPECT_NE(ok.output.find("2 of its 239 keys patch nothing"), std::string::npos) << ok.output;
  }
}

TEST_F(CliLora, InfoListsMatchedAndUnmatchedKeys) {
  const auto f = SafeTensorsFile::open(lora_path("sd15_kohya_unet_te"));
  std::vector<std::pair<std::string, torch::Tensor>> t;
  for (const auto& info : f.tensors()) t.emplace_back(info.name, f.get(info.name));
  t.emplace_back("lora_te_text_model_encoder_layers_5_mlp_fc1.lora_down.weight", torch::zeros({4, 32}));
  t.emplace_back("lora_te_text_model_encoder_layers_5_mlp_fc1.lora_up.weight", torch::zeros({128, 4}));
  save_safetensors(tmp_ + "/style.safetensors", t);
  auto r = run("info --model " + model_ + " --lora " + q(tmp_ + "/style.safetensors"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("layout kohya, 234 keys: 232 matched, 2 unmatched; scale 1, rank 4/8"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("unet: 66 modules patched"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("text_encoder: 12 modules patched"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("      down_blocks.0.resnets.0.time_emb_proj"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("      lora_te_text_model_encoder_layers_5_mlp_fc1.lora_up.weight"), std::string::npos)
      << r.output;
  r = run("info --json --model " + model_ + " --lora " + q(lora_path("sd15_diffusers") + ":0.5") + " 2>/dev/null");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  ASSERT_EQ(j["loras"].size(), 1u);
  EXPECT_EQ(j["loras"][0]["layout"], "diffusers");
  EXPECT_EQ(j["loras"][0]["scale"], 0.5);
  EXPECT_EQ(j["loras"][0]["matched_keys"], 82);
  EXPECT_EQ(j["loras"][0]["modules"]["text_encoder"].size(), 12u);
  EXPECT_TRUE(j["loras"][0]["unmatched_keys"].empty());
  // Another family: the same error as --lora.
  r = run("info --model " + model_ + " --lora " + q(lora_path("sd21_kohya")));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("another model family"), std::string::npos) << r.output;
}

// info --lora on a TAESD-only model (vae/ holds only its config, like the built-in model) and on a single file.
TEST_F(CliLora, InfoLoraOnTaesdOnlyModelsAndSingleFiles) {
  const std::string m = tmp_ + "/taesd-only";
  fs::copy(test::fixture_path("models/tiny-sd15"), m, fs::copy_options::recursive);
  for (const auto& e : fs::directory_iterator(m + "/vae"))
    if (e.path().extension() == ".safetensors") fs::remove(e.path());
  auto r = run("info --model " + q(m) + " --lora " + q(lora_path("sd15_kohya_lcm")));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("237 matched, 0 unmatched"), std::string::npos) << r.output;
  if (!test::fixture_exists("single_file/tiny-sd15.safetensors")) return;
  r = run("info --model " + q(test::fixture_path("single_file/tiny-sd15.safetensors")) + " --config " + model_ +
          " --lora " + q(lora_path("sd15_kohya_lcm")));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("237 matched, 0 unmatched"), std::string::npos) << r.output;
  // --config is for single files only, in info too.
  r = run("info --model " + model_ + " --config " + model_);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("is for single-file checkpoints"), std::string::npos) << r.output;
}

TEST_F(CliLora, BenchLoadsLorasAndTimesALiveRefuse) {
  const std::string json = tmp_ + "/bench.json";
  const auto r = run("bench --model " + model_ + " --lcm-lora " + q(lora_path("sd15_kohya_lcm")) + " --lora " +
                     q(lora_path("sd15_kohya_unet_te") + ":0.5") +
                     " --sections components --sizes 64 --dtypes fp32 --iters 1 --warmup 0 --threads 1 --json " +
                     q(json));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("LoRAs fused"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("live re-fuse"), std::string::npos) << r.output;
  std::ifstream in(json);
  const auto j = nlohmann::json::parse(in);
  ASSERT_FALSE(j["loads"].empty());
  const auto& l = j["loads"][0]["loras"];
  ASSERT_EQ(l.size(), 2u);
  EXPECT_EQ(l[0]["name"], "sd15_kohya_lcm");
  EXPECT_EQ(l[0]["unet_modules"], 79);
  EXPECT_EQ(l[1]["scale"], 0.5);
  EXPECT_EQ(l[1]["text_encoder_modules"], 12);
  EXPECT_GT(l[1]["refuse_s"].get<double>(), 0.0);
}

#else

TEST(CliLora, NotBuilt) { GTEST_SKIP() << "the CLI is not part of this build (SD_ENGINE_ONLY)"; }

#endif

}  // namespace
}  // namespace sd
