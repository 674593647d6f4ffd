// The inference fast paths of the leaf layers (models/layers.h) compute the same function as the plain paths: the
// prepacked oneDNN convolution, its fallbacks (weight changed, gradients wanted) and the packed-gate GEGLU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "core/device.h"
#include "common/fixtures.h"
#include "models/layers.h"
#include "models/transformer_2d.h"

namespace {

using sd::nn::Conv2d;

Conv2d random_conv(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad, torch::Dtype dtype) {
  torch::manual_seed(7);
  Conv2d conv(in, out, k, stride, pad);
  torch::NoGradGuard no_grad;
  conv->weight.set_data((torch::randn({out, in, k, k}) * 0.1).to(dtype));
  conv->bias.set_data(torch::randn({out}).to(dtype));
  return conv;
}

struct ConvCase {
  int64_t in, out, k, stride, pad, hw;
};
// gtest prints the parameter with the test (ctest, --gtest_list_tests); without this it is a byte dump.
void PrintTo(const ConvCase& c, std::ostream* os) {
  *os << "in " << c.in << ", out " << c.out << ", kernel " << c.k << ", stride " << c.stride << ", pad " << c.pad
      << ", " << c.hw << "x" << c.hw;
}

class PrepackedConv : public ::testing::TestWithParam<ConvCase> {};

TEST_P(PrepackedConv, MatchesEagerFp32AndBf16) {
  const auto c = GetParam();
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    auto conv = random_conv(c.in, c.out, c.k, c.stride, c.pad, dtype);
    torch::NoGradGuard no_grad;
    const auto x = torch::randn({2, c.in, c.hw, c.hw}).to(dtype);
    const auto eager = conv->forward(x).to(torch::kFloat);
    const std::string simd = sd::cpu_simd_level();
    if (dtype == torch::kBFloat16 && simd != "unknown" && simd.rfind("avx512", 0) != 0 && simd != "amx_bf16") {
      // oneDNN's bf16 convolutions need AVX-512: prepack declines and the layer stays on the eager path.
      EXPECT_FALSE(conv->prepack()) << simd;
      EXPECT_FALSE(conv->prepacked());
      SD_EXPECT_CLOSE(conv->forward(x).to(torch::kFloat), eager, 0.0, 0.0, "bf16 conv without prepack on " + simd);
      continue;
    }
    ASSERT_TRUE(conv->prepack());
    ASSERT_TRUE(conv->prepacked());
    const auto packed = conv->forward(x);
    EXPECT_EQ(packed.scalar_type(), dtype);
    EXPECT_EQ(packed.sizes(), eager.sizes());
    // Same oneDNN kernel family on both paths; fp32 agrees to rounding, bf16 to one bf16 ulp of the output.
    const double rtol = dtype == torch::kFloat ? 1e-5 : 8e-3;
    SD_EXPECT_CLOSE(packed.to(torch::kFloat), eager, 1e-5, rtol, "prepacked conv");
    // Channels-last input gives the same numbers.
    const auto cl = conv->forward(x.contiguous(at::MemoryFormat::ChannelsLast)).to(torch::kFloat);
    SD_EXPECT_CLOSE(cl, eager, 1e-5, rtol, "prepacked conv, channels-last input");
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PrepackedConv,
                         ::testing::Values(ConvCase{8, 16, 3, 1, 1, 9}, ConvCase{16, 8, 1, 1, 0, 6},
                                           ConvCase{12, 12, 3, 2, 1, 10}, ConvCase{32, 32, 3, 1, 1, 4}),
                         [](const auto& info) {
                           const auto& c = info.param;
                           return "in" + std::to_string(c.in) + "_out" + std::to_string(c.out) + "_k" +
                                  std::to_string(c.k) + "_s" + std::to_string(c.stride) + "_hw" +
                                  std::to_string(c.hw);
                         });

TEST(PrepackedConvFallback, WeightModifiedInPlaceUsesTheNewWeight) {
  auto conv = random_conv(4, 4, 3, 1, 1, torch::kFloat);
  torch::NoGradGuard no_grad;
  ASSERT_TRUE(conv->prepack());
  const auto x = torch::randn({1, 4, 5, 5});
  conv->weight.mul_(2.0);  // bumps the version counter: the packed copy is stale
  const auto y = conv->forward(x);
  const auto ref = at::conv2d(x, conv->weight, conv->bias, 1, 1);
  SD_EXPECT_CLOSE(y, ref, 1e-6, 1e-6, "conv after in-place weight change");
}

TEST(PrepackedConvFallback, WeightReplacedUsesTheNewWeight) {
  auto conv = random_conv(4, 4, 3, 1, 1, torch::kFloat);
  torch::NoGradGuard no_grad;
  ASSERT_TRUE(conv->prepack());
  const auto x = torch::randn({1, 4, 5, 5});
  conv->weight.set_data(torch::randn({4, 4, 3, 3}));
  const auto ref = at::conv2d(x, conv->weight, conv->bias, 1, 1);
  SD_EXPECT_CLOSE(conv->forward(x), ref, 1e-6, 1e-6, "conv after weight replacement");
}

// A weight replaced by one whose numbers lie at the freed weight's address (the allocator reuses freed blocks; here
// both are views of one buffer, so the address is the same every run) and with the same version (set_data keeps
// the parameter's counter): the packed copy must still be seen as stale.
TEST(PrepackedConvFallback, WeightReplacedAtTheFreedAddressUsesTheNewWeight) {
  std::vector<float> buf(4 * 4 * 3 * 3);  // outlives the layer whose weight views it
  auto conv = random_conv(4, 4, 3, 1, 1, torch::kFloat);
  torch::NoGradGuard no_grad;
  const auto at_buf = [&] { return torch::from_blob(buf.data(), {4, 4, 3, 3}); };
  at_buf().copy_(torch::randn({4, 4, 3, 3}));
  conv->weight.set_data(at_buf());
  ASSERT_TRUE(conv->prepack());
  const auto x = torch::randn({1, 4, 5, 5});
  const auto version = conv->weight._version();
  conv->weight.set_data(torch::empty({0}));  // the first weight's storage is gone
  at_buf().copy_(torch::randn({4, 4, 3, 3}));
  conv->weight.set_data(at_buf());
  ASSERT_EQ(conv->weight.data_ptr(), static_cast<void*>(buf.data()));
  ASSERT_EQ(conv->weight._version(), version);
  EXPECT_FALSE(conv->prepacked_current());
  const auto ref = at::conv2d(x, conv->weight, conv->bias, 1, 1);
  SD_EXPECT_CLOSE(conv->forward(x), ref, 1e-6, 1e-6, "conv after a weight at the freed address");
}

// Another view of the weight's own storage at the same address (its in/out channels swapped): not the packed weight.
TEST(PrepackedConvFallback, AnotherViewOfTheSameStorageUsesTheNewWeight) {
  auto conv = random_conv(4, 4, 3, 1, 1, torch::kFloat);
  torch::NoGradGuard no_grad;
  ASSERT_TRUE(conv->prepack());
  const auto x = torch::randn({1, 4, 5, 5});
  const auto swapped = conv->weight.transpose(0, 1);
  conv->weight.set_data(swapped);
  ASSERT_EQ(conv->weight.data_ptr(), swapped.data_ptr());
  EXPECT_FALSE(conv->prepacked_current());
  const auto ref = at::conv2d(x, swapped.contiguous(), conv->bias, 1, 1);
  SD_EXPECT_CLOSE(conv->forward(x), ref, 1e-6, 1e-6, "conv after a transposed view of its weight");
}

TEST(PrepackedConvFallback, GradientsFlowThroughThePlainPath) {
  auto conv = random_conv(3, 5, 3, 1, 1, torch::kFloat);
  {
    torch::NoGradGuard no_grad;
    ASSERT_TRUE(conv->prepack());
  }
  conv->weight.set_requires_grad(true);
  const auto x = torch::randn({1, 3, 6, 6});
  conv->forward(x).sum().backward();
  ASSERT_TRUE(conv->weight.grad().defined());
  // d(sum y)/dW[o, i, :, :] = sum of the input windows; non-zero everywhere for a random input.
  EXPECT_GT(conv->weight.grad().abs().min().item<float>(), 0.0f);
}

TEST(PrepackedConvFallback, DisabledFastPathGivesTheEagerResult) {
  auto conv = random_conv(6, 6, 3, 1, 1, torch::kFloat);  // fp32: packs on every CPU with oneDNN
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({1, 6, 7, 7});
  const auto eager = conv->forward(x);
  ASSERT_TRUE(conv->prepack());
  sd::nn::fast_path().prepack_conv = false;
  const auto y = conv->forward(x);
  sd::nn::fast_path().prepack_conv = true;
  EXPECT_TRUE(torch::equal(y, eager));
}

TEST(PrepackedConvFallback, Fp16WeightsAreNotPacked) {
  sd::nn::Conv2d conv(2, 2, 1);
  conv->weight.set_data(torch::randn({2, 2, 1, 1}).to(torch::kHalf));
  EXPECT_FALSE(conv->prepack());
  EXPECT_FALSE(conv->prepacked());
}

TEST(PrepackConvolutions, PacksEveryConvolutionOfATree) {
  torch::nn::Sequential seq(random_conv(2, 4, 3, 1, 1, torch::kFloat), random_conv(4, 4, 1, 1, 0, torch::kFloat));
  EXPECT_EQ(sd::nn::prepack_convolutions(*seq), 2);
}

// One copy of each packed weight (issue 20, memory): the dense weight is dropped while the packed copy serves, and
// comes back bit for bit when something needs it.
class OneConvCopy : public ::testing::TestWithParam<torch::Dtype> {};

TEST_P(OneConvCopy, ReleasedWeightGivesThePackedResultAndComesBackExactly) {
  const torch::Dtype dtype = GetParam();
  auto conv = random_conv(16, 24, 3, 1, 1, dtype);
  const auto original = conv->weight.clone();
  torch::NoGradGuard no_grad;
  if (!conv->prepack()) GTEST_SKIP() << "oneDNN does not pack " << dtype << " on this CPU";
  const auto x = torch::randn({2, 16, 9, 9}).to(dtype);
  const auto packed = conv->forward(x);
  ASSERT_TRUE(conv->release_dense());
  EXPECT_TRUE(conv->dense_released());
  EXPECT_EQ(conv->weight.numel(), 0);  // the dense copy is gone
  EXPECT_EQ(conv->weight.scalar_type(), dtype);
  EXPECT_TRUE(torch::equal(conv->forward(x), packed));
  conv->restore_dense();
  EXPECT_FALSE(conv->dense_released());
  ASSERT_EQ(conv->weight.sizes(), original.sizes());
  EXPECT_TRUE(torch::equal(conv->weight, original)) << "max |diff| " << (conv->weight - original).abs().max().item<double>();
  // Restored, the packed copy is still the current one: no re-pack, same result.
  EXPECT_TRUE(conv->prepacked_current());
  EXPECT_TRUE(torch::equal(conv->forward(x), packed));
}

TEST_P(OneConvCopy, PathsThatNeedTheDenseWeightRestoreIt) {
  const torch::Dtype dtype = GetParam();
  auto conv = random_conv(6, 8, 3, 1, 1, dtype);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({1, 6, 7, 7}).to(dtype);
  const auto eager = at::conv2d(x, conv->weight, conv->bias, {1, 1}, {1, 1});
  if (!conv->prepack()) GTEST_SKIP() << "oneDNN does not pack " << dtype << " on this CPU";
  ASSERT_TRUE(conv->release_dense());
  sd::nn::fast_path().prepack_conv = false;
  const auto y = conv->forward(x);
  sd::nn::fast_path().prepack_conv = true;
  EXPECT_FALSE(conv->dense_released());
  EXPECT_TRUE(torch::equal(y, eager));
  // A weight set from outside ends the release: the packed copy is stale and the new weight is used.
  ASSERT_TRUE(conv->release_dense());
  conv->weight.set_data(torch::zeros({8, 6, 3, 3}).to(dtype));
  EXPECT_FALSE(conv->dense_released());
  EXPECT_TRUE(torch::equal(conv->forward(x), conv->bias.view({1, 8, 1, 1}).expand({1, 8, 7, 7})));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, OneConvCopy, ::testing::Values(torch::kFloat, torch::kBFloat16),
                         [](const auto& info) { return std::string(info.param == torch::kFloat ? "fp32" : "bf16"); });

TEST(PrepackConvolutions, KeepsOneCopyUnlessAskedForBoth) {
  auto tree = [] {
    return torch::nn::Sequential(random_conv(2, 4, 3, 1, 1, torch::kFloat), random_conv(4, 4, 1, 1, 0, torch::kFloat));
  };
  auto one = tree();
  const int64_t params = sd::nn::parameter_count(*one);
  EXPECT_EQ(params, 4 * 2 * 9 + 4 + 4 * 4 + 4);
  ASSERT_EQ(sd::nn::prepack_convolutions(*one), 2);
  for (const auto& p : one->named_parameters()) {
    if (p.key().find("weight") != std::string::npos) {
      EXPECT_EQ(p.value().numel(), 0) << p.key();
    }
  }
  EXPECT_EQ(sd::nn::parameter_count(*one), params);
  EXPECT_EQ(sd::nn::restore_dense_convolutions(*one), 2);
  EXPECT_EQ(sd::nn::restore_dense_convolutions(*one), 0);
  EXPECT_EQ(one->named_parameters()["0.weight"].sizes(), torch::IntArrayRef({4, 2, 3, 3}));

  sd::nn::fast_path().one_conv_copy = false;
  auto both = tree();
  EXPECT_EQ(sd::nn::prepack_convolutions(*both), 2);
  sd::nn::fast_path().one_conv_copy = true;
  EXPECT_EQ(both->named_parameters()["1.weight"].sizes(), torch::IntArrayRef({4, 4, 1, 1}));
}

TEST(GEGLU, PackedGateMatchesTheFormulaWithAndWithoutGrad) {
  torch::manual_seed(3);
  sd::GEGLU geglu(8, 6);
  geglu->proj->weight.set_data(torch::randn({12, 8}) * 0.3);
  geglu->proj->bias.set_data(torch::randn({12}) * 0.1);
  const auto x = torch::randn({2, 5, 8});
  const auto h = torch::nn::functional::linear(x, geglu->proj->weight, geglu->proj->bias);
  const auto ref = h.slice(-1, 0, 6) * torch::gelu(h.slice(-1, 6, 12));
  {
    torch::NoGradGuard no_grad;
    SD_EXPECT_CLOSE(geglu->forward(x), ref.detach(), 1e-6, 1e-6, "GEGLU (inference)");
  }
  auto y = geglu->forward(x);  // parameters require grad: the out-of-place product
  SD_EXPECT_CLOSE(y.detach(), ref.detach(), 1e-6, 1e-6, "GEGLU (autograd)");
  y.sum().backward();
  EXPECT_TRUE(geglu->proj->weight.grad().defined());
}

// proj_in of a linear-projection Transformer2D packs its [B, HW, C] view of the NCHW input first when B > 1 and HW <=
// C (bf16 on the CPU; models/transformer_2d.cpp): the rows stay independent, so a batch of 3 equals its rows run one
// at a time (one row takes the strided product), and the bf16 block tracks the fp32 one.
TEST(Transformer2D, PackedProjInBatchEqualsItsRowsAndTracksFp32) {
  sd::Transformer2DOptions o;
  o.in_channels = 64;
  o.heads = 2;
  o.dim_head = 32;
  o.norm_num_groups = 8;
  o.cross_attention_dim = 16;
  o.use_linear_projection = true;
  sd::Transformer2DModel fp32(o), bf16(o);
  torch::NoGradGuard no_grad;
  torch::manual_seed(11);
  auto dst = bf16->named_parameters();
  for (auto& p : fp32->named_parameters()) {
    p.value().set_data(torch::randn(p.value().sizes()) * (p.key().find("norm") != std::string::npos ? 1.0 : 0.15));
    dst[p.key()].set_data(p.value().to(torch::kBFloat16));
  }
  const auto x = torch::randn({3, 64, 4, 4});  // HW 16 <= C 64
  const auto ctx = torch::randn({3, 5, 16});
  const auto xb = x.to(torch::kBFloat16), cb = ctx.to(torch::kBFloat16);
  const auto batched = bf16->forward(xb, cb).to(torch::kFloat);
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < 3; ++i) rows.push_back(bf16->forward(xb.slice(0, i, i + 1), cb.slice(0, i, i + 1)));
  // The same bf16 arithmetic over differently laid-out operands: a few bf16 ulps of the output.
  SD_EXPECT_CLOSE(batched, torch::cat(rows, 0).to(torch::kFloat), 0.0, 2e-2, "bf16 batch vs its rows");
  SD_EXPECT_CLOSE(batched, fp32->forward(x, ctx), 0.0, 5e-2, "bf16 vs fp32 Transformer2D");
}

}  // namespace
