// Settings files (config/settings_file.h) on a CLI11 app with every kind of option the CLI has (flags, integers,
// unsigned, numbers, text, repeatable options, validators, an option with a short name and an alias): the round
// trip dump -> load -> the same settings, command-line options over the file, and every refusal with its message
// (file, line, key, expected type).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>

#include <gtest/gtest.h>

#include <stdlib.h>

#include "common/error_of.h"
#include "config/settings_file.h"
#include "core/error.h"

namespace sd {
namespace {

// This suite has no libtorch (the settings code has none), so no tests/common/fixtures.
std::string make_temp_dir(const std::string& prefix) {
  std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
  if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed for " + tmpl);
  return tmpl;
}

// What a command's options are bound to; compared field by field.
struct Values {
  bool loop = false, no_batch = false;
  int64_t frames = 0;
  uint64_t seed = 2;
  double guidance = std::numeric_limits<double>::quiet_NaN();
  double lcm = 8.5;
  std::string input, prompt = "", t_index_list, prediction;
  std::vector<std::string> lora;
  std::vector<std::string> control{"auto"};
  int queue = 4;
  int clip_skip = 0;

  bool operator==(const Values& o) const {
    auto same = [](double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; };
    return loop == o.loop && no_batch == o.no_batch && frames == o.frames && seed == o.seed &&
           same(guidance, o.guidance) && same(lcm, o.lcm) && input == o.input && prompt == o.prompt &&
           t_index_list == o.t_index_list && prediction == o.prediction && lora == o.lora && control == o.control &&
           queue == o.queue && clip_skip == o.clip_skip;
  }
};

// The top-level app with one `stream` command, wired as apps/cli/main.cpp wires it.
struct Cli {
  CLI::App app{"test"};
  CLI::App* stream = nullptr;
  CLI::Option* dump = nullptr;
  Values v;

  Cli() {
    stream = app.add_subcommand("stream");
    stream->add_flag("--loop", v.loop);
    stream->add_flag("--no-denoising-batch", v.no_batch);
    stream->add_option("--frames", v.frames);
    stream->add_option("--seed", v.seed)->capture_default_str();
    stream->add_option("--guidance", v.guidance);
    stream->add_option_function<double>("--lcm-guidance", [this](double w) { v.lcm = w; });
    stream->add_option("-i,--input", v.input)->required();
    stream->add_option("--prompt", v.prompt)->capture_default_str();
    stream->add_option("--t-index-list", v.t_index_list);
    stream->add_option("--prediction-type", v.prediction)->check(CLI::IsMember({"epsilon", "v_prediction"}));
    stream->add_option("--lora", v.lora);
    stream->add_option("--control", v.control)->capture_default_str();
    stream->add_option("--queue", v.queue)->check(CLI::Range(1, 64))->capture_default_str();
    stream->add_option("--clip-skip,--text-encoder-clip-skip", v.clip_skip);
    dump = enable_settings_files(app);
  }
  // Parses like main(): the `--config FILE` rewrite, then CLI11.
  void parse(std::vector<std::string> args) {
    args = rewrite_config_arguments(std::move(args));
    std::reverse(args.begin(), args.end());
    app.parse(args);
  }
  std::string dumped() const { return dump_settings(*stream); }
};

class SettingsFile : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = make_temp_dir("settings_file"); }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }
  // The error message of parsing `text` as stream's settings (with --input given), "" when it is accepted.
  std::string refusal(const std::string& text) {
    const std::string path = write("bad.yaml", text);
    Cli c;
    try {
      c.parse({"stream", "-i", "x", "--config", path});
    } catch (const std::exception& e) {
      std::string m = e.what();
      const auto at = m.find(path);
      if (at != std::string::npos) m.replace(at, path.size(), "bad.yaml");
      return m;
    }
    return "";
  }
  std::string dir_;
};

constexpr const char* kFull =
    "# a performance set-up\n"
    "input: in.mp4\n"
    "prompt: \"oil painting: a harbour\"\n"
    "guidance: 1.5\n"
    "lcm_guidance: 6\n"
    "seed: 7\n"
    "frames: -1\n"
    "loop: yes\n"
    "no-denoising-batch: true\n"
    "t_index_list: \"32,45\"\n"
    "prediction_type: v_prediction\n"
    "lora: [a.safetensors, \"b.safetensors:0.5\"]\n"
    "control:\n"
    "  - none\n"
    "  - osc://127.0.0.1:9000\n"
    "queue: 8\n"
    "text_encoder_clip_skip: 1\n";

