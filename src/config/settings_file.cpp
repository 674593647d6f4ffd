#include "config/settings_file.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <sstream>

#include <yaml-cpp/yaml.h>

#include "core/error.h"
#include "core/text.h"

namespace sd {
namespace {

constexpr const char* kSettingsOption = "--config-file";
constexpr const char* kDumpOption = "--dump-config";

std::string at_line(int line) { return "line " + std::to_string(line) + ": "; }

const char* node_kind(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Null: return "nothing";
    default: return "a scalar";
  }
}

bool is_flag(const CLI::Option& o) { return o.get_expected_max() == 0; }
bool is_list(const CLI::Option& o) { return o.get_items_expected_max() > 1; }

// CLI11's type name without the validators' descriptions ("INT:INT in [1 - 100]" -> "INT").
std::string base_type(const CLI::Option& o) {
  const std::string t = o.get_type_name();
  return t.substr(0, t.find(':'));
}

std::string describe_type(const CLI::Option& o) {
  if (is_flag(o)) return "true or false";
  const std::string t = base_type(o);
  std::string what = t == "INT" ? "an integer" : t == "UINT" ? "an integer >= 0" : t == "FLOAT" ? "a number" : "text";
  const std::string full = o.get_type_name();
  if (full.size() > t.size()) what += " (" + full.substr(t.size() + 1) + ")";
  return is_list(o) ? what + ", or a list of them" : what;
}

bool all_digits(const std::string& s, size_t from) { return from < s.size() && is_decimal(s.substr(from)); }

// A decimal integer with a leading zero ("010", "-07"): CLI11 reads integers with strtoll base 0, so it would take
// 010 as octal 8 and refuse 099 with its own message (fuzz_settings found the latter).
bool leading_zero(const std::string& text, size_t from) { return text.size() > from + 1 && text[from] == '0'; }

// Whether `text` is a value of CLI11 type `type` (the subset CLI11 converts the same way; anything it also accepts
// beyond this, hex or octal integers for one, is refused here on purpose: a settings file should read plainly).
bool fits_type(const std::string& type, const std::string& text) {
  if (type == "INT") {
    const size_t from = text[0] == '-' || text[0] == '+' ? 1 : 0;
    if (!all_digits(text, from) || leading_zero(text, from)) return false;
    errno = 0;
    std::strtoll(text.c_str(), nullptr, 10);
    return errno != ERANGE;
  }
  if (type == "UINT") {
    const size_t from = text[0] == '+' ? 1 : 0;
    if (!all_digits(text, from) || leading_zero(text, from)) return false;
    errno = 0;
    std::strtoull(text.c_str(), nullptr, 10);
    return errno != ERANGE;
  }
  if (type == "FLOAT") {
    char* end = nullptr;
    errno = 0;
    const double v = std::strtod(text.c_str(), &end);
    return !text.empty() && end != text.c_str() && *end == '\0' && errno != ERANGE && std::isfinite(v);
  }
  return true;
}

std::optional<bool> parse_bool(const std::string& s) {
  std::string l = s;
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (l == "true" || l == "yes" || l == "on" || l == "1") return true;
  if (l == "false" || l == "no" || l == "off" || l == "0") return false;
  return std::nullopt;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    prev.swap(cur);
  }
  return prev[b.size()];
}

// The options a settings file may set: configurable, with a long name.
std::vector<const CLI::Option*> settable_options(const CLI::App& command) {
  std::vector<const CLI::Option*> out;
  for (const CLI::Option* o : command.get_options())
    if (o->get_configurable() && !o->get_lnames().empty()) out.push_back(o);
  return out;
}

std::string command_path(const CLI::App& command) {
  std::string path;
  for (const CLI::App* a = &command; a != nullptr && a->get_parent() != nullptr; a = a->get_parent())
    path = a->get_name() + (path.empty() ? "" : " " + path);
  return path;
}

// A scalar for a dump: numbers and booleans plain, text double-quoted (so "", "null", "yes", "1.0" stay text).
std::string yaml_scalar(const std::string& text, bool quote) {
  YAML::Emitter e;
  if (quote) e << YAML::DoubleQuoted;
  e << text;
  return e.c_str();
}

}  // namespace

