// The emoji dataset reader: emoji.json parsing (clear errors for malformed files), captions, PNG compositing.
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <opencv2/imgcodecs.hpp>

#include "common/fixtures.h"
#include "core/error.h"
#include "train/emoji_dataset.h"

namespace fs = std::filesystem;

namespace {

std::string write(const std::string& dir, const std::string& name, const std::string& content) {
  const std::string p = dir + "/" + name;
  std::ofstream(p) << content;
  return p;
}

void expect_format_error(const std::string& path, const std::string& part) {
  try {
    sd::train::read_emoji_json(path, "google");
    ADD_FAILURE() << "no error for " << path;
  } catch (const sd::FormatError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(part), std::string::npos) << "expected '" << part << "' in: " << msg;
  }
}

TEST(EmojiDataset, ReadsEntriesAndCaptions) {
  const auto dir = sd::test::make_temp_dir("emoji");
  const auto p = write(dir, "emoji.json", R"([
    {"name": "GRINNING FACE", "short_name": "grinning", "short_names": ["grinning"], "image": "1f600.png",
     "category": "Smileys & Emotion", "subcategory": "face-smiling", "has_img_google": true},
    {"name": null, "short_name": "hidden_one", "image": "x.png", "has_img_google": false},
    {"name": "Egypt Flag", "short_names": ["flag-eg"], "image": "1f1ea-1f1ec.png", "has_img_google": true}
  ])");
  const auto e = sd::train::read_emoji_json(p, "google");
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(e[0].name, "grinning face");
  EXPECT_EQ(e[0].subcategory, "face smiling");
  EXPECT_EQ(e[1].short_names, std::vector<std::string>{"flag eg"});
  const auto c = sd::train::emoji_captions(e[0], "google");
  EXPECT_EQ(c.front(), "grinning face");
  const auto ct = sd::train::emoji_captions(e[0], "twitter");
  EXPECT_EQ(ct.front(), "grinning face, twitter style");
  EXPECT_EQ(sd::train::read_emoji_json(p, "").size(), 3u);
}

TEST(EmojiDataset, MalformedJsonGivesClearErrors) {
  const auto dir = sd::test::make_temp_dir("emoji_bad");
  expect_format_error(write(dir, "a.json", "{\"not\": \"an array\"}"), "expected a JSON array");
  expect_format_error(write(dir, "b.json", "[{\"name\": \"x\"}]"), "entry 0: missing the string field \"image\"");
  expect_format_error(write(dir, "c.json", "[{\"name\": 5, \"image\": \"a.png\"}]"), "\"name\" must be a string");
  expect_format_error(write(dir, "d.json", "[{\"image\": \"a.png\"}]"), "neither \"name\" nor \"short_name\"");
  expect_format_error(write(dir, "e.json", "[{\"name\": \"a\", \"image\": \"a.png\", \"short_names\": \"a\"}]"),
                      "\"short_names\" must be an array");
  expect_format_error(write(dir, "f.json", "[1, 2"), "");
  expect_format_error(write(dir, "g.json", "[]"), "no emoji entries");
  EXPECT_THROW(sd::train::load_emoji_dataset(dir + "/nowhere", {"google"}), sd::FormatError);
}

TEST(EmojiDataset, CompositesRgbaOntoWhite) {
  const auto dir = sd::test::make_temp_dir("emoji_png");
  cv::Mat m(64, 64, CV_8UC4, cv::Scalar(0, 0, 255, 0));        // BGRA red, fully transparent
  m(cv::Rect(0, 0, 32, 64)).setTo(cv::Scalar(0, 0, 255, 255));  // left half opaque red
  m(cv::Rect(32, 0, 16, 64)).setTo(cv::Scalar(255, 0, 0, 128)); // half-transparent blue
  ASSERT_TRUE(cv::imwrite(dir + "/x.png", m));
  const auto t = sd::train::load_emoji_image(dir + "/x.png", 64);  // [3, 64, 64] in [-1, 1]
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{3, 64, 64}));
  EXPECT_NEAR(t[0][10][10].item<float>(), 1.0, 1e-5);   // red
  EXPECT_NEAR(t[1][10][10].item<float>(), -1.0, 1e-5);
  EXPECT_NEAR(t[1][10][60].item<float>(), 1.0, 1e-5);   // transparent -> white
  EXPECT_NEAR(t[2][10][40].item<float>(), 1.0, 1e-5);   // blue over white
  EXPECT_NEAR(t[0][10][40].item<float>(), 2 * (1 - 128 / 255.0) - 1, 1e-4);
  EXPECT_THROW(sd::train::load_emoji_image(dir + "/missing.png"), sd::FormatError);
}

TEST(EmojiDataset, InstalledPackageLoads) {
  const auto data = sd::train::default_emoji_data_dir();
  if (!sd::train::emoji_data_available(data, "google"))
    GTEST_SKIP() << "emoji data not installed in " << data << " (run scripts/fetch-emoji-data.sh)";
  const auto ds = sd::train::load_emoji_dataset(data, {"google"}, 64, 20);
  EXPECT_EQ(ds.size(), 20);
  EXPECT_EQ(ds.images.sizes(), (std::vector<int64_t>{20, 3, 64, 64}));
  const auto all = sd::train::read_emoji_json(sd::train::emoji_package_dir(data, "google") + "/emoji.json", "google");
  std::cout << "  [emoji] " << all.size() << " google emoji in " << data << "\n";
  EXPECT_GT(all.size(), 1500u);
}

TEST(EmojiDataset, AdherencePairsAreTheTestsSelection) {
  const auto p = sd::train::adherence_pairs(1911);
  ASSERT_EQ(p.size(), 50u);
  for (size_t k = 0; k < p.size(); ++k) {
    EXPECT_EQ(p[k].first, static_cast<int64_t>(38 * k));  // every (1911 / 50)-th emoji
    EXPECT_NE(p[k].second, p[k].first);
    EXPECT_GE(p[k].second, 0);
    EXPECT_LT(p[k].second, 1911);
  }
  EXPECT_EQ(sd::train::adherence_pairs(1911), p);  // fixed seed
  EXPECT_EQ(sd::train::adherence_pairs(12).size(), 12u);
  EXPECT_TRUE(sd::train::adherence_pairs(1).empty());
  EXPECT_TRUE(sd::train::adherence_pairs(0).empty());
}

}  // namespace
