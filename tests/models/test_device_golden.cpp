// The module goldens on the device and dtype chosen by $SD_TEST_DEVICE / $SD_TEST_DTYPE (tests/common/fixtures.h;
// default cpu / fp32): text encoder, UNet, AutoencoderKL and TAESD of every fixture model, loaded onto that device
// in that dtype, against the float32 diffusers references. scripts/gpu-check.sh runs them with cuda / fp16 (and cuda
// / fp32) on a GPU host; here they run on the CPU (fp32, or bf16 with SD_TEST_DTYPE=bf16).
//
// Tolerances (max|out − ref| <= atol + rtol·max|ref|, per tensor):
//   fp32 (CPU or CUDA, TF32 disabled): the fixture README's single-module bounds, atol 1e-4, rtol 1e-5.
//   bf16: the bounds measured on the CPU by the per-module tests (tests/models/test_*.cpp): UNet 6e-2, VAE and TAESD
//         5e-2, text encoder 2.5e-2 of max|ref| (atol 0).
//   fp16: the same bounds as bf16. fp16 keeps 11 significant bits against bf16's 8 (each rounding is 8x finer) and
//         the fixture activations stay far below fp16's range (65504), so the bf16 bounds hold with room; the
//         numbers a CUDA run measures are printed ([close] lines) to tighten them.
#include <map>
#include <set>

#include <ATen/Context.h>
#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/device.h"
#include "io/safetensors.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/clip_text_model.h"
#include "models/unet_2d_condition.h"

namespace {

struct DeviceCase {
  std::string model;
  std::string component;  // text_encoder | unet | vae | taesd
};

void PrintTo(const DeviceCase& c, std::ostream* os) { *os << c.model << "/" << c.component; }

std::vector<DeviceCase> discover() {
  std::vector<DeviceCase> out;
  for (const auto& model : sd::test::fixture_models())
    for (const std::string comp : {"text_encoder", "unet", "vae", "taesd"})
      if (sd::test::fixture_exists("modules/" + model + "/" + comp + ".safetensors") &&
          sd::test::fixture_exists("models/" + model + "/" + comp))
        out.push_back({model, comp});
  return out;
}

// rtol (of max|ref|) for a component in the dtype under test; see the header comment.
double rtol_for(const std::string& component, c10::ScalarType dtype) {
  if (dtype == c10::kFloat) return 1e-5;
  if (component == "unet") return 6e-2;
  if (component == "text_encoder") return 2.5e-2;
  return 5e-2;
}

class DeviceGolden : public ::testing::TestWithParam<DeviceCase> {
 protected:
  void SetUp() override {
    device_ = sd::test::test_device();
    dtype_ = sd::test::test_dtype();
    if (dtype_ == c10::kHalf && device_.is_cpu()) GTEST_SKIP() << "fp16 needs SD_TEST_DEVICE=cuda";
    // fp32 on CUDA: no TF32 in cuDNN convolutions / cuBLAS matmuls, so fp32 means fp32.
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
    std::cout << "  device " << device_ << ", dtype " << sd::dtype_name(dtype_) << "\n";
  }

  // Runs on the device, compares on the CPU in float64 (tensors_close converts).
  void expect(const torch::Tensor& out, const torch::Tensor& ref, const std::string& what) {
    const auto& c = GetParam();
    // (device_ may name no index: "cuda" is the current device, where outputs say cuda:0.)
    ASSERT_EQ(out.device().type(), device_.type()) << what << " on " << out.device();
    if (device_.has_index()) {
      ASSERT_EQ(out.device().index(), device_.index()) << what;
    }
    ASSERT_EQ(out.scalar_type(), dtype_) << what;
    const double atol = dtype_ == c10::kFloat ? 1e-4 : 0.0;
    SD_EXPECT_CLOSE(out.cpu(), ref, atol, rtol_for(c.component, dtype_),
                    c.model + " " + what + " (" + sd::dtype_name(dtype_) + " on " + device_.str() + ")");
  }

  torch::Tensor in(const torch::Tensor& t) const {
    return t.is_floating_point() ? t.to(device_, dtype_) : t.to(device_);
  }

  c10::Device device_{c10::kCPU};
  c10::ScalarType dtype_ = c10::kFloat;
};

TEST_P(DeviceGolden, MatchesFp32Reference) {
  const auto& c = GetParam();
  const std::string dir = sd::test::fixture_path("models/" + c.model + "/" + c.component);
  auto ref = sd::SafeTensorsFile::open(sd::test::fixture_path("modules/" + c.model + "/" + c.component + ".safetensors"));
  torch::NoGradGuard ng;
  if (c.component == "text_encoder") {
    auto enc = sd::load_clip_text_model(dir, dtype_, device_);
    expect(enc->forward(ref.get("input_ids").to(device_)), ref.get("last_hidden_state"), "text_encoder");
  } else if (c.component == "unet") {
    // As test_unet's bf16 test: the bound is of oneDNN's bf16 kernels (AVX-512); without them (an AVX2 CPU) libtorch's
    // generic bf16 convolutions round their partial sums (measured on a Zen 2: 0.107 of 1.57 for tiny-sd21, 6.8%).
    if (dtype_ == c10::kBFloat16 && device_.is_cpu() && !sd::cpu_has_onednn_bf16())
      GTEST_SKIP() << "no oneDNN bf16 kernels on this CPU (" << sd::cpu_simd_level() << ")";
    auto unet = sd::load_unet(dir, dtype_, device_);
    std::set<std::string> cases;
    for (const auto& k : ref.keys()) cases.insert(k.substr(0, k.rfind('.')));
    ASSERT_FALSE(cases.empty());
    for (const auto& n : cases)
      expect(unet->forward(in(ref.get(n + ".sample")), in(ref.get(n + ".timestep")),
                           in(ref.get(n + ".encoder_hidden_states"))),
             ref.get(n + ".out"), "unet " + n);
  } else if (c.component == "vae") {
    auto vae = sd::load_vae(dir, dtype_, device_);
    expect(vae->decode(in(ref.get("decode.input"))), ref.get("decode.out"), "vae decode");
    expect(vae->encode(in(ref.get("encode.input"))).mean, ref.get("encode.mean"), "vae encode mean");
  } else {
    auto taesd = sd::load_taesd(dir, dtype_, device_);
    expect(taesd->decode(in(ref.get("decode.input"))), ref.get("decode.out"), "taesd decode");
    expect(taesd->encode(in(ref.get("encode.input"))), ref.get("encode.latents"), "taesd encode");
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DeviceGolden, ::testing::ValuesIn(discover()),
                         [](const ::testing::TestParamInfo<DeviceCase>& i) {
                           return sd::test::test_name(i.param.model + "_" + i.param.component);
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(DeviceGolden);

}  // namespace
