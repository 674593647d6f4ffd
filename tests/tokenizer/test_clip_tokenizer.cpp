// CLIP tokenizer: every case of tokenizer_cases.json for every fixture model (pad variant chosen by the model's pad
// token), file errors, BPE rules on a synthetic vocabulary, invalid UTF-8, random robustness, threads and speed.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "common/fixtures.h"
#include "core/error.h"
#include "io/json_config.h"
#include "tokenizer/clip_tokenizer.h"
#include "tokenizer/unicode_text.h"

namespace {

namespace fs = std::filesystem;
using sd::ClipTokenizer;
using sd::FormatError;

// ---------------------------------------------------------------------------------------------------------------
// Golden cases

struct GoldenCase {
  std::string model;
  std::string tokenizer_dir;
  size_t index = 0;
  nlohmann::json data;  // one entry of cases[]
  std::string error;    // set when the fixture itself is malformed
};

void PrintTo(const GoldenCase& c, std::ostream* os) { *os << c.model << " case " << c.index; }

std::vector<GoldenCase> golden_cases() {
  std::vector<GoldenCase> out;
  if (!sd::test::fixture_exists("tokenizer_cases.json")) return out;
  const std::string file = sd::test::fixture_path("tokenizer_cases.json");
  nlohmann::json cases;
  try {
    const auto j = sd::read_json_file(file);
    if (!j.is_object() || !j.contains("cases") || !j["cases"].is_array())
      throw FormatError(file, "expected an object with a 'cases' array");
    cases = j["cases"];
  } catch (const std::exception& e) {
    GoldenCase bad;
    bad.model = "malformed";
    bad.error = e.what();
    return {bad};
  }
  for (const auto& model : sd::test::fixture_models()) {
    const std::string dir = sd::test::fixture_path("models/" + model + "/tokenizer");
    if (!fs::is_directory(dir)) continue;
    for (size_t i = 0; i < cases.size(); ++i) out.push_back({model, dir, i, cases[i], ""});
  }
  return out;
}

std::string golden_name(const ::testing::TestParamInfo<GoldenCase>& info) {
  const auto& c = info.param;
  if (!c.error.empty()) return "malformed_fixture";
  std::string prompt = c.data.value("prompt", std::string());
  if (prompt.size() > 24) prompt.resize(24);
  char idx[8];
  std::snprintf(idx, sizeof(idx), "%02zu", c.index);
  return sd::test::test_name(c.model + "_" + idx + "_" + prompt);
}

// One tokenizer per folder for the whole run (loading parses 49k vocab entries and 49k merges).
const ClipTokenizer& tokenizer_for(const std::string& dir) {
  static std::mutex m;
  static std::map<std::string, ClipTokenizer> loaded;
  std::lock_guard<std::mutex> lock(m);
  auto it = loaded.find(dir);
  if (it == loaded.end()) it = loaded.emplace(dir, ClipTokenizer::from_folder(dir)).first;
  return it->second;
}

template <class T>
std::vector<T> json_list(const nlohmann::json& j, const char* key) {
  if (!j.contains(key)) throw FormatError("tokenizer_cases.json", std::string("case without '") + key + "'");
  return j.at(key).get<std::vector<T>>();
}

class ClipGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(ClipGolden, MatchesOpenAiClipAndDiffusersPadding) {
  const GoldenCase& c = GetParam();
  ASSERT_TRUE(c.error.empty()) << c.error;
  const ClipTokenizer& tok = tokenizer_for(c.tokenizer_dir);
  const std::string prompt = c.data.at("prompt").get<std::string>();

  // The padded ids: SD1.x pads with <|endoftext|>, SD2.x / sd-turbo with "!".
  const char* field = nullptr;
  if (tok.pad_token() == "<|endoftext|>") field = "input_ids_pad_eos";
  if (tok.pad_token() == "!") field = "input_ids_pad_bang";
  ASSERT_NE(field, nullptr) << c.model << ": pad token '" << tok.pad_token() << "' has no reference field";
  const auto want_ids = json_list<int64_t>(c.data, field);
  EXPECT_EQ(tok.encode(prompt), want_ids) << field;
  EXPECT_EQ(tok.bpe_ids(prompt), json_list<int64_t>(c.data, "bpe_ids_no_special"));
  EXPECT_EQ(tok.bpe_tokens(prompt), json_list<std::string>(c.data, "bpe_tokens"));
  EXPECT_EQ(tok.untruncated_length(prompt), c.data.at("untruncated_length_with_special").get<size_t>());
  EXPECT_EQ(tok.truncated(prompt), c.data.at("truncated").get<bool>());

