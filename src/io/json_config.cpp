#include "io/json_config.h"

#include <fstream>
#include <sstream>

#include "core/log.h"

namespace sd {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path, "cannot open file");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::parse_error& e) {
    throw FormatError(path, std::string("not valid JSON: ") + e.what());
  }
}

ConfigReader::ConfigReader(const nlohmann::json& j, std::string file) : j_(j), file_(std::move(file)) {
  if (!j_.is_object()) throw FormatError(file_, "expected a JSON object at top level");
}

void ConfigReader::fail(const std::string& key, const std::string& expected) const {
  const auto it = j_.find(key);
  std::string found = it == j_.end() ? "nothing" : it->dump();
  if (found.size() > 80) found = found.substr(0, 77) + "...";
  throw FormatError(file_, "field '" + key + "': expected " + expected + ", found " + found);
}

const nlohmann::json* ConfigReader::find(const std::string& key) {
  seen_.insert(key);
  auto it = j_.find(key);
  if (it == j_.end() || it->is_null()) return nullptr;
  return &*it;
}

bool ConfigReader::has(const std::string& key) const {
  auto it = j_.find(key);
  return it != j_.end() && !it->is_null();
}

int64_t ConfigReader::get_int64(const std::string& key, int64_t def) {
  const auto* v = find(key);
  if (!v) return def;
  if (v->is_number_integer()) return v->get<int64_t>();
  // 1.0 written for an integer field is accepted; 1.5 is not.
  if (v->is_number_float()) {
    double d = v->get<double>();
    if (d == static_cast<double>(static_cast<int64_t>(d))) return static_cast<int64_t>(d);
  }
  fail(key, "an integer");
}

int ConfigReader::get_int(const std::string& key, int def) { return static_cast<int>(get_int64(key, def)); }

double ConfigReader::get_double(const std::string& key, double def) {
  const auto* v = find(key);
  if (!v) return def;
  if (v->is_number()) return v->get<double>();
  fail(key, "a number");
}

bool ConfigReader::get_bool(const std::string& key, bool def) {
  const auto* v = find(key);
  if (!v) return def;
  if (v->is_boolean()) return v->get<bool>();
  fail(key, "true or false");
}

std::string ConfigReader::get_string(const std::string& key, const std::string& def) {
  const auto* v = find(key);
  if (!v) return def;
  if (v->is_string()) return v->get<std::string>();
  fail(key, "a string");
}

std::optional<std::string> ConfigReader::get_optional_string(const std::string& key) {
  const auto* v = find(key);
  if (!v) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  fail(key, "a string or null");
}

std::vector<int> ConfigReader::get_int_list(const std::string& key, const std::vector<int>& def) {
  const auto* v = find(key);
  if (!v) return def;
  if (!v->is_array()) fail(key, "a list of integers");
  std::vector<int> out;
  for (const auto& e : *v) {
    if (!e.is_number_integer()) fail(key, "a list of integers");
    out.push_back(e.get<int>());
  }
  return out;
}

std::vector<std::string> ConfigReader::get_string_list(const std::string& key, const std::vector<std::string>& def) {
  const auto* v = find(key);
  if (!v) return def;
  if (!v->is_array()) fail(key, "a list of strings");
  std::vector<std::string> out;
  for (const auto& e : *v) {
    if (!e.is_string()) fail(key, "a list of strings");
    out.push_back(e.get<std::string>());
  }
  return out;
}

std::vector<int> ConfigReader::get_int_or_list(const std::string& key, int def, size_t n) {
  const auto* v = find(key);
  if (!v) return std::vector<int>(n, def);
  if (v->is_number_integer()) return std::vector<int>(n, v->get<int>());
  if (v->is_array()) {
    std::vector<int> out;
    for (const auto& e : *v) {
      if (!e.is_number_integer()) fail(key, "an integer or a list of integers");
      out.push_back(e.get<int>());
    }
    if (out.size() != n) fail(key, "an integer or a list of " + std::to_string(n) + " integers");
    return out;
  }
  fail(key, "an integer or a list of integers");
}

void ConfigReader::ignore(const std::string& key) { seen_.insert(key); }

void ConfigReader::require_unsupported_absent(const std::string& key) {
  const auto* v = find(key);
  if (v) {
    std::string val = v->dump();
    throw FormatError(file_, "field '" + key + "' = " + val + " is not supported by this implementation");
  }
}

void ConfigReader::log_unknown() const {
  for (auto it = j_.begin(); it != j_.end(); ++it) {
    if (!it.key().empty() && it.key()[0] == '_') continue;  // _class_name, _diffusers_version, ...
    if (!seen_.count(it.key())) log::debug("{}: ignoring unknown field '{}'", file_, it.key());
  }
}

}  // namespace sd
