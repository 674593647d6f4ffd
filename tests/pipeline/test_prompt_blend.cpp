// Prompt and seed blending, timed transitions and latent feedback (pipeline/prompt_blend.h, StreamDiffusion), on the
// deterministic stub models.
#include <chrono>
#include <cmath>
#include <map>
#include <thread>

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "pipeline/prompt_blend.h"
#include "pipeline/stream_diffusion.h"
#include "pipeline/stream_test_stubs.h"

namespace sd {
namespace {

using test::StubModels;
using torch::Tensor;

constexpr int64_t kSize = 16;

Tensor frames(int64_t F, int64_t seed) {
  auto g = at::detail::createCPUGenerator(1000 + seed);
  return torch::rand({F, 3, kSize, kSize}, g) * 2.0 - 1.0;
}

StreamConfig config(std::vector<int64_t> t_index = {32, 45}, int64_t size = kSize) {
  StreamConfig c;
  c.t_index_list = std::move(t_index);
  c.cfg_type = CfgType::Self;
  c.guidance_scale = 1.5;
  c.width = size;
  c.height = size;
  return c;
}

Tensor emb(const std::string& s) { return StubModels::text_embedding(s, 8); }

// ---- Parsing ----------------------------------------------------------------------------------------------------

TEST(PromptBlend, ParsesPromptListsSeedListsAndTransitions) {
  auto p = parse_prompt_list("a cat:1 | a dog : 0.5 | (red:1.3) fox");
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[0], (WeightedPrompt{"a cat", 1.0}));
  EXPECT_EQ(p[1], (WeightedPrompt{"a dog", 0.5}));
  EXPECT_EQ(p[2], (WeightedPrompt{"(red:1.3) fox", 1.0}));  // the weight syntax stays in the text
  p = parse_prompt_list(R"([["a cat", 2], {"text": "a | dog", "weight": 0.25}, "plain"])");
  ASSERT_EQ(p.size(), 3u);
  EXPECT_EQ(p[1], (WeightedPrompt{"a | dog", 0.25}));
  EXPECT_EQ(p[2], (WeightedPrompt{"plain", 1.0}));
  for (const char* bad : {"", "a:-1", "a:0 | b:0", "[1, 2]", "[[\"a\"]]", "[\"a\""})
    EXPECT_THROW(parse_prompt_list(bad), InvalidArgument) << bad;
  std::string many;
  for (int i = 0; i < 17; ++i) many += (i ? "|" : "") + std::string("p") + std::to_string(i);
  EXPECT_THROW(parse_prompt_list(many), InvalidArgument);

  auto s = parse_seed_list("1:0.7, 2:0.3 5");
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[0], (WeightedSeed{1, 0.7}));
  EXPECT_EQ(s[2], (WeightedSeed{5, 1.0}));
  EXPECT_EQ(parse_seed_list("[[7, 2], 9]"), (std::vector<WeightedSeed>{{7, 2.0}, {9, 1.0}}));
  for (const char* bad : {"", "x", "1:y", "-1", "1.5", "1:-2", "[[1, 2, 3]]"})
    EXPECT_THROW(parse_seed_list(bad), InvalidArgument) << bad;

  EXPECT_EQ(parse_transition("2"), (Transition{0, 2.0}));
  EXPECT_EQ(parse_transition("2.5s"), (Transition{0, 2.5}));
  EXPECT_EQ(parse_transition("30f"), (Transition{30, 0.0}));
  EXPECT_TRUE(parse_transition("0").instant());
  EXPECT_EQ(transition_str(parse_transition("30f")), "30f");
  EXPECT_EQ(transition_str(parse_transition("1.5")), "1.5s");
  for (const char* bad : {"", "-1", "1.5f", "xs", "4000", "nan"}) EXPECT_THROW(parse_transition(bad), InvalidArgument) << bad;
  EXPECT_EQ(parse_blend_method("slerp"), BlendMethod::Slerp);
  EXPECT_THROW(parse_blend_method("cubic"), InvalidArgument);
}

// ---- Blends -----------------------------------------------------------------------------------------------------