std::string settings_option_name(const std::string& key) {
  std::string k = key;
  while (!k.empty() && k[0] == '-') k.erase(0, 1);
  std::replace(k.begin(), k.end(), '_', '-');
  return k;
}

std::string settings_key(const std::string& option_name) {
  std::string k = settings_option_name(option_name);
  std::replace(k.begin(), k.end(), '-', '_');
  return k;
}

std::vector<SettingsEntry> parse_settings_yaml(const std::string& text, const std::string& file) {
  YAML::Node doc;
  try {
    doc = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    // e.mark is 0-based; e.msg is yaml-cpp's message without the position.
    throw FormatError(file, at_line(e.mark.line + 1) + "not valid YAML: " + e.msg + " (column " +
                                std::to_string(e.mark.column + 1) + ")");
  }
  std::vector<SettingsEntry> out;
  if (doc.IsNull()) return out;  // an empty file (or only comments): nothing set
  if (!doc.IsMap())
    throw FormatError(file, at_line(doc.Mark().line + 1) + "expected a mapping of option names to values "
                                                           "(e.g. 'prompt: a cat'), got " + node_kind(doc));
  std::map<std::string, int> seen;  // option name -> line, to refuse a key given twice (t_index_list + t-index-list)
  for (const auto& kv : doc) {
    const YAML::Node& k = kv.first;
    const YAML::Node& v = kv.second;
    SettingsEntry e;
    e.line = k.Mark().line + 1;
    e.column = k.Mark().column + 1;
    if (!k.IsScalar()) throw FormatError(file, at_line(e.line) + "a key must be an option name, got " + node_kind(k));
    e.key = k.Scalar();
    const std::string name = settings_option_name(e.key);
    if (name.empty()) throw FormatError(file, at_line(e.line) + "empty key");
    const auto [it, fresh] = seen.emplace(name, e.line);
    if (!fresh)
      throw FormatError(file, at_line(e.line) + "key '" + e.key + "' is set twice (also on line " +
                                  std::to_string(it->second) + ")");
    const int vline = v.Mark().line >= 0 ? v.Mark().line + 1 : e.line;
    if (v.IsScalar()) {
      e.values.push_back(v.Scalar());
      e.value_lines.push_back(vline);
    } else if (v.IsSequence()) {
      e.list = true;
      for (const auto& item : v) {
        const int iline = item.Mark().line >= 0 ? item.Mark().line + 1 : vline;
        if (!item.IsScalar())
          throw FormatError(file, at_line(iline) + "key '" + e.key + "': list items must be plain values, got " +
                                      node_kind(item));
        e.values.push_back(item.Scalar());
        e.value_lines.push_back(iline);
      }
    } else {
      throw FormatError(file, at_line(e.line) + "key '" + e.key + "' has " + node_kind(v) +
                                  " as its value; expected a value or a list of values (quote an empty text: \"\")");
    }
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<CLI::ConfigItem> settings_to_config_items(const std::vector<SettingsEntry>& entries, const CLI::App& command,
                                                      const std::string& file) {
  const auto options = settable_options(command);
  std::vector<std::string> parents;
  for (const CLI::App* a = &command; a != nullptr && a->get_parent() != nullptr; a = a->get_parent())
    parents.insert(parents.begin(), a->get_name());
  const std::string who = "`streamdiffusion " + command_path(command) + "`";

  std::vector<CLI::ConfigItem> items;
  for (const SettingsEntry& e : entries) {
    const std::string name = settings_option_name(e.key);
    const std::string where = at_line(e.line) + "key '" + e.key + "': ";
    const CLI::Option* opt = nullptr;
    for (const CLI::Option* o : command.get_options())
      if (o->check_lname(name)) opt = o;
    if (opt == nullptr) {
      std::string best;
      size_t best_d = 3;  // suggest only near misses
      for (const CLI::Option* o : options)
        for (const auto& l : o->get_lnames()) {
          const size_t d = edit_distance(name, l);
          if (d < best_d) best_d = d, best = l;
        }
      throw FormatError(file, at_line(e.line) + "unknown key '" + e.key + "' for " + who +
                                  (best.empty() ? "" : " (did you mean '" + settings_key(best) + "'?)") +
                                  "; the keys are the command's long options without dashes (see --help)");
    }
    if (!opt->get_configurable())
      throw FormatError(file, where + "cannot be set in a settings file (give it on the command line)");
    const std::string expected = describe_type(*opt);
    if (e.list && !is_list(*opt))
      throw FormatError(file, where + "expected " + expected + ", got a list of " + std::to_string(e.values.size()) +
                                  " (only repeatable options take lists)");
    if (e.list && e.values.empty())
      throw FormatError(file, where + "empty list; leave the key out for the default");

    CLI::ConfigItem item;
    item.parents = parents;
    item.name = opt->get_lnames().front();
    if (is_flag(*opt)) {
      const auto b = parse_bool(e.values[0]);
      if (!b) throw FormatError(file, where + "expected true or false, got '" + e.values[0] + "'");
      item.inputs.push_back(*b ? "true" : "false");
    } else {
      const std::string type = base_type(*opt);
      for (size_t i = 0; i < e.values.size(); ++i) {
        const std::string& v = e.values[i];
        const std::string vwhere = at_line(e.value_lines[i]) + "key '" + e.key + "': ";
        // CLI11 takes any value written as "[...]" apart as a list (its own vector syntax), also one quoted in
        // YAML: `lora: '[]'` became no value at all and a CLI11 error without file and line (fuzz_settings).
        if (v.size() >= 2 && v.front() == '[' && v.back() == ']')
          throw FormatError(file, vwhere + "a value written in brackets ('" + v + "') would be taken apart as a list "
                                           "by the command-line parser: write a list as a YAML sequence (" + e.key +
                                           ": [a, b]) and a single value without enclosing brackets");
        if (!fits_type(type, v))
          throw FormatError(file, vwhere + "expected " + expected + ", got '" + v + "'" +
                                      ((type == "INT" || type == "UINT") && !v.empty() &&
                                               leading_zero(v, v[0] == '-' || v[0] == '+' ? 1 : 0)
                                           ? " (write integers without leading zeros)"
                                           : ""));
        // The option's own validators (ranges, member lists), here so that their refusal names the line.
        for (int k = 0;; ++k) {
          CLI::Validator* val = nullptr;
          try {
            val = const_cast<CLI::Option*>(opt)->get_validator(k);
          } catch (const CLI::OptionNotFound&) {
            break;
          }
          std::string copy = v;
          const std::string err = val->get_active() ? (*val)(copy) : std::string();
          if (!err.empty()) throw FormatError(file, vwhere + err + " (expected " + expected + ")");
        }
        item.inputs.push_back(v);
      }
    }
    items.push_back(std::move(item));
  }
  return items;
}

std::string dump_settings(const CLI::App& command) {
  std::ostringstream out;
  out << "# streamdiffusion " << command_path(command) << " settings (load with --config FILE; command-line options "
      << "override them).\n# Commented keys are unset: their defaults apply.\n";
  for (const CLI::Option* o : settable_options(command)) {
    const std::string key = settings_key(o->get_lnames().front());
    if (o->count() == 0) {
      const std::string def = o->get_default_str();
      out << "# " << key << ":" << (def.empty() ? "" : " " + def) << "\n";
      continue;
    }
    const auto& res = o->results();
    out << key << ":";
    if (is_flag(*o)) {
      // Repeated flags keep the last; a negated flag name ({false}) already gave "false".
      const auto b = parse_bool(res.empty() ? "true" : res.back());
      out << " " << (b.value_or(true) ? "true" : "false") << "\n";
      continue;
    }
    const std::string type = base_type(*o);
    const bool quote = type != "INT" && type != "UINT" && type != "FLOAT";
    if (is_list(*o)) {
      out << "\n";
      for (const auto& r : res) out << "  - " << yaml_scalar(r, quote) << "\n";
    } else {
      out << " " << yaml_scalar(res.empty() ? "" : res.back(), quote) << "\n";
    }
  }
  return out.str();
}

std::string YamlSettingsConfig::to_config(const CLI::App* app, bool, bool, std::string) const {
  for (const CLI::App* sub : app->get_subcommands())
    if (sub->parsed()) return dump_settings(*sub);
  return dump_settings(*app);
}

std::vector<CLI::ConfigItem> YamlSettingsConfig::from_config(std::istream& input) const {
  const CLI::Option* file_opt = top_->get_option_no_throw(kSettingsOption);
  const std::string file = file_opt && !file_opt->results().empty() ? file_opt->results().back() : "settings file";
  std::stringstream text;
  text << input.rdbuf();
  const auto entries = parse_settings_yaml(text.str(), file);
  // The sub-command given on the command line (its options were parsed already; the file fills the rest).
  const CLI::App* command = top_;
  for (const CLI::App* sub : top_->get_subcommands())
    if (sub->parsed()) command = sub;
  if (command == top_ && !entries.empty())
    throw FormatError(file, "a settings file needs a command (e.g. `streamdiffusion stream --config " + file + "`)");
  return settings_to_config_items(entries, *command, file);
}

void read_numbers_as_settings_files_do(CLI::App& app) {
  for (CLI::Option* o : app.get_options([](CLI::Option*) { return true; })) {
    if (is_flag(*o)) continue;
    const std::string type = base_type(*o);
    if (type != "INT" && type != "UINT" && type != "FLOAT") continue;
    const std::string expected = type == "INT"    ? "a decimal integer"
                                 : type == "UINT" ? "a decimal integer >= 0"
                                                  : "a finite number";
    // No description: the option's help keeps its type name ("UINT", "FLOAT:INT in [0 - 1]"). Put first (what
    // transform() does with a validator that changes nothing): an option's own range check would otherwise read "08"
    // first and say only "not in range".
    o->transform(CLI::Validator(
        [type, expected](std::string& text) -> std::string {
          if (fits_type(type, text)) return "";
          const bool zero = (type == "INT" || type == "UINT") && !text.empty() &&
                            leading_zero(text, text[0] == '-' || text[0] == '+' ? 1 : 0);
          return "expected " + expected + ", got '" + text + "'" +
                 (zero ? " (write integers without leading zeros: CLI11 would read them as octal)" : "");
        },
        ""));
  }
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) read_numbers_as_settings_files_do(*sub);
}

CLI::Option* enable_settings_files(CLI::App& top) {
  read_numbers_as_settings_files_do(top);
  top.config_formatter(std::make_shared<YamlSettingsConfig>(&top));
  top.set_config(kSettingsOption, "",
                 "settings file (YAML): the command's options as 'key: value' (keys = long option names, '-' or '_'); "
                 "command-line options win. Also --config FILE (a file, or a name ending in .yaml / .yml)")
      ->multi_option_policy(CLI::MultiOptionPolicy::Throw);
  // The sub-commands pass options they do not know to the top level, so these work after the command name (CLI11
  // copies the setting into sub-commands made later; those made already are set here).
  top.fallthrough();
  for (CLI::App* sub : top.get_subcommands([](CLI::App*) { return true; })) sub->fallthrough();
  // A std::string description: with a string literal CLI11 2.1's add_flag overloads are ambiguous in C++20 (the
  // libtorch 2 build), where an array became constructible from an integer.
  const std::string description =
      "print the command's effective settings (file + command line) as a settings file and exit";
  return top.add_flag(kDumpOption, description);
}

std::vector<std::string> rewrite_config_arguments(std::vector<std::string> args) {
  // A file, or a path that names a YAML file (so a missing one is reported as a missing settings file); a folder or
  // a missing folder stays the model-config --config.
  auto settings_file = [](const std::string& path) {
    std::error_code ec;
    const std::filesystem::path p(path);
    return !path.empty() && (std::filesystem::is_regular_file(p, ec) || p.extension() == ".yaml" ||
                             p.extension() == ".yml" || path == "/dev/stdin");
  };
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--") break;
    if (args[i] == "--config" && i + 1 < args.size() && settings_file(args[i + 1])) {
      args[i] = kSettingsOption;
    } else if (args[i].rfind("--config=", 0) == 0 && settings_file(args[i].substr(9))) {
      args[i] = std::string(kSettingsOption) + "=" + args[i].substr(9);
    }
  }
  return args;
}

}  // namespace sd
