#include "train/bpe_trainer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/clip_tokenizer.h"

namespace fs = std::filesystem;

namespace sd::train {

namespace {
std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Byte values in CLIP's vocabulary order: the printable ranges first, then the rest.
const std::vector<int>& byte_order() {
  static const std::vector<int> order = [] {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
    std::vector<bool> seen(256, false);
    for (int b : bs) seen[b] = true;
    for (int b = 0; b < 256; ++b)
      if (!seen[b]) bs.push_back(b);
    return bs;
  }();
  return order;
}

void write_file(const fs::path& p, const std::string& content) {
  std::ofstream out(p, std::ios::binary);
  if (!out) throw FormatError(p.string(), "cannot write");
  out << content;
  if (!out) throw FormatError(p.string(), "write failed");
}
}  // namespace

const std::vector<std::string>& byte_symbols() {
  static const std::vector<std::string> sym = [] {
    std::vector<std::string> s(256);
    std::vector<bool> printable(256, false);
    for (int b = '!'; b <= '~'; ++b) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) s[b] = printable[b] ? utf8(static_cast<uint32_t>(b)) : utf8(256 + n++);
    return s;
  }();
  return sym;
}

BpeVocab learn_bpe(const std::vector<std::pair<std::string, int64_t>>& word_counts, const BpeTrainOptions& opts) {
  BpeVocab v;
  for (int b : byte_order()) v.tokens.push_back(byte_symbols()[b]);
  for (int b : byte_order()) v.tokens.push_back(byte_symbols()[b] + "</w>");

  // Each word as its symbol sequence; "</w>" on the last symbol (CLIP's end-of-word marker).
  std::vector<std::vector<std::string>> words;
  std::vector<int64_t> counts;
  for (const auto& [w, c] : word_counts) {
    if (w.empty() || c <= 0) continue;
    std::vector<std::string> sy;
    for (unsigned char ch : w) sy.push_back(byte_symbols()[ch]);
    sy.back() += "</w>";
    words.push_back(std::move(sy));
    counts.push_back(c);
  }
  for (int64_t m = 0; m < opts.max_merges; ++m) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;  // ordered: ties go to the smallest pair
    for (size_t i = 0; i < words.size(); ++i)
      for (size_t k = 0; k + 1 < words[i].size(); ++k) pairs[{words[i][k], words[i][k + 1]}] += counts[i];
    const std::pair<std::string, std::string>* best = nullptr;
    int64_t best_count = 0;
    for (const auto& [p, c] : pairs)
      if (c > best_count) {
        best = &p;
        best_count = c;
      }
    if (!best || best_count < opts.min_frequency) break;
    const auto merge = *best;
    const std::string joined = merge.first + merge.second;
    for (auto& w : words) {
      std::vector<std::string> out;
      out.reserve(w.size());
      for (size_t k = 0; k < w.size(); ++k) {
        if (k + 1 < w.size() && w[k] == merge.first && w[k + 1] == merge.second) {
          out.push_back(joined);
          ++k;
        } else {
          out.push_back(w[k]);
        }
      }
      w = std::move(out);
    }
    v.merges.push_back(merge);
    v.tokens.push_back(joined);
  }
  v.tokens.push_back("<|startoftext|>");
  v.tokens.push_back("<|endoftext|>");
  return v;
}

void write_clip_tokenizer(const BpeVocab& vocab, const std::string& dir, int max_length) {
  if (vocab.merges.empty())
    throw InvalidArgument("write_clip_tokenizer: the vocabulary has no merges (CLIP tokenizer folders need at least one)");
  fs::create_directories(dir);
  nlohmann::ordered_json vj = nlohmann::ordered_json::object();
  for (size_t i = 0; i < vocab.tokens.size(); ++i) {
    if (vj.contains(vocab.tokens[i]))
      throw InvalidArgument("write_clip_tokenizer: duplicate token '" + vocab.tokens[i] + "'");
    vj[vocab.tokens[i]] = static_cast<int64_t>(i);
  }
  write_file(fs::path(dir) / "vocab.json", vj.dump() + "\n");
  std::string merges = "#version: 0.2 (learned by streamdiffusion train)\n";
  for (const auto& [a, b] : vocab.merges) merges += a + " " + b + "\n";
  write_file(fs::path(dir) / "merges.txt", merges);
  nlohmann::ordered_json cfg = {{"tokenizer_class", "CLIPTokenizer"},
                                {"bos_token", "<|startoftext|>"},
                                {"eos_token", "<|endoftext|>"},
                                {"pad_token", "<|endoftext|>"},
                                {"unk_token", "<|endoftext|>"},
                                {"model_max_length", max_length},
                                {"do_lower_case", true}};
  write_file(fs::path(dir) / "tokenizer_config.json", cfg.dump(2) + "\n");
  nlohmann::ordered_json sp = {{"bos_token", "<|startoftext|>"},
                               {"eos_token", "<|endoftext|>"},
                               {"pad_token", "<|endoftext|>"},
                               {"unk_token", "<|endoftext|>"}};
  write_file(fs::path(dir) / "special_tokens_map.json", sp.dump(2) + "\n");
}

BpeVocab train_clip_tokenizer(const std::vector<std::string>& texts, const std::string& dir,
                              const BpeTrainOptions& opts, int max_length) {
  // A byte-only vocabulary (plus one merge: the format needs one) gives a tokenizer whose pre-tokeniser we use, so
  // the learned merges see exactly the words the tokenizer will see.
  BpeVocab base = learn_bpe({}, BpeTrainOptions{0, 1});
  base.merges.push_back({"a", "b</w>"});
  base.tokens.insert(base.tokens.end() - 2, "ab</w>");
  write_clip_tokenizer(base, dir, max_length);
  const ClipTokenizer tok = ClipTokenizer::from_folder(dir);
  std::map<std::string, int64_t> counts;
  for (const auto& t : texts)
    for (const auto& piece : tok.pre_tokenize(ClipTokenizer::normalize(t))) ++counts[piece];
  std::vector<std::pair<std::string, int64_t>> wc(counts.begin(), counts.end());
  BpeVocab v = learn_bpe(wc, opts);
  write_clip_tokenizer(v, dir, max_length);
  return v;
}

}  // namespace sd::train
