#include "tokenizer/clip_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <climits>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <unordered_map>

#include "core/error.h"
#include "core/log.h"
#include "io/json_config.h"
#include "tokenizer/unicode_text.h"

namespace fs = std::filesystem;

namespace sd {
namespace {

constexpr const char* kStartOfText = "<|startoftext|>";
constexpr const char* kEndOfText = "<|endoftext|>";
// openai/CLIP and transformers' CLIPTokenizer read merges[1 : 49152 - 256 - 2 + 1]: at most 48894 merges.
constexpr size_t kMaxMerges = 49152 - 256 - 2;
// Largest model_max_length accepted (the text encoder's position table is 77 for every SD model).
constexpr int64_t kMaxModelLength = 65536;
// The word cache is cleared when it grows past this many entries (prompts reuse few words; this bounds memory
// when arbitrary text is streamed through).
constexpr size_t kMaxCacheEntries = 1 << 16;

// openai/CLIP's pre-tokeniser: <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
// [^\s\p{L}\p{N}]+ with IGNORECASE, for the `regex` module. Two spellings differ for PCRE2 so that both engines
// split identically:
//  * \s is written out as the White_Space set the `regex` module uses (PCRE2 10.42's UCP \s also matches U+180E);
//  * U+0345 (COMBINING GREEK YPOGEGRAMMENI, Mn) is excluded from the last class: under IGNORECASE `regex` tests a
//    negated class against the character's case variants too, and U+0345's uppercase U+0399 is a letter, so
//    `regex` never matches U+0345 (it is dropped). PCRE2 does not case-fold \p{..} items. (Caseless, the literal
//    \x{345} also excludes its case variants U+0399 / U+03B9 / U+1FBE, which are letters anyway.)
// IGNORECASE still matters for the literals: "'ſ" (U+017F) matches 's in both engines.
constexpr const char* kPattern =
    "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|"
    "[^\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}"
    "\\x{3000}\\p{L}\\p{N}\\x{345}]+";

struct MergeInfo {
  int32_t rank;
  int32_t merged;
};

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// GPT-2 / CLIP bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100.. in
// byte order, so every byte has a visible, non-space character.
std::array<char32_t, 256> bytes_to_unicode() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    table[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path, "cannot open file");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string shorten(std::string s) {
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

struct PcreCodeDeleter {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct PcreMatchDeleter {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};

// A special token field of tokenizer_config.json / special_tokens_map.json: a string or an AddedToken object.
struct TokenSetting {
  std::string content;
  std::string source;  // the file that set it ("" = transformers' default)
};

void read_token_field(const nlohmann::json& j, const std::string& file, const char* key, TokenSetting& out) {
  auto it = j.find(key);
  if (it == j.end()) return;
  const auto& v = *it;
  if (v.is_string()) {
    out = {v.get<std::string>(), file};
  } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    out = {v["content"].get<std::string>(), file};
  } else if (v.is_null()) {
    throw FormatError(file, std::string("field '") + key + "' is null: the CLIP tokenizer needs a " + key +
                                " (padding to model_max_length uses it)");
  } else {
    throw FormatError(file, std::string("field '") + key +
                                "': expected a string or an object with a string 'content', found " +
                                shorten(v.dump()));
  }
}

}  // namespace

struct ClipTokenizer::Core {
  std::string dir;
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> decoder;  // id -> token ("" for ids not in the vocabulary)
  size_t vocab_entries = 0;
  std::array<int32_t, 256> byte_id{};      // id of the byte's symbol
  std::array<int32_t, 256> byte_end_id{};  // id of the byte's symbol + "</w>"
  std::unordered_map<uint64_t, MergeInfo> merges;
  int32_t sot_id = 0, eot_id = 0;  // the literal <|startoftext|> / <|endoftext|> pieces
  int64_t bos = 0, eos = 0, pad = 0;
  std::string pad_token;
  int max_length = 77;
  std::unique_ptr<pcre2_code, PcreCodeDeleter> regex;

