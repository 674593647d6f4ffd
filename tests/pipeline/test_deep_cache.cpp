// Deep-feature reuse across frames (DeepCache applied to a stream; models/unet_feature_cache.h) on the fixture models:
// a UNet call that reuses the deep features of the same input is the full call, bit for bit (the shallow path
// recomputes exactly the first level); on another input it is an approximation whose error is measured here; the
// stream runs one full call every K and K - 1 shallow ones, a cut in the input forces a full call, K = 1 is the exact
// stream, and models or settings that cannot reuse are refused.
#include <gtest/gtest.h>

#include "common/error_of.h"
#include "common/fixtures.h"
#include "core/error.h"
#include "pipeline/controlnet.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/stream_diffusion.h"
#include "stream_test_stubs.h"

namespace sd {
namespace {

using torch::Tensor;
using test::error_of;

std::shared_ptr<const DiffusionModels> load(const std::string& model) {
  LoadOptions o;
  o.threads = -1;
  return load_pipeline(test::fixture_path(model), o);
}

double rel_l2(const Tensor& a, const Tensor& ref) {
  return ((a.to(torch::kDouble) - ref.to(torch::kDouble)).norm() / ref.to(torch::kDouble).norm()).item<double>();
}

class DeepCache : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!test::fixture_exists(GetParam())) GTEST_SKIP() << GetParam() << " not present";
  }
};

TEST_P(DeepCache, ReusingTheFeaturesOfTheSameInputIsTheFullCall) {
  auto m = load(GetParam());
  ASSERT_TRUE(m->supports_feature_cache());
  torch::manual_seed(5);
  const int64_t h = 8;
  const Tensor x = torch::randn({2, m->latent_channels(), h, h});
  const Tensor t = torch::tensor({999, 500}, torch::kLong);
  const Tensor ehs = m->encode_prompt("a cat").repeat({2, 1, 1});
  AddedConditioning added;
  if (m->pooled_text_dim() > 0) {
    added.text_embeds = torch::randn({2, m->pooled_text_dim()});
    added.time_ids = torch::tensor({64., 64., 0., 0., 64., 64.}).repeat({2, 1});
  }
  const Tensor full = m->unet(x, t, ehs, added);
  UNetFeatureCache cache;
  EXPECT_TRUE(torch::equal(m->unet_cached(x, t, ehs, added, {}, cache), full)) << "storing must not change a call";
  ASSERT_TRUE(cache.deep.defined());
  EXPECT_EQ(cache.deep.size(0), 2);
  EXPECT_EQ(cache.deep.size(2), h);
  EXPECT_EQ(cache.deep.size(3), h);
  cache.reuse = true;
  EXPECT_TRUE(torch::equal(m->unet_cached(x, t, ehs, added, {}, cache), full)) << "the shallow path on its own input";

  // Another input (5% of its size changed): the shallow path approximates its full call, far better than the stale
  // output would.
  const Tensor x2 = x + 0.05 * torch::randn_like(x);
  const Tensor exact2 = m->unet(x2, t, ehs, added);
  const double err = rel_l2(m->unet_cached(x2, t, ehs, added, {}, cache), exact2);
  const double stale = rel_l2(full, exact2);
  RecordProperty("rel_l2_reused", std::to_string(err));
  std::cout << "  [deep cache] " << GetParam() << ": reused rel-L2 " << err << ", stale output " << stale << "\n";
  EXPECT_GT(err, 0.0);
  EXPECT_LT(err, stale);

  // Reuse needs features of the same batch and size.
  UNetFeatureCache empty;
  empty.reuse = true;
  std::string e = error_of([&] { m->unet_cached(x, t, ehs, added, {}, empty); });
  EXPECT_NE(e.find("deep-feature cache holds nothing"), std::string::npos) << e;
  AddedConditioning one;
  if (added.defined()) one = {added.text_embeds.slice(0, 0, 1), added.time_ids.slice(0, 0, 1)};
  e = error_of([&] { m->unet_cached(x.slice(0, 0, 1), t.slice(0, 0, 1), ehs.slice(0, 0, 1), one, {}, cache); });
  EXPECT_NE(e.find("does not fit a sample of shape [1, 4, 8, 8]"), std::string::npos) << e;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DeepCache,
                         ::testing::Values("models/tiny-sd15", "models/tiny-sd21", "sdxl/models/tiny-sdxl"),
                         [](const auto& info) {
                           std::string n = info.param.substr(info.param.rfind('/') + 1);
                           for (auto& ch : n) ch = std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
                           return n;
                         });

