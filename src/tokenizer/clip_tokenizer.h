#pragma once
// The CLIP byte-level BPE tokenizer of Stable Diffusion 1.x / 2.x, as openai/CLIP's SimpleTokenizer computes it
// (with ftfy treated as the identity) and as diffusers' encode_prompt pads it:
//   ids = [bos] + bpe_ids(text)[:max_length - 2] + [eos], right-padded with the pad id to max_length.
// Normalisation (html.unescape x2, strip, whitespace collapse, Python str.lower()) is in tokenizer/unicode_text.h;
// pre-tokenisation is PCRE2 (UTF + UCP) with openai/CLIP's pattern; BPE merges by rank with "</w>" on the last
// symbol. Invalid UTF-8 in a prompt is not an error: each invalid sequence becomes U+FFFD (like Python's
// decode(errors="replace")), which is then tokenised like any other character.
//
// Limits (documented, not silently different):
//  * ftfy.fix_text is the identity (the reference fixtures were made that way): no NFC, no curly-quote folding.
//  * Unicode data versions: str.lower() / Final_Sigma / html entities come from CPython 3.11 (Unicode 14.0, see
//    unicode_tables.inc); \p{L} / \p{N} from the system PCRE2 (10.42: Unicode 14.0). Characters whose category
//    changed in a later Unicode version than the reference's `regex` module used (e.g. CJK Extension H/I/J, newly
//    assigned scripts) can split differently; every code point whose letter/number/other class is the same in
//    Unicode 14 and in the `regex` module tokenises identically to openai/CLIP (checked for all 1.1M code points).
//  * Only the first 48894 merges of merges.txt are used, like openai/CLIP and transformers.
//
// Thread safety: every const method may be called concurrently; the word cache is behind a shared mutex.
// Copies are cheap (they share one immutable core and its cache).
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sd {

class ClipTokenizer {
 public:
  // Reads <dir>/vocab.json and <dir>/merges.txt (required) and tokenizer_config.json / special_tokens_map.json
  // (optional: bos/eos/pad tokens as strings or {"content": ...}, model_max_length; special_tokens_map.json wins
  // as in transformers). FormatError naming the file for anything missing or malformed, or a special token that
  // is not in the vocabulary.
  // A non-empty `pad_token` replaces the folder's pad token (SD 2.x pads with "!" where SD 1.x pads with
  // <|endoftext|>; the shipped models/clip-tokenizer serves both).
  static ClipTokenizer from_folder(const std::string& tokenizer_dir, const std::string& pad_token = "");

  // max_length() ids: bos + bpe_ids[:max_length-2] + eos + pad...
  std::vector<int64_t> encode(const std::string& text) const;
  // The BPE ids of the normalised text: no bos/eos, no truncation.
  std::vector<int64_t> bpe_ids(const std::string& text) const;
  // The BPE symbols of bpe_ids (byte-level strings as in vocab.json, e.g. "cat</w>", "ðŁĺĢ").
  std::vector<std::string> bpe_tokens(const std::string& text) const;
  // [N, max_length] int64 (CPU) of encode() for every text.
  torch::Tensor encode_batch(const std::vector<std::string>& texts) const;
  // bpe_ids(text).size() + 2 (what the text would need without truncation).
  size_t untruncated_length(const std::string& text) const;
  // True when encode() drops BPE ids.
  bool truncated(const std::string& text) const;

  int64_t bos_id() const;
  int64_t eos_id() const;
  int64_t pad_id() const;
  int max_length() const;
  size_t vocab_size() const;
  const std::string& pad_token() const;
  // The vocabulary string of an id ("" when the id is not in the vocabulary).
  const std::string& id_to_token(int64_t id) const;
  // The folder it was read from.
  const std::string& dir() const;

  // The normalised text the BPE sees (see tokenizer/unicode_text.h).
  static std::string normalize(const std::string& text);
  // The pre-tokeniser pieces of an already normalised text.
  std::vector<std::string> pre_tokenize(const std::string& normalized) const;

  struct Core;

 private:
  explicit ClipTokenizer(std::shared_ptr<const Core> core) : core_(std::move(core)) {}
  std::shared_ptr<const Core> core_;
};

}  // namespace sd