  // encode_batch: the same row, int64, [N, 77], also next to another prompt.
  const auto batch = tok.encode_batch({prompt, "a photo of a cat"});
  ASSERT_EQ(batch.dim(), 2);
  EXPECT_EQ(batch.size(0), 2);
  EXPECT_EQ(batch.size(1), tok.max_length());
  EXPECT_EQ(batch.scalar_type(), torch::kInt64);
  const auto row = batch[0].contiguous();
  EXPECT_EQ(std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel()), want_ids);
}

GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(ClipGolden);
INSTANTIATE_TEST_SUITE_P(Fixtures, ClipGolden, ::testing::ValuesIn(golden_cases()), golden_name);

TEST(ClipFixtureTokenizers, SpecialIdsAndLengths) {
  bool any = false;
  for (const auto& model : sd::test::fixture_models()) {
    const std::string dir = sd::test::fixture_path("models/" + model + "/tokenizer");
    if (!fs::is_directory(dir)) continue;
    any = true;
    const auto& tok = tokenizer_for(dir);
    EXPECT_EQ(tok.bos_id(), 49406) << model;
    EXPECT_EQ(tok.eos_id(), 49407) << model;
    EXPECT_EQ(tok.max_length(), 77) << model;
    EXPECT_EQ(tok.vocab_size(), 49408u) << model;
    EXPECT_EQ(tok.pad_id(), tok.pad_token() == "!" ? 0 : 49407) << model;
    EXPECT_EQ(tok.id_to_token(49406), "<|startoftext|>");
    EXPECT_EQ(tok.id_to_token(320), "a</w>");
    EXPECT_EQ(tok.id_to_token(-1), "");
    EXPECT_EQ(tok.id_to_token(1 << 20), "");
  }
  if (!any) GTEST_SKIP() << "no fixture models under " << sd::test::fixtures_root();
}

// ---------------------------------------------------------------------------------------------------------------
// A synthetic tokenizer folder: the 256 byte symbols, their "</w>" forms, a few merges and the two specials.

std::vector<std::string> byte_symbols() {
  std::vector<std::string> out(256);
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    sd::text::append_utf8(out[b], printable ? static_cast<char32_t>(b) : next++);
  }
  return out;
}

const std::vector<std::string> kSyntheticMerges = {"c a",     "ca t</w>",   "a a",     "h e", "he l",
                                                   "l o</w>", "hel lo</w>", "' s</w>", "1 2"};

void write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
}

struct SyntheticFolder {
  std::string dir;
  nlohmann::json vocab;
  std::vector<std::string> merges = kSyntheticMerges;
  nlohmann::json config = {{"model_max_length", 16}, {"tokenizer_class", "CLIPTokenizer"}};
  nlohmann::json special = {{"pad_token", "!"}};

  SyntheticFolder() {
    dir = sd::test::make_temp_dir("sd-clip-tok");
    // Ids in bytes_to_unicode order like the real vocabulary: printable bytes first ("!" = 0), then the others.
    const auto syms = byte_symbols();
    std::vector<std::string> ordered;
    for (int pass = 0; pass < 2; ++pass)
      for (int b = 0; b < 256; ++b)
        if ((sd::text::decode_utf8_lossy(syms[b])[0] == static_cast<char32_t>(b)) == (pass == 0))
          ordered.push_back(syms[b]);
    int id = 0;
    for (const auto& s : ordered) vocab[s] = id++;
    for (const auto& s : ordered) vocab[s + "</w>"] = id++;
    for (const auto& m : merges) {
      const auto sp = m.find(' ');
      vocab[m.substr(0, sp) + m.substr(sp + 1)] = id++;
    }
    vocab["<|startoftext|>"] = id++;
    vocab["<|endoftext|>"] = id++;
  }
  ~SyntheticFolder() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string write() const {
    write_file(dir + "/vocab.json", vocab.dump());
    std::string m = "#version: 0.2\n";
    for (const auto& line : merges) m += line + "\n";
    write_file(dir + "/merges.txt", m);
    write_file(dir + "/tokenizer_config.json", config.dump());
    write_file(dir + "/special_tokens_map.json", special.dump());
    return dir;
  }
};

