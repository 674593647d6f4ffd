#include "tokenizer/unicode_text.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace sd::text {
namespace {

struct LowerRun {
  uint32_t first;
  uint32_t last;
  uint32_t stride;
  int32_t delta;
};
struct CodeRange {
  uint32_t first;
  uint32_t last;
};
struct NamedEntity {
  const char* name;
  const char* value;  // UTF-8
};
struct CharRefFix {
  uint32_t number;
  uint32_t replacement;
};

#include "tokenizer/unicode_tables.inc"

constexpr char32_t kReplacement = 0xFFFD;

template <size_t N>
bool in_ranges(const CodeRange (&table)[N], char32_t c) {
  // Last range whose first <= c.
  const auto* it = std::upper_bound(std::begin(table), std::end(table), static_cast<uint32_t>(c),
                                    [](uint32_t v, const CodeRange& r) { return v < r.first; });
  if (it == std::begin(table)) return false;
  --it;
  return c <= it->last;
}

char32_t lower_simple(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  const auto* it = std::upper_bound(std::begin(kLowerRuns), std::end(kLowerRuns), static_cast<uint32_t>(c),
                                    [](uint32_t v, const LowerRun& r) { return v < r.first; });
  if (it == std::begin(kLowerRuns)) return c;
  --it;
  if (c > it->last || (c - it->first) % it->stride != 0) return c;
  return static_cast<char32_t>(static_cast<int64_t>(c) + it->delta);
}

bool is_case_ignorable(char32_t c) { return in_ranges(kCaseIgnorable, c); }
bool is_cased_not_ignorable(char32_t c) { return in_ranges(kCasedNotIgnorable, c); }

// CPython's handle_capital_sigma: U+03A3 at i is final when preceded by a cased letter (case-ignorable characters
// skipped) and not followed by one (likewise skipped).
char32_t lower_capital_sigma(const std::u32string& s, size_t i) {
  size_t j = i;
  bool final_sigma = false;
  while (j > 0) {
    --j;
    if (!is_case_ignorable(s[j])) {
      final_sigma = is_cased_not_ignorable(s[j]);
      break;
    }
  }
  if (final_sigma) {
    for (size_t k = i + 1; k < s.size(); ++k) {
      if (!is_case_ignorable(s[k])) {
        final_sigma = !is_cased_not_ignorable(s[k]);
        break;
      }
    }
  }
  return final_sigma ? 0x3C2 : 0x3C3;
}

const char* find_entity(const std::string& name) {
  const auto* it =
      std::lower_bound(std::begin(kHtml5Entities), std::end(kHtml5Entities), name,
                       [](const NamedEntity& e, const std::string& n) { return std::strcmp(e.name, n.c_str()) < 0; });
  if (it != std::end(kHtml5Entities) && name == it->name) return it->value;
  return nullptr;
}

bool is_ascii_digit(char32_t c) { return c >= '0' && c <= '9'; }
int hex_value(char32_t c) {
  if (c >= '0' && c <= '9') return static_cast<int>(c - '0');
  if (c >= 'a' && c <= 'f') return static_cast<int>(c - 'a' + 10);
  if (c >= 'A' && c <= 'F') return static_cast<int>(c - 'A' + 10);
  return -1;
}

// Characters that end a named reference: [^\t\n\f <&#;] in html's _charref pattern.
bool ends_entity_name(char32_t c) {
  return c == '\t' || c == '\n' || c == '\f' || c == ' ' || c == '<' || c == '&' || c == '#' || c == ';';
}

void append_numeric_reference(std::u32string& out, uint32_t num) {
  const auto* fix = std::lower_bound(std::begin(kInvalidCharRefs), std::end(kInvalidCharRefs), num,
                                     [](const CharRefFix& f, uint32_t v) { return f.number < v; });
  if (fix != std::end(kInvalidCharRefs) && fix->number == num) {
    out.push_back(fix->replacement);
    return;
  }
  if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) {
    out.push_back(kReplacement);
    return;
  }
  if (in_ranges(kInvalidCodepoints, num)) return;
  out.push_back(num);
}

}  // namespace

