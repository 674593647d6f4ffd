// int8 layers (models/int8.h): the activation / weight quantizers against their definitions, and the int8
// convolution / linear layer against the float layer within the error of 8-bit codes. The layer tests need
// libtorch's oneDNN int8 operators (libtorch 2.1+) and a CPU with VNNI/AMX; elsewhere they are skipped with the
// reason, and Int8Layers.UnavailableSaysWhy checks that reason is what a user gets.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "common/fixtures.h"
#include "core/error.h"
#include "models/int8.h"
#include "models/layers.h"

namespace {

torch::Tensor dequantize(const sd::int8::QuantizedActivation& a) {
  return (a.q.to(torch::kFloat) - static_cast<double>(a.zero_point)) * a.scale;
}

double rel_l2(const torch::Tensor& a, const torch::Tensor& ref) {
  return ((a.to(torch::kFloat) - ref.to(torch::kFloat)).norm() / ref.to(torch::kFloat).norm()).item<double>();
}

TEST(Int8Quantizer, ActivationCodesRoundTripWithinHalfAStep) {
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (auto fmt : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
      // Odd sizes so the chunked loops end mid-chunk; an offset so the range is not symmetric.
      const auto x = (torch::randn({3, 7, 61, 53}) * 2.5 + 0.7).to(dtype).contiguous(fmt);
      const auto a = sd::int8::quantize_activation(x);
      ASSERT_EQ(a.q.scalar_type(), torch::kByte);
      ASSERT_EQ(a.q.sizes(), x.sizes());
      EXPECT_TRUE(a.q.is_contiguous(fmt));
      const auto xf = x.to(torch::kFloat);
      const double lo = std::min(0.0, xf.min().item<double>()), hi = std::max(0.0, xf.max().item<double>());
      EXPECT_NEAR(a.scale, (hi - lo) / 255.0, 1e-6 * (hi - lo));
      EXPECT_EQ(a.zero_point, std::llround(-lo / a.scale));
      const double err = (dequantize(a) - xf).abs().max().item<double>();
      EXPECT_LE(err, a.scale * 0.5 + 1e-6) << c10::toString(dtype);
      // The extremes land on the ends of the code range.
      EXPECT_EQ(a.q.min().item<int>(), 0);
      EXPECT_EQ(a.q.max().item<int>(), 255);
    }
  }
}

TEST(Int8Quantizer, ZeroIsExactAndTheRangeAlwaysHoldsIt) {
  const auto pos = torch::rand({4, 1000}) + 1.0;  // all in [1, 2)
  auto a = sd::int8::quantize_activation(pos);
  EXPECT_EQ(a.zero_point, 0);
  EXPECT_NEAR(a.scale, pos.max().item<double>() / 255.0, 1e-7);
  const auto neg = -(torch::rand({4, 1000}) + 1.0);
  a = sd::int8::quantize_activation(neg);
  EXPECT_EQ(a.zero_point, 255);
  const auto mixed = torch::tensor({-1.0f, 0.0f, 3.0f});
  a = sd::int8::quantize_activation(mixed);
  EXPECT_EQ(a.q[1].item<int>(), a.zero_point);  // 0 maps to the zero point exactly
  const auto zeros = torch::zeros({5, 5});
  a = sd::int8::quantize_activation(zeros);  // a degenerate range still gives a finite scale
  EXPECT_GT(a.scale, 0.0);
  EXPECT_TRUE(torch::equal(dequantize(a), zeros));
}

TEST(Int8Quantizer, RejectsNonFiniteAndOtherDtypes) {
  auto x = torch::randn({2, 3});
  x[1][2] = std::numeric_limits<float>::infinity();
  try {
    sd::int8::quantize_activation(x);
    FAIL() << "inf accepted";
  } catch (const sd::Error& e) {
    EXPECT_NE(std::string(e.what()).find("inf or NaN"), std::string::npos) << e.what();
  }
  x[1][2] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(sd::int8::quantize_activation(x), sd::Error);
  try {
    sd::int8::quantize_activation(torch::ones({2, 2}, torch::kInt));
    FAIL() << "int32 accepted";
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("bf16 or fp32"), std::string::npos) << e.what();
  }
}

