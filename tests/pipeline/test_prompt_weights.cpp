// Prompt weights (pipeline/prompt_weights.h): the A1111 emphasis syntax, its tokens and A1111's "multiply, then
// restore the mean" convention on the text embeddings; plain text stays bit for bit what it was.
#include <cmath>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common/fixtures.h"
#include "core/error.h"
#include "pipeline/diffusion_models.h"
#include "pipeline/prompt_weights.h"
#include "pipeline/stream_diffusion.h"
#include "pipeline/stream_test_stubs.h"
#include "tokenizer/clip_tokenizer.h"

namespace sd {
namespace {

using Chunks = std::vector<PromptChunk>;

void expect_chunks(const std::string& prompt, const Chunks& want) {
  SCOPED_TRACE("prompt: " + prompt);
  const Chunks got = parse_prompt_weights(prompt);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].text, want[i].text) << "chunk " << i;
    EXPECT_NEAR(got[i].weight, want[i].weight, 1e-12) << "chunk " << i << " '" << got[i].text << "'";
  }
}

TEST(PromptWeights, PlainTextIsOneChunkAtWeightOne) {
  expect_chunks("a photo of a cat, 4k", {{"a photo of a cat, 4k", 1.0}});
  expect_chunks("", {{"", 1.0}});
  expect_chunks("a cat BREAK a dog", {{"a cat BREAK a dog", 1.0}});  // BREAK is text (not supported)
  EXPECT_TRUE(unweighted(parse_prompt_weights("a photo: 1.5 of a cat")));
  EXPECT_EQ(joined_text(parse_prompt_weights("a photo of a cat")), "a photo of a cat");
}

TEST(PromptWeights, RoundSquareAndExplicitWeights) {
  expect_chunks("a (cat) on grass", {{"a ", 1.0}, {"cat", 1.1}, {" on grass", 1.0}});
  expect_chunks("a [cat] on grass", {{"a ", 1.0}, {"cat", 1 / 1.1}, {" on grass", 1.0}});
  expect_chunks("a (cat:1.3) on grass", {{"a ", 1.0}, {"cat", 1.3}, {" on grass", 1.0}});
  expect_chunks("(red cat:0.5)", {{"red cat", 0.5}});
  expect_chunks("( cat : 1.5 )x", {{" cat ", 1.5}, {"x", 1.0}});  // spaces around the number
  expect_chunks("(cat:-1)", {{"cat", -1.0}});
  expect_chunks("(cat:.5)", {{"cat", 0.5}});
  // ':' that is not followed by a number up to the ')' is text, and the pair is a plain (…) = 1.1
  expect_chunks("(a:b)", {{"a:b", 1.1}});
  expect_chunks("(a:1.2.3)", {{"a:1.2.3", 1.1}});
  // square brackets take no explicit weight (no prompt editing): "[a:2]" is the text "a:2" at ÷1.1
  expect_chunks("[a:2]", {{"a:2", 1 / 1.1}});
}

TEST(PromptWeights, NestingMultiplies) {
  expect_chunks("((cat))", {{"cat", 1.1 * 1.1}});
  expect_chunks("(((cat)))", {{"cat", 1.1 * 1.1 * 1.1}});
  expect_chunks("[[cat]]", {{"cat", 1 / 1.1 / 1.1}});
  expect_chunks("((cat:1.5))", {{"cat", 1.5 * 1.1}});
  expect_chunks("(a (b):1.2) c", {{"a ", 1.2}, {"b", 1.2 * 1.1}, {" c", 1.0}});
  expect_chunks("(a [b] c:2)", {{"a ", 2.0}, {"b", 2.0 / 1.1}, {" c", 2.0}});
  // ([a]) is 1.1/1.1: not exactly 1 in floating point, so it is a (near-1) weighted chunk
  const Chunks c = parse_prompt_weights("([a])");
  ASSERT_EQ(c.size(), 1u);
  EXPECT_NEAR(c[0].weight, 1.0, 1e-12);
}

TEST(PromptWeights, EscapesAreLiteralBrackets) {
  expect_chunks("\\(cat\\)", {{"(cat)", 1.0}});
  expect_chunks("\\[cat\\]", {{"[cat]", 1.0}});
  expect_chunks("(\\(cat\\):1.5)", {{"(cat)", 1.5}});
  expect_chunks("a \\\\ b", {{"a \\ b", 1.0}});      // \\ -> one backslash
  expect_chunks("a \\n b", {{"a \\n b", 1.0}});      // other backslashes stay
  expect_chunks("(cat\\)", {{"(cat)", 1.0}});       // the escaped ')' closes nothing: '(' is unbalanced
  EXPECT_TRUE(unweighted(parse_prompt_weights("\\(cat\\)")));
}

