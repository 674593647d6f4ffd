#pragma once
// Limits on JSON that comes from outside (client messages, API bodies, prompt lists, model config files).
// nlohmann's parser is iterative, but dump(), copies and comparisons of the parsed value recurse once per nesting
// level: 200 KB of '[' parse fine and then overflow the stack (SIGSEGV, no exception) on the first error message
// that quotes the value. So text nested deeper than kMaxJsonDepth is refused before it is parsed, and an error
// quotes at most an excerpt of a value.
#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace sd {

// Far above any real config or message (a diffusers config.json nests 2 levels, a client message 4).
constexpr int kMaxJsonDepth = 64;

// The deepest nesting of arrays and objects in `text`, strings skipped; counting stops past `limit` (returns
// limit + 1). Malformed text gets a number too: the parser reports what is wrong with it.
inline int json_nesting_depth(std::string_view text, int limit = kMaxJsonDepth) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
      if (deepest > limit) return limit + 1;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

// "" when `text` nests at most kMaxJsonDepth levels, else the reason to give.
inline std::string json_depth_problem(std::string_view text) {
  if (json_nesting_depth(text) <= kMaxJsonDepth) return "";
  return "arrays / objects nested more than " + std::to_string(kMaxJsonDepth) + " levels deep";
}

// A value as an error message quotes it: its JSON text, cut to `max_chars` ("..." marks the cut).
inline std::string json_excerpt(const nlohmann::json& v, size_t max_chars = 120) {
  std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (s.size() > max_chars) s = s.substr(0, max_chars > 3 ? max_chars - 3 : 0) + "...";
  return s;
}

}  // namespace sd
