// `streamdiffusion bench --controlnet ... [--controlnet-every N] [--control-guidance-end E]` and `make-random-model
// --arch controlnet*` on the fixtures (tiny-sd15 + tiny-controlnet-sd15): the JSON report names the ControlNets,
// every stream row ran them (calls counted, reuse with --controlnet-every 2, timed frames rounded to a multiple of N,
// a guidance range's steps only), components has a controlnet line per ControlNet; bad options are named. Timings
// are not checked (a 64 px model).
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "common/cli_run.h"
#include "common/fixtures.h"

namespace sd {
namespace {

namespace fs = std::filesystem;

#ifdef SD_BENCH_CLI_PATH

using test::q;
using test::RunResult;
RunResult run(const std::string& args) { return test::run_command(std::string(SD_BENCH_CLI_PATH) + " " + args); }

class CliControlNetBench : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = test::fixture_path("models/tiny-sd15");
    cn_ = test::fixture_path("controlnet/models/tiny-controlnet-sd15");
    if (!fs::exists(model_) || !fs::exists(cn_ + "/config.json")) GTEST_SKIP() << "no ControlNet fixtures";
    dir_ = test::make_temp_dir("sd-cn-bench");
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  nlohmann::json bench(const std::string& extra, const std::string& name, int frames = 1) {
    const std::string json = dir_ + "/" + name + ".json";
    const RunResult r = run("bench --model " + q(model_) + " --sizes 64 --dtypes fp32 --sections components,e2e "
                            "--iters 1 --warmup 1 --frames " + std::to_string(frames) + " --threads 1 " + extra +
                            " --json " + q(json));
    EXPECT_EQ(r.status, 0) << r.output;
    if (r.status != 0 || !fs::exists(json)) return {};
    std::ifstream in(json);
    return nlohmann::json::parse(in);
  }
  std::string model_, cn_, dir_;
};

TEST_F(CliControlNetBench, TwoControlNetsRunOnEveryStreamRow) {
  const auto j = bench("--controlnet " + q(cn_ + ":0.5") + " --controlnet " + q(cn_), "two");
  ASSERT_FALSE(j.is_null());
  ASSERT_EQ(j["controlnets"].size(), 2u);
  EXPECT_EQ(j["controlnets"][0]["path"], cn_);
  EXPECT_DOUBLE_EQ(j["controlnets"][0]["scale"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(j["controlnets"][1]["scale"].get<double>(), 1.0);
  EXPECT_EQ(j["controlnet_every"], 1);
  ASSERT_GE(j["loads"].size(), 1u);
  EXPECT_EQ(j["loads"][0]["controlnets"].size(), 2u);
  int streams = 0, cn_lines = 0;
  for (const auto& x : j["results"]) {
    SCOPED_TRACE(x["id"].get<std::string>());
    if (x["name"] == "controlnet") {
      ++cn_lines;
      EXPECT_EQ(x["section"], "components");
      EXPECT_GT(x["median_s"].get<double>(), 0.0);
    }
    if (x["id"].get<std::string>().rfind("stream/", 0) != 0) continue;
    ++streams;
    const auto& e = x["extra"];
    EXPECT_NE(x["variant"].get<std::string>().find(" cn=2"), std::string::npos);
    EXPECT_EQ(e["controlnets"], 2);
    // One UNet call per frame (one step, cfg none), two ControlNets on each: 2 calls per timed frame.
    EXPECT_EQ(e["controlnet_calls"].get<int>(), 2 * x["iters"].get<int>());
    EXPECT_EQ(e["controlnet_reused"], 0);
    EXPECT_DOUBLE_EQ(e["controlnet_calls_per_frame"].get<double>(), 2.0);
    EXPECT_GT(e["per_frame_s"]["controlnet"].get<double>(), 0.0);
    EXPECT_DOUBLE_EQ(e["amortized_s_per_frame"].get<double>(), x["mean_s"].get<double>());
  }
  EXPECT_EQ(streams, 2);   // e2e txt2img and img2img
  EXPECT_EQ(cn_lines, 2);  // one components line per ControlNet
}

TEST_F(CliControlNetBench, EveryTwoReusesTheResiduals) {
  const auto j = bench("--controlnet " + q(cn_) + " --controlnet-every 2", "every2", 3);
  ASSERT_FALSE(j.is_null());
  EXPECT_EQ(j["controlnet_every"], 2);
  int streams = 0;
  for (const auto& x : j["results"]) {
    if (x["id"].get<std::string>().rfind("stream/", 0) != 0) continue;
    SCOPED_TRACE(x["id"].get<std::string>());
    ++streams;
    EXPECT_NE(x["variant"].get<std::string>().find(" cn=1 every=2"), std::string::npos);
    EXPECT_EQ(x["iters"], 4);  // --frames 3 rounded up to a multiple of 2
    const auto& e = x["extra"];
    EXPECT_EQ(e["controlnet_every"], 2);
    EXPECT_EQ(e["controlnet_calls"], 2);   // frames 1 and 3 compute ...
    EXPECT_EQ(e["controlnet_reused"], 2);  // ... frames 2 and 4 reuse
    EXPECT_DOUBLE_EQ(e["controlnet_calls_per_frame"].get<double>(), 0.5);
  }
  EXPECT_EQ(streams, 2);
}

// A guidance range over the first of two steps: the img2img stream's one UNet call a frame still runs the
// ControlNet (on its first row); the one-step txt2img stream (step 0 of 1 ends at 1 > 0.5) never does. A range is in
// the variant and the report.
TEST_F(CliControlNetBench, AGuidanceRangeConditionsOnlyTheStepsInIt) {
  const auto j = bench("--controlnet " + q(cn_) + " --control-guidance-end 0.5 --img2img-t-index 32,45", "range", 2);
  ASSERT_FALSE(j.is_null());
  EXPECT_EQ(j["control_guidance"], nlohmann::json::array({0.0, 0.5}));
  int streams = 0;
  for (const auto& x : j["results"]) {
    if (x["id"].get<std::string>().rfind("stream/", 0) != 0) continue;
    SCOPED_TRACE(x["id"].get<std::string>());
    ++streams;
    EXPECT_NE(x["variant"].get<std::string>().find(" cn=1 steps=0.0..0.5"), std::string::npos);
    const bool img2img = x["name"] == "img2img";
    EXPECT_EQ(x["extra"]["controlnet_calls"].get<int>(), img2img ? x["iters"].get<int>() : 0);
  }
  EXPECT_EQ(streams, 2);
}

TEST_F(CliControlNetBench, WithoutControlNetsTheFieldsSayNone) {
  const auto j = bench("", "none");
  ASSERT_FALSE(j.is_null());
  EXPECT_EQ(j["controlnets"].size(), 0u);
  for (const auto& x : j["results"]) {
    EXPECT_NE(x["name"], "controlnet");
    if (x["id"].get<std::string>().rfind("stream/", 0) != 0) continue;
    EXPECT_EQ(x["extra"]["controlnets"], 0);
    EXPECT_FALSE(x["extra"].contains("controlnet_calls"));
    EXPECT_EQ(x["variant"].get<std::string>().find("cn="), std::string::npos);
  }
}

TEST_F(CliControlNetBench, BadOptionsAreNamed) {
  RunResult r = run("bench --model " + q(model_) + " --sizes 64 --controlnet-every 2");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--controlnet-every needs --controlnet"), std::string::npos) << r.output;
  r = run("bench --model " + q(model_) + " --sizes 64 --controlnet /nonexistent-cn:0.5");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--controlnet /nonexistent-cn:0.5: no such file or folder '/nonexistent-cn'"),
            std::string::npos)
      << r.output;
  r = run("bench --model " + q(model_) + " --sizes 64 --controlnet " + q(cn_) + " --controlnet-every 0");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--controlnet-every must be >= 1"), std::string::npos) << r.output;
  r = run("bench --model " + q(model_) + " --sizes 64 --control-guidance-end 0.5");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--control-guidance-end need --controlnet"), std::string::npos) << r.output;
  r = run("bench --model " + q(model_) + " --sizes 64 --controlnet " + q(cn_) + " --control-guidance-start 0.5 " +
          "--control-guidance-end 0.5");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("must satisfy 0 <= start < end <= 1"), std::string::npos) << r.output;
}

// make-random-model --arch controlnet --for-model: a ControlNet folder that bench loads against that model; the
// published architectures need no tokenizer, the models still do.
TEST_F(CliControlNetBench, MakeRandomControlNetForAModel) {
  const std::string out = dir_ + "/random-cn";
  RunResult r = run("make-random-model --arch controlnet --for-model " + q(model_) + " --out " + q(out) +
                    " --weights-dtype bf16");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("ControlNet"), std::string::npos) << r.output;
  ASSERT_TRUE(fs::exists(out + "/config.json"));
  ASSERT_TRUE(fs::exists(out + "/diffusion_pytorch_model.safetensors"));
  const auto j = bench("--controlnet " + q(out), "random");
  ASSERT_FALSE(j.is_null());
  int streams = 0;
  for (const auto& x : j["results"])
    if (x["id"].get<std::string>().rfind("stream/", 0) == 0) {
      ++streams;
      EXPECT_GT(x["extra"]["controlnet_calls"].get<int>(), 0) << x["id"];
    }
  EXPECT_EQ(streams, 2);

  r = run("make-random-model --arch controlnet --out " + q(dir_ + "/x"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("needs --for-model DIR"), std::string::npos) << r.output;
  r = run("make-random-model --arch sd-turbo --out " + q(dir_ + "/y"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--tokenizer is required"), std::string::npos) << r.output;
  r = run("make-random-model --arch controlnet-sd21 --out " + q(dir_ + "/z") + " --single-file " + q(dir_ + "/z.st"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--single-file: not for ControlNets"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir_ + "/z/diffusion_pytorch_model.safetensors"));
}

#else

TEST(CliControlNetBench, NeedsTheCli) { GTEST_SKIP() << "built without the streamdiffusion CLI"; }

#endif

}  // namespace
}  // namespace sd
