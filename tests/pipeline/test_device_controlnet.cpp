// A ControlNet's guidance range on the device and dtype of $SD_TEST_DEVICE / $SD_TEST_DTYPE (tests/common/fixtures.h;
// default cpu / fp32; scripts/gpu-check.sh runs it with cuda). The stream runs the ControlNet on the rows of the
// steps in range alone, chosen on the host from its copy of the timesteps and gathered with an index uploaded once
// per row list (no host synchronisation inside the frame on CUDA): a row out of range gets exactly zero, a row in
// range the full range's residuals to the rounding of another batch size (the matrix products of fewer rows:
// measured 2e-6 of 5.8 in fp32 on the CPU), a sequential call of a step out of range runs no ControlNet, and a range
// that keeps no step is no ControlNet at all.
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

  // Three frames of a cfg self stream over t_index_list {32, 45} (rows [step 0, step 1]; sequential: one call per
  // step) with the ControlNet on [start, end), its first call's residuals traced; without a ControlNet when start < 0.
  const auto run = [&](double start, double end, std::map<std::string, Tensor>* traced, bool sequential = false) {
    StreamConfig c;
    c.width = c.height = 64;
    c.cfg_type = CfgType::Self;
    c.t_index_list = {32, 45};
    c.use_denoising_batch = !sequential;
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
  // The kept row runs at another batch size, so it may take other kernels: float rounding on the CPU; on CUDA other
  // cuDNN algorithms (the autotuner picks per shape), in TF32 unless that is off; half precision's rounding.
  const bool cuda = lo.device.rfind("cuda", 0) == 0;
  const double rtol = test::test_dtype() == torch::kFloat
                          ? (!cuda ? 1e-5 : at::globalContext().allowTF32CuDNN() ? 1e-2 : 1e-3)
                          : test::test_dtype() == torch::kHalf ? 2e-2 : 4e-2;
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

  // Sequential mode: the second step's call has no row in range and runs no ControlNet (one call a frame, not two);
  // its first step's call is conditioned as in the full range.
  std::map<std::string, Tensor> seq_full, seq_first;
  const auto [seq_full_out, seq_full_calls] = run(0.0, 1.0, &seq_full, true);
  const auto [seq_first_out, seq_first_calls] = run(0.0, 0.5, &seq_first, true);
  const auto [seq_plain_out, seq_plain_calls] = run(-1.0, 1.0, nullptr, true);
  EXPECT_EQ(seq_full_calls, 6);
  EXPECT_EQ(seq_first_calls, 3);
  EXPECT_EQ(seq_first.count("unet1.controlnet_mid"), 0u) << "no residuals for the step out of range";
  ASSERT_TRUE(seq_first.count("unet0.controlnet_mid") && seq_full.count("unet0.controlnet_mid"));
  EXPECT_TRUE(torch::equal(seq_first["unet0.controlnet_mid"], seq_full["unet0.controlnet_mid"]))
      << "the same call on the same rows";
  EXPECT_FALSE(torch::equal(seq_first_out, seq_full_out));
  EXPECT_FALSE(torch::equal(seq_first_out, seq_plain_out));
}

}  // namespace
}  // namespace sd
