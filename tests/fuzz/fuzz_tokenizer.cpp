// The CLIP tokenizer on arbitrary bytes (prompts come from the HTTP API, WebSocket clients, the control channel and
// the command line; invalid UTF-8 is replaced, never an error): normalisation (tokenizer/unicode_text.h), PCRE2
// pre-tokenisation and BPE with the shipped models/clip-tokenizer. Nothing may throw; the ids must be in the vocabulary
// and encode() exactly max_length long.
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "fuzz_torch.h"
#include "fuzz_util.h"
#include "tokenizer/clip_tokenizer.h"
#include "tokenizer/unicode_text.h"

namespace {
void fail(const char* what, const std::string& text) {
  std::fprintf(stderr, "tokenizer: %s for a %zu-byte input\n", what, text.size());
  std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const sd::ClipTokenizer tok = sd::ClipTokenizer::from_folder(SD_SOURCE_DIR "/models/clip-tokenizer");
  const std::string text = sd::fuzz::bytes(data, size);
  // UTF-8: lossy decoding then encoding gives valid UTF-8 that decodes to the same code points.
  const std::u32string cps = sd::text::decode_utf8_lossy(text);
  const std::string utf8 = sd::text::encode_utf8(cps);
  if (sd::text::decode_utf8_lossy(utf8) != cps) fail("UTF-8 does not round-trip", text);
  const std::vector<int64_t> ids = tok.encode(text);
  if (static_cast<int>(ids.size()) != tok.max_length()) fail("encode() length is not max_length", text);
  if (ids.front() != tok.bos_id()) fail("no bos first", text);
  const auto vocab = static_cast<int64_t>(tok.vocab_size());
  for (int64_t id : ids)
    if (id < 0 || id >= vocab) fail("id outside the vocabulary", text);
  const auto bpe = tok.bpe_ids(text);
  const auto symbols = tok.bpe_tokens(text);
  if (bpe.size() != symbols.size()) fail("bpe_ids and bpe_tokens differ in length", text);
  for (size_t i = 0; i < bpe.size(); ++i)
    if (tok.id_to_token(bpe[i]) != symbols[i]) fail("bpe_tokens is not the vocabulary string of bpe_ids", text);
  if (tok.untruncated_length(text) != bpe.size() + 2) fail("untruncated_length != bpe_ids + 2", text);
  if (tok.truncated(text) != (bpe.size() + 2 > ids.size())) fail("truncated() disagrees", text);
  return 0;
}
