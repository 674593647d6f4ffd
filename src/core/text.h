#pragma once
// Small text helpers shared by the line parsers (control commands, prompt lists).
#include <string>

namespace sd {

// `s` without leading and trailing spaces, tabs and line ends.
inline std::string trim(const std::string& s) {
  const char* ws = " \t\r\n";
  const auto b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

}  // namespace sd