// Expects FormatError whose message names `file` and contains every fragment.
template <class F>
void expect_format_error(F&& f, const std::string& file, const std::vector<std::string>& fragments) {
  try {
    f();
    FAIL() << "expected a FormatError naming " << file;
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file), std::string::npos) << "file '" << file << "' not named in: " << msg;
    for (const auto& frag : fragments)
      EXPECT_NE(msg.find(frag), std::string::npos) << "missing '" << frag << "' in: " << msg;
  }
}

TEST(ClipSynthetic, BpeMergesByRankWithEndOfWordMarker) {
  SyntheticFolder f;
  const auto tok = ClipTokenizer::from_folder(f.write());
  EXPECT_EQ(tok.max_length(), 16);
  EXPECT_EQ(tok.pad_token(), "!");
  EXPECT_EQ(tok.pad_id(), 0);
  EXPECT_EQ(tok.bpe_tokens("cat"), (std::vector<std::string>{"cat</w>"}));
  // "hello": h e -> he l -> l o</w> -> hel lo</w>, in rank order.
  EXPECT_EQ(tok.bpe_tokens("Hello"), (std::vector<std::string>{"hello</w>"}));
  // Repeated pairs merge left to right without overlap; "a a</w>" is not a merge.
  EXPECT_EQ(tok.bpe_tokens("aaa"), (std::vector<std::string>{"aa", "a</w>"}));
  EXPECT_EQ(tok.bpe_tokens("aaaa"), (std::vector<std::string>{"aa", "a", "a</w>"}));
  // No merge applies: bytes with </w> on the last one. Digits are single pieces ([\p{N}]).
  EXPECT_EQ(tok.bpe_tokens("cab"), (std::vector<std::string>{"ca", "b</w>"}));
  EXPECT_EQ(tok.bpe_tokens("12"), (std::vector<std::string>{"1</w>", "2</w>"}));
  EXPECT_EQ(tok.bpe_tokens("cat's"), (std::vector<std::string>{"cat</w>", "'s</w>"}));
  // Bytes of non-ASCII characters become byte symbols (é = C3 A9 -> "Ã" "©</w>").
  EXPECT_EQ(tok.bpe_tokens("é"), (std::vector<std::string>{"Ã", "©</w>"}));
  // The special strings inside a prompt map to their ids; other spellings are ordinary text.
  const auto ids = tok.bpe_ids("<|startoftext|> <|ENDOFTEXT|>");
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(tok.id_to_token(ids[0]), "<|startoftext|>");
  EXPECT_EQ(tok.id_to_token(ids[1]), "<|endoftext|>");

  // Truncation keeps max_length - 2 BPE ids.
  std::string long_text;
  for (int i = 0; i < 20; ++i) long_text += "cat ";
  const auto enc = tok.encode(long_text);
  ASSERT_EQ(enc.size(), 16u);
  EXPECT_EQ(enc.front(), tok.bos_id());
  EXPECT_EQ(enc.back(), tok.eos_id());
  EXPECT_EQ(tok.untruncated_length(long_text), 22u);
  EXPECT_TRUE(tok.truncated(long_text));
  EXPECT_FALSE(tok.truncated("cat"));
  const auto short_enc = tok.encode("cat");
  EXPECT_EQ(short_enc[2], tok.eos_id());
  for (size_t i = 3; i < short_enc.size(); ++i) EXPECT_EQ(short_enc[i], 0);
  EXPECT_EQ(tok.encode(""),
            (std::vector<int64_t>{tok.bos_id(), tok.eos_id(), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}));
  EXPECT_EQ(tok.encode_batch({}).sizes(), (std::vector<int64_t>{0, 16}));
}

TEST(ClipSynthetic, DefaultsWithoutConfigFiles) {
  SyntheticFolder f;
  f.write();
  fs::remove(f.dir + "/tokenizer_config.json");
  fs::remove(f.dir + "/special_tokens_map.json");
  const auto tok = ClipTokenizer::from_folder(f.dir);
  EXPECT_EQ(tok.max_length(), 77);
  EXPECT_EQ(tok.pad_token(), "<|endoftext|>");
  EXPECT_EQ(tok.pad_id(), tok.eos_id());
}

TEST(ClipSynthetic, SpecialTokensMapWinsAndAddedTokenObjects) {
  SyntheticFolder f;
  f.config["pad_token"] = {{"__type", "AddedToken"}, {"content", "<|endoftext|>"}};
  f.special["pad_token"] = {{"content", "!"}, {"lstrip", false}};
  const auto tok = ClipTokenizer::from_folder(f.write());
  EXPECT_EQ(tok.pad_token(), "!");
  EXPECT_EQ(tok.pad_id(), 0);
}

