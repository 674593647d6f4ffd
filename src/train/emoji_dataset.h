#pragma once
// The emoji training data: emoji.json + 64x64 PNGs of the npm packages emoji-datasource-<style> (google: Noto Emoji,
// MIT/Apache; twitter: Twemoji, CC-BY 4.0), installed by scripts/fetch-emoji-data.sh into a cache folder outside the
// repository. Images are RGBA and composited onto white; captions come from the names, short names and categories.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace sd::train {

struct EmojiEntry {
  std::string name;                      // "grinning face" (lower-cased "GRINNING FACE")
  std::vector<std::string> short_names;  // {"grinning"} ('_' and '-' become spaces)
  std::string category;                  // "smileys & emotion"
  std::string subcategory;               // "face smiling"
  std::string image;                     // "1f600.png"
};

// Reads an emoji-datasource emoji.json (array of objects with "name" or "short_name", "image", "category"...).
// Entries without an image for `style` (has_img_<style> false) are skipped; an empty style keeps all.
// FormatError naming the file and the entry index for malformed JSON or missing/ill-typed fields.
std::vector<EmojiEntry> read_emoji_json(const std::string& path, const std::string& style = "");

// Captions of one emoji, canonical first: "grinning face", then the short names, "grinning face, face smiling",
// "<name> emoji". A non-default style (anything but "google") appends ", <style> style" to each.
std::vector<std::string> emoji_captions(const EmojiEntry& e, const std::string& style);

// The cache folder holding node_modules/emoji-datasource-*: $SD_EMOJI_DATA, else
// ${XDG_CACHE_HOME:-$HOME/.cache}/streamdiffusion/emoji (what scripts/fetch-emoji-data.sh uses).
std::string default_emoji_data_dir();
// <data_dir>/node_modules/emoji-datasource-<style>
std::string emoji_package_dir(const std::string& data_dir, const std::string& style);
// True when emoji.json and the 64 px image folder of `style` exist under data_dir.
bool emoji_data_available(const std::string& data_dir, const std::string& style = "google");

// A PNG (RGBA or RGB) composited onto white, resized (area) to size x size: float32 [3, size, size] in [-1, 1].
// FormatError naming the file if it cannot be read.
torch::Tensor load_emoji_image(const std::string& png_path, int64_t size = 64);

struct EmojiDataset {
  std::vector<EmojiEntry> entries;    // per sample
  std::vector<std::string> styles;    // per sample
  torch::Tensor images;               // uint8 [N, 3, S, S] composited RGB
  int64_t size() const { return static_cast<int64_t>(entries.size()); }
  // float32 [B, 3, S, S] in [-1, 1] of the samples `idx` (int64 [B]).
  torch::Tensor batch(const torch::Tensor& idx) const;
  // All captions of sample i (emoji_captions of its entry and style).
  std::vector<std::string> captions(int64_t i) const;
};

// Loads every emoji of each style (in emoji.json order, styles one after the other). `limit` > 0 keeps only the
// first `limit` emoji per style (tiny runs). FormatError if a style's package or an image listed is missing.
EmojiDataset load_emoji_dataset(const std::string& data_dir, const std::vector<std::string>& styles,
                                int64_t image_size = 64, int64_t limit = 0);

// The emoji pairs prompt adherence is measured on (tests/train/test_emoji_adherence.cpp and the trainer's probe):
// sample i = 0, k, 2k, ... with k = max(1, n / 50), at most 50, each with a random other sample j != i drawn by
// std::mt19937_64 seeded 12345. Empty when n < 2.
std::vector<std::pair<int64_t, int64_t>> adherence_pairs(int64_t n);

}  // namespace sd::train
