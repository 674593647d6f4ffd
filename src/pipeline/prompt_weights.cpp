#include "pipeline/prompt_weights.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>

#include <torch/torch.h>

#include "core/error.h"
#include "tokenizer/clip_tokenizer.h"

namespace sd {
namespace {

constexpr double kRoundMultiplier = 1.1;
constexpr double kSquareMultiplier = 1 / 1.1;

// One lexeme: a literal character (escapes resolved) or a bracket that may turn out to be structure.
struct Lexeme {
  char c;
  bool bracket;    // an unescaped ( ) [ ]
  long match = -1;  // index of the matching bracket (matched brackets only)
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// For a matched round pair (open, close): the weight of a ":number" just before `close`, and where it starts.
bool weight_suffix(const std::vector<Lexeme>& lx, long open, long close, double& weight, long& start) {
  long i = close - 1;
  while (i > open && !lx[i].bracket && is_space(lx[i].c)) --i;
  const long num_end = i + 1;
  while (i > open && !lx[i].bracket && (std::isdigit(static_cast<unsigned char>(lx[i].c)) || lx[i].c == '.')) --i;
  if (i > open && !lx[i].bracket && (lx[i].c == '+' || lx[i].c == '-')) --i;
  const long num_start = i + 1;
  if (num_start >= num_end) return false;
  while (i > open && !lx[i].bracket && is_space(lx[i].c)) --i;
  if (i <= open || lx[i].bracket || lx[i].c != ':') return false;
  std::string num;
  for (long k = num_start; k < num_end; ++k) num += lx[k].c;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(num.c_str(), &end);
  if (end != num.c_str() + num.size() || errno == ERANGE || !std::isfinite(v)) return false;
  weight = v;
  start = i;
  return true;
}

}  // namespace

std::vector<PromptChunk> parse_prompt_weights(const std::string& prompt) {
  // 1. Lexemes: escapes resolved, brackets marked.
  std::vector<Lexeme> lx;
  for (size_t i = 0; i < prompt.size(); ++i) {
    const char c = prompt[i];
    if (c == '\\' && i + 1 < prompt.size()) {
      const char n = prompt[i + 1];
      if (n == '(' || n == ')' || n == '[' || n == ']' || n == '\\') {
        lx.push_back({n, false});
        ++i;
        continue;
      }
    }
    lx.push_back({c, c == '(' || c == ')' || c == '[' || c == ']'});
  }
  // 2. Match brackets with a stack; a close that does not match the innermost open is literal, and so is every open
  //    left on the stack at the end.
  std::vector<long> stack;
  for (long i = 0; i < static_cast<long>(lx.size()); ++i) {
    if (!lx[i].bracket) continue;
    const char c = lx[i].c;
    if (c == '(' || c == '[') {
      stack.push_back(i);
    } else if (!stack.empty() && lx[stack.back()].c == (c == ')' ? '(' : '[')) {
      lx[i].match = stack.back();
      lx[stack.back()].match = i;
      stack.pop_back();
    }
  }
  for (auto& l : lx)
    if (l.bracket && l.match < 0) l.bracket = false;  // unbalanced: literal text
  // 3. Multipliers of the matched pairs (":number" suffixes removed from the text).
  std::vector<double> mult(lx.size(), 1.0);
  std::vector<bool> removed(lx.size(), false);
  for (long i = 0; i < static_cast<long>(lx.size()); ++i) {
    if (!lx[i].bracket || lx[i].match < i) continue;
    const long close = lx[i].match;
    double w = lx[i].c == '(' ? kRoundMultiplier : kSquareMultiplier;
    long start = 0;
    if (lx[i].c == '(' && weight_suffix(lx, i, close, w, start))
      for (long k = start; k < close; ++k) removed[k] = true;
    mult[i] = w;
  }
  // 4. Walk the text with the product of the open pairs' multipliers; merge runs of equal weight.
  std::vector<PromptChunk> out;
  std::vector<double> open;
  double weight = 1.0;
  for (long i = 0; i < static_cast<long>(lx.size()); ++i) {
    const Lexeme& l = lx[i];
    if (l.bracket) {
      if (l.match > i) {
        open.push_back(mult[i]);
      } else {
        open.pop_back();
      }
      weight = 1.0;
      for (double m : open) weight *= m;
      continue;
    }
    if (removed[i]) continue;
    if (out.empty() || out.back().weight != weight) out.push_back({"", weight});
    out.back().text += l.c;
  }
  if (out.empty()) out.push_back({"", 1.0});
  return out;
}

bool unweighted(const std::vector<PromptChunk>& chunks) {
  for (const auto& c : chunks)
    if (c.weight != 1.0) return false;
  return true;
}

std::string joined_text(const std::vector<PromptChunk>& chunks) {
  std::string s;
  for (const auto& c : chunks) s += c.text;
  return s;
}

WeightedTokens weighted_tokens(const ClipTokenizer& tokenizer, const std::vector<PromptChunk>& chunks) {
  std::vector<int64_t> ids;
  std::vector<float> w;
  for (const auto& c : chunks) {
    for (int64_t id : tokenizer.bpe_ids(c.text)) {
      ids.push_back(id);
      w.push_back(static_cast<float>(c.weight));
    }
  }
  const int64_t L = tokenizer.max_length();
  WeightedTokens t;
  const int64_t keep = std::min<int64_t>(static_cast<int64_t>(ids.size()), L - 2);
  t.dropped = static_cast<int64_t>(ids.size()) - keep;
  t.ids = torch::full({1, L}, tokenizer.pad_id(), torch::kInt64);
  t.weights = torch::ones({L}, torch::kFloat32);
  auto* p = t.ids.data_ptr<int64_t>();
  auto* q = t.weights.data_ptr<float>();
  p[0] = tokenizer.bos_id();
  for (int64_t i = 0; i < keep; ++i) {
    p[i + 1] = ids[static_cast<size_t>(i)];
    q[i + 1] = w[static_cast<size_t>(i)];
  }
  p[keep + 1] = tokenizer.eos_id();
  return t;
}

torch::Tensor apply_token_weights(const torch::Tensor& z, const torch::Tensor& weights) {
  if (z.dim() != 3 || weights.dim() != 1 || weights.size(0) != z.size(1))
    throw InvalidArgument("apply_token_weights: embeddings [1, T, D] and weights [T] expected");
  const torch::Tensor w = weights.to(z.device(), torch::kFloat32);
  if (w.eq(1).all().item<bool>()) return z;
  const torch::Tensor z32 = z.to(torch::kFloat32);
  const torch::Tensor original_mean = z32.mean();
  torch::Tensor weighted = z32 * w.view({1, -1, 1});
  const torch::Tensor new_mean = weighted.mean();
  weighted = weighted * (original_mean / new_mean);
  return weighted.to(z.scalar_type());
}

}  // namespace sd
