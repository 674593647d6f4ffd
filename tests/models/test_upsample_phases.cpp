// Conv2dImpl::forward_upsampled2x: a 3x3 convolution of the nearest-2x upsampled input, computed on the CPU as four
// 2x2 convolutions of the input itself (fast_path().upsample_phases). Checked against conv(upsample(x)) computed in
// float64 from the same inputs and weights; the weight-change tracking (in place, set_data, prepacked and released
// weights) and the plain path where the phases do not apply (switched off, gradients wanted, not 3x3).
//
// Tolerances (max|out - ref| <= atol + rtol * max|ref|): fp32 atol 1e-5, rtol 1e-5, one convolution's rounding
// (the phase kernels are float64 sums rounded once); bf16 rtol 5e-2, the module goldens' bound for TAESD (the phase
// kernels are rounded to bf16 after summing up to four taps; on an AVX2 Zen 2 the phases measured 0.163 at max|ref|
// 8.45, 1.9e-2, and the plain path 0.219: 1.13's generic bf16 convolution rounds partial sums; with libtorch 2.15
// 0.0315 and 0.0310).
#include <gtest/gtest.h>

#include <iostream>
#include <vector>

#include "common/fixtures.h"
#include "models/autoencoder_kl.h"
#include "models/autoencoder_tiny.h"
#include "models/layers.h"
#include "models/resnet.h"

