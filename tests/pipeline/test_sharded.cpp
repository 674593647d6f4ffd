// Sharded checkpoints (diffusers' and transformers' save_pretrained with max_shard_size: an SDXL UNet in float32 is
// saved as diffusion_pytorch_model-0000N-of-00002.safetensors + diffusion_pytorch_model.safetensors.index.json) on
// copies of the fixture models whose weight files are split into shards: the frames equal the unsharded model's bit
// for bit, with and without a variant, and `info` reports the shards.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/cli_run.h"
#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "stream_outputs.h"

namespace sd {
namespace {

namespace fs = std::filesystem;

// Replaces `<dir>/<stem>[.<variant>].safetensors` by `shards` shard files and their index, as save_pretrained names
// them (legacy: diffusers' older variant names, <stem>-00001-of-00002.<variant>.safetensors and
// <stem>.safetensors.<variant>.index.json); the tensors go round-robin (by name) so every shard holds some of every
// kind.
void shard(const std::string& dir, const std::string& stem, int shards, const std::string& variant = "",
           bool legacy = false) {
  const std::string v = variant.empty() ? "" : "." + variant;
  const auto shard_name = [&](size_t p) {
    char n[64];
    std::snprintf(n, sizeof n, "-%05zu-of-%05d", p + 1, shards);
    return legacy ? stem + n + v + ".safetensors" : stem + v + n + ".safetensors";
  };
  const std::string file = dir + "/" + stem + v + ".safetensors";
  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> parts(static_cast<size_t>(shards));
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  int64_t total = 0;
  {
    const auto f = SafeTensorsFile::open(file);
    size_t i = 0;
    for (const auto& k : f.keys()) {
      const auto t = f.get(k).clone();
      total += static_cast<int64_t>(t.nbytes());
      const size_t p = i++ % parts.size();
      parts[p].emplace_back(k, t);
      index["weight_map"][k] = shard_name(p);
    }
  }
  fs::remove(file);
  for (size_t p = 0; p < parts.size(); ++p) save_safetensors(dir + "/" + shard_name(p), parts[p], {{"format", "pt"}});
  index["metadata"]["total_size"] = total;
  std::ofstream(dir + "/" + stem + (legacy ? ".safetensors" + v + ".index.json" : ".safetensors.index" + v + ".json"))
      << index.dump(2);
}

using test::max_diff;

class Sharded : public ::testing::Test {
 protected:
  void SetUp() override { tmp_ = test::make_temp_dir("sd-sharded"); }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
  std::string copy_model(const std::string& rel, const std::string& name) const {
    const std::string m = tmp_ + "/" + name;
    fs::copy(test::fixture_path(rel), m, fs::copy_options::recursive);
    return m;
  }
  std::string tmp_;
};

LoadOptions with(const std::string& taesd, const std::string& variant = "") {
  LoadOptions o;
  o.taesd = taesd;
  o.variant = variant;
  return o;
}

TEST_F(Sharded, EveryComponentShardedLoadsBitForBit) {
  SD_SKIP_WITHOUT_FIXTURE("models/tiny-sd15");
  const std::string m = copy_model("models/tiny-sd15", "sd15");
  shard(m + "/unet", "diffusion_pytorch_model", 3);
  shard(m + "/text_encoder", "model", 2);
  shard(m + "/vae", "diffusion_pytorch_model", 2);
  shard(m + "/taesd", "diffusion_pytorch_model", 2);
  ASSERT_FALSE(fs::exists(m + "/unet/diffusion_pytorch_model.safetensors"));
  for (const std::string taesd : {"", "none"}) {  // the fixture's TAESD, then the AutoencoderKL
    SCOPED_TRACE("taesd '" + taesd + "'");
    const auto got = test::stream_outputs(test::load_models(m, with(taesd)), 2);
    const auto ref = test::stream_outputs(test::load_models(test::fixture_path("models/tiny-sd15"), with(taesd)), 2);
    EXPECT_EQ(max_diff(got, ref), 0.0);
  }
}

// SDXL: the UNet and the second text encoder are the components large enough to be sharded.
TEST_F(Sharded, SdxlUnetAndSecondTextEncoder) {
  SD_SKIP_WITHOUT_FIXTURE("sdxl/models/tiny-sdxl");
  const std::string m = copy_model("sdxl/models/tiny-sdxl", "sdxl");
  shard(m + "/unet", "diffusion_pytorch_model", 2);
  shard(m + "/text_encoder_2", "model", 2);
  const auto got = test::stream_outputs(test::load_models(m, with("")), 1);
  const auto ref = test::stream_outputs(test::load_models(test::fixture_path("sdxl/models/tiny-sdxl"), with("")), 1);
  EXPECT_EQ(max_diff(got, ref), 0.0);
}

// A sharded fp16 variant beside plain weights: --variant fp16 loads the shards (the model they are), without it the
// plain file; under diffusers' older variant names too.
class ShardedVariant : public Sharded, public ::testing::WithParamInterface<bool> {};

TEST_P(ShardedVariant, LoadsWhenAsked) {
  SD_SKIP_WITHOUT_FIXTURE("models/tiny-sd15");
  const bool legacy = GetParam();
  const std::string m = copy_model("models/tiny-sd15", "variant");
  const std::string ref = copy_model("models/tiny-sd15", "ref");
  {
    std::map<std::string, torch::Tensor> w;
    const auto f = SafeTensorsFile::open(m + "/unet/diffusion_pytorch_model.safetensors");
    for (const auto& k : f.keys()) w[k] = (f.get(k) * 0.9).to(torch::kHalf);
    save_safetensors(m + "/unet/diffusion_pytorch_model.fp16.safetensors", w);
    save_safetensors(ref + "/unet/diffusion_pytorch_model.safetensors", w);
  }
  shard(m + "/unet", "diffusion_pytorch_model", 2, "fp16", legacy);
  ASSERT_TRUE(fs::exists(m + "/unet/diffusion_pytorch_model.safetensors" +
                         (legacy ? ".fp16.index.json" : ".index.fp16.json")));
  const auto asked = test::stream_outputs(test::load_models(m, with("", "fp16")), 1);
  EXPECT_EQ(max_diff(asked, test::stream_outputs(test::load_models(ref, with("")), 1)), 0.0);
  const auto plain = test::stream_outputs(test::load_models(m, with("")), 1);
  EXPECT_EQ(max_diff(plain, test::stream_outputs(test::load_models(test::fixture_path("models/tiny-sd15"), with("")),
                                                 1)),
            0.0);
  EXPECT_GT(max_diff(asked, plain), 1e-3);
}
INSTANTIATE_TEST_SUITE_P(Names, ShardedVariant, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Legacy" : "Current"; });

// A shard missing from the folder is named with the index before anything loads.
TEST_F(Sharded, AMissingShardIsNamed) {
  SD_SKIP_WITHOUT_FIXTURE("models/tiny-sd15");
  const std::string m = copy_model("models/tiny-sd15", "missing");
  shard(m + "/unet", "diffusion_pytorch_model", 2);
  fs::remove(m + "/unet/diffusion_pytorch_model-00002-of-00002.safetensors");
  const std::string msg = test::error_of<FormatError>([&] { test::load_models(m, with("")); });
  EXPECT_NE(msg.find(m + "/unet/diffusion_pytorch_model.safetensors.index.json: shard "
                         "diffusion_pytorch_model-00002-of-00002.safetensors (holding '"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("') is missing: expected " + m + "/unet/diffusion_pytorch_model-00002-of-00002.safetensors"),
            std::string::npos)
      << msg;
}

test::RunResult cli(const std::string& args) { return test::run_command(std::string(SD_CLI_PATH) + " " + args); }

TEST_F(Sharded, InfoReportsTheShards) {
  SD_SKIP_WITHOUT_FIXTURE("models/tiny-sd15");
  const std::string m = copy_model("models/tiny-sd15", "info");
  shard(m + "/unet", "diffusion_pytorch_model", 3);
  const auto r = cli("info --model " + test::q(m) + " --json");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto ref = cli("info --model " + test::q(test::fixture_path("models/tiny-sd15")) + " --json");
  ASSERT_EQ(ref.status, 0) << ref.output;
  const auto unet = [](const std::string& out) {
    const auto report = nlohmann::json::parse(out);
    for (const auto& c : report["components"])
      if (c["name"] == "unet") return c["weights"];
    return nlohmann::json();
  };
  const auto w = unet(r.output), w_ref = unet(ref.output);
  EXPECT_EQ(w["file"], m + "/unet/diffusion_pytorch_model.safetensors.index.json");
  EXPECT_EQ(w["shards"], nlohmann::json({"diffusion_pytorch_model-00001-of-00003.safetensors",
                                         "diffusion_pytorch_model-00002-of-00003.safetensors",
                                         "diffusion_pytorch_model-00003-of-00003.safetensors"}));
  EXPECT_EQ(w["parameters"], w_ref["parameters"]);
  EXPECT_EQ(w["tensors"], w_ref["tensors"]);
  EXPECT_FALSE(w_ref.contains("shards"));
  const auto text = cli("info --model " + test::q(m));
  EXPECT_NE(text.output.find(" tensors, dtype F32, 3 shards\n"), std::string::npos) << text.output;
  shard(m + "/text_encoder", "model", 1);  // a one-shard save
  const auto one = cli("info --model " + test::q(m));
  EXPECT_NE(one.output.find(" tensors, dtype F32, 1 shard\n"), std::string::npos) << one.output;
}

}  // namespace
}  // namespace sd