TEST(PromptWeights, UnbalancedBracketsAreLiteralText) {
  expect_chunks("a (cat", {{"a (cat", 1.0}});
  expect_chunks("a cat)", {{"a cat)", 1.0}});
  expect_chunks("a [cat", {{"a [cat", 1.0}});
  expect_chunks("(a]", {{"(a]", 1.0}});                    // mismatched: both literal
  expect_chunks("((cat)", {{"(", 1.0}, {"cat", 1.1}});      // the inner pair matches, the outer '(' is text
  expect_chunks("(cat))", {{"cat", 1.1}, {")", 1.0}});
  expect_chunks("([a)]", {{"(", 1.0}, {"a)", 1 / 1.1}});   // ')' does not close '[': literal, '(' unbalanced
  expect_chunks("(a:1.5", {{"(a:1.5", 1.0}});
}

TEST(PromptWeights, ApplyTokenWeightsMultipliesThenRestoresTheMean) {
  torch::manual_seed(0);
  const torch::Tensor z = torch::randn({1, 6, 4}) + 0.3;
  const torch::Tensor w = torch::tensor({1.0f, 1.5f, 1.0f, 0.5f, 1.0f, 1.0f});
  const torch::Tensor out = apply_token_weights(z, w);
  // mean restored
  EXPECT_NEAR(out.mean().item<double>(), z.mean().item<double>(), 1e-6);
  // each row is z_i · w_i · mean(z) / mean(z·w)
  const double k = z.mean().item<double>() / (z * w.view({1, -1, 1})).mean().item<double>();
  for (int64_t i = 0; i < 6; ++i)
    EXPECT_TRUE(torch::allclose(out[0][i], z[0][i] * w[i].item<double>() * k, 1e-5, 1e-6)) << "row " << i;
  // all ones: the same tensor
  EXPECT_TRUE(torch::equal(apply_token_weights(z, torch::ones({6})), z));
  EXPECT_THROW(apply_token_weights(z, torch::ones({5})), InvalidArgument);
}

ClipTokenizer shipped_tokenizer() { return ClipTokenizer::from_folder(find_clip_tokenizer_dir()); }

TEST(PromptWeights, MultiTokenWordsGiveEveryTokenTheWeight) {
  const ClipTokenizer tok = shipped_tokenizer();
  const std::string word = "streamdiffusion";
  const auto word_ids = tok.bpe_ids(word);
  ASSERT_GT(word_ids.size(), 1u) << "the test needs a word of several tokens";
  const WeightedTokens t = weighted_tokens(tok, parse_prompt_weights("a (" + word + ":1.4) cat"));
  // ids exactly those of the plain text (chunks tokenised one by one give the same ids here)
  EXPECT_TRUE(torch::equal(t.ids, tok.encode_batch({"a " + word + " cat"})));
  const auto* w = t.weights.data_ptr<float>();
  EXPECT_EQ(w[0], 1.0f);  // bos
  EXPECT_EQ(w[1], 1.0f);  // "a"
  for (size_t i = 0; i < word_ids.size(); ++i) EXPECT_FLOAT_EQ(w[2 + i], 1.4f) << "token " << i << " of " << word;
  EXPECT_EQ(w[2 + word_ids.size()], 1.0f);      // "cat"
  EXPECT_EQ(w[3 + word_ids.size()], 1.0f);      // eos
  EXPECT_NEAR(t.weights.sum().item<double>(), 77 + 0.4 * static_cast<double>(word_ids.size()), 1e-5);
  EXPECT_EQ(t.dropped, 0);
}

TEST(PromptWeights, TokensPastTheWindowAreDroppedAndAStraddlingChunkKeepsItsWeight) {
  const ClipTokenizer tok = shipped_tokenizer();
  std::string head;
  for (int i = 0; i < 73; ++i) head += "cat ";  // 73 tokens
  const WeightedTokens t = weighted_tokens(tok, parse_prompt_weights(head + "(red green blue:1.5)"));
  EXPECT_EQ(t.dropped, 1);  // 73 + 3 = 76 > 75: "blue" is cut
  const auto* w = t.weights.data_ptr<float>();
  EXPECT_FLOAT_EQ(w[74], 1.5f);  // "red"
  EXPECT_FLOAT_EQ(w[75], 1.5f);  // "green"
  EXPECT_EQ(t.ids[0][76].item<int64_t>(), tok.eos_id());
  EXPECT_EQ(w[76], 1.0f);
  // the ids are the plain prompt's, cut the same way
  EXPECT_TRUE(torch::equal(t.ids, tok.encode_batch({head + "red green blue"})));
}