TEST(PromptBlend, WeightsOneZeroEqualTheSinglePromptBitForBit) {
  for (BlendMethod m : {BlendMethod::Linear, BlendMethod::Slerp}) {
    SCOPED_TRACE(blend_method_name(m));
    auto c = config();
    c.prompt_blend = m;
    StreamDiffusion single(std::make_shared<StubModels>(), c), blend(std::make_shared<StubModels>(), c);
    single.prepare("a cat");
    blend.prepare({{"a cat", 1.0}, {"a dog", 0.0}});
    EXPECT_TRUE(torch::equal(blend.cond_embeds(), single.cond_embeds()));
    EXPECT_TRUE(torch::equal(blend.prompt_embeds(), single.prompt_embeds()));
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(blend.img2img(frames(1, i)), single.img2img(frames(1, i))));
    // the zero-weight entry and its scale do not matter either: (3, 0) is (1, 0)
    blend.set_prompt_list({{"a dog", 0.0}, {"a cat", 3.0}});
    EXPECT_TRUE(torch::equal(blend.cond_embeds(), single.cond_embeds()));
  }
}

TEST(PromptBlend, LinearBlendIsTheNormalisedWeightedMean) {
  StreamDiffusion s(std::make_shared<StubModels>(), config());
  s.prepare({{"a cat", 3.0}, {"a dog", 1.0}});
  EXPECT_TRUE(torch::allclose(s.cond_embeds(), 0.75 * emb("a cat") + 0.25 * emb("a dog"), 1e-6, 1e-7));
  s.set_prompt_list({{"a", 1.0}, {"b", 1.0}, {"c", 2.0}});
  EXPECT_TRUE(torch::allclose(s.cond_embeds(), 0.25 * emb("a") + 0.25 * emb("b") + 0.5 * emb("c"), 1e-6, 1e-7));
  EXPECT_EQ(s.prompt_embeds().size(0), 2);  // the text rows of the stream batch are the blend
  EXPECT_TRUE(torch::equal(s.prompt_embeds()[1], s.cond_embeds()[0]));
}

TEST(PromptBlend, SlerpFollowsTheArcPerTokenRow) {
  // Orthogonal unit rows: slerp(a, b, t) = cos(tπ/2)·a + sin(tπ/2)·b, norm 1 all the way (linear dips to 0.71).
  const Tensor a = torch::tensor({1.0f, 0.0f}).view({1, 1, 2}), b = torch::tensor({0.0f, 1.0f}).view({1, 1, 2});
  for (double t : {0.0, 0.25, 0.5, 0.9, 1.0}) {
    const Tensor r = slerp(a, b, t);
    EXPECT_NEAR(r[0][0][0].item<double>(), std::cos(t * M_PI / 2), 1e-6) << t;
    EXPECT_NEAR(r[0][0][1].item<double>(), std::sin(t * M_PI / 2), 1e-6) << t;
  }
  // Three entries fold left: (a, b, c) with weights (1, 1, 2) = slerp(slerp(a, b, 1/2), c, 2/4).
  torch::manual_seed(3);
  const Tensor x = torch::randn({1, 4, 8}), y = torch::randn({1, 4, 8}), z = torch::randn({1, 4, 8});
  const Tensor want = slerp(slerp(x, y, 0.5), z, 0.5);
  EXPECT_TRUE(torch::allclose(blend_embeddings({x, y, z}, {1, 1, 2}, BlendMethod::Slerp), want, 1e-6, 1e-6));
  // parallel rows fall back to linear (no 0/0)
  const Tensor p = slerp(x, 2 * x, 0.5);
  EXPECT_TRUE(torch::allclose(p, 1.5 * x, 1e-5, 1e-6));
  EXPECT_FALSE(torch::isnan(p).any().item<bool>());
  // through the stream
  auto c = config();
  c.prompt_blend = BlendMethod::Slerp;
  StreamDiffusion s(std::make_shared<StubModels>(), c);
  s.prepare({{"a cat", 1.0}, {"a dog", 1.0}});
  EXPECT_TRUE(torch::allclose(s.cond_embeds(), slerp(emb("a cat"), emb("a dog"), 0.5), 1e-6, 1e-7));
  s.set_prompt_blend(BlendMethod::Linear);
  EXPECT_TRUE(torch::allclose(s.cond_embeds(), 0.5 * emb("a cat") + 0.5 * emb("a dog"), 1e-6, 1e-7));
}