TEST_F(SettingsFile, EveryKindOfOptionIsReadFromTheFile) {
  Cli c;
  c.parse({"stream", "--config", write("full.yaml", kFull)});
  EXPECT_EQ(c.v.input, "in.mp4");
  EXPECT_EQ(c.v.prompt, "oil painting: a harbour");
  EXPECT_DOUBLE_EQ(c.v.guidance, 1.5);
  EXPECT_DOUBLE_EQ(c.v.lcm, 6.0);
  EXPECT_EQ(c.v.seed, 7u);
  EXPECT_EQ(c.v.frames, -1);
  EXPECT_TRUE(c.v.loop);
  EXPECT_TRUE(c.v.no_batch);
  EXPECT_EQ(c.v.t_index_list, "32,45");
  EXPECT_EQ(c.v.prediction, "v_prediction");
  EXPECT_EQ(c.v.lora, (std::vector<std::string>{"a.safetensors", "b.safetensors:0.5"}));
  EXPECT_EQ(c.v.control, (std::vector<std::string>{"none", "osc://127.0.0.1:9000"}));
  EXPECT_EQ(c.v.queue, 8);
  EXPECT_EQ(c.v.clip_skip, 1) << "an alias is a key too";
  EXPECT_TRUE(c.stream->get_option("--input")->count() > 0) << "a required option may come from the file";
}

TEST_F(SettingsFile, RoundTripDumpLoadGivesTheSameSettings) {
  Cli a;
  a.parse({"stream", "--config", write("full.yaml", kFull), "--prompt", "a \"quoted\" 'text': yes", "--seed", "9"});
  const std::string dump = a.dumped();
  // Set keys are written, unset ones commented; '_' names.
  EXPECT_NE(dump.find("\nseed: 9\n"), std::string::npos) << dump;
  EXPECT_NE(dump.find("\nno_denoising_batch: true\n"), std::string::npos) << dump;
  EXPECT_NE(dump.find("\nlora:\n  - \"a.safetensors\"\n  - \"b.safetensors:0.5\"\n"), std::string::npos) << dump;

  Cli b;
  b.parse({"stream", "--config", write("dump.yaml", dump)});
  EXPECT_TRUE(a.v == b.v) << dump;
  EXPECT_EQ(b.v.prompt, "a \"quoted\" 'text': yes");
  EXPECT_EQ(b.dumped(), dump) << "the dump of the loaded dump is the dump";

  // Defaults only: nothing set but the required input; every other key commented out, and loading it changes nothing.
  Cli d;
  d.parse({"stream", "-i", "cam"});
  const std::string dd = d.dumped();
  EXPECT_NE(dd.find("# seed: 2\n"), std::string::npos) << dd;
  EXPECT_NE(dd.find("# control: [auto]\n"), std::string::npos) << dd;
  Cli e;
  e.parse({"stream", "--config", write("defaults.yaml", dd)});
  EXPECT_TRUE(d.v == e.v);
}

TEST_F(SettingsFile, CommandLineOptionsOverrideTheFile) {
  Cli c;
  c.parse({"stream", "--guidance", "3", "--config", write("full.yaml", kFull), "--lora", "c.safetensors", "--queue",
           "2"});
  EXPECT_DOUBLE_EQ(c.v.guidance, 3.0) << "given before --config";
  EXPECT_EQ(c.v.queue, 2) << "given after --config";
  EXPECT_EQ(c.v.lora, std::vector<std::string>{"c.safetensors"}) << "a list from the command line replaces the file's";
  EXPECT_EQ(c.v.prompt, "oil painting: a harbour") << "the rest still comes from the file";
  // --config-file is the same option; `--config=FILE` too.
  Cli d;
  d.parse({"stream", "--config-file", write("g.yaml", "input: x\nguidance: 2\n")});
  EXPECT_DOUBLE_EQ(d.v.guidance, 2.0);
  Cli e;
  e.parse({"stream", "--config=" + write("h.yaml", "input: x\nguidance: 4\n")});
  EXPECT_DOUBLE_EQ(e.v.guidance, 4.0);
}

TEST_F(SettingsFile, AFolderStaysTheModelConfigOption) {
  // --config DIR is the single-file checkpoints' folder of model configs; only files and *.yaml are settings files.
  const auto args = rewrite_config_arguments({"txt2img", "--config", dir_, "--config", "x.yaml", "--config=" + dir_});
  EXPECT_EQ(args, (std::vector<std::string>{"txt2img", "--config", dir_, "--config-file", "x.yaml", "--config=" + dir_}));
}

