// Settings files through the built CLI: a txt2img settings file gives the image its flags give (the effective
// settings are the same, not just the dump), the dump of a real command loads back to itself, flags override the
// file, and a bad file stops the command with file, line, key and expected type before anything loads.
#include <filesystem>
#include <fstream>

#include <sys/wait.h>

#include <gtest/gtest.h>

#include "common/fixtures.h"

namespace sd {
namespace {

#ifdef SD_CLI_PATH
namespace fs = std::filesystem;

struct CliRun {
  int status = -1;
  std::string output;
};

CliRun sh(const std::string& cmd) {
  CliRun r;
  FILE* p = popen(("(" + cmd + ") 2>&1 < /dev/null").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) r.output.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

class CliSettings : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::fixture_exists("models/tiny-sd15")) GTEST_SKIP() << "fixture model tiny-sd15 not present";
    tmp_ = test::make_temp_dir("cli_settings");
    model_ = test::fixture_path("models/tiny-sd15");
  }
  void TearDown() override {
    if (!tmp_.empty()) fs::remove_all(tmp_);
  }
  std::string write(const std::string& name, const std::string& text) {
    const std::string path = tmp_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }
  const std::string cli_ = SD_CLI_PATH;
  std::string tmp_, model_;
};

TEST_F(CliSettings, ASettingsFileGivesTheImageItsFlagsGive) {
  const std::string flags = " --model '" + model_ + "' --size 64x64 --threads 1 --prompt 'a red fox' --seed 5 "
                            "--t-index-list 0,16 --guidance 1.3 --cfg-type self --delta 0.9";
  CliRun a = sh(cli_ + " txt2img" + flags + " -o " + tmp_ + "/a.png");
  ASSERT_EQ(a.status, 0) << a.output;
  const std::string file = write("fox.yaml", "model: '" + model_ +
                                                 "'\nsize: 64x64\nthreads: 1\nprompt: a red fox\nseed: 5\n"
                                                 "t_index_list: '0,16'\nguidance: 1.3\ncfg-type: self\ndelta: 0.9\n");
  CliRun b = sh(cli_ + " txt2img --config " + file + " -o " + tmp_ + "/b.png");
  ASSERT_EQ(b.status, 0) << b.output;
  EXPECT_EQ(slurp(tmp_ + "/a.png"), slurp(tmp_ + "/b.png")) << "the same effective settings";
  // A flag over the file changes the image (seed), and the dump says so.
  CliRun c = sh(cli_ + " txt2img --config " + file + " --seed 6 -o " + tmp_ + "/c.png");
  ASSERT_EQ(c.status, 0) << c.output;
  EXPECT_NE(slurp(tmp_ + "/a.png"), slurp(tmp_ + "/c.png"));
  CliRun d = sh(cli_ + " txt2img --config " + file + " --seed 6 -o x.png --dump-config");
  ASSERT_EQ(d.status, 0) << d.output;
  EXPECT_NE(d.output.find("\nseed: 6\n"), std::string::npos) << d.output;
  EXPECT_NE(d.output.find("\nprompt: \"a red fox\"\n"), std::string::npos) << d.output;
}

TEST_F(CliSettings, TheDumpOfARealCommandLoadsBackToItself) {
  const std::string file = write("live.yaml", "input: none\noutput: none\nprompt: a cat\nframes: 3\nloop: false\n"
                                              "lora: []\n");
  // An empty list is refused (leave the key out): the message names file, line and key.
  CliRun bad = sh(cli_ + " stream --config " + file);
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.output.find(file + ": line 6: key 'lora': empty list"), std::string::npos) << bad.output;

  write("live.yaml", "input: none\noutput: none\nprompt: a cat\nframes: 3\nloop: false\ncontrol: [none]\n"
                     "at: ['1:guidance 1.1', '2:seed 3']\n");
  CliRun d1 = sh(cli_ + " stream --config " + file + " --model '" + model_ + "' --dump-config");
  ASSERT_EQ(d1.status, 0) << d1.output;
  const std::string dump = write("dump.yaml", d1.output);
  CliRun d2 = sh(cli_ + " stream --config " + dump + " --dump-config");
  ASSERT_EQ(d2.status, 0) << d2.output;
  EXPECT_EQ(d1.output, d2.output);
  EXPECT_NE(d1.output.find("\nat:\n  - \"1:guidance 1.1\"\n  - \"2:seed 3\"\n"), std::string::npos) << d1.output;
  // `config --dump` is the same, and needs none of the run's required options.
  CliRun t = sh(cli_ + " config --dump stream");
  ASSERT_EQ(t.status, 0) << t.output;
  EXPECT_NE(t.output.find("\n# input:\n"), std::string::npos) << t.output;
  // And the dumped file runs.
  CliRun r = sh(cli_ + " stream --config " + dump + " --size 64x64 --threads 1 --status-interval 0");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("3 in, 3 out"), std::string::npos) << r.output;
}

TEST_F(CliSettings, BadFilesStopTheCommandWithFileLineKeyAndType) {
  const std::string file = write("bad.yaml", "prompt: a cat\nguidance: strong\n");
  CliRun r = sh(cli_ + " txt2img --config " + file + " -o " + tmp_ + "/x.png");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("error: " + file + ": line 2: key 'guidance': expected a number, got 'strong'"),
            std::string::npos)
      << r.output;
  write("bad.yaml", "prompt: a cat\nstrength: 0.5\n");
  r = sh(cli_ + " serve --config " + file);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("line 2: unknown key 'strength' for `streamdiffusion serve`"), std::string::npos) << r.output;
  r = sh(cli_ + " stream --input none --config " + tmp_ + "/missing.yaml");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("missing.yaml"), std::string::npos) << r.output;
  // --config DIR stays the model-config folder of single-file checkpoints (refused for a folder model, as before).
  r = sh(cli_ + " info --model '" + model_ + "' --config '" + model_ + "'");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("single-file"), std::string::npos) << r.output;
}
#endif

}  // namespace
}  // namespace sd