// Slowly moving frames: a pattern drifting by a small step per frame (cosine similarity to frame 0 stays > 0.95).
Tensor moving_frame(int k, bool cut = false) {
  auto g = torch::arange(64, torch::kFloat);
  auto img = torch::sin(g.view({1, 1, 64, 1}) * 0.2 + g.view({1, 1, 1, 64}) * 0.1 + 0.08 * k) * 0.8;
  img = img.repeat({1, 3, 1, 1}) + torch::tensor({0.1f, -0.1f, 0.05f}).view({1, 3, 1, 1});
  return cut ? -img : img;
}

StreamConfig stream_config(int64_t every) {
  StreamConfig c;
  c.t_index_list = {32, 45};
  c.cfg_type = CfgType::Self;
  c.guidance_scale = 1.2;
  c.width = c.height = 64;
  c.deep_cache_every = every;
  return c;
}

TEST(DeepCacheStream, OneFullCallEveryKAndAnErrorThatStaysBounded) {
  if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP();
  auto m = load("models/tiny-sd15");
  const int N = 12;
  StreamDiffusion exact(m, stream_config(1)), off(m, stream_config(1)), reuse(m, stream_config(3));
  for (auto* s : {&exact, &off, &reuse}) s->prepare("a photo of a cat");
  double worst = 0, sum = 0;
  for (int k = 0; k < N; ++k) {
    const Tensor a = exact.img2img(moving_frame(k)), b = off.img2img(moving_frame(k)), c = reuse.img2img(moving_frame(k));
    EXPECT_TRUE(torch::equal(a, b)) << "deep_cache_every 1 is the exact stream (frame " << k << ")";
    if (k == 0) {
      EXPECT_TRUE(torch::equal(a, c)) << "the first call is full";
    }
    const double err = rel_l2(c, a);
    worst = std::max(worst, err);
    sum += err;
  }
  EXPECT_EQ(reuse.stats().unet_calls, N);
  EXPECT_EQ(reuse.stats().unet_shallow_calls, N - N / 3);  // calls 1, 2, 4, 5, 7, 8, 10, 11
  EXPECT_EQ(reuse.stats().deep_cache_forced, 0);
  EXPECT_EQ(exact.stats().unet_shallow_calls, 0);
  std::cout << "  [deep cache] tiny-sd15 stream, K = 3, " << N << " moving frames: decoded rel-L2 vs exact mean "
            << sum / N << ", worst " << worst << "\n";
  // The tiny random model is far less smooth than a trained one; the bound is a regression guard (measured: see
  // the printed figures), not a quality claim.
  EXPECT_LT(worst, 0.1);  // measured 0.065 (mean 0.012)
}

