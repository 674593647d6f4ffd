// AutoencoderKL against diffusers 0.24 on the fixture models (data-driven over models/*/vae and the cases in
// modules/<model>/vae.safetensors), config errors, loading errors, the real SD VAE's parameter count.
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <set>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/autoencoder_layouts.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "io/state_dict.h"
#include "models/autoencoder_kl.h"

namespace fs = std::filesystem;

namespace {

constexpr double kAtol = 1e-4, kRtol = 1e-5;  // fixture README: single VAE calls in float32

// bf16 weights and activations vs the fp32 reference, as a fraction of max|ref| of each tensor. Measured on the
// fixture models over several runs (the test prints them; oneDNN's bf16 kernels vary with memory layout):
// decode.out 1.3e-2 .. 2.2e-2; encode mean 1.4e-2 .. 1.9e-2, logvar 1.4e-2 .. 2.5e-2, std 0.9e-2 .. 1.1e-2. Norm
// statistics and the attention softmax run in fp32; the rest rounds to bf16 (8 mantissa bits) after every layer.
// The bound leaves >= 2x margin.
constexpr double kBf16Rtol = 5e-2;

using GoldenCase = sd::test::ComponentGoldenCase;

// Runs a case on `vae` (inputs cast to its dtype): {name, output (fp32), reference} per compared tensor.
std::vector<std::tuple<std::string, torch::Tensor, torch::Tensor>> run_case(sd::AutoencoderKL& vae,
                                                                            const GoldenCase& c) {
  auto ref = sd::SafeTensorsFile::open(sd::test::fixture_path("modules/" + c.model + "/vae.safetensors"));
  torch::NoGradGuard ng;
  const auto f = [](const torch::Tensor& t) { return t.to(torch::kFloat); };
  if (c.name == "encode") {
    auto d = vae->encode(ref.get("encode.input").to(vae->dtype()));
    return {{"mean", f(d.mean), ref.get("encode.mean")},
            {"logvar", f(d.logvar), ref.get("encode.logvar")},
            {"std", f(d.std()), ref.get("encode.std")}};
  }
  if (c.name == "decode") {
    auto out = vae->decode(ref.get("decode.input").to(vae->dtype()));
    return {{"out", f(out), ref.get("decode.out")}};
  }
  throw sd::FormatError("modules/" + c.model + "/vae.safetensors", "unknown case '" + c.name + "'");
}

class VaeGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(VaeGolden, MatchesDiffusersFp32) {
  const auto& c = GetParam();
  ASSERT_TRUE(c.error.empty()) << c.error;
  auto vae = sd::load_vae(sd::test::fixture_path("models/" + c.model + "/vae"));
  sd::test::for_each_cpu_layout(vae, [&](const std::string& layout) {
    for (const auto& [name, out, ref] : run_case(vae, c)) {
      EXPECT_TRUE(out.is_contiguous()) << name;
      SD_EXPECT_CLOSE(out, ref, kAtol, kRtol, c.model + " vae " + c.name + "." + name + layout);
    }
  });
}

TEST_P(VaeGolden, Bf16WithinMeasuredBound) {
  const auto& c = GetParam();
  ASSERT_TRUE(c.error.empty()) << c.error;
  auto vae = sd::load_vae(sd::test::fixture_path("models/" + c.model + "/vae"), torch::kBFloat16);
  EXPECT_EQ(vae->dtype(), torch::kBFloat16);
  for (const auto& [name, out, ref] : run_case(vae, c))
    SD_EXPECT_CLOSE(out, ref, 0.0, kBf16Rtol, c.model + " vae bf16 " + c.name + "." + name);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, VaeGolden, ::testing::ValuesIn(sd::test::component_golden_cases("vae")),
                         [](const auto& info) { return sd::test::test_name(info.param.model + "_" + info.param.name); });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(VaeGolden);

// ---------------------------------------------------------------------------------------------------------------

sd::AutoencoderKLConfig config_of(const std::string& json) {
  return sd::AutoencoderKLConfig::from_json(nlohmann::json::parse(json), "vae/config.json");
}

// The real SD 1.x / 2.x VAE config (stabilityai/sd-vae-ft-mse, runwayml/stable-diffusion-v1-5/vae).
const char* kSdVaeConfig = R"({
  "_class_name": "AutoencoderKL", "_diffusers_version": "0.24.0", "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]})";

TEST(AutoencoderKLConfig, DefaultsAndFields) {
  auto d = config_of("{}");
  EXPECT_EQ(d.block_out_channels, (std::vector<int>{64}));
  EXPECT_EQ(d.layers_per_block, 1);
  EXPECT_EQ(d.norm_num_groups, 32);
  EXPECT_EQ(d.latent_channels, 4);
  EXPECT_EQ(d.sample_size, 32);
  EXPECT_DOUBLE_EQ(d.scaling_factor, 0.18215);
  EXPECT_TRUE(d.force_upcast);
  EXPECT_EQ(d.spatial_factor(), 1);
  auto c = config_of(kSdVaeConfig);
  EXPECT_EQ(c.block_out_channels, (std::vector<int>{128, 256, 512, 512}));
  EXPECT_EQ(c.layers_per_block, 2);
  EXPECT_EQ(c.sample_size, 512);
  EXPECT_EQ(c.spatial_factor(), 8);
  auto l = config_of(R"({"sample_size": [768, 768], "latents_mean": null, "scaling_factor": 0.13025})");
  EXPECT_EQ(l.sample_size, 768);
  EXPECT_DOUBLE_EQ(l.scaling_factor, 0.13025);
}

TEST(AutoencoderKLConfig, ErrorsNameTheField) {
  auto expect_msg = [](const std::string& json, const std::string& frag) {
    try {
      config_of(json);
      FAIL() << "no error for " << json;
    } catch (const sd::FormatError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("vae/config.json"), std::string::npos) << m;
      EXPECT_NE(m.find(frag), std::string::npos) << m;
    }
  };
  expect_msg(R"({"down_block_types": ["AttnDownEncoderBlock2D"]})", "'down_block_types'");
  expect_msg(R"({"down_block_types": ["AttnDownEncoderBlock2D"]})", "AttnDownEncoderBlock2D");
  expect_msg(R"({"up_block_types": ["AttnUpDecoderBlock2D"]})", "'up_block_types'");
  expect_msg(R"({"block_out_channels": "128"})", "'block_out_channels'");
  expect_msg(R"({"layers_per_block": "two"})", "'layers_per_block'");
  expect_msg(R"({"scaling_factor": [0.18215]})", "'scaling_factor'");
  expect_msg(R"({"force_upcast": 1})", "'force_upcast'");
  expect_msg(R"({"act_fn": "gelu"})", "'act_fn'");
  expect_msg(R"({"shift_factor": 0.1159})", "'shift_factor'");
  expect_msg(R"({"block_out_channels": [64, 64]})", "down_block_types");
  expect_msg(R"({"block_out_channels": [48], "norm_num_groups": 32})", "norm_num_groups");
  expect_msg(R"({"layers_per_block": 0})", "layers_per_block");
  expect_msg(R"({"_class_name": "AutoencoderTiny"})", "'_class_name'");
}