// The real text encoder of the tiny SD 1.5 fixture: weights change the embedding exactly as the convention says,
// plain text is unchanged bit for bit.
TEST(PromptWeights, EmbeddingEffectOnTheTinySd15TextEncoder) {
  if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP() << "no tiny-sd15 fixture";
  LoadOptions lo;
  lo.threads = -1;
  const auto m = load_pipeline(test::fixture_path("models/tiny-sd15"), lo);
  const std::string plain = "a photo of a cat on the grass";
  const torch::Tensor z = m->encode_prompt(plain);

  const Chunks chunks = parse_prompt_weights("a photo of a (cat:1.5) on the [grass]");
  const torch::Tensor zw = m->encode_weighted_text(chunks).embeds;
  const ClipTokenizer tok = ClipTokenizer::from_folder(test::fixture_path("models/tiny-sd15/tokenizer"));
  EXPECT_TRUE(torch::equal(weighted_tokens(tok, chunks).ids, tok.encode_batch({plain})));
  // positions: bos, "a photo of a", "cat", "on the", "grass"
  const int64_t cat = 1 + static_cast<int64_t>(tok.bpe_ids("a photo of a").size());
  const int64_t n_cat = static_cast<int64_t>(tok.bpe_ids("cat").size());
  const int64_t grass = cat + n_cat + static_cast<int64_t>(tok.bpe_ids("on the").size());
  const int64_t n_grass = static_cast<int64_t>(tok.bpe_ids("grass").size());
  torch::Tensor w = torch::ones({77});
  w.slice(0, cat, cat + n_cat).fill_(1.5);
  w.slice(0, grass, grass + n_grass).fill_(static_cast<float>(1 / 1.1));
  const torch::Tensor zf = z.to(torch::kFloat32), ww = zf * w.view({1, -1, 1});
  const torch::Tensor expect = ww * (zf.mean() / ww.mean());
  EXPECT_TRUE(torch::allclose(zw, expect, 1e-5, 1e-6));
  EXPECT_NEAR(zw.mean().item<double>(), z.mean().item<double>(), 1e-6);  // the mean is restored
  // the weighted token's row is scaled against its neighbours: cat / photo ratio moves by 1.5
  const double k = (zf.mean() / ww.mean()).item<double>();
  EXPECT_TRUE(torch::allclose(zw[0][cat], z[0][cat] * 1.5 * k, 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(zw[0][1], z[0][1] * k, 1e-5, 1e-6));
  EXPECT_GT((zw - z).abs().max().item<double>(), 1e-3);

  // Through the stream: plain text is bit for bit today's (the plain path), weights differ.
  StreamConfig c;
  c.t_index_list = {32, 45};
  c.width = c.height = 64;
  StreamDiffusion s(m, c);
  s.prepare(plain);
  EXPECT_TRUE(torch::equal(s.cond_embeds(), z));
  s.update_prompt("a photo of a (cat:1.5) on the [grass]");
  EXPECT_TRUE(torch::equal(s.cond_embeds(), zw));
  // escapes and literal brackets without weights: the plain path of the resolved text
  s.update_prompt("a \\(cat\\) (on the grass");
  EXPECT_TRUE(torch::equal(s.cond_embeds(), m->encode_prompt("a (cat) (on the grass")));
}

TEST(PromptWeights, SdxlWeightsEachEncoderAndKeepsThePooledEmbedding) {
  const std::string dir = "sdxl/models/tiny-sdxl";
  if (!test::fixture_exists(dir + "/model_index.json")) GTEST_SKIP() << "no tiny-sdxl fixture";
  LoadOptions lo;
  lo.threads = -1;
  const auto m = load_pipeline(test::fixture_path(dir), lo);
  const TextEmbeddings plain = m->encode_text("a cat on grass");
  const TextEmbeddings weighted = m->encode_weighted_text(parse_prompt_weights("a (cat:2) on grass"));
  EXPECT_TRUE(torch::equal(weighted.pooled, plain.pooled));
  ASSERT_EQ(weighted.embeds.sizes(), plain.embeds.sizes());
  EXPECT_GT((weighted.embeds - plain.embeds).abs().max().item<double>(), 1e-4);
}

TEST(PromptWeights, ModelsWithoutATokenizerRefuseWeights) {
  auto models = std::make_shared<test::StubModels>();
  StreamConfig c;
  c.t_index_list = {32};
  c.width = c.height = 16;
  StreamDiffusion s(models, c);
  s.prepare("plain text is fine (even with a stray bracket");
  EXPECT_THROW(s.update_prompt("a (cat:1.5)"), InvalidArgument);
}

}  // namespace
}  // namespace sd
