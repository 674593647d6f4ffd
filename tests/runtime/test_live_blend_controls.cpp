// The live performance controls as control commands (prompt_list, seed_list, transition, prompt_blend,
// latent_feedback): parsed with clear errors and applied by the processor on the model thread (stub models).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common/error_of.h"
#include "core/error.h"
#include "pipeline/stream_diffusion.h"
#include "pipeline/stream_test_stubs.h"
#include "runtime/control_command.h"
#include "runtime/stream_diffusion_processor.h"

namespace sd {
namespace {

using test::StubModels;
using test::error_of;

Frame frame(const torch::Tensor& x, int64_t i) {
  Frame f;
  f.index = i;
  f.tensor = x;
  return f;
}

TEST(LiveBlendCommands, Parse) {
  auto c = parse_control_command("prompt_list a cat:1 | a (dog:1.2):0.5");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->kind, ControlCommand::Kind::PromptList);
  ASSERT_EQ(c->prompts.size(), 2u);
  EXPECT_EQ(c->prompts[1], (WeightedPrompt{"a (dog:1.2)", 0.5}));
  c = parse_control_command(R"(prompt_list [["a cat", 1], ["a dog", 3]])");
  ASSERT_EQ(c->prompts.size(), 2u);
  EXPECT_EQ(c->prompts[1].weight, 3.0);
  c = parse_control_command("seed_list 1:0.7, 2:0.3");
  EXPECT_EQ(c->kind, ControlCommand::Kind::SeedList);
  EXPECT_EQ(c->seeds, (std::vector<WeightedSeed>{{1, 0.7}, {2, 0.3}}));
  c = parse_control_command("transition 30f");
  EXPECT_EQ(c->kind, ControlCommand::Kind::Transition);
  EXPECT_EQ(c->transition.frames, 30);
  c = parse_control_command("transition 1.5");
  EXPECT_EQ(c->transition.seconds, 1.5);
  c = parse_control_command("prompt_blend slerp");
  EXPECT_EQ(c->blend, BlendMethod::Slerp);
  c = parse_control_command("latent_feedback 0.3");
  EXPECT_EQ(c->kind, ControlCommand::Kind::LatentFeedback);
  EXPECT_EQ(c->number, 0.3);

  EXPECT_NE(error_of([] { parse_control_command("prompt_list"); }).find("a cat:1 | a dog:0.5"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("prompt_list a:0 | b:0"); }).find("every weight is 0"),
            std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("seed_list 1:x"); }).find("weight"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("transition soon"); }).find("30f"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("prompt_blend cubic"); }).find("linear or slerp"), std::string::npos);
  EXPECT_NE(error_of([] { parse_control_command("latent_feedback 1.2"); }).find("[0, 1]"), std::string::npos);
  for (const char* cmd : {"prompt_list", "seed_list", "transition", "prompt_blend", "latent_feedback"})
    EXPECT_NE(control_help().find(cmd), std::string::npos) << cmd;
}

TEST(LiveBlendCommands, TheProcessorAppliesThemToTheStream) {
  StreamConfig c;
  c.t_index_list = {32, 45};
  c.width = c.height = 16;
  auto models = std::make_shared<StubModels>();
  auto stream = std::make_shared<StreamDiffusion>(models, c);
  stream->prepare("a");
  StreamDiffusionProcessor proc(stream, "a", "", false);
  const auto emb = [](const std::string& s) { return StubModels::text_embedding(s, 8); };

  proc.apply(*parse_control_command("prompt_list a:1 | b:3"));
  EXPECT_TRUE(torch::allclose(stream->cond_embeds(), 0.25 * emb("a") + 0.75 * emb("b"), 1e-6, 1e-7));
  proc.apply(*parse_control_command("prompt_blend slerp"));
  EXPECT_EQ(stream->config().prompt_blend, BlendMethod::Slerp);
  EXPECT_TRUE(torch::allclose(stream->cond_embeds(), slerp(emb("a"), emb("b"), 0.75), 1e-6, 1e-7));
  proc.apply(*parse_control_command("negative blurry"));  // keeps the blend
  EXPECT_EQ(stream->prompt_list().size(), 2u);

  proc.apply(*parse_control_command("transition 3f"));
  EXPECT_EQ(stream->config().transition.frames, 3);
  proc.apply(*parse_control_command("prompt c"));
  const torch::Tensor x = torch::zeros({1, 3, 16, 16});
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(torch::equal(stream->cond_embeds(), emb("c"))) << i;
    proc.process(frame(x.clone(), i));
  }
  EXPECT_TRUE(torch::equal(stream->cond_embeds(), emb("c")));

  proc.apply(*parse_control_command("transition 0"));
  proc.apply(*parse_control_command("seed_list 4:1, 5:1"));
  EXPECT_EQ(stream->config().seed_list.size(), 2u);
  EXPECT_NEAR(stream->effective_seeds()[0].weight, 0.5, 1e-12);
  proc.apply(*parse_control_command("latent_feedback 0.25"));
  EXPECT_EQ(stream->config().latent_feedback, 0.25);
}

}  // namespace
}  // namespace sd