TEST(ClipSynthetic, CopiesShareTheCore) {
  SyntheticFolder f;
  const auto a = ClipTokenizer::from_folder(f.write());
  const ClipTokenizer b = a;  // NOLINT(performance-unnecessary-copy-initialization)
  ClipTokenizer c = std::move(ClipTokenizer(a));
  EXPECT_EQ(b.encode("hello cat"), a.encode("hello cat"));
  EXPECT_EQ(c.encode("hello cat"), a.encode("hello cat"));
  EXPECT_EQ(&a.dir(), &b.dir());
}

// ---------------------------------------------------------------------------------------------------------------
// File errors name the file and what is wrong.

TEST(ClipErrors, MissingFolder) {
  expect_format_error([] { ClipTokenizer::from_folder("/nonexistent/tokenizer"); }, "/nonexistent/tokenizer",
                      {"not a directory"});
}

TEST(ClipErrors, MissingVocab) {
  SyntheticFolder f;
  f.write();
  fs::remove(f.dir + "/vocab.json");
  expect_format_error([&] { ClipTokenizer::from_folder(f.dir); }, "vocab.json", {"cannot open"});
}

TEST(ClipErrors, MissingMerges) {
  SyntheticFolder f;
  f.write();
  fs::remove(f.dir + "/merges.txt");
  expect_format_error([&] { ClipTokenizer::from_folder(f.dir); }, "merges.txt", {"cannot open"});
}

TEST(ClipErrors, VocabNotAnObject) {
  SyntheticFolder f;
  f.write();
  write_file(f.dir + "/vocab.json", "[\"a\", \"b\"]");
  expect_format_error([&] { ClipTokenizer::from_folder(f.dir); }, "vocab.json", {"expected a JSON object"});
  write_file(f.dir + "/vocab.json", "{\"a\": 1,");
  expect_format_error([&] { ClipTokenizer::from_folder(f.dir); }, "vocab.json", {"not valid JSON"});
}

TEST(ClipErrors, VocabBadIdsAndMissingSymbols) {
  {
    SyntheticFolder f;
    f.vocab["cat</w>"] = -3;
    expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "vocab.json",
                        {"cat</w>", "non-negative integer"});
  }
  {
    SyntheticFolder f;
    f.vocab["cat</w>"] = "7";
    expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "vocab.json", {"cat</w>"});
  }
  {
    SyntheticFolder f;
    f.vocab["cat</w>"] = 0;  // also the id of "!"
    expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "vocab.json", {"id 0 is used by both"});
  }
  {
    SyntheticFolder f;
    f.vocab.erase("z</w>");
    expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "vocab.json", {"z</w>", "byte 0x7A"});
  }
  {
    SyntheticFolder f;
    f.vocab.erase("<|startoftext|>");
    expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "vocab.json", {"<|startoftext|>"});
  }
}

TEST(ClipErrors, MalformedMergesLine) {
  SyntheticFolder f;
  f.merges[1] = "ca t</w> x";  // line 3 of the file (after the header)
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "merges.txt", {"line 3", "two symbols"});
  f.merges[1] = "cat";
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "merges.txt", {"line 3"});
  f.merges[1] = "";
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "merges.txt", {"line 3"});
  f.merges[1] = "ca t</w>";
  f.merges.push_back("x y");  // "xy" is not in the vocabulary
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "merges.txt",
                      {"line 11", "'xy' is not in vocab.json"});
}

TEST(ClipErrors, UnknownPadToken) {
  SyntheticFolder f;
  f.special["pad_token"] = "<pad>";
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "special_tokens_map.json",
                      {"pad_token '<pad>'", "not in"});
  f.special = nlohmann::json::object();
  f.config["pad_token"] = "<pad>";
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "tokenizer_config.json", {"pad_token '<pad>'"});
  f.config["pad_token"] = nullptr;
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "tokenizer_config.json", {"'pad_token' is null"});
  f.config["pad_token"] = 5;
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "tokenizer_config.json", {"'pad_token'"});
}

