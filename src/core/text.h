#pragma once
// Small text helpers shared by the line parsers (control commands, prompt lists, option lists, key paths).
#include <string>
#include <vector>

namespace sd {

// `s` without leading and trailing spaces, tabs and line ends.
inline std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  const auto b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}
inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// `s` is one or more ASCII digits (no sign, no space: what a key index or a shard number is; std::isdigit would
// depend on the locale).
inline bool is_decimal(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

// `s` cut at every `sep`. keep_empty: every field keeps its position, a trailing separator included
// ("a;;b;" -> a, "", b, ""), for lists where an empty entry means something (one caption per image); otherwise
// empty fields are dropped ("a,,b," -> a, b). An empty `s` gives no fields either way.
inline std::vector<std::string> split(const std::string& s, char sep, bool keep_empty = false) {
  std::vector<std::string> out;
  if (s.empty()) return out;
  size_t from = 0;
  while (true) {
    const auto at = s.find(sep, from);
    std::string field = s.substr(from, at == std::string::npos ? std::string::npos : at - from);
    if (keep_empty || !field.empty()) out.push_back(std::move(field));
    if (at == std::string::npos) break;
    from = at + 1;
  }
  return out;
}

}  // namespace sd