TEST(PromptBlend, OnlyNewTextsAreEncoded) {
  auto models = std::make_shared<StubModels>();
  StreamDiffusion s(models, config());
  s.prepare({{"a", 1.0}, {"b", 1.0}});
  EXPECT_EQ(s.stats().text_encodes, 2);
  s.set_prompt_list({{"a", 1.0}, {"b", 3.0}});  // new weights only
  EXPECT_EQ(s.stats().text_encodes, 2);
  s.set_prompt_list({{"a", 1.0}, {"c", 1.0}});  // one new text
  EXPECT_EQ(s.stats().text_encodes, 3);
  for (int i = 0; i < 5; ++i) s.img2img(frames(1, i));
  EXPECT_EQ(s.stats().text_encodes, 3);  // nothing per frame
  s.set_prompt_list({{"b", 1.0}});       // "b" was dropped from the cache with the list: encoded again
  EXPECT_EQ(s.stats().text_encodes, 4);
}

// ---- Transitions --------------------------------------------------------------------------------------------------

TEST(PromptBlend, TransitionOverNFramesHitsTheTargetEmbeddingExactlyAtFrameN) {
  for (BlendMethod m : {BlendMethod::Linear, BlendMethod::Slerp}) {
    SCOPED_TRACE(blend_method_name(m));
    const int64_t N = 5;
    auto c = config();
    c.prompt_blend = m;
    c.transition = Transition{N, 0};
    auto models = std::make_shared<StubModels>();
    StreamDiffusion s(models, c);
    s.prepare("a cat");
    s.img2img(frames(1, 0));
    const int64_t encodes = s.stats().text_encodes;
    s.update_prompt("a dog");
    EXPECT_EQ(s.stats().text_encodes, encodes + 1);     // the new prompt, once
    EXPECT_TRUE(torch::equal(s.cond_embeds(), emb("a cat")));  // nothing moves before the next call
    const Tensor target = emb("a dog");
    for (int64_t k = 1; k <= N; ++k) {
      models->clear();
      s.img2img(frames(1, k));
      const double t = static_cast<double>(k) / N;
      const Tensor want = m == BlendMethod::Linear ? (1 - t) * emb("a cat") + t * target
                                                   : slerp(emb("a cat"), target, t);
      if (k < N) {
        EXPECT_TRUE(s.transition_active()) << k;
        EXPECT_TRUE(torch::allclose(s.cond_embeds(), want, 1e-6, 1e-7)) << "frame " << k;
        EXPECT_FALSE(torch::equal(s.cond_embeds(), target)) << "frame " << k;
      } else {
        EXPECT_FALSE(s.transition_active());
        EXPECT_TRUE(torch::equal(s.cond_embeds(), target)) << "frame N is the target bit for bit";
      }
      // the UNet of frame k got these text rows
      const Tensor ehs = models->unet_calls().back().ehs;
      EXPECT_TRUE(torch::equal(ehs[0], s.cond_embeds()[0])) << "frame " << k;
    }
    s.img2img(frames(1, N + 1));
    EXPECT_TRUE(torch::equal(s.cond_embeds(), target));
    EXPECT_EQ(s.stats().text_encodes, encodes + 1);  // no re-encoding per frame
  }
}

TEST(PromptBlend, ThePromptGivenAgainWithEveryFrameDoesNotRestartTheTransition) {
  // Upstream's wrapper passes its prompt with every call: the morph must still end at frame N, encoding nothing more.
  const int64_t N = 4;
  auto c = config();
  c.transition = Transition{N, 0};
  StreamDiffusion s(std::make_shared<StubModels>(), c);
  s.prepare("a cat");
  const int64_t encodes = s.stats().text_encodes;
  for (int64_t k = 1; k <= N; ++k) {
    s.update_prompt("a dog");
    s.set_prompt_list({{"a dog", 1.0}});
    s.img2img(frames(1, k));
    EXPECT_EQ(s.transition_active(), k < N) << "frame " << k;
  }
  EXPECT_TRUE(torch::equal(s.cond_embeds(), emb("a dog")));
  EXPECT_EQ(s.stats().text_encodes, encodes + 1) << "the new prompt, once";
  // A new negative prompt with the same prompt is a change: the prompt is encoded again (cfg self has no negative
  // rows, so the negative prompt is not encoded).
  s.update_prompt("a dog", "blurry");
  EXPECT_EQ(s.stats().text_encodes, encodes + 2);
}

