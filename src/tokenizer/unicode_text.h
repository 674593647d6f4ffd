#pragma once
// The text side of the CLIP tokenizer: UTF-8 <-> code points and the prompt normalisation of openai/CLIP's
// SimpleTokenizer, reproduced the way CPython computes it:
//   text = whitespace_clean(basic_clean(text)).lower()
//   basic_clean(t)      = html.unescape(html.unescape(t)).strip()      (ftfy.fix_text is treated as the identity)
//   whitespace_clean(t) = regex.sub(r"\s+", " ", t).strip()
// The Unicode data (str.lower(), Case_Ignorable / Cased for the Final_Sigma rule, the HTML5 entity list) is
// generated from CPython by gen_unicode_tables.py into unicode_tables.inc; see that script for the version used.
#include <string>

namespace sd::text {

// UTF-8 -> code points. Invalid input never throws: each maximal invalid subsequence becomes one U+FFFD, exactly
// like Python's bytes.decode("utf-8", errors="replace") (overlong forms, surrogates D800-DFFF, code points above
// 10FFFF, stray continuation bytes and truncated sequences are all invalid).
std::u32string decode_utf8_lossy(const std::string& s);
// Code points -> UTF-8. Surrogates and values above 10FFFF are written as U+FFFD (they never come out of
// decode_utf8_lossy / the normaliser).
std::string encode_utf8(const std::u32string& s);
void append_utf8(std::string& out, char32_t cp);

// Python's str.isspace() (what str.strip() removes): White_Space plus U+001C..U+001F.
bool is_python_space(char32_t c);
// The `regex` module's \s for str patterns: the Unicode White_Space property (U+001C..U+001F excluded).
bool is_regex_space(char32_t c);

// Python's html.unescape (Python 3.11 semantics): named references from the full HTML5 list (with and without the
// trailing ';' as the list allows, longest-prefix match for names without ';'), decimal and hex numeric references
// with or without ';', HTML5 replacements for numeric references (&#128; -> U+20AC, &#0; / surrogates / > 10FFFF
// -> U+FFFD, noncharacters and most C0/C1 controls -> removed). One difference: Python refuses decimal references
// longer than 4300 digits (int() limit, ValueError); here they are simply out of range -> U+FFFD.
std::u32string html_unescape(const std::u32string& s);

// Python's str.lower(): full lowercase mapping (U+0130 -> "i\u0307") including the Final_Sigma rule for U+03A3.
std::u32string python_lower(const std::u32string& s);

// str.strip() with no argument.
std::u32string python_strip(const std::u32string& s);

// The whole CLIP normalisation above; returns valid UTF-8.
std::string clip_normalize(const std::string& utf8_text);

}  // namespace sd::text
