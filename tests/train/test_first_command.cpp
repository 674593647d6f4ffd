// A newcomer's first command, exactly as the README and `streamdiffusion` (no arguments) print it:
//   streamdiffusion txt2img --prompt "red apple" -o apple.png
// run in an empty folder with no other flag. It must write a 64x64 image (the built-in model's native size, not a
// 512x512 noise texture) that looks like the red-apple emoji: closer to it (L2 on 16x16 RGB, as the adherence test
// measures) than to the random other emoji the adherence test would pick, and closer than to most other emoji.
#include <cstdlib>
#include <filesystem>
#include <random>

#include <unistd.h>

#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>
#include <torch/torch.h>

#include "common/cli_run.h"
#include "train/emoji_dataset.h"

#ifndef SD_SOURCE_DIR
#define SD_SOURCE_DIR "."
#endif

namespace {

namespace fs = std::filesystem;

torch::Tensor small(const torch::Tensor& img_m11) {  // [3, H, W] in [-1, 1] -> [3, 16, 16] in [0, 1]
  const auto x = (img_m11.to(torch::kFloat32).clamp(-1, 1) + 1) / 2;
  return torch::adaptive_avg_pool2d(x.unsqueeze(0), {16, 16})[0];
}

double l2(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).pow(2).sum().sqrt().item<double>(); }

#ifdef SD_CLI_PATH
TEST(FirstCommand, RedAppleWithNoOtherFlag) {
  if (!fs::exists(std::string(SD_SOURCE_DIR) + "/models/emoji-tiny/model_index.json"))
    GTEST_SKIP() << "the built-in model is not in the source tree";
  const fs::path dir = fs::temp_directory_path() / ("sd_first_command_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const auto [status, out] = sd::test::run_command("cd '" + dir.string() + "' && '" SD_CLI_PATH
                                                   "' txt2img --prompt \"red apple\" -o apple.png");
  ASSERT_EQ(status, 0) << out;
  const cv::Mat img = cv::imread((dir / "apple.png").string(), cv::IMREAD_COLOR);
  ASSERT_FALSE(img.empty()) << out;
  EXPECT_EQ(img.cols, 64);
  EXPECT_EQ(img.rows, 64);

  const std::string data = sd::train::default_emoji_data_dir();
  if (!sd::train::emoji_data_available(data, "google")) {
    fs::remove_all(dir);
    GTEST_SKIP() << "size checked; emoji data not installed in " << data << " (scripts/fetch-emoji-data.sh)";
  }
  const std::string pkg = sd::train::emoji_package_dir(data, "google");
  const auto all = sd::train::read_emoji_json(pkg + "/emoji.json", "google");
  const std::string img_dir = pkg + "/img/google/64";
  const auto gen = small(sd::train::load_emoji_image((dir / "apple.png").string()));
  fs::remove_all(dir);

  int64_t apple = -1;
  for (size_t i = 0; i < all.size(); ++i)
    if (all[i].name == "red apple") apple = static_cast<int64_t>(i);
  ASSERT_GE(apple, 0) << "no 'red apple' in emoji.json";
  const double d_apple = l2(gen, small(sd::train::load_emoji_image(img_dir + "/" + all[apple].image)));
  // The adherence test's rule: one random other emoji (std::mt19937_64 seeded 12345).
  std::mt19937_64 rng(12345);
  int64_t other = apple;
  while (other == apple) other = static_cast<int64_t>(rng() % all.size());
  const double d_other = l2(gen, small(sd::train::load_emoji_image(img_dir + "/" + all[other].image)));
  // And against every emoji: the share of others farther away than the red apple.
  int64_t farther = 0;
  for (size_t i = 0; i < all.size(); ++i)
    if (static_cast<int64_t>(i) != apple &&
        l2(gen, small(sd::train::load_emoji_image(img_dir + "/" + all[i].image))) > d_apple)
      ++farther;
  const double share = static_cast<double>(farther) / static_cast<double>(all.size() - 1);
  std::cout << "  [first command] L2 16x16 to 'red apple' " << d_apple << ", to '" << all[other].name << "' "
            << d_other << "; farther than the red apple: " << farther << " of " << all.size() - 1 << " emoji ("
            << 100 * share << "%)\n";
  EXPECT_LT(d_apple, d_other);
  EXPECT_GE(share, 0.9);
}
#endif

}  // namespace