TEST(PromptBlend, ATransitionInterruptedMorphsOnFromWhereItIs) {
  auto c = config();
  c.transition = Transition{4, 0};
  StreamDiffusion s(std::make_shared<StubModels>(), c);
  s.prepare("a");
  s.set_prompt_list({{"b", 1.0}});
  s.img2img(frames(1, 0));
  s.img2img(frames(1, 1));  // half way: 0.5 a + 0.5 b
  const Tensor mid = s.cond_embeds();
  EXPECT_TRUE(torch::allclose(mid, 0.5 * emb("a") + 0.5 * emb("b"), 1e-6, 1e-7));
  s.set_prompt_list({{"c", 1.0}});  // from the mix, towards c
  s.img2img(frames(1, 2));
  EXPECT_TRUE(torch::allclose(s.cond_embeds(), 0.75 * mid + 0.25 * emb("c"), 1e-6, 1e-7));
  for (int i = 3; i < 6; ++i) s.img2img(frames(1, i));
  EXPECT_TRUE(torch::equal(s.cond_embeds(), emb("c")));
  const auto eff = s.effective_prompts();
  ASSERT_EQ(eff.size(), 1u);
  EXPECT_EQ(eff[0].text, "c");
}

TEST(PromptBlend, TransitionInSecondsEndsOnTheTarget) {
  auto c = config();
  c.transition = Transition{0, 0.05};
  StreamDiffusion s(std::make_shared<StubModels>(), c);
  s.prepare("a");
  s.update_prompt("b");
  s.txt2img();  // some fraction of the way (at most all of it on a very slow machine)
  std::this_thread::sleep_for(std::chrono::milliseconds(80));
  s.txt2img();
  EXPECT_FALSE(s.transition_active());
  EXPECT_TRUE(torch::equal(s.cond_embeds(), emb("b")));
}

TEST(PromptBlend, InstantChangesAreTheOldBehaviour) {
  StreamDiffusion s(std::make_shared<StubModels>(), config());
  s.prepare("a");
  s.update_prompt("b");
  EXPECT_FALSE(s.transition_active());
  EXPECT_TRUE(torch::equal(s.cond_embeds(), emb("b")));
  EXPECT_THROW(s.set_transition(Transition{-1, 0}), InvalidArgument);
}

// ---- Seed blending --------------------------------------------------------------------------------------------------

TEST(SeedBlend, BlendedSeedNoiseIsStandardNormal) {
  // 512 x 512 -> [2, 4, 64, 64]: 32768 draws per blend.
  auto c = config({32, 45}, 512);
  for (const auto& seeds : std::vector<std::vector<WeightedSeed>>{
           {{1, 0.5}, {2, 0.5}}, {{1, 0.7}, {2, 0.2}, {3, 0.1}}, {{10, 1}, {11, 1}, {12, 1}, {13, 1}}, {{5, 0.9}, {6, 0.1}}}) {
    c.seed_list = seeds;
    StreamDiffusion s(std::make_shared<StubModels>(), c);
    s.prepare("p");
    const double sd = s.init_noise().std().item<double>(), mean = s.init_noise().mean().item<double>();
    EXPECT_NEAR(sd, 1.0, 0.02) << seed_list_str(seeds);
    EXPECT_NEAR(mean, 0.0, 0.02) << seed_list_str(seeds);
  }
  // the non-normalised weighted mean would not be: 0.5·N1 + 0.5·N2 has std 0.71
  c.seed_list.clear();
  c.seed = 1;
  StreamDiffusion a(std::make_shared<StubModels>(), c);
  a.prepare("p");
  c.seed = 2;
  StreamDiffusion b(std::make_shared<StubModels>(), c);
  b.prepare("p");
  EXPECT_NEAR((0.5 * a.init_noise() + 0.5 * b.init_noise()).std().item<double>(), std::sqrt(0.5), 0.02);
  // and the blend is exactly Σ ŵ N / sqrt(Σ ŵ²)
  c.seed_list = {{1, 3.0}, {2, 1.0}};
  StreamDiffusion ab(std::make_shared<StubModels>(), c);
  ab.prepare("p");
  const Tensor want = (0.75 * a.init_noise() + 0.25 * b.init_noise()) / std::sqrt(0.75 * 0.75 + 0.25 * 0.25);
  EXPECT_TRUE(torch::allclose(ab.init_noise(), want, 1e-6, 1e-6));
}

