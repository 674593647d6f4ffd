#pragma once
// Learns a small byte-level BPE vocabulary (CLIP format) from a text corpus, so a model trained in-house has its own
// tokenizer that our CLIP tokenizer (tokenizer/clip_tokenizer.h) loads like any Stable Diffusion tokenizer folder.
//
// The vocabulary is laid out like openai/CLIP's: the 256 byte symbols (GPT-2 bytes_to_unicode order), the same with
// "</w>", then one symbol per merge in merge order, then <|startoftext|> and <|endoftext|>. Words are the pieces of
// CLIP's own normaliser and pre-tokeniser, so training and tokenisation split text identically.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sd::train {

struct BpeTrainOptions {
  int64_t max_merges = 1000;  // at most this many merges
  int64_t min_frequency = 2;  // stop when the most frequent pair occurs fewer times
};

struct BpeVocab {
  std::vector<std::string> tokens;                          // by id
  std::vector<std::pair<std::string, std::string>> merges;  // by rank
};

// GPT-2 / CLIP bytes_to_unicode(): the printable symbol (UTF-8) that stands for each byte value.
const std::vector<std::string>& byte_symbols();

// Learns merges from word counts (words already normalised and pre-tokenised, UTF-8). Deterministic: ties between
// equally frequent pairs go to the lexicographically smallest pair.
BpeVocab learn_bpe(const std::vector<std::pair<std::string, int64_t>>& word_counts, const BpeTrainOptions& opts);

// Writes vocab.json, merges.txt ("#version: 0.2" header), tokenizer_config.json and special_tokens_map.json
// (bos <|startoftext|>, eos and pad <|endoftext|>, model_max_length `max_length`) into `dir` (created).
void write_clip_tokenizer(const BpeVocab& vocab, const std::string& dir, int max_length = 77);

// The whole job: normalises and pre-tokenises `texts` with the CLIP tokenizer's own rules, counts words, learns the
// merges and writes the tokenizer folder `dir`. Returns the vocabulary.
BpeVocab train_clip_tokenizer(const std::vector<std::string>& texts, const std::string& dir,
                              const BpeTrainOptions& opts = {}, int max_length = 77);

}  // namespace sd::train