TEST(AutoencoderKL, RealSdVaeParameterCount) {
  sd::AutoencoderKL vae(config_of(kSdVaeConfig));
  EXPECT_EQ(sd::count_parameters(*vae), 83653863);
}

TEST(AutoencoderKL, KeysAreDiffusersNames) {
  sd::AutoencoderKL vae(config_of(kSdVaeConfig));
  const auto s = sd::state_dict(*vae);
  for (const char* k :
       {"encoder.conv_in.weight", "encoder.down_blocks.0.resnets.1.norm2.bias",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "encoder.down_blocks.2.downsamplers.0.conv.weight",
        "encoder.mid_block.attentions.0.group_norm.weight", "encoder.mid_block.attentions.0.to_out.0.bias",
        "encoder.mid_block.resnets.1.conv2.weight", "encoder.conv_norm_out.bias", "encoder.conv_out.weight",
        "quant_conv.weight", "post_quant_conv.bias", "decoder.conv_in.weight", "decoder.mid_block.attentions.0.to_q.bias",
        "decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up_blocks.2.upsamplers.0.conv.bias",
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight", "decoder.conv_norm_out.weight", "decoder.conv_out.bias"})
    EXPECT_TRUE(s.count(k)) << k;
  // No downsampler on the last encoder block, no upsampler on the last decoder block, 3 resnets per up block.
  for (const char* k : {"encoder.down_blocks.3.downsamplers.0.conv.weight",
                        "decoder.up_blocks.3.upsamplers.0.conv.weight", "decoder.up_blocks.0.resnets.3.conv1.weight",
                        "encoder.down_blocks.0.resnets.2.conv1.weight"})
    EXPECT_FALSE(s.count(k)) << k;
}

TEST(AutoencoderKL, NormsUseEps1e6) {
  sd::AutoencoderKL vae(config_of(kSdVaeConfig));
  int norms = 0;
  for (const auto& m : vae->modules()) {
    if (auto* g = dynamic_cast<sd::nn::GroupNormImpl*>(m.get())) {
      EXPECT_DOUBLE_EQ(g->eps, 1e-6);
      EXPECT_EQ(g->num_groups, 32);
      ++norms;
    }
  }
  // 2 per ResNet (encoder 4*2 + 2 mid, decoder 4*3 + 2 mid), 1 per mid attention, conv_norm_out x2.
  EXPECT_EQ(norms, 2 * (10 + 14) + 2 + 2);
}

TEST(AutoencoderKL, SampleIsMeanPlusStdTimesNoise) {
  auto mean = torch::randn({2, 4, 3, 5});
  auto logvar = torch::randn({2, 4, 3, 5}) * 3;
  auto noise = torch::randn({2, 4, 3, 5});
  auto s = sd::AutoencoderKLImpl::sample(mean, logvar, noise);
  EXPECT_TRUE(torch::allclose(s, mean + torch::sqrt(torch::exp(logvar)) * noise, 1e-5, 1e-6));
  sd::DiagonalGaussian d{mean, logvar};
  EXPECT_TRUE(torch::equal(d.sample(noise), s));
  EXPECT_THROW(sd::AutoencoderKLImpl::sample(mean, logvar, torch::randn({2, 4, 3, 4})), sd::InvalidArgument);
}

TEST(AutoencoderKL, ShapesAndInputChecks) {
  auto c = config_of(R"({"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]})");
  sd::AutoencoderKL vae(c);
  torch::NoGradGuard ng;
  for (auto& p : vae->parameters()) p.normal_(0, 0.1);
  auto d = vae->encode(torch::zeros({1, 3, 64, 96}));
  EXPECT_EQ(d.mean.sizes(), (std::vector<int64_t>{1, 4, 8, 12}));
  EXPECT_EQ(d.logvar.sizes(), (std::vector<int64_t>{1, 4, 8, 12}));
  EXPECT_EQ(vae->decode(torch::zeros({2, 4, 5, 7})).sizes(), (std::vector<int64_t>{2, 3, 40, 56}));
  EXPECT_THROW(vae->encode(torch::zeros({1, 4, 64, 64})), sd::InvalidArgument);
  EXPECT_THROW(vae->encode(torch::zeros({1, 3, 4, 64})), sd::InvalidArgument);
  EXPECT_THROW(vae->decode(torch::zeros({1, 4, 8, 8}, torch::kDouble)), sd::InvalidArgument);
  // logvar is clamped to [-30, 20] like diffusers' DiagonalGaussianDistribution.
  for (auto& p : vae->quant_conv->parameters()) p.fill_(1e3);
  auto big = vae->encode(torch::ones({1, 3, 64, 64}));
  EXPECT_LE(big.logvar.max().item<double>(), 20.0);
  EXPECT_GE(big.logvar.min().item<double>(), -30.0);
}

