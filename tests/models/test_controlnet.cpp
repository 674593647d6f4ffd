// ControlNetModel against the reference (fixtures controlnet/, diffusers 0.24): the residual lists of every
// modules/controlnet case (two conditioning scales), the UNet with down/mid additional residuals, the linearity in the
// conditioning scale, and the config / input errors. Tolerances are the README's (modules: atol 1e-4 + rtol 1e-5 x
// max|ref|).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "io/safetensors.h"
#include "models/controlnet.h"
#include "models/unet_2d_condition.h"

namespace sd {
namespace {

using torch::Tensor;

constexpr double kAtol = 1e-4, kRtol = 1e-5;
const std::string kControlNet = "controlnet/models/tiny-controlnet-sd15";
const std::string kUNet = "models/tiny-sd15/unet";

bool have_fixtures() { return test::fixture_exists(kControlNet + "/config.json"); }

#define SD_REQUIRE_CONTROLNET() \
  if (!have_fixtures()) GTEST_SKIP() << kControlNet << " not in the fixture root"

// uint8 [B, H, W, 3] -> float [B, 3, H, W] in [0, 1] (what diffusers' ControlNet pipelines feed).
Tensor control_from_u8(const Tensor& u8) { return u8.permute({0, 3, 1, 2}).to(torch::kFloat32) / 255.0; }

std::vector<std::string> module_cases() {
  std::vector<std::string> names;
  if (!have_fixtures()) return {"no_fixtures"};
  const auto j = read_json_file(test::fixture_path("controlnet/modules/cases.json"));
  for (const auto& c : j.at("modules").at("controlnet").at("cases")) names.push_back(c.at("name"));
  return names;
}

class ControlNetModule : public ::testing::TestWithParam<std::string> {};

TEST_P(ControlNetModule, ResidualsMatchDiffusers) {
  SD_REQUIRE_CONTROLNET();
  const std::string name = GetParam();
  auto net = load_controlnet_model(test::fixture_path(kControlNet));
  const auto ref = SafeTensorsFile::open(test::fixture_path("controlnet/modules/controlnet.safetensors"));
  auto get = [&](const std::string& k) { return ref.get(name + "." + k); };
  torch::NoGradGuard ng;
  const Tensor cond = control_from_u8(get("controlnet_cond_u8"));
  const double scale = get("conditioning_scale").item<double>();
  SD_EXPECT_CLOSE(net->controlnet_cond_embedding(cond), get("cond_embedding"), kAtol, kRtol, name + " cond_embedding");
  const auto res = net->forward(get("sample"), get("timestep"), get("encoder_hidden_states"), cond, scale);
  ASSERT_EQ(res.down.size(), 4u);  // conv_in + (resnet + downsampler) + resnet for 2 levels of 1 layer
  for (size_t k = 0; k < res.down.size(); ++k)
    SD_EXPECT_CLOSE(res.down[k], get("down" + std::to_string(k)), kAtol, kRtol, name + " down" + std::to_string(k));
  SD_EXPECT_CLOSE(res.mid, get("mid"), kAtol, kRtol, name + " mid");

  // guess_mode false: every residual is linear in the conditioning scale.
  const auto unit = net->forward(get("sample"), get("timestep"), get("encoder_hidden_states"), cond, 1.0);
  for (size_t k = 0; k < res.down.size(); ++k)
    SD_EXPECT_CLOSE(unit.down[k] * scale, res.down[k], 1e-6, 1e-6, name + " linear in scale, down" + std::to_string(k));
}

INSTANTIATE_TEST_SUITE_P(Golden, ControlNetModule, ::testing::ValuesIn(module_cases()),
                         [](const auto& info) { return test::test_name(info.param); });

TEST(ControlNetUNet, AdditionalResidualsMatchDiffusers) {
  SD_REQUIRE_CONTROLNET();
  auto unet = load_unet(test::fixture_path(kUNet));
  const auto ref = SafeTensorsFile::open(test::fixture_path("controlnet/modules/unet_with_residuals.safetensors"));
  torch::NoGradGuard ng;
  ControlResiduals res;
  for (int k = 0; ref.contains("down_block_additional_residual" + std::to_string(k)); ++k)
    res.down.push_back(ref.get("down_block_additional_residual" + std::to_string(k)));
  res.mid = ref.get("mid_block_additional_residual");
  ASSERT_EQ(res.down.size(), 4u);
  const Tensor sample = ref.get("sample"), t = ref.get("timestep"), ehs = ref.get("encoder_hidden_states");
  const Tensor with = unet->forward(sample, t, ehs, {}, {}, {}, res);
  SD_EXPECT_CLOSE(with, ref.get("out"), kAtol, kRtol, "unet with residuals");
  const Tensor without = unet->forward(sample, t, ehs);
  SD_EXPECT_CLOSE(without, ref.get("out_without_residuals"), kAtol, kRtol, "unet without residuals");
  // The residuals matter (the fixture measured a max effect of 1.1) ...
  EXPECT_GT((with - without).abs().max().item<double>(), 0.1);
  // ... and zero residuals (a ControlNet at scale 0) change nothing, bit for bit.
  ControlResiduals zero;
  for (const auto& d : res.down) zero.down.push_back(torch::zeros_like(d));
  zero.mid = torch::zeros_like(res.mid);
  EXPECT_TRUE(torch::equal(unet->forward(sample, t, ehs, {}, {}, {}, zero), without));
}

TEST(ControlNetUNet, ResidualsOfAnotherUNetAreRefusedWithTheShapes) {
  SD_REQUIRE_CONTROLNET();
  auto unet = load_unet(test::fixture_path(kUNet));
  const auto ref = SafeTensorsFile::open(test::fixture_path("controlnet/modules/unet_with_residuals.safetensors"));
  torch::NoGradGuard ng;
  ControlResiduals res;
  res.down = {ref.get("down_block_additional_residual0")};
  res.mid = ref.get("mid_block_additional_residual");
  try {
    unet->forward(ref.get("sample"), ref.get("timestep"), ref.get("encoder_hidden_states"), {}, {}, {}, res);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("1 ControlNet down residuals for a UNet with 4 skip tensors"),
              std::string::npos)
        << e.what();
  }
}

TEST(ControlNetModelTest, ControlImageOfTheWrongSizeIsAnErrorNamingTheExpectedShape) {
  SD_REQUIRE_CONTROLNET();
  auto net = load_controlnet_model(test::fixture_path(kControlNet));
  torch::NoGradGuard ng;
  const Tensor sample = torch::zeros({1, 4, 8, 8}), ehs = torch::zeros({1, 77, 32});
  try {
    net->forward(sample, torch::tensor({999}), ehs, torch::zeros({1, 3, 32, 32}), 1.0);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("controlnet_cond must be [1, 3, 64, 64]"), std::string::npos) << e.what();
  }
}

