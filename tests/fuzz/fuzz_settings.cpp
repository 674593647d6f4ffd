// Settings files (config/settings_file.h: `stream --config live.yaml`): the file's text goes through the path main()
// gives it (the `--config FILE` rewrite, CLI11's --config-file, YamlSettingsConfig::from_config ->
// parse_settings_yaml -> settings_to_config_items -> CLI11) on a command with every kind of option the CLI has
// (flags, signed / unsigned integers, numbers, text, repeatable options, validators, an alias, a required option).
// A file is either accepted (the command parsed) or refused with sd::FormatError naming the file first; a required
// option the file leaves out is CLI11's RequiredError, as on the command line. Any other exception - a raw yaml-cpp
// one, or a CLI11 conversion / validation error for a value the settings check let through (its message would not
// name the file and line) - is a finding.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "config/settings_file.h"
#include "fuzz_util.h"

namespace {

struct Cli {
  CLI::App app{"fuzz"};
  bool loop = false, flag = false;
  int64_t frames = 0;
  uint64_t seed = 2;
  int queue = 4, clip_skip = 0;
  unsigned threads = 0;
  double guidance = 1.0, lcm = 8.5;
  std::string input, prompt, t_index_list, prediction;
  std::vector<std::string> lora, control;
  std::vector<double> scales;

  Cli() {
    auto* stream = app.add_subcommand("stream");
    stream->add_flag("--loop", loop);
    stream->add_flag("--no-denoising-batch", flag);
    stream->add_option("--frames", frames);
    stream->add_option("--seed", seed)->capture_default_str();
    stream->add_option("--threads", threads);
    stream->add_option("--guidance", guidance);
    stream->add_option_function<double>("--lcm-guidance", [this](double w) { lcm = w; });
    stream->add_option("-i,--input", input)->required();
    stream->add_option("--prompt", prompt);
    stream->add_option("--t-index-list", t_index_list);
    stream->add_option("--prediction-type", prediction)->check(CLI::IsMember({"epsilon", "v_prediction"}));
    stream->add_option("--lora", lora);
    stream->add_option("--control", control);
    stream->add_option("--controlnet-scale", scales);
    stream->add_option("--queue", queue)->check(CLI::Range(1, 64));
    stream->add_option("--clip-skip,--text-encoder-clip-skip", clip_skip);
    sd::enable_settings_files(app);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static sd::fuzz::TextFile file("fuzz.yaml");
  const std::string& path = file.write(data, size);
  // Fresh each time: CLI11 keeps the results of a parse.
  Cli cli;
  std::vector<std::string> args = sd::rewrite_config_arguments({"stream", "--config", path});
  std::reverse(args.begin(), args.end());
  try {
    cli.app.parse(args);
  } catch (const sd::FormatError& e) {
    sd::fuzz::expect_names_file(e, path);
  } catch (const CLI::RequiredError&) {
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "CLI11 refused a value the settings check accepted (%s): %s\n", e.get_name().c_str(),
                 e.what());
    std::abort();
  }
  // Parsing the text directly (what the Python package's read_settings does) gives the same verdict on the YAML.
  try {
    const auto entries = sd::parse_settings_yaml(sd::fuzz::bytes(data, size), "fuzz.yaml");
    for (const auto& e : entries) {
      if (e.key.empty() || e.values.size() != e.value_lines.size() || e.line < 1 || (!e.list && e.values.size() != 1)) {
        std::fprintf(stderr, "accepted entry breaks an invariant: key '%s' line %d, %zu values\n", e.key.c_str(), e.line,
                     e.values.size());
        std::abort();
      }
    }
  } catch (const sd::FormatError& e) {
    sd::fuzz::expect_names_file(e, "fuzz.yaml");
  }
  return 0;
}