// ---------------------------------------------------------------------------------------------------------------
// Loading errors name the file and what is wrong.

class VaeLoadErrors : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = sd::test::make_temp_dir("sd-vae"); }
  void TearDown() override { fs::remove_all(dir_); }
  void expect_error(const std::string& path, std::vector<std::string> frags) {
    try {
      sd::load_vae(path);
      FAIL() << "no error for " << path;
    } catch (const sd::FormatError& e) {
      const std::string m = e.what();
      for (const auto& f : frags) EXPECT_NE(m.find(f), std::string::npos) << "missing '" << f << "' in: " << m;
    }
  }
  std::string dir_;
};

TEST_F(VaeLoadErrors, MissingFolderConfigAndWeights) {
  expect_error(dir_ + "/nope", {"nope", "not a directory"});
  expect_error(dir_, {"no config.json"});
  std::ofstream(dir_ + "/config.json") << R"({"block_out_channels": [8], "norm_num_groups": 4})";
  expect_error(dir_, {"no .safetensors"});
  std::ofstream(dir_ + "/diffusion_pytorch_model.bin") << "pickle";
  expect_error(dir_, {"pickle", "safetensors"});
}

// One more resnet per block in the config than the weights of `src` have: the load lists the first missing one. The
// broken value comes from the folder's own config, so it is wrong whatever the folder has.
void expect_missing_resnet(const std::string& src, const std::string& dir,
                           const std::function<void(const std::string&, std::vector<std::string>)>& expect_error) {
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(src + "/diffusion_pytorch_model.safetensors", dir + "/diffusion_pytorch_model.safetensors");
  auto j = sd::read_json_file(src + "/config.json");
  const int64_t layers = j.value("layers_per_block", int64_t{1});  // diffusers' default when absent
  j["layers_per_block"] = layers + 1;
  std::ofstream(dir + "/config.json") << j.dump();
  // The encoder's blocks have layers_per_block resnets, so index `layers` is the first one the weights lack.
  expect_error(dir, {"diffusion_pytorch_model.safetensors", "missing keys",
                     "encoder.down_blocks.0.resnets." + std::to_string(layers) + "."});
}