TEST(Int8Quantizer, WeightsPerOutputChannel) {
  torch::manual_seed(5);
  // Channels of very different magnitude: one scale per output channel keeps each one's resolution.
  auto w = torch::randn({6, 4, 3, 3}) * torch::tensor({1e-3, 1e-2, 0.1, 1.0, 10.0, 0.0}).view({-1, 1, 1, 1});
  const auto q = sd::int8::quantize_weight(w);
  ASSERT_EQ(q.q.scalar_type(), torch::kChar);
  ASSERT_EQ(q.scale.sizes(), torch::IntArrayRef({6}));
  const auto amax = q.q.abs().to(torch::kInt).amax({1, 2, 3});
  for (int o = 0; o < 5; ++o) EXPECT_EQ(amax[o].item<int>(), 127) << "channel " << o;
  EXPECT_EQ(amax[5].item<int>(), 0);  // the all-zero channel
  const auto back = q.q.to(torch::kFloat) * q.scale.view({-1, 1, 1, 1});
  const auto err = (back - w).abs().amax({1, 2, 3});
  for (int o = 0; o < 6; ++o) EXPECT_LE(err[o].item<double>(), q.scale[o].item<double>() * 0.5 * (1 + 1e-5));
}

TEST(Int8Layers, UnavailableSaysWhy) {
  const std::string why = sd::int8::unavailable_reason();
  sd::nn::Conv2d conv(4, 4, 3, 1, 1);
  conv->weight.set_data(torch::randn({4, 4, 3, 3}));
  conv->bias.set_data(torch::randn({4}));
  if (why.empty()) {
    EXPECT_EQ(sd::nn::quantize_int8(*conv, nullptr), 1);
    EXPECT_TRUE(conv->quantized());
    return;
  }
  try {
    sd::nn::quantize_int8(*conv, nullptr);
    FAIL() << "quantize_int8 succeeded where int8 is unavailable: " << why;
  } catch (const sd::InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
  }
  EXPECT_FALSE(conv->quantized());
}

#define SD_REQUIRE_INT8()                                                              \
  do {                                                                                 \
    if (!sd::int8::available()) GTEST_SKIP() << sd::int8::unavailable_reason();       \
  } while (0)

// 8-bit codes for weights (per channel) and activations (per tensor): on Gaussian data each product term carries
// ~0.4% (weights) + ~0.6% (activations, 255 steps over ~±4σ) relative noise, averaging over the K terms of a dot
// product to ~1-1.5% of the output's norm. Measured (libtorch 2.15, AMX): conv 1.3-1.4%, linear 0.95-1.4%.
// Bound: 3%.
constexpr double kLayerRelL2 = 3e-2;

TEST(Int8Layers, ConvMatchesFloatWithinQuantizationError) {
  SD_REQUIRE_INT8();
  torch::manual_seed(11);
  struct Case { int64_t in, out, k, stride, pad, hw; };
  for (const Case c : {Case{32, 48, 3, 1, 1, 17}, Case{64, 32, 1, 1, 0, 8}, Case{32, 32, 3, 2, 1, 16}}) {
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      sd::nn::Conv2d conv(c.in, c.out, c.k, c.stride, c.pad);
      conv->weight.set_data((torch::randn({c.out, c.in, c.k, c.k}) * 0.05).to(dtype));
      conv->bias.set_data(torch::randn({c.out}).to(dtype));
      torch::NoGradGuard ng;
      const auto x = torch::randn({2, c.in, c.hw, c.hw}).to(dtype);
      const auto ref = at::conv2d(x.to(torch::kFloat), conv->weight.to(torch::kFloat), conv->bias.to(torch::kFloat),
                                  c.stride, c.pad);
      conv->quantize_int8();
      const auto y = conv->forward(x);
      EXPECT_EQ(y.scalar_type(), dtype);
      ASSERT_EQ(y.sizes(), ref.sizes());
      EXPECT_LT(rel_l2(y, ref), kLayerRelL2) << c.in << "->" << c.out << " k" << c.k << " " << c10::toString(dtype);
      // Not the float path by accident: int8 codes leave a visible error.
      EXPECT_GT(rel_l2(y, ref), 1e-4);
    }
  }
}