TEST(ControlNetConfigTest, ReadsTheControlNetFieldsAndRefusesBadOnes) {
  SD_REQUIRE_CONTROLNET();
  const std::string path = test::fixture_path(kControlNet + "/config.json");
  const auto j = read_json_file(path);
  const auto c = ControlNetConfig::from_json(j, path);
  EXPECT_EQ(c.conditioning_channels, 3);
  EXPECT_EQ(c.conditioning_embedding_out_channels, (std::vector<int64_t>{4, 8, 8, 16}));
  EXPECT_EQ(c.cond_downscale(), 8);
  EXPECT_FALSE(c.bgr);
  EXPECT_EQ(c.unet.block_out_channels, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(c.unet.cross_attention_dim, (std::vector<int64_t>{32, 32}));

  auto expect_error = [&](nlohmann::json bad, const std::string& needle) {
    try {
      ControlNetConfig::from_json(bad, "cn/config.json");
      ADD_FAILURE() << "expected FormatError for " << needle;
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("cn/config.json"), std::string::npos) << e.what();
    }
  };
  auto bad = j;
  bad["controlnet_conditioning_channel_order"] = "rgba";
  expect_error(bad, "controlnet_conditioning_channel_order");
  bad = j;
  bad["conditioning_embedding_out_channels"] = nlohmann::json::array();
  expect_error(bad, "conditioning_embedding_out_channels");
  bad = j;
  bad["conditioning_channels"] = "three";
  expect_error(bad, "conditioning_channels");
  bad = j;
  bad["mid_block_type"] = nullptr;
  expect_error(bad, "mid block");
}

TEST(ControlNetModelTest, BgrChannelOrderFlipsTheControlImage) {
  SD_REQUIRE_CONTROLNET();
  const std::string dir = test::fixture_path(kControlNet);
  auto rgb = load_controlnet_model(dir);
  auto j = read_json_file(dir + "/config.json");
  j["controlnet_conditioning_channel_order"] = "bgr";
  const auto file = SafeTensorsFile::open(dir + "/diffusion_pytorch_model.safetensors");
  auto bgr = load_controlnet_model(ControlNetConfig::from_json(j, "bgr"), file.load_all(), file.path());
  torch::NoGradGuard ng;
  torch::manual_seed(1);
  const Tensor sample = torch::randn({1, 4, 8, 8}), ehs = torch::randn({1, 77, 32}), img = torch::rand({1, 3, 64, 64});
  const auto a = rgb->forward(sample, torch::tensor({500}), ehs, img, 1.0);
  const auto b = bgr->forward(sample, torch::tensor({500}), ehs, img.flip({1}), 1.0);
  EXPECT_TRUE(torch::allclose(a.mid, b.mid, 1e-6, 1e-6));
}

}  // namespace
}  // namespace sd
