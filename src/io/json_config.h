#pragma once
// Typed reading of diffusers/transformers config.json files: every field has diffusers' default when absent, a
// field of the wrong type is a FormatError naming the file and the field, and unknown fields are only logged.
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace sd {

nlohmann::json read_json_file(const std::string& path);  // FormatError if missing, unreadable or not JSON
// The JSON text of a file read by read_json_file (the fuzz targets call this): FormatError naming `path` if not JSON.
nlohmann::json parse_json_text(const std::string& text, const std::string& path);

class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& j, std::string file);

  bool has(const std::string& key) const;  // present and not null
  int get_int(const std::string& key, int def);
  int64_t get_int64(const std::string& key, int64_t def);
  double get_double(const std::string& key, double def);
  bool get_bool(const std::string& key, bool def);
  std::string get_string(const std::string& key, const std::string& def);
  std::optional<std::string> get_optional_string(const std::string& key);
  std::vector<int> get_int_list(const std::string& key, const std::vector<int>& def);
  std::vector<std::string> get_string_list(const std::string& key, const std::vector<std::string>& def);
  // An int or a list of ints (diffusers' attention_head_dim); an int is broadcast to `n` entries.
  std::vector<int> get_int_or_list(const std::string& key, int def, size_t n);
  // Marks a field as known without reading it (so it is not reported as unknown).
  void ignore(const std::string& key);
  // A field that must be absent/null/one of the accepted values, else "not supported" error.
  void require_unsupported_absent(const std::string& key);

  // Logs (debug) every field that no getter asked for. Call once after reading.
  void log_unknown() const;
  const std::string& file() const { return file_; }
  [[noreturn]] void fail(const std::string& key, const std::string& expected) const;
  // fail()s unless 0 < value <= max: `value` is what was read for `key` (bounds of sizes that allocate memory).
  void check_positive(const std::string& key, int64_t value, int64_t max) const;

 private:
  const nlohmann::json* find(const std::string& key);
  const nlohmann::json& j_;
  std::string file_;
  std::set<std::string> seen_;
};

}  // namespace sd