std::u32string decode_utf8_lossy(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char b = p[i];
    if (b < 0x80) {
      out.push_back(b);
      ++i;
      continue;
    }
    // Sequence length and the allowed range of the SECOND byte (Unicode Table 3-7, well-formed UTF-8).
    int len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
      len = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      len = 3;
      if (b == 0xE0) lo = 0xA0;
      if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
      len = 4;
      if (b == 0xF0) lo = 0x90;
      if (b == 0xF4) hi = 0x8F;
    } else {  // 80..C1, F5..FF: never a valid start byte
      out.push_back(kReplacement);
      ++i;
      continue;
    }
    char32_t cp = b & (0x7F >> len);
    int k = 1;
    for (; k < len; ++k) {
      if (i + k >= n) break;
      const unsigned char c = p[i + k];
      const bool ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
      if (!ok) break;
      cp = (cp << 6) | (c & 0x3F);
    }
    if (k == len) {
      out.push_back(cp);
    } else {
      // The maximal valid prefix (start byte + k-1 continuation bytes) becomes one U+FFFD, as in CPython.
      out.push_back(kReplacement);
    }
    i += static_cast<size_t>(k);
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  if ((cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) cp = kReplacement;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string encode_utf8(const std::u32string& s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

bool is_regex_space(char32_t c) {
  switch (c) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

bool is_python_space(char32_t c) { return is_regex_space(c) || (c >= 0x1C && c <= 0x1F); }

std::u32string python_strip(const std::u32string& s) {
  size_t b = 0, e = s.size();
  while (b < e && is_python_space(s[b])) ++b;
  while (e > b && is_python_space(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::u32string html_unescape(const std::u32string& s) {
  if (s.find(U'&') == std::u32string::npos) return s;
  std::u32string out;
  out.reserve(s.size());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    if (s[i] != U'&') {
      out.push_back(s[i++]);
      continue;
    }
    const size_t j = i + 1;
    if (j < n && s[j] == U'#') {
      // &#[0-9]+;?  |  &#[xX][0-9a-fA-F]+;?
      size_t k = j + 1;
      uint32_t num = 0;
      bool matched = false;
      auto accumulate = [&num](uint32_t base, uint32_t digit) {
        num = num > 0x10FFFF ? 0x110000 : std::min<uint32_t>(num * base + digit, 0x110000);
      };
      if (k < n && is_ascii_digit(s[k])) {
        matched = true;
        for (; k < n && is_ascii_digit(s[k]); ++k) accumulate(10, static_cast<uint32_t>(s[k] - U'0'));
      } else if (k + 1 < n && (s[k] == U'x' || s[k] == U'X') && hex_value(s[k + 1]) >= 0) {
        matched = true;
        for (++k; k < n && hex_value(s[k]) >= 0; ++k) accumulate(16, static_cast<uint32_t>(hex_value(s[k])));
      }
      if (!matched) {  // '#' cannot start a named reference either
        out.push_back(s[i++]);
        continue;
      }
      if (k < n && s[k] == U';') ++k;
      append_numeric_reference(out, num);
      i = k;
      continue;
    }
    // Named: [^\t\n\f <&#;]{1,32};?
    size_t e = j;
    while (e < n && e - j < 32 && !ends_entity_name(s[e])) ++e;
    if (e == j) {
      out.push_back(s[i++]);
      continue;
    }
    size_t end = e;
    if (end < n && s[end] == U';') ++end;
    const std::u32string name = s.substr(j, end - j);
    // Entity names are ASCII: the longest ASCII prefix is all that can match.
    std::string ascii;
    for (char32_t c : name) {
      if (c >= 0x80) break;
      ascii.push_back(static_cast<char>(c));
    }
    const char* value = nullptr;
    size_t used = 0;
    if (ascii.size() == name.size()) {
      value = find_entity(ascii);
      used = name.size();
    }
    // Else the longest prefix of at least 2 characters (only the legacy names without ';' can match here).
    for (size_t x = std::min(name.size() - 1, ascii.size()); !value && x >= 2; --x) {
      value = find_entity(ascii.substr(0, x));
      used = x;
    }
    if (value) {
      const std::u32string v = decode_utf8_lossy(value);
      out += v;
      out.append(name, used, std::u32string::npos);
    } else {
      out.push_back(U'&');
      out += name;
    }
    i = end;
  }
  return out;
}

std::u32string python_lower(const std::u32string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const char32_t c = s[i];
    if (c == 0x130) {
      out.push_back(U'i');
      out.push_back(0x307);
    } else if (c == 0x3A3) {
      out.push_back(lower_capital_sigma(s, i));
    } else {
      out.push_back(lower_simple(c));
    }
  }
  return out;
}

std::string clip_normalize(const std::string& utf8_text) {
  std::u32string t = decode_utf8_lossy(utf8_text);
  t = python_strip(html_unescape(html_unescape(t)));
  // whitespace_clean: every run of \s becomes one space, then strip().
  std::u32string collapsed;
  collapsed.reserve(t.size());
  for (size_t i = 0; i < t.size();) {
    if (is_regex_space(t[i])) {
      collapsed.push_back(U' ');
      while (i < t.size() && is_regex_space(t[i])) ++i;
    } else {
      collapsed.push_back(t[i++]);
    }
  }
  return encode_utf8(python_lower(python_strip(collapsed)));
}

}  // namespace sd::text
