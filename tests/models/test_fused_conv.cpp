// sd::nn::conv_add_relu (TAESD's ReLU-ending convolutions) on the device and dtype of $SD_TEST_DEVICE /
// $SD_TEST_DTYPE (tests/common/fixtures.h; default cpu / fp32), against relu(conv(x) + bias + z) computed in float64
// on the CPU. On CUDA the call is cuDNN's fused kernel (at::cudnn_convolution_relu / _add_relu) while
// sd::nn::cuda_fused_conv() is on, and these tests also check that it stayed on (cuDNN neither refused the call nor
// disagreed with the eager path); elsewhere, and with the fusion off, it is the eager convolution, add and ReLU.
// Part of test_models and of test_device (scripts/gpu-check.sh runs it on CUDA, fp16 and fp32).
//
// Tolerances (max|out - ref| <= atol + rtol * max|ref|): fp32 atol 1e-5, rtol 1e-5 (TF32 off: one convolution's
// rounding; measured on the CPU 2.2e-6 at max|ref| 6.3); fp16 rtol 1e-2 (the eager path rounds the convolution, the
// bias add and the residual add to 2^-11 each; cuDNN may pick other algorithms than the reference's); bf16 rtol 5e-2,
// the module goldens' bound for TAESD (the CPU's bf16 convolution rounds its partial sums: measured 0.152 at max|ref|
// 6.47, 2.3e-2).
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include "common/fixtures.h"
#include "core/device.h"
#include "models/conv_layout.h"
#include "models/layers.h"

namespace {

class FusedConv : public ::testing::Test {
 protected:
  void SetUp() override {
    device_ = sd::test::test_device();
    dtype_ = sd::test::test_dtype();
    if (dtype_ == c10::kHalf && device_.is_cpu()) GTEST_SKIP() << "fp16 needs SD_TEST_DEVICE=cuda";
    at::globalContext().setAllowTF32CuDNN(false);
    fused_at_start_ = sd::nn::cuda_fused_conv();
  }
  void TearDown() override { sd::nn::set_cuda_fused_conv(fused_at_start_); }

  // A conv of TAESD's kind (3x3, bias of order 1 so that a lost bias shows), on the device in the dtype, channels-last
  // on CUDA as the loader makes TAESD's weights.
  sd::nn::Conv2d make_conv(int64_t channels, int64_t stride) const {
    torch::manual_seed(7 + stride);
    sd::nn::Conv2d conv(channels, channels, 3, stride, 1, /*bias=*/true);
    torch::NoGradGuard ng;
    conv->weight.set_data(torch::randn(conv->weight.sizes()) * 0.1);
    conv->bias.set_data(torch::randn({channels}));
    conv->to(device_, dtype_);
    if (device_.is_cuda()) conv->weight.set_data(conv->weight.contiguous(torch::MemoryFormat::ChannelsLast));
    return conv;
  }
  torch::Tensor on_device(const torch::Tensor& t) const {
    auto d = t.to(device_, dtype_);
    return device_.is_cuda() ? d.contiguous(torch::MemoryFormat::ChannelsLast) : d;
  }
  // relu(conv(x) + bias [+ z]) in float64 on the CPU from the device's (rounded) inputs and weights.
  static torch::Tensor reference(const sd::nn::Conv2dImpl& conv, const torch::Tensor& x, const torch::Tensor& z) {
    auto f = [](const torch::Tensor& t) { return t.cpu().to(torch::kDouble); };
    auto y = torch::conv2d(f(x), f(conv.weight), f(conv.bias), {conv.stride, conv.stride}, {conv.padding, conv.padding});
    if (z.defined()) y = y + f(z);
    return y.relu();
  }
  void expect_close(const torch::Tensor& out, const torch::Tensor& ref, const std::string& what) const {
    ASSERT_EQ(out.device().type(), device_.type()) << what;
    ASSERT_EQ(out.scalar_type(), dtype_) << what;
    ASSERT_EQ(out.sizes(), ref.sizes()) << what;
    const double atol = dtype_ == c10::kFloat ? 1e-5 : 0.0;
    const double rtol = dtype_ == c10::kFloat ? 1e-5 : dtype_ == c10::kHalf ? 1e-2 : 5e-2;
    SD_EXPECT_CLOSE(out.cpu(), ref, atol, rtol, what + " (" + sd::dtype_name(dtype_) + " on " + device_.str() + ")");
  }

  c10::Device device_{c10::kCPU};
  c10::ScalarType dtype_ = c10::kFloat;
  bool fused_at_start_ = true;
};

TEST_F(FusedConv, ConvAddReluIsTheReluOfConvPlusBiasPlusResidual) {
  torch::NoGradGuard ng;
  torch::manual_seed(3);
  const auto x = on_device(torch::randn({2, 16, 12, 10}));
  for (const int64_t stride : {1, 2}) {
    auto conv = make_conv(16, stride);
    const int64_t h = stride == 1 ? 12 : 6, w = stride == 1 ? 10 : 5;
    const auto z = on_device(torch::randn({2, 16, h, w}));
    const std::string s = "stride " + std::to_string(stride);
    expect_close(sd::nn::conv_add_relu(*conv, x), reference(*conv, x, {}), "relu(conv(x) + b), " + s);
    expect_close(sd::nn::conv_add_relu(*conv, x, z), reference(*conv, x, z), "relu(conv(x) + b + z), " + s);
    // The residual may be the convolution's own input (TAESD's blocks keep their width).
    if (stride == 1) {
      expect_close(sd::nn::conv_add_relu(*conv, x, x), reference(*conv, x, x), "z = x, " + s);
    }
  }
  // Where the fusion runs (CUDA), it must still be on: off means cuDNN refused a call or disagreed with the eager
  // path, and the log's warning says which.
  if (device_.is_cuda() && fused_at_start_) {
    EXPECT_TRUE(sd::nn::cuda_fused_conv()) << "cuDNN's fused convolution + ReLU turned itself off (see the warning)";
  }
}

TEST_F(FusedConv, OffAndOnGiveTheSameResult) {
  torch::NoGradGuard ng;
  torch::manual_seed(4);
  auto conv = make_conv(8, 1);
  const auto x = on_device(torch::randn({1, 8, 16, 16}));
  const auto z = on_device(torch::randn({1, 8, 16, 16}));
  sd::nn::set_cuda_fused_conv(true);
  const auto on = sd::nn::conv_add_relu(*conv, x, z);
  sd::nn::set_cuda_fused_conv(false);
  const auto off = sd::nn::conv_add_relu(*conv, x, z);
  EXPECT_FALSE(sd::nn::cuda_fused_conv());
  // Both against the float64 reference (off CUDA both are the eager path: equal bit for bit).
  const auto ref = reference(*conv, x, z);
  expect_close(on, ref, "fusion on");
  expect_close(off, ref, "fusion off");
  if (!device_.is_cuda()) {
    EXPECT_TRUE(torch::equal(on, off));
  }
}

// Training keeps the eager path (cuDNN's fused kernels have no autograd): the gradient flows to the weight.
TEST_F(FusedConv, GradientsFlowThroughTheEagerPath) {
  torch::manual_seed(5);
  auto conv = make_conv(4, 1);
  conv->weight.set_requires_grad(true);
  const auto x = on_device(torch::randn({1, 4, 6, 6}));
  auto y = sd::nn::conv_add_relu(*conv, x, x);
  y.sum().backward();
  ASSERT_TRUE(conv->weight.grad().defined());
  EXPECT_GT(conv->weight.grad().abs().sum().item<double>(), 0.0);
}

}  // namespace