TEST(SeedBlend, OneSeedIsTheSeedBitForBit) {
  auto c = config();
  c.seed = 7;
  StreamDiffusion plain(std::make_shared<StubModels>(), c);
  plain.prepare("p");
  c.seed_list = {{7, 1.0}, {8, 0.0}};
  StreamDiffusion list(std::make_shared<StubModels>(), c);
  list.prepare("p");
  EXPECT_TRUE(torch::equal(list.init_noise(), plain.init_noise()));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(list.img2img(frames(1, i)), plain.img2img(frames(1, i))));
  // live: set_seed_list({{9, 1}}) is set_seed(9)
  list.set_seed_list({{9, 1.0}});
  plain.set_seed(9);
  EXPECT_TRUE(torch::equal(list.init_noise(), plain.init_noise()));
  EXPECT_TRUE(torch::equal(list.stock_noise(), plain.stock_noise()));
}

TEST(SeedBlend, ASeedListedTwiceIsOneSeedWithTheWeightsAdded) {
  auto c = config();
  c.seed = 7;
  StreamDiffusion plain(std::make_shared<StubModels>(), c);
  plain.prepare("p");
  c.seed = 8;
  StreamDiffusion eight(std::make_shared<StubModels>(), c);
  eight.prepare("p");
  c.seed_list = {{7, 1.0}, {7, 1.0}};
  StreamDiffusion twice(std::make_shared<StubModels>(), c);
  twice.prepare("p");
  EXPECT_TRUE(torch::equal(twice.init_noise(), plain.init_noise())) << "two copies of one noise are not a blend";
  // 7:0.25, 8:0.5, 7:0.25 is 7:0.5, 8:0.5.
  twice.set_seed_list({{7, 0.25}, {8, 0.5}, {7, 0.25}});
  const Tensor want = (0.5 * plain.init_noise() + 0.5 * eight.init_noise()) / std::sqrt(0.5);
  EXPECT_TRUE(torch::allclose(twice.init_noise(), want, 1e-6, 1e-6));
}

TEST(SeedBlend, SeedTransitionStaysStandardNormalAndEndsOnTheNewSeed) {
  auto c = config({32, 45}, 512);
  c.seed = 1;
  StreamDiffusion target(std::make_shared<StubModels>(), [&] {
    auto t = c;
    t.seed = 2;
    return t;
  }());
  target.prepare("p");
  c.transition = Transition{4, 0};
  StreamDiffusion s(std::make_shared<StubModels>(), c);
  s.prepare("p");
  const Tensor start = s.init_noise().clone();
  s.set_seed(2);
  EXPECT_TRUE(torch::equal(s.init_noise(), start));
  for (int k = 1; k <= 4; ++k) {
    s.txt2img();
    EXPECT_NEAR(s.init_noise().std().item<double>(), 1.0, 0.02) << "frame " << k;
    const double t = k / 4.0;
    if (k < 4) {
      const Tensor want = ((1 - t) * start + t * target.init_noise()) / std::sqrt((1 - t) * (1 - t) + t * t);
      EXPECT_TRUE(torch::allclose(s.init_noise(), want, 1e-5, 1e-6)) << "frame " << k;
    }
  }
  EXPECT_TRUE(torch::equal(s.init_noise(), target.init_noise()));
  EXPECT_EQ(s.config().seed, 2u);
}