TEST_F(VaeLoadErrors, WeightsNotMatchingConfigListKeys) {
  const auto expect = [this](const std::string& p, std::vector<std::string> f) { expect_error(p, std::move(f)); };
  int checked = 0;
  for (const auto& m : sd::test::fixture_models()) {
    const std::string src = sd::test::fixture_path("models/" + m + "/vae");
    if (!fs::exists(src + "/config.json")) continue;
    SCOPED_TRACE(m);
    expect_missing_resnet(src, dir_ + "/" + m, expect);
    ++checked;
  }
  // A VAE that already has 2 resnets per block (the value the test once hard-coded as the broken one).
  const std::string two = dir_ + "/two-layers-src";
  fs::create_directories(two);
  const std::string cfg = R"({"block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 2,
                              "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                              "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]})";
  std::ofstream(two + "/config.json") << cfg;
  sd::AutoencoderKL vae(sd::AutoencoderKLConfig::from_json(nlohmann::json::parse(cfg), two + "/config.json"));
  for (auto& p : vae->parameters()) p.data().normal_();
  sd::save_safetensors(two + "/diffusion_pytorch_model.safetensors", sd::state_dict(*vae));
  sd::load_vae(two);  // the folder itself is consistent
  expect_missing_resnet(two, dir_ + "/two-layers", expect);
  if (checked == 0) std::cout << "  (no fixture VAE: only the 2-layer one checked)\n";
}

}  // namespace