  mutable std::shared_mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  template <class F>
  void for_each_piece(const std::string& text, F&& f) const;
  void bpe_piece(const std::string& piece, std::vector<int64_t>& out) const;
  std::vector<int32_t> bpe_uncached(const std::string& piece) const;
  std::vector<int64_t> ids(const std::string& text) const;
};

template <class F>
void ClipTokenizer::Core::for_each_piece(const std::string& text, F&& f) const {
  if (text.empty()) return;
  std::unique_ptr<pcre2_match_data, PcreMatchDeleter> md(pcre2_match_data_create_from_pattern(regex.get(), nullptr));
  if (!md) throw std::bad_alloc();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  PCRE2_SIZE offset = 0;
  uint32_t options = 0;  // the first match validates the whole subject as UTF-8; later ones skip the check
  while (offset < text.size()) {
    const int rc = pcre2_match(regex.get(), subject, text.size(), offset, options, md.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(rc, msg, sizeof(msg));
      throw InvalidArgument(std::string("CLIP pre-tokeniser: ") + reinterpret_cast<const char*>(msg) +
                            " (the text must be valid UTF-8: use ClipTokenizer::normalize first)");
    }
    options = PCRE2_NO_UTF_CHECK;
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
    f(text.substr(ov[0], ov[1] - ov[0]));
    // Every alternative consumes at least one character, so ov[1] > ov[0] >= offset.
    offset = ov[1];
  }
}

std::vector<int32_t> ClipTokenizer::Core::bpe_uncached(const std::string& piece) const {
  std::vector<int32_t> word;
  word.reserve(piece.size());
  for (size_t i = 0; i < piece.size(); ++i) {
    const auto b = static_cast<unsigned char>(piece[i]);
    word.push_back(i + 1 == piece.size() ? byte_end_id[b] : byte_id[b]);
  }
  std::vector<int32_t> next;
  next.reserve(word.size());
  while (word.size() > 1) {
    // The adjacent pair with the lowest merge rank...
    int32_t best_rank = INT32_MAX;
    MergeInfo best{};
    int32_t first = -1, second = -1;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      auto it = merges.find(pair_key(word[i], word[i + 1]));
      if (it != merges.end() && it->second.rank < best_rank) {
        best_rank = it->second.rank;
        best = it->second;
        first = word[i];
        second = word[i + 1];
      }
    }
    if (first < 0) break;
    // ...is merged at every (non-overlapping, left to right) occurrence.
    next.clear();
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == first && word[i + 1] == second) {
        next.push_back(best.merged);
        i += 2;
      } else {
        next.push_back(word[i]);
        ++i;
      }
    }
    word.swap(next);
  }
  return word;
}