TEST(ClipErrors, BadConfigFields) {
  SyntheticFolder f;
  f.config["model_max_length"] = 1e30;
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "tokenizer_config.json", {"model_max_length"});
  f.config["model_max_length"] = 1;
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "tokenizer_config.json", {"model_max_length"});
  f.config["model_max_length"] = 77;
  f.config["tokenizer_class"] = "T5Tokenizer";
  expect_format_error([&] { ClipTokenizer::from_folder(f.write()); }, "tokenizer_config.json", {"T5Tokenizer"});
  f.config["tokenizer_class"] = "CLIPTokenizerFast";
  EXPECT_NO_THROW(ClipTokenizer::from_folder(f.write()));
  write_file(f.dir + "/special_tokens_map.json", "[]");
  expect_format_error([&] { ClipTokenizer::from_folder(f.dir); }, "special_tokens_map.json", {"JSON object"});
}

// ---------------------------------------------------------------------------------------------------------------
// Normalisation = Python's html.unescape x2 / strip / \s+ collapse / str.lower() (expected values from CPython 3.11).

TEST(ClipNormalize, InvalidUtf8BecomesReplacementCharacterLikePython) {
  using sd::text::decode_utf8_lossy;
  const std::u32string R(1, 0xFFFD);
  EXPECT_EQ(decode_utf8_lossy("\xe2\x82"), R);              // truncated 3-byte sequence: one U+FFFD
  EXPECT_EQ(decode_utf8_lossy("\xed\xa0\x80"), R + R + R);  // surrogate: ED A0 is never valid
  EXPECT_EQ(decode_utf8_lossy("a\xff"
                              "b"),
            U"a" + R + U"b");
  EXPECT_EQ(decode_utf8_lossy("\xf0\x9f\x98"), R);
  EXPECT_EQ(decode_utf8_lossy("\xc0\xaf"), R + R);                  // overlong
  EXPECT_EQ(decode_utf8_lossy("\xf4\x90\x80\x80"), R + R + R + R);  // above U+10FFFF
  EXPECT_EQ(decode_utf8_lossy("\xe2(\xa1"), R + U"(" + R);
  EXPECT_EQ(decode_utf8_lossy("\x80\x80"), R + R);
  EXPECT_EQ(decode_utf8_lossy("\xf0\x9f\x98\x80"), std::u32string(1, 0x1F600));
  EXPECT_EQ(decode_utf8_lossy("\xef\xbf\xbe"), std::u32string(1, 0xFFFE));
  EXPECT_EQ(decode_utf8_lossy(std::string("a\0b", 3)), std::u32string(U"a\0b", 3));
}

TEST(ClipNormalize, HtmlUnescapeTwiceStripCollapseLower) {
  using sd::ClipTokenizer;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"&amp;lt;", "<"},
      {"&ampx", "&x"},
      {"&#128;", "\u20ac"},
      {"&#0;", "\ufffd"},
      {"&#1;", ""},
      {"&#xD800;", "\ufffd"},
      {"&#x110000;", "\ufffd"},
      {"&#99999999999999999999999;", "\ufffd"},
      {"&#xFFFF;", ""},
      {"&notit;", "\u00acit;"},
      {"&#39", "'"},
      {"&#x;", "&#x;"},
      {"&CounterClockwiseContourIntegral;", "\u2233"},
      {"&NotEqualTilde;", "\u2242\u0338"},
      {"&#13;", ""},  // -> "\r", then stripped
      {"&lt&gt", "<>"},
      {"&amp;amp;amp;", "&amp;"},
      {"&#65;&#x42;&#X43", "abc"},
      {"&unknown;", "&unknown;"},
      {"&aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa;", "&aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa;"},
      {"a &amp b", "a & b"},
      {"x&nbsp;&nbsp;y", "x y"},
      {"\xce\x91\xce\xa3", "\u03b1\u03c2"},  // final sigma
      {"\xce\xa3", "\u03c3"},
      {"\xce\x91\xce\xa3\xce\x91", "\u03b1\u03c3\u03b1"},
      {"\xce\x91\xce\xa3.", "\u03b1\u03c2."},
      {"\xce\x91\xcc\x81\xce\xa3", "\u03b1\u0301\u03c2"},                // case-ignorable before
      {"\xce\x91\xce\xa3\xcc\x81\xce\x91", "\u03b1\u03c3\u0301\u03b1"},  // case-ignorable between
      {"\xce\x9f\xce\x94\xce\xa5\xce\xa3\xce\xa3\xce\x95\xce\xa5\xce\xa3",
       "\u03bf\u03b4\u03c5\u03c3\u03c3\u03b5\u03c5\u03c2"},
      {"\xc4\xb0", "i\u0307"},  // U+0130: two code points
      {"\xe1\xba\x9e", "\u00df"},
      {"\xc7\x85", "\u01c6"},
      {"\xef\xbc\xa1\xef\xbc\xa2", "\uff41\uff42"},
      {" \x1c"
       "a\x1c"
       "b\x1c ",
       "a\x1c"
       "b"},  // strip() removes U+001C, \s does not match it
      {" a\u3000\u3000b\t\n", "a b"},
      {"\u0085x\u00a0y\u2028", "x y"},
      {"   leading   and   trailing   ", "leading and trailing"},
  };
  for (const auto& [in, want] : cases) EXPECT_EQ(ClipTokenizer::normalize(in), want) << "input: " << in;
}