// ---- Latent feedback ------------------------------------------------------------------------------------------------

TEST(LatentFeedback, BlendsThePreviousOutputLatentIntoTheInput) {
  auto c = config({32, 45});
  c.cfg_type = CfgType::None;
  auto models = std::make_shared<StubModels>();
  // A = 0 (switched off live after running with feedback) is exactly the stream without feedback
  {
    auto c1 = c;
    c1.latent_feedback = 0.5;
    StreamDiffusion a(std::make_shared<StubModels>(), c), b(std::make_shared<StubModels>(), c1);
    a.prepare("p");
    b.prepare("p");
    b.set_latent_feedback(0.0);
    for (int i = 0; i < 4; ++i) EXPECT_TRUE(torch::equal(a.img2img(frames(1, i)), b.img2img(frames(1, i))));
  }
  const double A = 0.4;
  c.latent_feedback = A;
  StreamDiffusion s(models, c);
  s.prepare("p");
  std::map<std::string, Tensor> seen;
  s.set_trace([&](const std::string& name, const Tensor& t) { seen[name] = t.clone(); });
  // call 1 is warm-up (n = 2): its output is the zero buffer's, not fed back
  s.img2img(frames(1, 0));
  EXPECT_FALSE(seen.count("latent_feedback_in"));
  EXPECT_FALSE(s.previous_output_latent().defined());
  s.img2img(frames(1, 1));
  EXPECT_FALSE(seen.count("latent_feedback_in"));  // the first real output comes out of this call
  ASSERT_TRUE(s.previous_output_latent().defined());
  const Tensor prev = s.previous_output_latent().clone();
  seen.clear();
  s.img2img(frames(1, 2));
  ASSERT_TRUE(seen.count("latent_feedback_in"));
  const Tensor z = seen.at("image_latent");
  EXPECT_TRUE(torch::allclose(seen.at("latent_feedback_in"), (1 - A) * z + A * prev, 1e-6, 1e-7));
  // x_t = α0·x_in + β0·init_noise[0]
  const Tensor want_xt = s.alpha_prod_t_sqrt()[0] * ((1 - A) * z + A * prev) + s.beta_prod_t_sqrt()[0] * s.init_noise()[0];
  EXPECT_TRUE(torch::allclose(seen.at("x_t_latent_in"), want_xt, 1e-5, 1e-6));
  // live changes and bounds
  s.set_latent_feedback(0.0);
  seen.clear();
  s.img2img(frames(1, 3));
  EXPECT_FALSE(seen.count("latent_feedback_in"));
  EXPECT_THROW(s.set_latent_feedback(1.5), InvalidArgument);
  EXPECT_THROW(s.set_latent_feedback(-0.1), InvalidArgument);
  c.latent_feedback = 2;
  EXPECT_THROW({ StreamDiffusion bad(models, c); }, InvalidArgument);
}

TEST(LatentFeedback, ReducesFrameToFrameChangeOnANoisyStaticScene) {
  // The bench's flicker measure on the stub: mean |out_k − out_{k−1}| with sensor noise on a static scene. One step
  // (the output of a call is its own frame's): the feedback is an exponential average of the outputs.
  auto flicker = [](double A) {
    auto c = config({32});
    c.cfg_type = CfgType::None;
    c.latent_feedback = A;
    StreamDiffusion s(std::make_shared<StubModels>(), c);
    s.prepare("p");
    auto g = at::detail::createCPUGenerator(5);
    const Tensor scene = frames(1, 0);
    Tensor prev;
    double sum = 0;
    int n = 0;
    for (int i = 0; i < 40; ++i) {
      const Tensor out = s.img2img((scene + 0.1 * torch::randn(scene.sizes(), g)).clamp(-1, 1)).clone();
      if (i >= 10) {  // past the feedback's settling
        sum += (out - prev).abs().mean().item<double>();
        ++n;
      }
      prev = out;
    }
    return sum / n;
  };
  const double off = flicker(0.0), on = flicker(0.5);
  EXPECT_LT(on, 0.8 * off) << "off " << off << " on " << on;
}

}  // namespace
}  // namespace sd
