#pragma once
// Sub-commands register themselves (one file per command): REGISTER_COMMAND(name, description, order, setup) where
// setup(CLI::App&) adds the options and returns the function that runs the command (its exit code).
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace sd::cli {

using Runner = std::function<int()>;
using Setup = std::function<Runner(CLI::App&)>;

struct CommandSpec {
  std::string name;
  std::string description;
  int order;
  Setup setup;
};

std::vector<CommandSpec>& command_registry();
bool register_command(CommandSpec spec);

// Common options every model command takes (threads, dtype, device); applied by apply_common().
struct CommonOptions {
  int threads = 0;
  std::string dtype = "auto";  // resolved by sd::parse_dtype for the device
  std::string device = "cpu";
};
void add_common_options(CLI::App& app, CommonOptions& opts);
void apply_threads(const CommonOptions& opts);
// A CLI11 check that a number is >= `min` ("--steps: expected >= 1, got 0"; CLI11 2.1's PositiveNumber names
// DBL_MAX in full). A value that is not a number passes here: the settings files' number check refuses it.
CLI::Validator at_least(double min);

}  // namespace sd::cli

#define SD_CLI_CONCAT2(a, b) a##b
#define SD_CLI_CONCAT(a, b) SD_CLI_CONCAT2(a, b)
#define REGISTER_COMMAND(name, description, order, setup) \
  static const bool SD_CLI_CONCAT(sd_cli_registered_, __LINE__) = \
      ::sd::cli::register_command(::sd::cli::CommandSpec{name, description, order, setup})