namespace {

struct PhasesSwitch {  // restores the fast path's switch whatever a test does
  bool saved = sd::nn::fast_path().upsample_phases;
  ~PhasesSwitch() { sd::nn::fast_path().upsample_phases = saved; }
};

sd::nn::Conv2d make_conv(int64_t in, int64_t out, bool bias, c10::ScalarType dt = c10::kFloat, int64_t k = 3,
                         int64_t pad = 1) {
  torch::manual_seed(11 + in + out);
  sd::nn::Conv2d conv(in, out, k, 1, pad, bias);
  torch::NoGradGuard ng;
  conv->weight.set_data(torch::randn(conv->weight.sizes()) * 0.2);
  if (bias) conv->bias.set_data(torch::randn({out}));  // of order 1, so that a lost or misplaced bias shows
  conv->to(dt);
  return conv;
}

// conv(nearest_2x(x)) in float64 from the (rounded) weights and input.
torch::Tensor reference(const sd::nn::Conv2dImpl& conv, const torch::Tensor& x) {
  auto f = [](const torch::Tensor& t) { return t.to(torch::kDouble); };
  const auto up = at::upsample_nearest2d(f(x), {x.size(2) * 2, x.size(3) * 2});
  return torch::conv2d(up, f(conv.weight), conv.bias.defined() ? f(conv.bias) : torch::Tensor(), {1, 1},
                       {conv.padding, conv.padding});
}

void expect_close(const torch::Tensor& out, const torch::Tensor& ref, const std::string& what) {
  ASSERT_EQ(out.sizes(), ref.sizes()) << what;
  const bool fp32 = out.scalar_type() == torch::kFloat;
  SD_EXPECT_CLOSE(out, ref, fp32 ? 1e-5 : 0.0, fp32 ? 1e-5 : 5e-2, what);
}

TEST(UpsamplePhases, EqualUpsampleThenConvolve) {
  torch::NoGradGuard ng;
  // Odd and even sizes, one and two rows, more and fewer output channels, with and without a bias: the borders
  // (where the upsampled image's padding row is x's) and the interleaving.
  struct Case { int64_t n, in, out, h, w; bool bias; };
  for (const Case c : {Case{1, 8, 12, 5, 7, true}, Case{2, 16, 16, 6, 6, false}, Case{1, 4, 3, 1, 1, true},
                       Case{3, 6, 10, 2, 9, true}}) {
    auto conv = make_conv(c.in, c.out, c.bias);
    torch::manual_seed(c.h * 10 + c.w);
    const auto x = torch::randn({c.n, c.in, c.h, c.w});
    const auto out = conv->forward_upsampled2x(x);
    const std::string what = std::to_string(c.n) + "x" + std::to_string(c.in) + "x" + std::to_string(c.h) + "x" +
                             std::to_string(c.w) + " -> " + std::to_string(c.out);
    EXPECT_TRUE(conv->upsample_phases_current()) << what << ": the four-phase path did not run";
    EXPECT_TRUE(out.is_contiguous()) << what;
    expect_close(out, reference(*conv, x), what);
  }
}

TEST(UpsamplePhases, ChannelsLastInputGivesChannelsLastOutput) {
  torch::NoGradGuard ng;
  auto conv = make_conv(8, 8, true);
  conv->weight.set_data(conv->weight.contiguous(torch::MemoryFormat::ChannelsLast));  // as load_taesd on the CPU
  const auto x = torch::randn({2, 8, 5, 6}).contiguous(torch::MemoryFormat::ChannelsLast);
  const auto out = conv->forward_upsampled2x(x);
  EXPECT_TRUE(out.is_contiguous(torch::MemoryFormat::ChannelsLast));
  expect_close(out, reference(*conv, x), "channels-last");
}

TEST(UpsamplePhases, PrepackedAndReleasedWeights) {
  torch::NoGradGuard ng;
  auto conv = make_conv(16, 8, true);
  const auto x = torch::randn({1, 16, 7, 5});
  const auto ref = reference(*conv, x);
  if (!conv->prepack()) GTEST_SKIP() << "no oneDNN prepacking here";
  ASSERT_TRUE(conv->release_dense());
  expect_close(conv->forward_upsampled2x(x), ref, "made from the released packed copy");
  EXPECT_TRUE(conv->dense_released()) << "the phases must not bring the dense weight back";
  EXPECT_TRUE(conv->upsample_phases_current());
  conv->restore_dense();  // the same numbers: the phases stay
  EXPECT_TRUE(conv->upsample_phases_current());
  ASSERT_TRUE(conv->prepack());
  ASSERT_TRUE(conv->release_dense());
  EXPECT_TRUE(conv->upsample_phases_current());
  expect_close(conv->forward_upsampled2x(x), ref, "again after restore, prepack and release");
}

TEST(UpsamplePhases, FollowTheWeight) {
  torch::NoGradGuard ng;
  auto conv = make_conv(8, 6, true);
  const auto x = torch::randn({2, 8, 4, 6});
  expect_close(conv->forward_upsampled2x(x), reference(*conv, x), "first");
  conv->weight.mul_(-2);  // in place (a version bump)
  EXPECT_FALSE(conv->upsample_phases_current());
  expect_close(conv->forward_upsampled2x(x), reference(*conv, x), "after an in-place change");
  conv->weight.set_data(torch::randn(conv->weight.sizes()));  // a new weight, as LoRA fusion sets it
  EXPECT_FALSE(conv->upsample_phases_current());
  expect_close(conv->forward_upsampled2x(x), reference(*conv, x), "after set_data");
  conv->bias.set_data(conv->bias + 5);
  EXPECT_FALSE(conv->upsample_phases_current()) << "a bias change must re-make the phases";
  expect_close(conv->forward_upsampled2x(x), reference(*conv, x), "after a bias change");
  if (conv->prepack() && conv->release_dense()) {
    conv->weight.set_data(torch::randn({6, 8, 3, 3}) * 3);  // ends the release
    EXPECT_FALSE(conv->upsample_phases_current());
    expect_close(conv->forward_upsampled2x(x), reference(*conv, x), "a weight set while released");
  }
}

// New numbers at the old weight's address with the old version (both weights views of one buffer, the first freed
// before the second is set): the phases are made again.
TEST(UpsamplePhases, FollowAWeightAtTheFreedAddress) {
  torch::NoGradGuard ng;
  std::vector<float> buf(6 * 8 * 3 * 3);  // outlives the layer whose weight views it
  auto conv = make_conv(8, 6, true);
  const auto at_buf = [&] { return torch::from_blob(buf.data(), {6, 8, 3, 3}); };
  at_buf().copy_(conv->weight);
  conv->weight.set_data(at_buf());
  const auto x = torch::randn({2, 8, 4, 6});
  expect_close(conv->forward_upsampled2x(x), reference(*conv, x), "first");
  ASSERT_TRUE(conv->upsample_phases_current());
  conv->weight.set_data(torch::empty({0}));
  at_buf().copy_(torch::randn({6, 8, 3, 3}) * 0.2);
  conv->weight.set_data(at_buf());
  EXPECT_FALSE(conv->upsample_phases_current());
  expect_close(conv->forward_upsampled2x(x), reference(*conv, x), "after a weight at the freed address");
}

TEST(UpsamplePhases, Bf16WithinBound) {
  torch::NoGradGuard ng;
  auto conv = make_conv(16, 16, true, torch::kBFloat16);
  const auto x = torch::randn({1, 16, 6, 7}).to(torch::kBFloat16);
  const auto out = conv->forward_upsampled2x(x);
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(conv->upsample_phases_current());
  const auto ref = reference(*conv, x);
  expect_close(out.to(torch::kDouble), ref, "bf16");
  // The plain path's own error, for scale (this CPU's bf16 convolution rounds its partial sums).
  PhasesSwitch keep;
  sd::nn::fast_path().upsample_phases = false;
  const auto plain = conv->forward_upsampled2x(x).to(torch::kDouble);
  std::cout << "  bf16 plain path: max abs err " << (plain - ref).abs().max().item<double>() << "\n";
}

TEST(UpsamplePhases, PlainPathWhereTheyDoNotApply) {
  const auto x = torch::randn({1, 8, 5, 4});
  auto plain = [](sd::nn::Conv2dImpl& conv, const torch::Tensor& in) {
    return conv.forward(at::upsample_nearest2d(in, {in.size(2) * 2, in.size(3) * 2}));
  };
  {
    PhasesSwitch keep;
    sd::nn::fast_path().upsample_phases = false;
    torch::NoGradGuard ng;
    auto conv = make_conv(8, 8, true);
    EXPECT_TRUE(torch::equal(conv->forward_upsampled2x(x), plain(*conv, x))) << "switched off: the plain path";
    EXPECT_FALSE(conv->upsample_phases_current());
  }
  {
    torch::NoGradGuard ng;
    auto conv = make_conv(8, 8, true, c10::kFloat, 1, 0);  // 1x1: not the decomposition's case
    EXPECT_TRUE(torch::equal(conv->forward_upsampled2x(x), plain(*conv, x))) << "1x1 convolution";
    EXPECT_FALSE(conv->upsample_phases_current());
  }
  // Gradients: the plain (autograd) path, the same gradient as upsample-then-convolve.
  auto conv = make_conv(8, 8, true);
  conv->weight.set_requires_grad(true);
  const auto xg = x.clone().set_requires_grad(true);
  conv->forward_upsampled2x(xg).square().sum().backward();
  EXPECT_FALSE(conv->upsample_phases_current());
  const auto gx = xg.grad().clone(), gw = conv->weight.grad().clone();
  xg.mutable_grad().zero_();
  conv->weight.mutable_grad().zero_();
  plain(*conv, xg).square().sum().backward();
  EXPECT_TRUE(torch::equal(xg.grad(), gx));
  EXPECT_TRUE(torch::equal(conv->weight.grad(), gw));
}

// sd::nn::upsample_nearest, the one nearest-neighbour upsampling of the models (plain paths of the above, TAESD's
// upsampling when the phases are off, other sizes): every output pixel is its source pixel, bit for bit, in each dtype
// (fp16 through the fp32 detour on the CPU) and memory format, for 2x, 3x and a non-integer size.
TEST(UpsamplePhases, UpsampleNearestCopiesEachSourcePixel) {
  torch::manual_seed(5);
  const auto x32 = torch::randn({2, 3, 5, 4});
  for (const auto dt : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    for (const bool cl : {false, true}) {
      auto x = x32.to(dt);
      if (cl) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      for (const auto& size : {std::vector<int64_t>{10, 8}, {15, 12}, {7, 9}}) {
        const auto what = std::string(c10::toString(dt)) + (cl ? " channels-last " : " ") + std::to_string(size[0]) +
                          "x" + std::to_string(size[1]);
        const auto y = sd::nn::upsample_nearest(x, size);
        ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, size[0], size[1]})) << what;
        EXPECT_EQ(y.scalar_type(), dt) << what;
        EXPECT_EQ(y.is_contiguous(at::MemoryFormat::ChannelsLast), cl) << what;
        // PyTorch's "nearest": source index floor(i * in / out).
        const auto rows = (torch::arange(size[0]) * x.size(2)).div(size[0], "floor");
        const auto cols = (torch::arange(size[1]) * x.size(3)).div(size[1], "floor");
        const auto expect = x.index_select(2, rows).index_select(3, cols);
        EXPECT_TRUE(torch::equal(y.contiguous(), expect.contiguous())) << what;
      }
    }
  }
}