void ClipTokenizer::Core::bpe_piece(const std::string& piece, std::vector<int64_t>& out) const {
  // openai/CLIP seeds its BPE cache with the two special strings: they map to their own ids.
  if (piece == kStartOfText) {
    out.push_back(sot_id);
    return;
  }
  if (piece == kEndOfText) {
    out.push_back(eot_id);
    return;
  }
  {
    std::shared_lock<std::shared_mutex> lock(cache_mutex);
    auto it = cache.find(piece);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> word = bpe_uncached(piece);
  out.insert(out.end(), word.begin(), word.end());
  std::unique_lock<std::shared_mutex> lock(cache_mutex);
  if (cache.size() >= kMaxCacheEntries) cache.clear();
  cache.emplace(piece, std::move(word));
}

std::vector<int64_t> ClipTokenizer::Core::ids(const std::string& text) const {
  std::vector<int64_t> out;
  for_each_piece(text::clip_normalize(text), [&](const std::string& piece) { bpe_piece(piece, out); });
  return out;
}

ClipTokenizer ClipTokenizer::from_folder(const std::string& tokenizer_dir, const std::string& pad_override) {
  if (!fs::is_directory(tokenizer_dir))
    throw FormatError(tokenizer_dir,
                      "not a directory (expected a CLIP tokenizer folder with vocab.json and merges.txt)");
  auto core = std::make_shared<Core>();
  core->dir = tokenizer_dir;
  const std::string vocab_path = (fs::path(tokenizer_dir) / "vocab.json").string();
  const std::string merges_path = (fs::path(tokenizer_dir) / "merges.txt").string();
  const std::string config_path = (fs::path(tokenizer_dir) / "tokenizer_config.json").string();
  const std::string special_path = (fs::path(tokenizer_dir) / "special_tokens_map.json").string();

  // vocab.json: {"token": id, ...}
  {
    const nlohmann::json j = read_json_file(vocab_path);
    if (!j.is_object())
      throw FormatError(vocab_path,
                        "expected a JSON object mapping tokens to ids, found a " + std::string(j.type_name()));
    if (j.empty()) throw FormatError(vocab_path, "the vocabulary is empty");
    core->vocab.reserve(j.size());
    int64_t max_id = -1;
    for (auto it = j.begin(); it != j.end(); ++it) {
      const auto& v = it.value();
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
        throw FormatError(vocab_path, "token '" + shorten(it.key()) + "': expected a non-negative integer id, found " +
                                          shorten(v.dump()));
      core->vocab[it.key()] = static_cast<int32_t>(v.get<int64_t>());
      max_id = std::max<int64_t>(max_id, v.get<int64_t>());
    }
    if (max_id >= (int64_t{1} << 24))
      throw FormatError(vocab_path, "id " + std::to_string(max_id) + " is implausibly large for a CLIP vocabulary");
    core->decoder.assign(static_cast<size_t>(max_id + 1), std::string());
    std::vector<bool> used(static_cast<size_t>(max_id + 1), false);
    for (const auto& [tok, id] : core->vocab) {
      if (used[static_cast<size_t>(id)])
        throw FormatError(vocab_path, "id " + std::to_string(id) + " is used by both '" + shorten(core->decoder[id]) +
                                          "' and '" + shorten(tok) + "'");
      used[static_cast<size_t>(id)] = true;
      core->decoder[static_cast<size_t>(id)] = tok;
    }
    core->vocab_entries = core->vocab.size();
    const auto byte_chars = bytes_to_unicode();
    for (int b = 0; b < 256; ++b) {
      std::string sym;
      text::append_utf8(sym, byte_chars[b]);
      auto a = core->vocab.find(sym);
      auto e = core->vocab.find(sym + "</w>");
      if (a == core->vocab.end() || e == core->vocab.end()) {
        char hex[8];
        std::snprintf(hex, sizeof(hex), "0x%02X", b);
        throw FormatError(vocab_path, "missing the byte-level symbol '" +
                                          (a == core->vocab.end() ? sym : sym + "</w>") + "' (byte " + hex +
                                          "): not a CLIP byte-level BPE vocabulary");
      }
      core->byte_id[b] = a->second;
      core->byte_end_id[b] = e->second;
    }
    for (const char* special : {kStartOfText, kEndOfText}) {
      if (!core->vocab.count(special))
        throw FormatError(vocab_path, std::string("missing the special token '") + special + "'");
    }
    core->sot_id = core->vocab.at(kStartOfText);
    core->eot_id = core->vocab.at(kEndOfText);
  }

  // merges.txt: "#version: ..." header, then one "left right" pair per line in rank order.
  {
    const std::string content = read_text_file(merges_path);
    std::vector<std::string> lines;
    size_t start = 0;
    while (start <= content.size()) {
      size_t end = content.find('\n', start);
      if (end == std::string::npos) end = content.size();
      std::string line = content.substr(start, end - start);
      if (!line.empty() && line.back() == '\r') line.pop_back();
      lines.push_back(std::move(line));
      start = end + 1;
    }
    while (!lines.empty() && lines.back().empty()) lines.pop_back();
    size_t first = 0;
    if (!lines.empty() && lines[0].rfind("#version", 0) == 0) first = 1;
    const size_t available = lines.size() - first;
    if (available == 0) throw FormatError(merges_path, "no merges");
    if (available > kMaxMerges)
      log::debug("{}: {} merges; CLIP uses the first {} (as openai/CLIP and transformers do)", merges_path, available,
                 kMaxMerges);
    const size_t count = std::min(available, kMaxMerges);
    core->merges.reserve(count * 2);
    for (size_t r = 0; r < count; ++r) {
      const std::string& line = lines[first + r];
      const size_t line_no = first + r + 1;
      const size_t sp = line.find(' ');
      if (line.empty() || sp == std::string::npos || sp == 0 || sp + 1 == line.size() ||
          line.find(' ', sp + 1) != std::string::npos)
        throw FormatError(merges_path, "line " + std::to_string(line_no) +
                                           ": expected two symbols separated by one space, found '" + shorten(line) +
                                           "'");
      const std::string left = line.substr(0, sp), right = line.substr(sp + 1);
      auto l = core->vocab.find(left), rr = core->vocab.find(right);
      // A merge whose parts are not in the vocabulary can never apply (every symbol of a word is in it).
      if (l == core->vocab.end() || rr == core->vocab.end()) continue;
      auto m = core->vocab.find(left + right);
      if (m == core->vocab.end())
        throw FormatError(merges_path, "line " + std::to_string(line_no) + ": the merged symbol '" +
                                           shorten(left + right) + "' is not in vocab.json");
      // Later duplicates win, like dict(zip(merges, range(len(merges)))).
      core->merges[pair_key(l->second, rr->second)] = MergeInfo{static_cast<int32_t>(r), m->second};
    }
  }

  // Special tokens and length: tokenizer_config.json, then special_tokens_map.json (which transformers lets win).
  TokenSetting bos{kStartOfText, ""}, eos{kEndOfText, ""}, pad{kEndOfText, ""};
  int64_t max_length = 77;
  if (fs::exists(config_path)) {
    const nlohmann::json j = read_json_file(config_path);
    if (!j.is_object()) throw FormatError(config_path, "expected a JSON object");
    if (auto it = j.find("tokenizer_class"); it != j.end() && !it->is_null()) {
      if (!it->is_string()) throw FormatError(config_path, "field 'tokenizer_class': expected a string");
      const std::string cls = it->get<std::string>();
      if (cls.rfind("CLIPTokenizer", 0) != 0)
        throw FormatError(config_path,
                          "tokenizer_class '" + cls + "' is not supported: expected CLIPTokenizer (SD 1.x / 2.x)");
    }
    if (auto it = j.find("model_max_length"); it != j.end() && !it->is_null()) {
      if (!it->is_number_integer() || it->get<int64_t>() < 2 || it->get<int64_t>() > kMaxModelLength)
        throw FormatError(config_path, "field 'model_max_length': expected an integer in [2, " +
                                           std::to_string(kMaxModelLength) +
                                           "] (the text encoder's position count, 77 for Stable Diffusion), found " +
                                           shorten(it->dump()));
      max_length = it->get<int64_t>();
    }
    read_token_field(j, config_path, "bos_token", bos);
    read_token_field(j, config_path, "eos_token", eos);
    read_token_field(j, config_path, "pad_token", pad);
  }
  if (fs::exists(special_path)) {
    const nlohmann::json j = read_json_file(special_path);
    if (!j.is_object()) throw FormatError(special_path, "expected a JSON object");
    read_token_field(j, special_path, "bos_token", bos);
    read_token_field(j, special_path, "eos_token", eos);
    read_token_field(j, special_path, "pad_token", pad);
  }
  if (!pad_override.empty()) pad = TokenSetting{pad_override, ""};
  auto token_id = [&](const TokenSetting& t, const char* what) -> int64_t {
    auto it = core->vocab.find(t.content);
    if (it == core->vocab.end())
      throw FormatError(t.source.empty() ? vocab_path : t.source,
                        std::string(what) + " '" + shorten(t.content) + "' is not in " + vocab_path +
                            (t.source.empty() ? " (transformers' default for CLIPTokenizer)" : ""));
    return it->second;
  };
  core->bos = token_id(bos, "bos_token");
  core->eos = token_id(eos, "eos_token");
  core->pad = token_id(pad, "pad_token");
  core->pad_token = pad.content;
  core->max_length = static_cast<int>(max_length);

  int err = 0;
  PCRE2_SIZE err_offset = 0;
  core->regex.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED,
                                  PCRE2_UTF | PCRE2_UCP | PCRE2_CASELESS, &err, &err_offset, nullptr));
  if (!core->regex) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    throw Error(std::string("CLIP pre-tokeniser pattern does not compile: ") + reinterpret_cast<const char*>(msg));
  }
  // JIT is an optimisation only; the interpreter gives the same matches.
  if (pcre2_jit_compile(core->regex.get(), PCRE2_JIT_COMPLETE) != 0)
    log::debug("PCRE2 JIT not available; the CLIP pre-tokeniser uses the interpreter");
  return ClipTokenizer(std::move(core));
}