TEST(ClipNormalize, InvalidUtf8InPromptTokenizesAsReplacementCharacter) {
  SyntheticFolder f;
  const auto tok = ClipTokenizer::from_folder(f.write());
  EXPECT_EQ(tok.encode("cat\xff"
                       "cat"),
            tok.encode("cat\xef\xbf\xbd"
                       "cat"));
  EXPECT_EQ(tok.bpe_tokens("\xff"), (std::vector<std::string>{"ï", "¿", "½</w>"}));  // EF BF BD
  EXPECT_EQ(tok.bpe_ids("\xed\xa0\x80").size(), 9u);                                 // three U+FFFD, 3 bytes each
  // pre_tokenize() takes normalised text: invalid UTF-8 there is an error, not undefined behaviour.
  EXPECT_THROW(tok.pre_tokenize("a\xff"), sd::InvalidArgument);
  EXPECT_EQ(tok.pre_tokenize("it's a cat,42!"), (std::vector<std::string>{"it", "'s", "a", "cat", ",", "4", "2", "!"}));
}

TEST(ClipNormalize, PreTokenizerMatchesTheRegexModule) {
  SyntheticFolder f;
  const auto tok = ClipTokenizer::from_folder(f.write());
  using V = std::vector<std::string>;
  // Contractions only as listed; "'ſ" (long s) matches 's case-insensitively, as in `regex`.
  EXPECT_EQ(tok.pre_tokenize("we'll they're i'd x'q"), (V{"we", "'ll", "they", "'re", "i", "'d", "x", "'", "q"}));
  EXPECT_EQ(tok.pre_tokenize("x'\u017f"), (V{"x", "'\u017f"}));
  // Letters of any script group, numbers split one by one (incl. non-ASCII digits), the rest groups.
  EXPECT_EQ(tok.pre_tokenize("caf\u00e9 \u732b\u732b 12\u0663 \U0001F600\U0001F389!"),
            (V{"caf\u00e9", "\u732b\u732b", "1", "2", "\u0663", "\U0001F600\U0001F389!"}));
  // U+001C is not \s for `regex`: it is a symbol piece. U+0345 matches nothing under IGNORECASE and is dropped.
  EXPECT_EQ(tok.pre_tokenize(std::string("a\x1c") + "b"), (V{"a", "\x1c", "b"}));
  // U+180E is \s for PCRE2's UCP \s but not for `regex` (nor str.isspace): a symbol piece here too.
  EXPECT_EQ(tok.pre_tokenize("a\u180e" "b"), (V{"a", "\u180e", "b"}));
  EXPECT_EQ(ClipTokenizer::normalize(" \u180e "), "\u180e");
  EXPECT_EQ(tok.pre_tokenize("a\u0345b \u0345"), (V{"a", "b"}));
  EXPECT_EQ(tok.pre_tokenize("x<|startoftext|>y<|endoftext|>"), (V{"x", "<|startoftext|>", "y", "<|endoftext|>"}));
}

// ---------------------------------------------------------------------------------------------------------------
// Robustness: random bytes and random Unicode never throw and always give max_length valid ids.