TEST(UpsamplePhases, Upsample2DUsesThemForExactly2xWhereAsked) {
  torch::NoGradGuard ng;
  sd::Upsample2D up(8, 4, /*phases=*/true);
  auto& conv = *up->conv;
  torch::manual_seed(5);
  conv.weight.set_data(torch::randn(conv.weight.sizes()) * 0.2);
  conv.bias.set_data(torch::randn({4}));
  const auto x = torch::randn({2, 8, 5, 7});
  expect_close(up(x), reference(conv, x), "2x");
  EXPECT_TRUE(conv.upsample_phases_current());
  // The UNet's (phases not asked for: memory) upsamples, then convolves.
  sd::Upsample2D unet_up(8, 4);
  unet_up->conv->weight.set_data(conv.weight.clone());
  unet_up->conv->bias.set_data(conv.bias.clone());
  expect_close(unet_up(x), reference(conv, x), "2x, the UNet's");
  EXPECT_FALSE(unet_up->conv->upsample_phases_current());
  // An explicit size (the UNet's, for inputs that are not a multiple of its down factor): plain nearest to that size.
  sd::Upsample2D odd(8, 4, /*phases=*/true);
  odd->conv->weight.set_data(conv.weight.clone());
  odd->conv->bias.set_data(conv.bias.clone());
  const auto out = odd(x, std::make_pair<int64_t, int64_t>(9, 13));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 4, 9, 13}));
  EXPECT_FALSE(odd->conv->upsample_phases_current());
  const auto ref = torch::conv2d(at::upsample_nearest2d(x, {9, 13}), conv.weight, conv.bias, {1, 1}, {1, 1});
  EXPECT_TRUE(torch::allclose(out, ref, 1e-6, 1e-6));
}

