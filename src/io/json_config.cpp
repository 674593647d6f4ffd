#include "io/json_config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include "core/json_limits.h"
#include "core/log.h"

namespace sd {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path, "cannot open file");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_json_text(ss.str(), path);
}

nlohmann::json parse_json_text(const std::string& text, const std::string& path) {
  if (std::string why = json_depth_problem(text); !why.empty()) throw FormatError(path, "not valid JSON: " + why);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for a number like 1e999
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

void ConfigReader::check_positive(const std::string& key, int64_t value, int64_t max) const {
  if (value <= 0 || value > max) fail(key, "a positive integer up to " + std::to_string(max));
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

namespace {
// An integer JSON value (or a float with an integral value, e.g. 1.0) in [lo, hi]; nullopt otherwise (a fraction,
// out of range, another type). Floats are range-checked before the conversion (1e300 would be undefined behaviour).
std::optional<int64_t> integer_value(const nlohmann::json& v, int64_t lo, int64_t hi) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    const auto i = static_cast<int64_t>(u);
    return i >= lo && i <= hi ? std::optional<int64_t>(i) : std::nullopt;
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    return i >= lo && i <= hi ? std::optional<int64_t>(i) : std::nullopt;
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    // [-2^63, 2^63): every double in it converts exactly; the bounds are powers of two, so exact too.
    if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0) || d != std::trunc(d)) return std::nullopt;
    const auto i = static_cast<int64_t>(d);
    return i >= lo && i <= hi ? std::optional<int64_t>(i) : std::nullopt;
  }
  return std::nullopt;
}

// A number too large in magnitude for the field (rather than a fraction or another type): what the error then says.
bool out_of_range(const nlohmann::json& v, double max) {
  if (v.is_number_unsigned() || v.is_number_integer()) return true;  // integers only fail on range
  return v.is_number_float() && !(std::fabs(v.get<double>()) <= max);
}

constexpr int64_t kIntMin = std::numeric_limits<int>::min(), kIntMax = std::numeric_limits<int>::max();
const std::string kIntRange = "[" + std::to_string(kIntMin) + ", " + std::to_string(kIntMax) + "]";
}  // namespace

int64_t ConfigReader::get_int64(const std::string& key, int64_t def) {
  const auto* v = find(key);
  if (!v) return def;
  // 1.0 written for an integer field is accepted; 1.5 is not.
  if (auto i = integer_value(*v, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max())) return *i;
  fail(key, out_of_range(*v, 9.2e18) ? "an integer in the 64-bit range" : "an integer");
}

int ConfigReader::get_int(const std::string& key, int def) {
  const auto* v = find(key);
  if (!v) return def;
  if (auto i = integer_value(*v, kIntMin, kIntMax)) return static_cast<int>(*i);
  fail(key, out_of_range(*v, kIntMax) ? "an integer in " + kIntRange : "an integer");
}

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
    const auto i = integer_value(e, kIntMin, kIntMax);
    if (!i) fail(key, "a list of integers in " + kIntRange);
    out.push_back(static_cast<int>(*i));
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
  if (v->is_number_integer()) {
    const auto i = integer_value(*v, kIntMin, kIntMax);
    if (!i) fail(key, "an integer in " + kIntRange + " or a list of them");
    return std::vector<int>(n, static_cast<int>(*i));
  }
  if (v->is_array()) {
    std::vector<int> out;
    for (const auto& e : *v) {
      if (!e.is_number_integer()) fail(key, "an integer or a list of integers");
      const auto i = integer_value(e, kIntMin, kIntMax);
      if (!i) fail(key, "an integer in " + kIntRange + " or a list of them");
      out.push_back(static_cast<int>(*i));
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
