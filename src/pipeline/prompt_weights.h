#pragma once
// Prompt weights: the emphasis syntax of the popular UIs (AUTOMATIC1111's parse_prompt_attention), applied per token
// to the text embeddings with A1111's convention.
//
// Syntax
//   (text)        weight ×1.1            [text]      weight ÷1.1 (×1/1.1)
//   (text:1.3)    weight ×1.3 (any decimal number, sign allowed, spaces around it allowed: "( text : 0.5 )")
//   nesting multiplies: ((a)) = 1.21, ([a]) = 1, ((a:1.5)) = 1.65, (a (b):1.2) gives b 1.32
//   \( \) \[ \] \\  a literal ( ) [ ] \ (any other backslash is itself)
//   unbalanced or mismatched brackets are literal text: "a (b" is the text "a (b" at weight 1, and in "(a]" both
//   brackets are literal; ":" is only a weight before the closing round bracket of a matched pair ("[a:2]" is the text
//   "a:2" at ÷1.1 — no prompt editing, no BREAK: both stay text).
//
// Encoding (DiffusionModels::encode_weighted_text)
//   Each chunk (a run of text with one weight) is tokenised on its own with the model's CLIP tokenizer, the ids are
//   concatenated, cut to the 77-token window (75 + BOS + EOS, as an unweighted prompt) and encoded once. Then every
//   token's embedding row is multiplied by its weight (BOS, EOS and padding: 1), and the whole [77, D] embedding is
//   rescaled so that its mean equals the mean of the unweighted embedding:
//       z' = z ⊙ w ;   z'' = z' · mean(z) / mean(z')       (A1111's "multiply, then restore the mean"; float32)
//   SDXL: each text encoder's rows are weighted and mean-restored on their own (as A1111), the pooled embedding is the
//   unweighted one. A word that tokenises into several tokens gives every token its weight. Tokens past the window
//   are dropped like the tail of an unweighted prompt (no 75-token chunking): a weighted chunk that straddles
//   token 75 keeps its weight on the tokens that fit. A prompt without weight syntax (every weight 1) takes the plain
//   path (encode_text of the text), so plain text is unchanged bit for bit.
#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

namespace sd {

class ClipTokenizer;

struct PromptChunk {
  std::string text;
  double weight = 1.0;
  bool operator==(const PromptChunk& o) const { return text == o.text && weight == o.weight; }
};

// The chunks of `prompt` in order, escapes resolved, adjacent chunks of equal weight merged; never empty (an empty
// prompt is one empty chunk). Never throws: anything that is not weight syntax is text.
std::vector<PromptChunk> parse_prompt_weights(const std::string& prompt);

// True when every chunk has weight exactly 1 (the prompt then encodes as the plain text joined_text()).
bool unweighted(const std::vector<PromptChunk>& chunks);
// The chunks' texts concatenated (the prompt with the weight syntax removed).
std::string joined_text(const std::vector<PromptChunk>& chunks);

// One tokenizer's view of weighted chunks: ids [1, max_length] int64 (bos + ids + eos + pad, like
// ClipTokenizer::encode) and the per-position weights [max_length] float32 (1 for bos, eos and padding).
struct WeightedTokens {
  torch::Tensor ids, weights;
  int64_t dropped = 0;  // tokens past the window
};
WeightedTokens weighted_tokens(const ClipTokenizer& tokenizer, const std::vector<PromptChunk>& chunks);

// A1111's weighting of one encoder's embeddings z [1, T, D] by w [T]: z·w per token row, then × mean(z)/mean(z·w),
// computed in float32 and returned in z's dtype. All weights 1 returns z itself.
torch::Tensor apply_token_weights(const torch::Tensor& z, const torch::Tensor& weights);

}  // namespace sd
