// make-random-model's ControlNets (models/random_model.h): the published architectures fit the UNet of their own
// family and are refused by the other's (the check ControlNet::load makes), and a random ControlNet written for a
// model's UNet (--arch controlnet --for-model) loads against that model, conditions its stream (finite, different
// output) and is refused by a UNet of another width.
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "models/controlnet.h"
#include "models/random_model.h"
#include "models/unet_2d_condition.h"
#include "pipeline/controlnet.h"
#include "pipeline/stream_diffusion.h"

namespace sd {
namespace {

namespace fs = std::filesystem;

ControlNetConfig cn_config(const std::string& arch) {
  return ControlNetConfig::from_json(real_controlnet_config(arch), arch);
}
UNet2DConditionConfig unet_config(const std::string& arch) {
  return UNet2DConditionConfig::from_json(real_unet_config(arch), arch);
}

std::string refusal(const ControlNetConfig& cn, const UNet2DConditionConfig& u) {
  try {
    check_controlnet_fits(cn, u, "CN");
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

TEST(RandomControlNet, PublishedArchitecturesFitTheirFamilyOnly) {
  EXPECT_EQ(refusal(cn_config("controlnet-sd15"), unet_config("sd15")), "");
  EXPECT_EQ(refusal(cn_config("controlnet-sd21"), unet_config("sd-turbo")), "");
  const std::string a = refusal(cn_config("controlnet-sd15"), unet_config("sd-turbo"));
  EXPECT_NE(a.find("ControlNet CN is for SD 1.x (cross_attention_dim 768) but the model is SD 2.x"), std::string::npos)
      << a;
  const std::string b = refusal(cn_config("controlnet-sd21"), unet_config("sd15"));
  EXPECT_NE(b.find("is for SD 2.x (cross_attention_dim 1024) but the model is SD 1.x"), std::string::npos) << b;
  // SDXS-512 is SD 2.1's family with a distilled UNet: the widths do not fit.
  const std::string c = refusal(cn_config("controlnet-sd21"), unet_config("sdxs-512"));
  EXPECT_NE(c.find("does not fit the model's UNet"), std::string::npos) << c;
  EXPECT_EQ(controlnet_base_arch("controlnet-sd21"), "sd-turbo");
  EXPECT_EQ(controlnet_base_arch("controlnet-sd15"), "sd15");
}

const std::string kModel = "models/tiny-sd15";

std::shared_ptr<const DiffusionModels> tiny_sd15() {
  static auto m = [] {
    LoadOptions o;
    o.threads = -1;
    return load_pipeline(test::fixture_path(kModel), o);
  }();
  return m;
}

torch::Tensor run_stream(const std::shared_ptr<const ControlNet>& cn) {
  StreamConfig c;
  c.width = c.height = 64;
  c.t_index_list = {32};
  c.cfg_type = CfgType::None;
  StreamDiffusion s(tiny_sd15(), c);
  s.prepare("a cat");
  if (cn) {
    s.set_controlnets({{cn, 1.0}});
    auto img = torch::zeros({3, 64, 64});
    img.slice(1, 20, 44).slice(2, 20, 44).fill_(1.0);
    s.set_control_image(0, img);
  }
  return s.img2img(torch::linspace(-1, 1, 3 * 64 * 64).reshape({3, 64, 64}));
}

TEST(RandomControlNet, WrittenForAModelLoadsAndConditionsIt) {
  if (!test::fixture_exists(kModel + "/unet/config.json")) GTEST_SKIP() << "no fixture " << kModel;
  const std::string dir = test::make_temp_dir("sd-random-cn");
  RandomModelOptions o;
  o.arch = "controlnet";
  o.for_model = test::fixture_path(kModel);
  o.out_dir = dir + "/cn";
  o.seed = 5;
  const auto r = write_random_controlnet(o);
  EXPECT_GT(r.controlnet_parameters, 1000);
  EXPECT_GT(r.bytes_written, 4u * static_cast<uint64_t>(r.controlnet_parameters) - 1);
  const auto cfg = read_json_file(o.out_dir + "/config.json");
  EXPECT_EQ(cfg.at("_class_name"), "ControlNetModel");
  const auto unet = read_json_file(o.for_model + "/unet/config.json");
  for (const char* k : {"block_out_channels", "cross_attention_dim", "layers_per_block", "down_block_types"})
    EXPECT_EQ(cfg.at(k), unet.at(k)) << k;
  ASSERT_TRUE(fs::exists(o.out_dir + "/diffusion_pytorch_model.safetensors"));

  const auto cn = ControlNet::load(o.out_dir, *tiny_sd15());
  EXPECT_EQ(cn->name(), "cn");
  const auto plain = run_stream(nullptr), controlled = run_stream(cn);
  EXPECT_TRUE(torch::isfinite(controlled).all().item<bool>());
  EXPECT_GT((controlled - plain).abs().max().item<double>(), 1e-3);

  // The same ControlNet for a UNet with another text width: refused by the model it was not made for.
  fs::create_directories(dir + "/other/unet");
  // Another text width than the fixture's, whatever that is.
  const auto& cross_v = unet.at("cross_attention_dim");
  const int64_t cross = cross_v.is_array() ? cross_v.at(0).get<int64_t>() : cross_v.get<int64_t>();
  auto other = unet;
  other["cross_attention_dim"] = cross + 16;
  std::ofstream(dir + "/other/unet/config.json") << other.dump(2);
  o.for_model = dir + "/other";
  o.out_dir = dir + "/cn-other";
  write_random_controlnet(o);
  try {
    ControlNet::load(o.out_dir, *tiny_sd15());
    ADD_FAILURE() << "a ControlNet of another UNet loaded";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("cross_attention_dim " + std::to_string(cross + 16) + ") but the model is " +
                                         unet_family_name(cross, false)),
              std::string::npos)
        << e.what();
  }
  fs::remove_all(dir);
}

TEST(RandomControlNet, BadOptionsNameTheOption) {
  RandomModelOptions o;
  o.arch = "controlnet";
  o.out_dir = "/tmp/never-written";
  try {
    write_random_controlnet(o);
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("needs --for-model DIR"), std::string::npos) << e.what();
  }
  o.for_model = "/nonexistent-model";
  try {
    write_random_controlnet(o);
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--for-model /nonexistent-model: no unet/config.json"), std::string::npos)
        << e.what();
  }
  o.arch = "controlnet-sd21";
  try {
    write_random_controlnet(o);
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--for-model goes with --arch controlnet"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists("/tmp/never-written"));
}

}  // namespace
}  // namespace sd