TEST(Int8Layers, LinearMatchesFloatAndKeepsLeadingDims) {
  SD_REQUIRE_INT8();
  torch::manual_seed(12);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    sd::nn::Linear lin(96, 80);
    lin->weight.set_data((torch::randn({80, 96}) * 0.1).to(dtype));
    lin->bias.set_data(torch::randn({80}).to(dtype));
    torch::NoGradGuard ng;
    const auto x = torch::randn({2, 37, 96}).to(dtype);
    const auto ref = torch::linear(x.to(torch::kFloat), lin->weight.to(torch::kFloat), lin->bias.to(torch::kFloat));
    lin->quantize_int8();
    const auto y = lin->forward(x);
    EXPECT_EQ(y.scalar_type(), dtype);
    ASSERT_EQ(y.sizes(), torch::IntArrayRef({2, 37, 80}));
    EXPECT_LT(rel_l2(y, ref), kLayerRelL2) << c10::toString(dtype);
    EXPECT_GT(rel_l2(y, ref), 1e-4);
    // A non-contiguous input (a transposed view) gives the same result as its contiguous copy.
    const auto xt = torch::randn({96, 5}).to(dtype).t();
    EXPECT_TRUE(torch::equal(lin->forward(xt), lin->forward(xt.contiguous())));
    EXPECT_THROW(lin->forward(torch::randn({3, 95}).to(dtype)), sd::InvalidArgument);
  }
}

TEST(Int8Layers, FollowTheirWeightAndStepAsideForGradients) {
  SD_REQUIRE_INT8();
  torch::manual_seed(13);
  sd::nn::Linear lin(64, 64);
  lin->weight.set_data(torch::randn({64, 64}) * 0.1);
  lin->bias.set_data(torch::randn({64}));
  lin->quantize_int8();
  const auto x = torch::randn({16, 64});
  {
    torch::NoGradGuard ng;
    lin->weight.mul_(-2.0);  // a LoRA scale change patches weights in place: the int8 copy is re-made from it
    const auto ref = torch::linear(x, lin->weight, lin->bias);
    EXPECT_LT(rel_l2(lin->forward(x), ref), kLayerRelL2);
  }
  // Training wants gradients through the weight: the float path, exactly.
  lin->weight.set_requires_grad(true);
  const auto y = lin->forward(x);
  EXPECT_TRUE(y.requires_grad());
  EXPECT_TRUE(torch::equal(y.detach(), torch::linear(x, lin->weight, lin->bias).detach()));
  lin->weight.set_requires_grad(false);
  // The fast-path switch the bench uses turns the int8 copy off.
  torch::NoGradGuard ng;
  sd::nn::fast_path().int8 = false;
  const auto off = lin->forward(x);
  sd::nn::fast_path().int8 = true;
  EXPECT_TRUE(torch::equal(off, torch::linear(x, lin->weight, lin->bias)));
}

// A weight replaced by new numbers at the freed weight's address (views of one buffer, so the address is the same
// every run) and with the same version (set_data keeps the parameter's counter): the int8 copy is made again.
TEST(Int8Layers, FollowAWeightAtTheFreedAddress) {
  SD_REQUIRE_INT8();
  torch::manual_seed(17);
  torch::NoGradGuard ng;
  std::vector<float> lbuf(64 * 64), cbuf(8 * 8 * 3 * 3);  // outlive the layers whose weights view them
  const auto lin_at = [&] { return torch::from_blob(lbuf.data(), {64, 64}); };
  const auto conv_at = [&] { return torch::from_blob(cbuf.data(), {8, 8, 3, 3}); };
  sd::nn::Linear lin(64, 64);
  sd::nn::Conv2d conv(8, 8, 3, 1, 1);
  lin_at().copy_(torch::randn({64, 64}) * 0.1);
  conv_at().copy_(torch::randn({8, 8, 3, 3}) * 0.1);
  lin->weight.set_data(lin_at());
  lin->bias.set_data(torch::randn({64}));
  conv->weight.set_data(conv_at());
  conv->bias.set_data(torch::randn({8}));
  lin->quantize_int8();
  conv->quantize_int8();
  const auto xl = torch::randn({16, 64});
  const auto xc = torch::randn({1, 8, 6, 6});
  lin->forward(xl);
  conv->forward(xc);
  lin->weight.set_data(torch::empty({0}));
  conv->weight.set_data(torch::empty({0}));
  lin_at().copy_(torch::randn({64, 64}) * -0.3);
  conv_at().copy_(torch::randn({8, 8, 3, 3}) * -0.3);
  lin->weight.set_data(lin_at());
  conv->weight.set_data(conv_at());
  ASSERT_EQ(lin->weight.data_ptr(), static_cast<void*>(lbuf.data()));
  ASSERT_EQ(conv->weight.data_ptr(), static_cast<void*>(cbuf.data()));
  EXPECT_LT(rel_l2(lin->forward(xl), torch::linear(xl, lin->weight, lin->bias)), kLayerRelL2);
  EXPECT_LT(rel_l2(conv->forward(xc), at::conv2d(xc, conv->weight, conv->bias, 1, 1)), kLayerRelL2);
}

}  // namespace