std::vector<int64_t> ClipTokenizer::bpe_ids(const std::string& text) const { return core_->ids(text); }

std::vector<int64_t> ClipTokenizer::encode(const std::string& text) const {
  const std::vector<int64_t> bpe = core_->ids(text);
  const size_t max_len = static_cast<size_t>(core_->max_length);
  const size_t keep = std::min(bpe.size(), max_len - 2);
  std::vector<int64_t> out;
  out.reserve(max_len);
  out.push_back(core_->bos);
  out.insert(out.end(), bpe.begin(), bpe.begin() + static_cast<std::ptrdiff_t>(keep));
  out.push_back(core_->eos);
  out.resize(max_len, core_->pad);
  return out;
}

std::vector<std::string> ClipTokenizer::bpe_tokens(const std::string& text) const {
  std::vector<std::string> out;
  for (int64_t id : core_->ids(text)) out.push_back(core_->decoder[static_cast<size_t>(id)]);
  return out;
}

torch::Tensor ClipTokenizer::encode_batch(const std::vector<std::string>& texts) const {
  const int64_t n = static_cast<int64_t>(texts.size());
  auto t = torch::empty({n, core_->max_length}, torch::kInt64);
  auto* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const auto ids = encode(texts[static_cast<size_t>(i)]);
    std::copy(ids.begin(), ids.end(), p + i * core_->max_length);
  }
  return t;
}