std::string random_text(std::mt19937& rng) {
  static const std::vector<std::string> pieces = {"&amp;",
                                                  "&lt",
                                                  "&#39;",
                                                  "&#x1F600;",
                                                  "&#0;",
                                                  "&#xD800;",
                                                  "&notit;",
                                                  "&",
                                                  "#",
                                                  "'s",
                                                  "'LL",
                                                  " ",
                                                  "\t",
                                                  "\n",
                                                  "\xc2\x85",
                                                  "\xe3\x80\x80",
                                                  "\x1c",
                                                  "\xce\xa3",
                                                  "\xc4\xb0",
                                                  "\xcd\x85",
                                                  "<|startoftext|>",
                                                  "<|endoftext|>",
                                                  "cat",
                                                  "A PHOTO",
                                                  "\xf0\x9f\x98\x80",
                                                  "\xe7\x8c\xab",
                                                  "\xff",
                                                  "\xc0\xaf",
                                                  "\xed\xa0\x80",
                                                  "\xf4\x90\x80\x80",
                                                  "\xe2\x82",
                                                  std::string("\0", 1)};
  std::string s;
  const int parts = static_cast<int>(rng() % 30);
  for (int p = 0; p < parts; ++p) {
    switch (rng() % 4) {
      case 0:
        s += pieces[rng() % pieces.size()];
        break;
      case 1:  // raw random bytes (mostly invalid UTF-8)
        for (int k = static_cast<int>(rng() % 6); k > 0; --k) s.push_back(static_cast<char>(rng() % 256));
        break;
      case 2: {  // random code points, surrogates included (encoded as the invalid bytes ED A0..BF xx)
        for (int k = static_cast<int>(rng() % 6); k > 0; --k) {
          const char32_t cp = static_cast<char32_t>(rng() % 0x110000);
          if (cp >= 0xD800 && cp <= 0xDFFF) {
            s += static_cast<char>(0xED);
            s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            s += static_cast<char>(0x80 | (cp & 0x3F));
          } else {
            sd::text::append_utf8(s, cp);
          }
        }
        break;
      }
      default:  // printable ASCII words
        for (int k = static_cast<int>(rng() % 12); k > 0; --k) s.push_back(static_cast<char>(32 + rng() % 95));
    }
  }
  return s;
}

void check_random_texts(const ClipTokenizer& tok, int count, uint32_t seed) {
  std::mt19937 rng(seed);
  const size_t max_len = static_cast<size_t>(tok.max_length());
  int failures = 0;
  for (int i = 0; i < count && failures < 5; ++i) {
    const std::string s = random_text(rng);
    std::vector<int64_t> ids, bpe;
    try {
      ids = tok.encode(s);
      bpe = tok.bpe_ids(s);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw on random text #" << i << ": " << e.what();
      ++failures;
      continue;
    }
    bool ok = ids.size() == max_len && ids.front() == tok.bos_id();
    const size_t eos_at = std::min(bpe.size(), max_len - 2) + 1;
    ok = ok && ids[eos_at] == tok.eos_id();
    for (size_t k = 0; ok && k < ids.size(); ++k) {
      ok = ids[k] >= 0 && static_cast<size_t>(ids[k]) < tok.vocab_size();
      if (k > eos_at) ok = ok && ids[k] == tok.pad_id();
      if (k > 0 && k < eos_at) ok = ok && ids[k] == bpe[k - 1];
    }
    // Invalid UTF-8 is the same as its U+FFFD replacement.
    ok = ok && tok.bpe_ids(sd::text::encode_utf8(sd::text::decode_utf8_lossy(s))) == bpe;
    if (!ok) {
      ++failures;
      ADD_FAILURE() << "random text #" << i << " (" << s.size() << " bytes): bad ids";
    }
  }
}

TEST(ClipRobustness, RandomBytesAndUnicodeSynthetic) {
  SyntheticFolder f;
  check_random_texts(ClipTokenizer::from_folder(f.write()), 4000, 1);
}

TEST(ClipRobustness, RandomBytesAndUnicodeFixtureVocab) {
  const auto models = sd::test::fixture_models();
  if (models.empty()) GTEST_SKIP() << "no fixture models";
  for (const auto& m : models) {
    const std::string dir = sd::test::fixture_path("models/" + m + "/tokenizer");
    if (fs::is_directory(dir)) check_random_texts(tokenizer_for(dir), 4000, 2);
  }
}

TEST(ClipRobustness, LongInputs) {
  SyntheticFolder f;
  const auto tok = ClipTokenizer::from_folder(f.write());
  const std::string word(20000, 'a');           // one 20000-byte word: O(n^2) BPE stays well below a second
  EXPECT_EQ(tok.bpe_ids(word).size(), 10001u);  // 9999 x "aa", "a", "a</w>"
  EXPECT_EQ(tok.encode(word).size(), 16u);
  std::string many;
  for (int i = 0; i < 5000; ++i) many += "cat, ";
  EXPECT_EQ(tok.untruncated_length(many), 10002u);
}