TEST_F(SettingsFile, EveryBadKeyAndTypeIsRefusedWithFileLineKeyAndExpectedType) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"guidnce: 1\n", "bad.yaml: line 1: unknown key 'guidnce' for `streamdiffusion stream` (did you mean 'guidance'?)"},
      {"prompt: a\nwidth: 512\n", "bad.yaml: line 2: unknown key 'width' for `streamdiffusion stream`; the keys are"},
      {"guidance: strong\n", "bad.yaml: line 1: key 'guidance': expected a number, got 'strong'"},
      {"guidance: .nan\n", "key 'guidance': expected a number, got '.nan'"},
      {"frames: 1.5\n", "bad.yaml: line 1: key 'frames': expected an integer, got '1.5'"},
      {"seed: -1\n", "bad.yaml: line 1: key 'seed': expected an integer >= 0, got '-1'"},
      // fuzz_settings: CLI11 reads integers base 0 (010 = octal 8, 099 refused with its own message): refused here
      // with the file and line.
      {"frames: 099\n", "bad.yaml: line 1: key 'frames': expected an integer, got '099' (write integers without "
                        "leading zeros)"},
      {"frames: -010\n", "key 'frames': expected an integer, got '-010' (write integers without leading zeros)"},
      {"seed: 007\n", "key 'seed': expected an integer >= 0, got '007' (write integers without leading zeros)"},
      // fuzz_settings: CLI11 takes "[...]" apart as a list, also when YAML quoted it as one text.
      {"lora: '[]'\n", "bad.yaml: line 1: key 'lora': a value written in brackets ('[]') would be taken apart as a "
                       "list by the command-line parser: write a list as a YAML sequence (lora: [a, b])"},
      {"prompt: \"[a, b]\"\n", "bad.yaml: line 1: key 'prompt': a value written in brackets ('[a, b]')"},
      {"seed: 99999999999999999999999\n", "key 'seed': expected an integer >= 0, got '99999999999999999999999'"},
      {"loop: maybe\n", "bad.yaml: line 1: key 'loop': expected true or false, got 'maybe'"},
      {"loop: [true]\n", "bad.yaml: line 1: key 'loop': expected true or false, got a list of 1"},
      {"prompt: [a, b]\n", "bad.yaml: line 1: key 'prompt': expected text, got a list of 2 (only repeatable options"},
      {"prompt:\n  - a\n", "bad.yaml: line 1: key 'prompt': expected text, got a list of 1"},
      {"prompt:\n", "bad.yaml: line 1: key 'prompt' has nothing as its value"},
      {"prompt: {text: a}\n", "bad.yaml: line 1: key 'prompt' has a mapping as its value"},
      {"lora: []\n", "bad.yaml: line 1: key 'lora': empty list"},
      {"lora:\n  - a\n  - [b, c]\n", "bad.yaml: line 3: key 'lora': list items must be plain values, got a list"},
      {"lora:\n  - a\n  - {b: 1}\n", "bad.yaml: line 3: key 'lora': list items must be plain values, got a mapping"},
      {"queue: 500\n", "bad.yaml: line 1: key 'queue': Value 500 not in range 1 to 64"},
      {"queue: many\n", "bad.yaml: line 1: key 'queue': expected an integer (INT in [1 - 64]), got 'many'"},
      {"prediction_type: eps\n", "bad.yaml: line 1: key 'prediction_type': eps not in {epsilon,v_prediction}"},
      {"seed: 1\nprompt: a\nseed: 2\n", "bad.yaml: line 3: key 'seed' is set twice (also on line 1)"},
      {"t_index_list: 1\nt-index-list: 2\n", "bad.yaml: line 2: key 't-index-list' is set twice (also on line 1)"},
      {"help: true\n", "bad.yaml: line 1: key 'help': cannot be set in a settings file"},
      {"config_file: other.yaml\n", "bad.yaml: line 1: unknown key 'config_file'"},
      {"- prompt: a\n", "bad.yaml: line 1: expected a mapping of option names to values (e.g. 'prompt: a cat'), got a list"},
      {"just text\n", "bad.yaml: line 1: expected a mapping of option names to values"},
      {"prompt: [unclosed\n", "bad.yaml: line 2: not valid YAML: end of sequence flow not found"},
      {"prompt: a\n  guidance: 1\n", "bad.yaml: line 2: not valid YAML:"},
      {"[a, b]: 1\n", "bad.yaml: line 1: a key must be an option name, got a list"},
      {"lora:\n  - a\n  - b\nguidance: [1, 2]\n", "bad.yaml: line 4: key 'guidance': expected a number, got a list"},
      {"lora:\n  - a\n  - b\nqueue: 8\nseed: x\n", "bad.yaml: line 5: key 'seed': expected an integer >= 0, got 'x'"},
  };
  for (const auto& [text, expected] : cases) {
    const std::string got = refusal(text);
    EXPECT_NE(got.find(expected), std::string::npos) << "file:\n" << text << "message: " << got;
  }
  // Accepted: an empty file, only comments, quoted text that looks like other types.
  EXPECT_EQ(refusal(""), "");
  EXPECT_EQ(refusal("# nothing\n"), "");
  EXPECT_EQ(refusal("prompt: \"\"\nt_index_list: '1'\n"), "");
}