size_t ClipTokenizer::untruncated_length(const std::string& text) const { return core_->ids(text).size() + 2; }
bool ClipTokenizer::truncated(const std::string& text) const {
  return untruncated_length(text) > static_cast<size_t>(core_->max_length);
}

int64_t ClipTokenizer::bos_id() const { return core_->bos; }
int64_t ClipTokenizer::eos_id() const { return core_->eos; }
int64_t ClipTokenizer::pad_id() const { return core_->pad; }
int ClipTokenizer::max_length() const { return core_->max_length; }
size_t ClipTokenizer::vocab_size() const { return core_->vocab_entries; }
const std::string& ClipTokenizer::pad_token() const { return core_->pad_token; }
const std::string& ClipTokenizer::dir() const { return core_->dir; }

const std::string& ClipTokenizer::id_to_token(int64_t id) const {
  static const std::string empty;
  if (id < 0 || static_cast<size_t>(id) >= core_->decoder.size()) return empty;
  return core_->decoder[static_cast<size_t>(id)];
}

std::string ClipTokenizer::normalize(const std::string& text) { return text::clip_normalize(text); }

std::vector<std::string> ClipTokenizer::pre_tokenize(const std::string& normalized) const {
  std::vector<std::string> out;
  core_->for_each_piece(normalized, [&](const std::string& piece) { out.push_back(piece); });
  return out;
}

}  // namespace sd