TEST(ClipRobustness, LongRandomWordRealVocab) {
  const auto models = sd::test::fixture_models();
  if (models.empty()) GTEST_SKIP() << "no fixture models";
  const auto tok = ClipTokenizer::from_folder(sd::test::fixture_path("models/" + models.front() + "/tokenizer"));
  std::mt19937 rng(3);
  std::string word;
  for (int i = 0; i < 20000; ++i) word.push_back(static_cast<char>('a' + rng() % 26));
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = tok.bpe_ids(word);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "[ timing ] one 20000-letter word: " << ids.size() << " BPE ids in " << ms << " ms\n";
  EXPECT_GT(ids.size(), 2000u);
  EXPECT_LT(ids.size(), 20000u);
  EXPECT_EQ(tok.encode(word).size(), 77u);
}

// ---------------------------------------------------------------------------------------------------------------
// Concurrency and speed.

std::vector<std::string> sample_prompts() {
  std::vector<std::string> out = {"a photo of a cat, trending on artstation",
                                  "masterpiece, best quality, a red fox in the snow, 8k", "blurry, low quality", ""};
  if (sd::test::fixture_exists("tokenizer_cases.json")) {
    const auto j = sd::read_json_file(sd::test::fixture_path("tokenizer_cases.json"));
    for (const auto& c : j.at("cases")) out.push_back(c.at("prompt").get<std::string>());
  }
  return out;
}

TEST(ClipThreads, ConcurrentEncodeMatchesSequential) {
  std::string dir;
  SyntheticFolder f;
  const auto models = sd::test::fixture_models();
  dir = models.empty() ? f.write() : sd::test::fixture_path("models/" + models.front() + "/tokenizer");
  const auto tok = ClipTokenizer::from_folder(dir);  // fresh: the cache fills while the threads run
  std::vector<std::string> prompts = sample_prompts();
  std::mt19937 rng(7);
  for (int i = 0; i < 200; ++i) prompts.push_back(random_text(rng));
  std::vector<std::vector<int64_t>> want;
  {
    const auto ref = ClipTokenizer::from_folder(dir);
    for (const auto& p : prompts) want.push_back(ref.encode(p));
  }
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      const ClipTokenizer local = tok;  // copies share the core and its cache
      for (int round = 0; round < 20; ++round)
        for (size_t i = 0; i < prompts.size(); ++i) {
          const size_t k = (i * 7 + static_cast<size_t>(t) * 13 + static_cast<size_t>(round)) % prompts.size();
          if (local.encode(prompts[k]) != want[k]) ++mismatches;
        }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(ClipSpeed, PromptTokenizesInMicroseconds) {
  const auto models = sd::test::fixture_models();
  if (models.empty()) GTEST_SKIP() << "no fixture models";
  const auto tok = ClipTokenizer::from_folder(sd::test::fixture_path("models/" + models.front() + "/tokenizer"));
  const std::string prompt = "a photo of a cat, trending on artstation";
  auto t0 = std::chrono::steady_clock::now();
  tok.encode(prompt);
  const double cold_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  const auto prompts = sample_prompts();
  for (const auto& p : prompts) tok.encode(p);  // warm the word cache
  const int rounds = 200;
  t0 = std::chrono::steady_clock::now();
  size_t sink = 0;
  for (int r = 0; r < rounds; ++r) sink += tok.encode(prompt).size();
  const double warm_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / rounds;
  t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < rounds / 10; ++r)
    for (const auto& p : prompts) sink += tok.encode(p).size();
  const double all_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
                        (rounds / 10 * static_cast<double>(prompts.size()));
  std::cout << "[ timing ] cold " << cold_us << " us, warm " << warm_us << " us ('" << prompt << "'), mean " << all_us
            << " us over " << prompts.size() << " prompts (fixture cases incl. CJK/emoji/long)\n";
  RecordProperty("warm_us", std::to_string(warm_us));
  EXPECT_GT(sink, 0u);
  // A guard against a word cache that stopped working (a warm prompt takes ~10 us), 100x above it; not in sanitizer
  // builds, whose instrumentation alone slows it 5-15x (TSan measured 1.9 ms on a loaded 2-core machine).
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  std::cout << "[ timing ] sanitizer build: the bound is not checked\n";
#else
  EXPECT_LT(warm_us, 1000.0) << "a warm prompt should take microseconds";
#endif
}

}  // namespace