// A decoder's output with the phases off and on (both in fp32, so they agree to rounding), and how many of its
// convolutions made phase kernels.
struct DecodedBothWays {
  torch::Tensor plain, phased;
  int64_t convolutions_with_phases = 0;
};
template <class Vae>
DecodedBothWays decode_both_ways(Vae& vae, const torch::Tensor& z) {
  torch::NoGradGuard ng;
  PhasesSwitch keep;
  DecodedBothWays d;
  sd::nn::fast_path().upsample_phases = false;
  d.plain = vae->decode(z);
  sd::nn::fast_path().upsample_phases = true;
  d.phased = vae->decode(z);
  for (auto& m : vae->modules())
    if (auto* c = dynamic_cast<sd::nn::Conv2dImpl*>(m.get()); c && c->upsample_phases_current())
      ++d.convolutions_with_phases;
  return d;
}

TEST(UpsamplePhases, TaesdDecoderUsesThemAfterEachUpsampling) {
  SD_SKIP_WITHOUT_FIXTURE("models/tiny-sd15/taesd");
  auto vae = sd::load_taesd(sd::test::fixture_path("models/tiny-sd15/taesd"));
  torch::manual_seed(2);
  const auto d = decode_both_ways(vae, torch::randn({1, 4, 4, 4}));
  // One convolution after each upsampling: one fewer than the decoder's stages.
  EXPECT_EQ(d.convolutions_with_phases, static_cast<int64_t>(vae->config().num_decoder_blocks.size()) - 1);
  SD_EXPECT_CLOSE(d.phased, d.plain, 1e-5, 1e-5, "TAESD decode, phases on vs off");
}

TEST(UpsamplePhases, AutoencoderKlDecoderUsesThemInEachUpsampler) {
  SD_SKIP_WITHOUT_FIXTURE("models/tiny-sd15/vae");
  auto vae = sd::load_vae(sd::test::fixture_path("models/tiny-sd15/vae"));
  torch::manual_seed(2);
  const auto d = decode_both_ways(vae, torch::randn({1, 4, 4, 4}));
  EXPECT_EQ(d.convolutions_with_phases, 3) << "one per up block but the last (4 blocks in the fixture)";
  SD_EXPECT_CLOSE(d.phased, d.plain, 1e-5, 1e-5, "AutoencoderKL decode, phases on vs off");
}

}  // namespace
