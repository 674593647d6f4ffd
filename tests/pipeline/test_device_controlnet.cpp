// A ControlNet's guidance range on the device and dtype of $SD_TEST_DEVICE / $SD_TEST_DTYPE (tests/common/fixtures.h;
// default cpu / fp32; scripts/gpu-check.sh runs it with cuda). The stream keeps the steps out of range unconditioned
// in two ways: on the CPU it runs the ControlNet on the kept rows alone (cheaper), on CUDA on every row and zeroes the
// others on the device (no host synchronisation inside the frame). Either way: a row out of range gets exactly zero,
// a row in range the full range's residuals to the rounding of another batch size (CPU: the matrix products of fewer
// rows, measured 2e-6 of 5.8 in fp32; CUDA: the same batch, bit for bit), and a range that keeps no step is no
// ControlNet at all.
#include <map>

#include <gtest/gtest.h>

#include <torch/torch.h>

#include "common/fixtures.h"
#include "core/device.h"
#include "io/safetensors.h"
#include "pipeline/controlnet.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"

namespace sd {
namespace {

using torch::Tensor;

const std::string kModel = "models/tiny-sd15";
const std::string kCn = "controlnet/models/tiny-controlnet-sd15";

TEST(DeviceControlNet, GuidanceRangeRowsOnTheDevice) {
  if (!test::fixture_exists(kModel) || !test::fixture_exists(kCn + "/config.json")) GTEST_SKIP() << "no fixtures";
  LoadOptions lo;
  lo.device = test::test_device().str();
  lo.dtype = test::test_dtype();
  lo.threads = -1;
  lo.taesd = test::fixture_path(kModel + "/taesd");
  const auto models = load_pipeline(test::fixture_path(kModel), lo);
  const auto cn = ControlNet::load(test::fixture_path(kCn), *models);
  const Tensor control =
      SafeTensorsFile::open(test::fixture_path("controlnet/control_images.safetensors")).get("control0");
  const Tensor frame = torch::linspace(-1, 1, 3 * 64 * 64).reshape({3, 64, 64});

  // Three frames of a cfg self stream over t_index_list {32, 45} (rows [step 0, step 1]) with the ControlNet on
  // [start, end), its first call's residuals traced; without a ControlNet when start < 0.
  const auto run = [&](double start, double end, std::map<std::string, Tensor>* traced) {
    StreamConfig c;
    c.width = c.height = 64;
    c.cfg_type = CfgType::Self;
    c.t_index_list = {32, 45};
    StreamDiffusion s(models, c);
    if (traced) s.set_trace([&](const std::string& n, const Tensor& t) { traced->emplace(n, t.to(torch::kCPU)); });
    s.prepare("a cat");
    if (start >= 0) {
      ControlNetUnit u{cn, 1.0};
      u.guidance_start = start;
      u.guidance_end = end;
      s.set_controlnets({u});
      s.set_control_image(0, control);
    }
    std::vector<Tensor> outs;
    for (int i = 0; i < 3; ++i) outs.push_back(s.img2img(frame).to(torch::kCPU));
    return std::make_pair(torch::cat(outs), s.stats().controlnet_calls);
  };
  std::map<std::string, Tensor> full, first;
  run(0.0, 1.0, &full);
  const auto [first_out, first_calls] = run(0.0, 0.5, &first);
  EXPECT_EQ(first_calls, 3) << "one call a frame, on its first row";
  const double rtol = test::test_dtype() == torch::kFloat ? 1e-5 : 2e-2;
  for (const std::string k : {"unet0.controlnet_down0", "unet0.controlnet_down3", "unet0.controlnet_mid"}) {
    ASSERT_TRUE(full.count(k) && first.count(k)) << k;
    ASSERT_EQ(first[k].size(0), 2) << k;
    const Tensor want = full[k][0].to(torch::kFloat), got = first[k][0].to(torch::kFloat);
    const double scale = want.abs().max().item<double>(), d = (got - want).abs().max().item<double>();
    std::printf("[controlnet-range] %s %s %s: step 0 max|d| %.3g of max %.3g\n", lo.device.c_str(),
                dtype_name(test::test_dtype()).c_str(), k.c_str(), d, scale);
    EXPECT_GT(scale, 0.0) << k;
    EXPECT_LE(d, rtol * scale) << k << ": the kept row is the full range's";
    EXPECT_EQ(first[k][1].abs().max().item<double>(), 0.0) << k << ": the row out of range is zero";
  }
  // 0.6..1 keeps neither step: the frames of no ControlNet, bit for bit, and no ControlNet call.
  const auto [none_out, none_calls] = run(0.6, 1.0, nullptr);
  const auto [plain_out, plain_calls] = run(-1.0, 1.0, nullptr);
  EXPECT_EQ(none_calls, 0);
  EXPECT_TRUE(torch::equal(none_out, plain_out));
  EXPECT_FALSE(torch::equal(first_out, plain_out)) << "the first step is conditioned";
}

}  // namespace
}  // namespace sd
