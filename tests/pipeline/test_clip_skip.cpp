// LoadOptions::clip_skip (--clip-skip): the prompt embeddings come from the text encoder's layer clip_skip before the
// last, through the final layer norm (diffusers' clip_skip). The encoder's own clip-skip output is checked against
// the recorded hidden_states_penultimate in tests/models/test_clip_text_model.cpp; here: the model set uses it.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "models/clip_text_model.h"
#include "pipeline/diffusion_models.h"
#include "tokenizer/clip_tokenizer.h"

namespace sd {
namespace {

TEST(ClipSkip, ModelSetEncodesThePromptFromTheChosenLayer) {
  if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP() << "no tiny-sd15 fixture";
  const std::string dir = test::fixture_path("models/tiny-sd15");
  const std::string prompt = "a photo of a cat, trending on artstation";
  LoadOptions lo;
  lo.threads = -1;
  const auto m0 = load_pipeline(dir, lo);
  lo.clip_skip = 1;
  const auto m1 = load_pipeline(dir, lo);
  EXPECT_NE(m1->describe().find("clip skip 1"), std::string::npos) << m1->describe();

  auto enc = load_clip_text_model(dir + "/text_encoder");
  const auto ids = ClipTokenizer::from_folder(dir + "/tokenizer").encode_batch({prompt});
  torch::NoGradGuard ng;
  const auto last = enc->forward(ids), skip1 = enc->forward_clip_skip(ids, 1);
  EXPECT_TRUE(torch::equal(m0->encode_prompt(prompt), last));
  EXPECT_TRUE(torch::equal(m1->encode_prompt(prompt), skip1));
  EXPECT_GT((skip1 - last).abs().max().item<double>(), 1e-3);  // a different layer, not a no-op

  for (int bad : {-1, static_cast<int>(enc->config().num_hidden_layers)}) {
    lo.clip_skip = bad;
    try {
      load_pipeline(dir, lo);
      ADD_FAILURE() << "clip_skip " << bad << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("--clip-skip " + std::to_string(bad)), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("layers"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace sd