TEST(DeepCacheStream, ACutForcesAFullCallAndLiveChangesDropTheCache) {
  if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP();
  auto m = load("models/tiny-sd15");
  StreamDiffusion s(m, stream_config(4));
  s.prepare("a photo of a cat");
  // Calls: 0 full, 1-2 reuse, 3 = a cut (cosine similarity ~ -1 to frame 0): full, 4-6 reuse, 7 full.
  for (int k = 0; k < 8; ++k) s.img2img(moving_frame(k, k >= 3));
  EXPECT_EQ(s.stats().deep_cache_forced, 1);
  EXPECT_EQ(s.stats().unet_shallow_calls, 5);
  // A prompt change, a new t_index_list or set_deep_cache drop the cache: the next call is full.
  s.update_prompt("a photo of a dog");
  s.img2img(moving_frame(8, true));
  EXPECT_EQ(s.stats().unet_shallow_calls, 5);
  s.img2img(moving_frame(9, true));
  EXPECT_EQ(s.stats().unet_shallow_calls, 6);
  s.set_t_index_list({30, 45});
  s.img2img(moving_frame(10, true));
  EXPECT_EQ(s.stats().unet_shallow_calls, 6) << "a new schedule: full";
  s.set_deep_cache(1, 0.95);
  for (int k = 11; k < 14; ++k) s.img2img(moving_frame(k, true));
  EXPECT_EQ(s.stats().unet_shallow_calls, 6) << "off";
  // txt2img streams reuse by count alone.
  StreamConfig tc = stream_config(2);
  tc.t_index_list = {0};
  tc.cfg_type = CfgType::None;
  StreamDiffusion t(m, tc);
  t.prepare("a photo of a cat");
  for (int k = 0; k < 6; ++k) t.txt2img();
  EXPECT_EQ(t.stats().unet_shallow_calls, 3);
}

// With a ControlNet: the shallow path adds the first level's residuals, so reusing the features of the same input is
// still the full call bit for bit; in the stream a scale change drops the cache (the deep features hold the old
// scale's residuals).
TEST(DeepCacheStream, WithAControlNet) {
  const std::string cn_dir = "controlnet/models/tiny-controlnet-sd15";
  if (!test::fixture_exists("models/tiny-sd15") || !test::fixture_exists(cn_dir)) GTEST_SKIP();
  auto m = load("models/tiny-sd15");
  auto net = ControlNet::load(test::fixture_path(cn_dir), *m);
  torch::manual_seed(9);
  const Tensor x = torch::randn({1, 4, 8, 8});
  const Tensor t = torch::tensor({700}, torch::kLong);
  const Tensor ehs = m->encode_prompt("a cat");
  const Tensor control_image = torch::rand({1, 3, 64, 64});
  const ControlResiduals res = net->residuals(x, t, ehs, {}, control_image, 0.8);
  const Tensor full = m->unet(x, t, ehs, {}, res);
  UNetFeatureCache cache;
  m->unet_cached(x, t, ehs, {}, res, cache);
  cache.reuse = true;
  EXPECT_TRUE(torch::equal(m->unet_cached(x, t, ehs, {}, res, cache), full));

  StreamDiffusion s(m, stream_config(3));
  s.set_controlnets({{net, 1.0}});
  s.set_control_image(0, control_image);
  s.prepare("a photo of a cat");
  s.img2img(moving_frame(0));
  s.img2img(moving_frame(1));
  EXPECT_EQ(s.stats().unet_shallow_calls, 1);
  s.set_controlnet_scale(0, 0.5);
  s.img2img(moving_frame(2));
  EXPECT_EQ(s.stats().unet_shallow_calls, 1) << "a scale change: full";
  s.img2img(moving_frame(3));
  EXPECT_EQ(s.stats().unet_shallow_calls, 2);
}

TEST(DeepCacheStream, BadSettingsAndModelsWithoutTheSplitAreRefused) {
  auto stub = std::make_shared<test::StubModels>();
  StreamConfig c = stream_config(2);
  c.width = c.height = 64;
  std::string e = error_of([&] { StreamDiffusion s(stub, c); });
  EXPECT_NE(e.find("deep_cache_every 2: these models have no shallow UNet path"), std::string::npos) << e;
  StreamDiffusion s(stub, stream_config(1));
  e = error_of([&] { s.set_deep_cache(0, 0.9); });
  EXPECT_NE(e.find("deep_cache_every must be >= 1 (1 = off), got 0"), std::string::npos) << e;
  e = error_of([&] { s.set_deep_cache(1, 1.5); });
  EXPECT_NE(e.find("deep_cache_min_similarity must be in [-1, 1], got 1.5"), std::string::npos) << e;
  EXPECT_EQ(s.config().deep_cache_every, 1) << "a refused change leaves the stream as it was";
}

}  // namespace
}  // namespace sd
