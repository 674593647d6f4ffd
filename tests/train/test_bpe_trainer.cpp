// The BPE trainer: a vocabulary learned from captions, written in CLIP format, loads in our CLIP tokenizer and
// round-trips the captions (ids -> tokens -> text).
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/fixtures.h"
#include "tokenizer/clip_tokenizer.h"
#include "train/bpe_trainer.h"

namespace {

// Decodes CLIP BPE ids back to text: join the token strings, "</w>" -> " ", byte symbols -> bytes.
std::string decode(const sd::ClipTokenizer& tok, const std::vector<int64_t>& ids) {
  const auto& sym = sd::train::byte_symbols();
  std::string joined;
  for (int64_t id : ids) {
    std::string t = tok.id_to_token(id);
    EXPECT_FALSE(t.empty()) << "id " << id << " is not in the vocabulary";
    joined += t;
  }
  std::string out;
  size_t i = 0;
  while (i < joined.size()) {
    if (joined.compare(i, 4, "</w>") == 0) {
      out += ' ';
      i += 4;
      continue;
    }
    bool found = false;
    for (int b = 0; b < 256 && !found; ++b)
      if (joined.compare(i, sym[b].size(), sym[b]) == 0) {
        out += static_cast<char>(b);
        i += sym[b].size();
        found = true;
      }
    if (!found) ADD_FAILURE() << "undecodable symbol at byte " << i << " of " << joined;
    if (!found) break;
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

TEST(BpeTrainer, ByteSymbolsAreCLIPs) {
  const auto& s = sd::train::byte_symbols();
  ASSERT_EQ(s.size(), 256u);
  EXPECT_EQ(s['a'], "a");
  EXPECT_EQ(s[' '], "\xC4\xA0");  // U+0120 'Ġ'
  EXPECT_EQ(s[0], "\xC4\x80");    // U+0100
}

TEST(BpeTrainer, LearnsFrequentPairsDeterministically) {
  const auto v = sd::train::learn_bpe({{"low", 5}, {"lower", 2}, {"newest", 6}, {"widest", 3}}, {10, 2});
  ASSERT_FALSE(v.merges.empty());
  // "e s" occurs 9 times (newest 6 + widest 3) and wins; then "es t</w>".
  EXPECT_EQ(v.merges[0], std::make_pair(std::string("e"), std::string("s")));
  EXPECT_EQ(v.merges[1], std::make_pair(std::string("es"), std::string("t</w>")));
  EXPECT_EQ(v.tokens.size(), 512 + v.merges.size() + 2);
  EXPECT_EQ(v.tokens.back(), "<|endoftext|>");
  const auto v2 = sd::train::learn_bpe({{"low", 5}, {"lower", 2}, {"newest", 6}, {"widest", 3}}, {10, 2});
  EXPECT_EQ(v.merges, v2.merges);
}

TEST(BpeTrainer, CaptionsRoundTripThroughOurTokenizer) {
  const std::vector<std::string> captions = {
      "grinning face",        "smiling face with heart-eyes", "red apple",  "flag: côte d’ivoire",
      "piñata, twitter style", "cat face",                    "dog face",   "face with tears of joy",
      "red heart",            "blue heart",                   "green apple", "thumbs up sign 👍"};
  const std::string dir = sd::test::make_temp_dir("bpe") + "/tokenizer";
  const auto v = sd::train::train_clip_tokenizer(captions, dir, {200, 2});
  const auto tok = sd::ClipTokenizer::from_folder(dir);
  EXPECT_EQ(tok.vocab_size(), v.tokens.size());
  EXPECT_EQ(tok.bos_id(), static_cast<int64_t>(v.tokens.size()) - 2);
  EXPECT_EQ(tok.eos_id(), static_cast<int64_t>(v.tokens.size()) - 1);
  size_t total_ids = 0, total_bytes = 0;
  for (const auto& c : captions) {
    const auto ids = tok.bpe_ids(c);
    total_ids += ids.size();
    total_bytes += c.size();
    // CLIP's decode: every pre-tokeniser piece ends in "</w>", so the text comes back with its pieces
    // space-separated ("heart-eyes" -> "heart - eyes"), exactly as openai/CLIP's decode() returns it.
    std::string expected;
    for (const auto& piece : tok.pre_tokenize(sd::ClipTokenizer::normalize(c)))
      expected += (expected.empty() ? "" : " ") + piece;
    EXPECT_EQ(decode(tok, ids), expected) << c;
    const auto padded = tok.encode(c);
    ASSERT_EQ(padded.size(), 77u);
    EXPECT_EQ(padded[0], tok.bos_id());
    EXPECT_EQ(padded[ids.size() + 1], tok.eos_id());
  }
  // Merges compress: frequent words ("face") are single tokens.
  EXPECT_LT(total_ids * 4, total_bytes * 3) << total_ids << " ids for " << total_bytes << " bytes";
  EXPECT_EQ(tok.bpe_tokens("face"), std::vector<std::string>{"face</w>"});
  std::cout << "  [bpe] " << v.merges.size() << " merges, " << total_ids << " ids for " << total_bytes
            << " caption bytes\n";
}

}  // namespace
