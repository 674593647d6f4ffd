// `--lcm-guidance W` end to end through the built CLI on the LCM-distilled fixture pipeline
// (unet_variants/lcm-pipeline, time_cond_proj_dim 32): without the option the UNet gets diffusers'
// LatentConsistencyModelPipeline default (8.5), another W changes the image, and a UNet without time_cond_proj_dim
// refuses the option. (The numerics of the guidance path are pinned by LcmPipelineGolden.)
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <gtest/gtest.h>

#include "common/cli_run.h"
#include "common/fixtures.h"
#include "io/json_config.h"

namespace sd {
namespace {

namespace fs = std::filesystem;

#if defined(SD_CLI_PATH)

using test::RunResult;
RunResult run(const std::string& args) { return test::run_command(std::string(SD_CLI_PATH) + " " + args); }

using test::q;

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(CliLcmGuidance, DefaultIsTheLcmPipelineDefaultAndWChangesTheImage) {
  const std::string folder = "unet_variants/lcm-pipeline";
  if (!test::fixture_exists(folder)) GTEST_SKIP() << folder << " not in the fixture root";
  const std::string tmp = test::make_temp_dir("sd-cli-lcm");
  const std::string base = "txt2img --model " + q(test::fixture_path(folder)) +
                           " --taesd none --prompt 'a photo of a cat' --num-inference-steps 4 --t-index-list 0,1,2,3"
                           " --no-denoising-batch --size 64x64 --threads 1 --seed 7";
  auto out = [&](const std::string& extra, const std::string& name) {
    const auto r = run(base + extra + " -o " + q(tmp + "/" + name));
    EXPECT_EQ(r.status, 0) << r.output;
    return std::make_pair(r.output, read_bytes(tmp + "/" + name));
  };
  const auto [log_default, img_default] = out("", "default.png");
  const auto [log85, img85] = out(" --lcm-guidance 8.5", "w85.png");
  const auto [log2, img2] = out(" --lcm-guidance 2", "w2.png");
  ASSERT_FALSE(img_default.empty());
  EXPECT_NE(log_default.find("LCM guidance 8.5"), std::string::npos) << log_default;
  EXPECT_NE(log2.find("LCM guidance 2"), std::string::npos) << log2;
  EXPECT_EQ(img_default, img85);
  EXPECT_NE(img_default, img2);
  std::error_code ec;
  fs::remove_all(tmp, ec);
}

// A fixture model whose UNet has no time_cond_proj_dim, read from its config rather than assumed ("" when none).
std::string model_without_time_cond_proj() {
  for (const auto& m : test::fixture_models()) {
    const auto u = read_json_file(test::fixture_path("models/" + m + "/unet/config.json"));
    if (!u.contains("time_cond_proj_dim") || u.at("time_cond_proj_dim").is_null()) return m;
  }
  return "";
}

TEST(CliLcmGuidance, RefusedForAUNetWithoutTimeCondProj) {
  const std::string model = model_without_time_cond_proj();
  if (model.empty()) GTEST_SKIP() << "no fixture model without time_cond_proj_dim";
  const std::string tmp = test::make_temp_dir("sd-cli-lcm");
  const auto r = run("txt2img --model " + q(test::fixture_path("models/" + model)) +
                     " --size 64x64 --threads 1 --lcm-guidance 8 -o " + q(tmp + "/x.png"));
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("time_cond_proj_dim"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(tmp + "/x.png"));
  std::error_code ec;
  fs::remove_all(tmp, ec);
}

#else

TEST(CliLcmGuidance, NotBuilt) { GTEST_SKIP() << "the CLI is not part of this build"; }

#endif

}  // namespace
}  // namespace sd