// CLI11 alone reads integers base 0 and takes -1 for an unsigned option and nan for a number; the command line now
// refuses what a settings file refuses, so every command line's --dump-config loads back.
TEST_F(SettingsFile, TheCommandLineReadsNumbersAsTheFileDoes) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> refused = {
      {{"--seed", "0042"}, "--seed: expected a decimal integer >= 0, got '0042' (write integers without leading zeros"},
      {{"--seed", "-1"}, "--seed: expected a decimal integer >= 0, got '-1'"},
      {{"--seed", "0x10"}, "--seed: expected a decimal integer >= 0, got '0x10'"},
      {{"--frames", "-010"}, "--frames: expected a decimal integer, got '-010'"},
      {{"--guidance", "nan"}, "--guidance: expected a finite number, got 'nan'"},
      {{"--guidance", "inf"}, "--guidance: expected a finite number, got 'inf'"},
      {{"--lcm-guidance", "1e999"}, "--lcm-guidance: expected a finite number, got '1e999'"},
      {{"--clip-skip", "08"}, "--clip-skip: expected a decimal integer, got '08'"},
      {{"--queue", "08"}, "--queue: expected a decimal integer, got '08' (write integers without leading zeros"},
  };
  for (const auto& [args, expected] : refused) {
    Cli c;
    std::vector<std::string> argv{"stream", "-i", "x"};
    argv.insert(argv.end(), args.begin(), args.end());
    const std::string msg = test::error_of([&] { c.parse(argv); });
    EXPECT_NE(msg.find(expected), std::string::npos) << args[0] << " " << args[1] << ": " << msg;
  }
  // What both read the same is taken, and the dump of it loads back to the same values.
  Cli a;
  a.parse({"stream", "-i", "x", "--seed", "42", "--frames", "-3", "--guidance", "-0.5", "--lcm-guidance", "1e-3",
           "--queue", "+8"});
  EXPECT_EQ(a.v.seed, 42u);
  EXPECT_EQ(a.v.frames, -3);
  EXPECT_DOUBLE_EQ(a.v.lcm, 1e-3);
  EXPECT_EQ(a.v.queue, 8);
  Cli b;
  b.parse({"stream", "--config", write("dump.yaml", a.dumped())});
  EXPECT_TRUE(a.v == b.v) << a.dumped();
  // A validator of the option's own still has its say, and the help keeps the option's type name.
  Cli d;
  EXPECT_NE(test::error_of([&] { d.parse({"stream", "-i", "x", "--queue", "65"}); }).find("not in range 1 to 64"),
            std::string::npos);
  EXPECT_EQ(d.stream->get_option("--queue")->get_type_name(), "INT:INT in [1 - 64]");
  EXPECT_EQ(d.stream->get_option("--seed")->get_type_name(), "UINT");
}

TEST_F(SettingsFile, AMissingFileAndAFileWithoutACommandAreRefused) {
  Cli c;
  EXPECT_THROW(c.parse({"stream", "-i", "x", "--config", dir_ + "/missing.yaml"}), CLI::FileError);
  Cli d;
  const std::string msg = test::error_of([&] { d.parse({"--config", write("s.yaml", "seed: 1\n")}); });
  EXPECT_NE(msg.find("a settings file needs a command"), std::string::npos) << msg;
}

// The text parser alone (the fuzz target's entry point): positions and values, no CLI11.
TEST(SettingsYaml, ParsesKeysValuesAndLinesFromText) {
  const auto e = parse_settings_yaml("a: 1\n\nb:\n  - x\n  - 'y z'\nc: [p, q]\n", "t.yaml");
  ASSERT_EQ(e.size(), 3u);
  EXPECT_EQ(e[0].key, "a");
  EXPECT_EQ(e[0].values, std::vector<std::string>{"1"});
  EXPECT_EQ(e[0].line, 1);
  EXPECT_FALSE(e[0].list);
  EXPECT_EQ(e[1].line, 3);
  EXPECT_TRUE(e[1].list);
  EXPECT_EQ(e[1].values, (std::vector<std::string>{"x", "y z"}));
  EXPECT_EQ(e[1].value_lines, (std::vector<int>{4, 5}));
  EXPECT_EQ(e[2].values, (std::vector<std::string>{"p", "q"}));
  EXPECT_EQ(settings_option_name("t_index_list"), "t-index-list");
  EXPECT_EQ(settings_option_name("--t-index-list"), "t-index-list");
  EXPECT_EQ(settings_key("t-index-list"), "t_index_list");
  const std::string deep = std::string(5000, '[') + "\n";
  EXPECT_THROW(parse_settings_yaml(deep, "deep.yaml"), FormatError) << "yaml-cpp's depth guard, not a stack overflow";
}

}  // namespace
}  // namespace sd
