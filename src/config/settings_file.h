#pragma once
// Settings files: the command-line options of a command written down as YAML (`streamdiffusion stream --config
// live.yaml`), so a performance set-up is one file instead of a long command line.
//
//   # live.yaml
//   model: models/sd-turbo
//   prompt: "oil painting of a harbour"
//   guidance: 1.2
//   t_index_list: "32,45"
//   lora: [style.safetensors:0.8, detail.safetensors]   # a repeatable option: a list (or one scalar)
//   loop: true                                          # a flag: true / false
//
// Keys are the command's long option names without the leading dashes; `-` and `_` are the same (t-index-list =
// t_index_list; dumps write `_`). The key set is not a list kept here: it is read from the command's CLI11
// definition, so every option a command has (also ones added later) can be set, and nothing else. Values are
// checked against the option's CLI11 type (INT, UINT, FLOAT, TEXT, flags = booleans) and its validators before
// CLI11 sees them, so a bad file is refused with the file, line, key and the expected type. Options given on the
// command line win over the file (a repeatable option given on the command line replaces the file's whole list).
//
// Wiring (apps/cli/main.cpp): the top-level app owns `--config-file FILE` (CLI11's config option, which CLI11 only
// processes at the top level) and `--dump-config`, both reachable after the sub-command (fallthrough); `--config
// FILE` where FILE is a file or ends in .yaml/.yml is rewritten to `--config-file FILE` (`--config DIR` stays the
// single-file checkpoints' folder of model configs). The items go to the sub-command that was parsed.
//
// `--dump-config` prints the effective settings of the command as a settings file: every option that was set (file
// or command line) as `key: value`, every other one as a commented `# key: default` line. Loading the dump gives
// the same effective settings (tested).
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace sd {

// One `key: value` of a settings file.
struct SettingsEntry {
  std::string key;                  // as written
  std::vector<std::string> values;  // the scalar(s) as text
  std::vector<int> value_lines;     // 1-based line of each value
  bool list = false;                // written as a YAML sequence
  int line = 0, column = 0;         // 1-based position of the key
};

// Parses a settings file's text (not a path, so it can be fuzzed): a YAML mapping of keys to a scalar or a sequence
// of scalars. `file` names the text in messages. Throws sd::FormatError(file, "line L: ...") for bad YAML, a
// document that is not a mapping, a repeated key, a value that is empty, a mapping or a nested sequence.
std::vector<SettingsEntry> parse_settings_yaml(const std::string& text, const std::string& file);

// "t_index_list" / "t-index-list" / "--t-index-list" -> "t-index-list" (CLI11's long name).
std::string settings_option_name(const std::string& key);
// "t-index-list" -> "t_index_list" (the form dumps write).
std::string settings_key(const std::string& option_name);

// Checks entries against a command's options and turns them into CLI11 config items for it (`parents` = the
// command's name path below the top-level app). Throws sd::FormatError(file, "line L: key 'k': ...") for an unknown
// key (with the closest known one), a key that cannot be set from a file (help, the settings file itself), a list
// for a single-value option, a value of the wrong type or one the option's validator refuses.
std::vector<CLI::ConfigItem> settings_to_config_items(const std::vector<SettingsEntry>& entries, const CLI::App& command,
                                                      const std::string& file);

// The effective settings of a parsed command as a settings file (see the file comment).
std::string dump_settings(const CLI::App& command);

// The CLI11 config formatter of the top-level app: reads the YAML with parse_settings_yaml and hands the items to
// the sub-command that was parsed (settings_to_config_items). The file name for messages is the --config-file value.
class YamlSettingsConfig : public CLI::Config {
 public:
  explicit YamlSettingsConfig(const CLI::App* top) : top_(top) {}
  std::string to_config(const CLI::App* app, bool default_also, bool write_description,
                        std::string prefix) const override;
  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override;

 private:
  const CLI::App* top_;
};

// Gives every integer and number option of `app` and its sub-commands (as they are now) the settings files' rules
// for numbers (decimal, no leading zeros, no sign on unsigned, finite) as a CLI11 validator. CLI11 alone reads
// `--seed 0042` as octal 34, `--seed -1` as 2^64 - 1 and `--guidance nan` as NaN, values a settings file refuses,
// so such a command line's --dump-config did not load back.
void read_numbers_as_settings_files_do(CLI::App& app);

// Adds --config-file and --dump-config to the top-level app (reachable after any sub-command) and installs the YAML
// formatter; the options the app has by then read numbers as settings files do (read_numbers_as_settings_files_do).
// Returns the --dump-config option.
CLI::Option* enable_settings_files(CLI::App& top);
// argv with `--config FILE` / `--config=FILE` rewritten to --config-file where FILE is a settings file (see above).
std::vector<std::string> rewrite_config_arguments(std::vector<std::string> args);

}  // namespace sd
