// streamdiffusion: the command-line front end. Each sub-command lives in its own file and registers itself.
#include <algorithm>
#include <iostream>
#include <map>
#include <sstream>

#include "apps/cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#ifdef SD_HAVE_SETTINGS_FILES
#include "config/settings_file.h"
#endif

namespace sd::cli {

std::vector<CommandSpec>& command_registry() {
  static std::vector<CommandSpec> registry;
  return registry;
}

bool register_command(CommandSpec spec) {
  command_registry().push_back(std::move(spec));
  return true;
}

void add_common_options(CLI::App& app, CommonOptions& opts) {
  app.add_option("--threads", opts.threads,
                 "intra-op threads for the model (0 = the model's recommendation, else all cores)")
      ->check(CLI::Range(0, 1024))  // more is a typo that would hang the command making threads
      ->capture_default_str();
  app.add_option("--dtype", opts.dtype,
                 "weights and activations: auto | fp32 | bf16 | fp16 (fp16 on CUDA) | int8. auto: bf16 on a CPU with "
                 "AVX512-BF16 or AMX-BF16, fp16 on CUDA, else fp32 (bf16 without them is emulated, far slower). "
                 "int8 (CPU with VNNI/AMX, libtorch 2 builds): the UNet's convolutions and linear layers in int8, "
                 "the rest as auto")
      ->capture_default_str();
  app.add_option("--device", opts.device, "cpu | cuda | cuda:N")->capture_default_str();
}

void apply_threads(const CommonOptions& opts) { sd::set_threads(opts.threads); }

CLI::Validator at_least(double min) {
  std::ostringstream bound;
  bound << ">= " << min;
  return CLI::Validator(
      [min, b = bound.str()](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        return end != text.c_str() && *end == '\0' && !(v >= min) ? "expected " + b + ", got " + text : "";
      },
      bound.str());
}

}  // namespace sd::cli

int main(int argc, char** argv) {
  // Logs go to stderr so commands can print machine-readable output (JSON, ids, raw frames) on stdout.
  spdlog::set_default_logger(spdlog::stderr_color_mt("streamdiffusion"));
  CLI::App app{"streamdiffusion: real-time Stable Diffusion (StreamDiffusion) in C++"};
  app.name("streamdiffusion");
  app.require_subcommand(1);
  app.footer(
      "First command to try (the built-in 64x64 emoji model, no download):\n"
      "  streamdiffusion txt2img --prompt \"red apple\" -o apple.png\n"
      "then `streamdiffusion serve` and open http://127.0.0.1:8000/ for the live browser app.\n"
      "Every command has --help; `streamdiffusion info` shows a model's native size and default settings.");
  std::string log_level = "info";
  // On the top level (`streamdiffusion --log-level debug stream ...`) and on every command, which makes it a key of
  // settings files too (`log_level: debug`): the top level's options are not theirs.
  const auto add_log_level = [&log_level](CLI::App& a) {
    a.add_option("--log-level", log_level, "trace | debug | info | warn | error | critical | off")
        ->check(CLI::IsMember({"trace", "debug", "info", "warn", "warning", "error", "critical", "off"}))
        ->capture_default_str();
  };
  add_log_level(app);

  auto& registry = sd::cli::command_registry();
  std::sort(registry.begin(), registry.end(),
            [](const auto& a, const auto& b) { return a.order != b.order ? a.order < b.order : a.name < b.name; });
  std::map<CLI::App*, sd::cli::Runner> runners;
  for (auto& spec : registry) {
    CLI::App* sub = app.add_subcommand(spec.name, spec.description);
    runners[sub] = spec.setup(*sub);
    add_log_level(*sub);
  }
  if (argc == 1) {  // no arguments: the command list and a first command, not just "A subcommand is required"
    std::cout << app.help();
    return 0;
  }
  std::vector<std::string> args(argv + 1, argv + argc);
#ifdef SD_HAVE_SETTINGS_FILES
  // Settings files for every command (config/settings_file.h): --config FILE.yaml, --dump-config.
  CLI::Option* dump = sd::enable_settings_files(app);
  // `streamdiffusion config --dump COMMAND [options]` = `streamdiffusion COMMAND [options] --dump-config`.
  CLI::App* config_cmd = app.add_subcommand(
      "config", "print a command's effective settings as a settings file: config --dump COMMAND [--config FILE] [options]");
  config_cmd->allow_extras();
  runners[config_cmd] = [] {
    std::cerr << "usage: streamdiffusion config --dump COMMAND [--config FILE.yaml] [options]\n";
    return 2;
  };
  if (args.size() >= 3 && args[0] == "config" && args[1] == "--dump") {
    args.erase(args.begin(), args.begin() + 2);
    args.push_back("--dump-config");
  }
  args = sd::rewrite_config_arguments(std::move(args));
  // A dump may be a template to fill in: the options a run requires (--input, -o) need not be there yet.
  if (std::find(args.begin(), args.end(), "--dump-config") != args.end())
    for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; }))
      for (CLI::Option* opt : sub->get_options([](CLI::Option*) { return true; })) opt->required(false);
#endif
  try {
    std::reverse(args.begin(), args.end());  // CLI11 takes the arguments last first
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    // CLI11's own codes (105 for a refused value, 106 for a missing option, ...) would read as signals or crashes to
    // a shell script; a usage error exits 2 as other command-line tools do (--help / --version: 0).
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const sd::Error& e) {  // a settings file that does not fit the command (file, line, key, expected type)
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
#ifdef SD_HAVE_SETTINGS_FILES
  if (dump->count() > 0) {
    for (CLI::App* sub : app.get_subcommands())
      if (sub->parsed() && sub != config_cmd) {
        std::cout << sd::dump_settings(*sub);
        return 0;
      }
  }
#endif
  try {
    sd::log::set_level(log_level);
    for (auto& [sub, run] : runners)
      if (sub->parsed()) return run();
  } catch (const sd::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::cerr << "error (libtorch): " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
